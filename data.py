"""Image-caption data for MiniT2I, host side: sources -> decoded, cropped, tokenised batches.

Sources (mixed by weight): WebDataset tar shards, an image folder with .txt captions, a .jsonl manifest, or
`synthetic` shapes whose captions describe them. One producer thread walks each source's sample order (a pure
function of seed, epoch and process) and draws the source of every batch slot from (seed, batch index);
worker threads only read and decode, and their results are used in submission order. So batches never depend
on thread timing or worker count, and a small position (batches returned; per source, epoch and samples
consumed) resumes exactly: the resumed loader rebuilds the current epoch's order and drops what was consumed
(for tar shards that re-reads the headers, not the images, of shards used this epoch; exact if the files are
unchanged). Bad input is skipped, counted once by reason (in the first pass over a source) and the first
few named on stderr; a missing path or a source without a usable sample is a ValueError at start-up.

Multi-aspect training (buckets=aspect_buckets(S, p)): every image is cropped to the bucket shape nearest its
aspect ratio, and every batch holds one bucket. The bucket of batch b is drawn the same way on every process
from (seed, b) alone; each source stream then serves it from its samples read ahead (see _Stream.next).
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import io
import itertools
import json
import math
import os
import queue
import re
import sys
import tarfile
import threading

import numpy as np
from PIL import Image, ImageDraw, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption", "json")  # preferred in this order when a sample has several
MIN_SIDE = 8  # images with a shorter side below this are skipped
SHUFFLE_BUFFER = 1000
PREFETCH_BATCHES = 2
NAMED_SKIPS = 5  # skipped samples named in a warning; the rest are only counted
STARTUP_TRIES = 32  # samples tried per source at start-up before calling it unusable
CAPTION_SAMPLE = 50_000  # captions read per source at start-up (all of a smaller source)
READ_AHEAD = 16  # multi-aspect: samples a stream may hold back for other buckets, in batches
PROBE = 256  # multi-aspect: samples whose aspect ratios estimate a file source's bucket frequencies
_SYNTH, _EPOCH, _MIX, _BUCKET, _CAPTIONS = 0, 1, 2, 3, 4  # separate random streams under one seed
GOLDEN = (5**0.5 - 1) / 2


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the short category it is counted under."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------- images and captions

def load_image(src, image_size):
    """Bytes or a path -> (float32 [H, W, 3] in [-1, 1], whether it was upscaled), (H, W) = image_size (an int
    for a square): decode, apply the EXIF orientation, convert to RGB, resize to cover H x W (antialiased) and
    center-crop. Raises BadSample."""
    h_out, w_out = (image_size, image_size) if isinstance(image_size, int) else image_size
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            w, h = im.size
            # PIL raises above 2x its pixel limit but only warns above 1x; a warnings filter is not
            # thread-safe, so check the limit here and skip both.
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise BadSample("decompression bomb", f"{w}x{h} px")
            if min(w, h) < MIN_SIDE:
                raise BadSample("image too small", f"{w}x{h} px")
            im.draft("RGB", (w_out, h_out))  # JPEG: decode at 1/2..1/8 scale if that still covers the crop
            ImageOps.exif_transpose(im, in_place=True)
            im = to_rgb(im)
            w, h = im.size
            cw, ch = (h * w_out / h_out, h) if w * h_out >= h * w_out else (w, w * h_out / w_out)  # the crop
            box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)  # resize and crop in one resampling pass
            im = im.resize((w_out, h_out), Image.BICUBIC, box=box)
            return np.asarray(im, np.float32) / 127.5 - 1.0, cw < w_out
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("decompression bomb", str(e)) from None
    except Exception as e:  # PIL reports malformed files with many exception types
        raise BadSample("unreadable image", f"{type(e).__name__}: {e}") from None


def to_rgb(im):
    """Any PIL mode -> RGB. Transparency is composited over white; 16-bit grey keeps its top 8 bits (PIL's own
    conversion clips it to 255 instead)."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im if im.mode == "RGB" else im.convert("RGB")


def caption_field(meta):
    """The caption of a .json caption file or a manifest line: its "caption" or else its "text" string."""
    text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
    return text if isinstance(text, str) else None


def parse_caption(raw, ext):
    """Caption bytes (or text) -> stripped text; a .json caption holds it in its "caption" or "text" field."""
    try:
        text = raw if isinstance(raw, str) else raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadSample("caption not UTF-8", str(e)) from None
    if ext == "json":
        try:
            meta = json.loads(text)
        except ValueError as e:
            raise BadSample("unreadable caption", str(e)) from None
        text = caption_field(meta)
        if text is None:
            raise BadSample("missing caption", 'json without a "caption" or "text" string')
    if not text.strip():
        raise BadSample("empty caption")
    return text.strip()


# ----------------------------------------------------------------------------- aspect-ratio buckets

def aspect_buckets(size, patch, count=5, budget=0.1):
    """(height, width) shapes for multi-aspect training at size x size: multiples of `patch`, width / height
    within [1/2, 2], `count` ratios log-spaced from 1:2 to 2:1 (a tall one, square, a wide one...), each the
    patch grid nearest that ratio whose pixel count is within `budget` (+-10%) of size x size. Grids that
    small cannot all hit their ratio: at 32 px, patch 4, they are 24x44 (1.83:1), 28x40, 32x32 and transposes."""
    g = size // patch
    grids = [(r, c) for r in range(1, 2 * g + 1) for c in range(r // 2 + (r % 2), 2 * r + 1)
             if abs(r * c - g * g) <= budget * g * g]
    nearest = lambda k: min(grids, key=lambda rc: (abs(np.log2(rc[1] / rc[0]) - k), abs(rc[0] * rc[1] - g * g)))
    return list(dict.fromkeys((r * patch, c * patch) for r, c in map(nearest, np.linspace(-1, 1, count))))


# ----------------------------------------------------------------------------- synthetic shapes

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (140, 60, 190), "orange": (245, 135, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "blue": COLOURS["blue"]}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"center": (0.5, 0.5), "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
PLACES = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One synthetic image: `count` (1 or 2) same-coloured shapes; one object sits at `position`, two sit side
    by side. dx, dy and scale jitter the layout a little and are not in the caption."""
    shape: str
    colour: str
    background: str
    count: int = 1
    position: str = "center"
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0


def random_scene(rng):
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    dx, dy = rng.uniform(-0.04, 0.04, 2)
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))], colour=colour,
                 background=backgrounds[rng.integers(len(backgrounds))], count=1 + int(rng.integers(2)),
                 position=list(POSITIONS)[rng.integers(len(POSITIONS))], dx=float(dx), dy=float(dy),
                 scale=float(rng.uniform(0.9, 1.1)))


def describe(scene):
    """The caption of a scene, e.g. "two red circles on a white background"."""
    if scene.count == 2:
        return f"two {scene.colour} {scene.shape}s on a {scene.background} background"
    article = "an" if scene.colour[0] in "aeiou" else "a"
    return f"{article} {scene.colour} {scene.shape} {PLACES[scene.position]} on a {scene.background} background"


def render_scene(scene, height, width=None):
    """Scene -> float32 [height, width, 3] in [-1, 1] (width defaults to height); positions are fractions of
    the canvas, sizes of its shorter side. Drawn at 4x and box-downsampled for clean edges."""
    width = width or height
    im = Image.new("RGB", (4 * width, 4 * height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    if scene.count == 2:
        centres, r = [(0.27, 0.5), (0.73, 0.5)], 0.18
    else:
        centres, r = [POSITIONS[scene.position]], 0.21
    r, fill = r * scene.scale * 4 * min(height, width), COLOURS[scene.colour]
    for cx, cy in centres:
        x, y = (cx + scene.dx) * 4 * width, (cy + scene.dy) * 4 * height
        if scene.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill)
        elif scene.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill)
    return np.asarray(im.reduce(4), np.float32) / 127.5 - 1.0


def synthetic_captions():
    """Every caption the synthetic source can produce (414 of them), sorted."""
    layouts = [(1, p) for p in POSITIONS] + [(2, "center")]
    return sorted({describe(Scene(shape, colour, background, count, position)) for shape in SHAPES
                   for colour in COLOURS for background in BACKGROUNDS if background != colour
                   for count, position in layouts})


def nearest_colour(pixels, palette):
    """Index into palette (RGB triples, 0-255) of the colour nearest to each pixel [..., 3]."""
    return np.argmin(((pixels[..., None, :] - np.array(palette, np.float32)) ** 2).sum(-1), -1)


def regions(mask):
    """Label image of the 4-connected regions of a boolean mask [H, W]: each True pixel gets the smallest
    flat index in its region (spread one pixel per pass), False pixels get mask.size."""
    off = mask.size
    labels = np.where(mask, np.arange(off).reshape(mask.shape), off)
    while True:
        p = np.pad(labels, 1, constant_values=off)
        new = np.where(mask, np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), off)
        if (new == labels).all():
            return labels
        labels = new


def read_scene(image):
    """The inverse of describe(render_scene(...)): a Scene (its captioned fields) read from an image [S, S, 3]
    in [-1, 1], rendered or sampled, or None when it shows no one or two objects. The background is the
    palette colour nearest to the border's median; an object pixel is nearer to a shape colour than to the
    background; objects are regions of at least 2% of the image. The shape is read from the share of its
    bounding box an object fills (triangle 1/2, circle pi/4, square 1), the position from the box's centre
    (which the jitter moves by under 0.05, positions being 0.22 apart)."""
    pixels = (np.clip(np.asarray(image, np.float32), -1, 1) + 1) * 127.5
    S = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = list(BACKGROUNDS)[nearest_colour(np.median(border, 0), list(BACKGROUNDS.values()))]
    colours = [c for c in COLOURS if c != background]  # a shape never has its background's colour
    label = nearest_colour(pixels, [BACKGROUNDS[background]] + [COLOURS[c] for c in colours])  # [S, S], 0 = background
    objects = regions(label > 0)
    ids, sizes = np.unique(objects[label > 0], return_counts=True)
    big = ids[sizes >= 0.02 * S * S]  # specks of a shape colour (antialiased edges, sampling noise) are no objects
    if len(big) not in (1, 2):
        return None
    colour = colours[np.bincount(label[np.isin(objects, big)]).argmax() - 1]  # the objects' majority colour
    ys, xs = np.nonzero(objects == ids[sizes.argmax()])  # the largest object
    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / (box_h * box_w)
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.9 else "square"
    centre = np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / (2 * S)
    position = list(POSITIONS)[np.argmin([np.hypot(*(centre - p)) for p in POSITIONS.values()])]
    return Scene(shape, colour, background, len(big), "center" if len(big) == 2 else position)


def faithfulness(images, captions):
    """The share of images [N, S, S, 3] (in [-1, 1]) whose read-back scene has exactly their caption."""
    scenes = [read_scene(image) for image in images]
    return float(np.mean([s is not None and describe(s) == c for s, c in zip(scenes, captions)]))


# Captions the generator produces, spread over its vocabulary; train.py samples them to show progress.
SYNTHETIC_PROMPTS = [describe(Scene(*args)) for args in [
    ("circle", "red", "white"), ("square", "blue", "white", 1, "left"), ("triangle", "yellow", "black", 1, "top"),
    ("circle", "green", "gray", 2), ("square", "orange", "blue", 1, "right"), ("triangle", "purple", "white", 2),
    ("circle", "yellow", "blue", 1, "bottom"), ("square", "red", "black", 2)]]


# ----------------------------------------------------------------------------- file samples

@dataclasses.dataclass(frozen=True)
class Sample:
    """Where one image-caption pair lives. A part is (path, offset, size), offset None meaning the whole file;
    a caption may also be the text itself. `error` (reason, detail) marks a sample known bad when indexed."""
    name: str
    image: tuple = None
    caption: object = None
    caption_ext: str = "txt"
    error: tuple = None


def read_part(part):
    path, offset, size = part
    with open(path, "rb") as f:
        if offset is None:
            return f.read()
        f.seek(offset)
        return f.read(size)


def read_caption(sample):
    """Sample -> its caption text, reading nothing of the image; raises BadSample."""
    if sample.error:
        raise BadSample(*sample.error)
    if sample.caption is None:
        raise BadSample("missing caption")
    try:
        raw = sample.caption if isinstance(sample.caption, str) else read_part(sample.caption)
    except OSError as e:
        raise BadSample("missing caption", str(e)) from None
    return parse_caption(raw, sample.caption_ext)


def load_sample(sample, shape):
    """Sample -> (image, caption, upscaled), reading its files; raises BadSample. Runs on the worker threads."""
    caption = read_caption(sample)
    if sample.image is None:
        raise BadSample("missing image")
    try:
        data = read_part(sample.image)
    except OSError as e:
        raise BadSample("unreadable image", str(e)) from None
    image, upscaled = load_image(data, shape)
    return image, caption, upscaled


def index_tar(path):
    """A WebDataset shard -> its samples, from the tar headers alone. Members pair up by key (the name up to the
    first dot of its basename). A shard that is cut short or corrupt keeps the samples before the damage and
    gets one extra sample marking it, so the damage is counted like any bad sample."""
    parts, error = {}, None
    try:
        end = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.offset_data + m.size > end:
                    error = ("unreadable shard", f"{path} is cut short in {m.name}")
                    break
                if m.isfile():
                    folder, _, base = m.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    parts.setdefault(f"{folder}/{stem}", {})[ext.lower()] = (path, m.offset_data, m.size)
            stop = tar.offset
        if error is None:  # tarfile ends quietly at garbage or at the end of the file; a whole tar ends in zeros
            with open(path, "rb") as f:
                f.seek(stop)
                if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    error = ("unreadable shard", f"{path} is cut short or corrupt at byte {stop}")
    except (OSError, tarfile.TarError) as e:
        error = ("unreadable shard", f"{path}: {e}")
    samples = []
    for key, found in parts.items():
        image = next((found[e] for e in IMAGE_EXTS if e in found), None)
        ext = next((e for e in CAPTION_EXTS if e in found), "txt")
        samples.append(Sample(f"{path}:{key.lstrip('/')}", image, found.get(ext), ext))
    if error:
        samples.append(Sample(path, error=error))
    return samples


def scan_folder(root):
    """Every image under root (recursively, in sorted order) with its caption: the same-named .txt, .caption or
    .json beside it (the first found, in that order, as in tar shards)."""
    samples = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext[1:].lower() in IMAGE_EXTS:
                ext = next((e for e in CAPTION_EXTS if f"{stem}.{e}" in files), None)
                caption = ext and (os.path.join(folder, f"{stem}.{ext}"), None, None)
                path = os.path.join(folder, f)
                samples.append(Sample(path, (path, None, None), caption, ext or "txt"))
    return samples


def read_manifest(path):
    """A .jsonl manifest -> samples; image paths are relative to the manifest; a bad line is a bad sample."""
    samples = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = os.path.join(os.path.dirname(path), row["image"])
            except (ValueError, KeyError, TypeError) as e:
                samples.append(Sample(f"{path}:{n}", error=("bad manifest line", f"{type(e).__name__}: {e}")))
                continue
            samples.append(Sample(f"{path}:{n}", (image, None, None), caption_field(row)))
    return samples


def expand_braces(pattern):
    """'a/{00..02}.tar' -> ['a/00.tar', 'a/01.tar', 'a/02.tar']; also comma lists '{x,y}'."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    if span:
        a, b = span.groups()
        options = [str(i).zfill(len(a)) for i in range(int(a), int(b) + 1)]
    else:
        options = m.group(1).split(",")
    return [pattern[:m.start()] + o + rest for o in options for rest in expand_braces(pattern[m.end():])]


def shuffle_buffer(items, rng, size):
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.integers(size)
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


# ----------------------------------------------------------------------------- sources

class Synthetic:
    """Infinite shapes; sample i of process p is global sample i * process_count + p, so hosts never overlap.
    Each scene has its own canvas, one of the bucket shapes drawn uniformly."""

    def __init__(self, number, seed, shapes, process_index, process_count):
        self.name, self.number, self.seed, self.shapes = "synthetic", number, seed, shapes
        self.process_index, self.process_count = process_index, process_count
        self.frequencies = np.full(len(shapes), 1 / len(shapes))

    def samples(self, epoch, consumed):
        for i in itertools.count(consumed):
            yield epoch, i + 1, i * self.process_count + self.process_index

    def bucket(self, index):
        return int(np.random.default_rng([self.seed, _SYNTH, self.number, index, 1]).integers(len(self.shapes)))

    def load(self, index, shape):
        scene = random_scene(np.random.default_rng([self.seed, _SYNTH, self.number, index]))
        return render_scene(scene, *shape), describe(scene), False


class Files:
    """Samples from files, in an order reshuffled every epoch: units (tar shards, or single samples) in a
    random order, each unit's samples in a random order, through a shuffle buffer."""

    def __init__(self, name, units, expand, number, seed, shapes, frequencies):
        self.name, self.units, self.expand = name, units, expand
        self.number, self.seed, self.shapes, self.frequencies = number, seed, shapes, frequencies

    def epoch_order(self, epoch):
        rng = np.random.default_rng([self.seed, _EPOCH, self.number, epoch])

        def in_units():
            for u in rng.permutation(len(self.units)):
                found = self.expand(self.units[u])
                for j in rng.permutation(len(found)):
                    yield found[j]
        return shuffle_buffer(in_units(), rng, SHUFFLE_BUFFER)

    def samples(self, epoch, consumed):
        """(epoch, samples consumed once this one is, sample) from `consumed` samples into `epoch`, forever."""
        while True:
            n = 0
            for n, sample in enumerate(self.epoch_order(epoch), 1):
                if n > consumed:
                    yield epoch, n, sample
            if n == 0:
                raise ValueError(f"--data {self.name}: an epoch without a single sample")
            epoch, consumed = epoch + 1, 0

    def bucket(self, sample):
        """The bucket nearest the image's aspect ratio in log ratio, from its header (EXIF rotations applied)."""
        with Image.open(io.BytesIO(read_part(sample.image))) as im:
            w, h = im.size[::-1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size  # turned by 90
        return int(np.argmin([abs(math.log(w * bh / (h * bw))) for bh, bw in self.shapes]))

    def load(self, sample, shape):
        return load_sample(sample, shape)


def parse_sources(specs):
    """["path[:weight]", ...] -> [(path, weight)]; the weight (default 1) is split off only when it parses."""
    sources = []
    for spec in specs:
        path, weight = spec, 1.0
        head, _, tail = spec.rpartition(":")
        if head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--data {spec}: the weight must be a positive number")
        sources.append((path, weight))
    return sources


def open_source(path, number, seed, shapes, process_index=0, process_count=1):
    """A --data path -> a source holding this process's share: shards[process_index::process_count] for tar
    shards, the same split of the sample list for a folder or manifest. With several bucket shapes, their
    frequencies come from PROBE samples of the whole source, the same on every process (as for checkpoints,
    a shared filesystem is assumed)."""
    if path == "synthetic":
        return Synthetic(number, seed, shapes, process_index, process_count)
    expected = "expected .tar shards, a brace pattern of them, an image folder, a .jsonl manifest or 'synthetic'"
    shards = samples = None
    if "{" in path:
        shards = expand_braces(path)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise ValueError(f"--data {path}: {len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}")
    elif not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file or directory ({expected})")
    elif os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.tar"))) or None
        if shards is None:
            samples = scan_folder(path)
    elif path.endswith(".jsonl"):
        samples = read_manifest(path)
    elif path.endswith(".tar"):
        shards = [path]
    else:
        raise ValueError(f"--data {path}: unknown kind of file ({expected})")
    units, kind = (shards, "shards") if shards else (samples, "samples")
    if not units:
        raise ValueError(f"--data {path}: no images found ({expected}; a folder needs images with captions beside them)")
    mine = units[process_index::process_count]
    if not mine:
        raise ValueError(f"--data {path}: {len(units)} {kind} cannot be split over {process_count} processes")
    expand = index_tar if shards else lambda s: [s]
    source = Files(path, mine, expand, number, seed, shapes, np.ones(1))
    if len(shapes) > 1:
        counts = np.ones(len(shapes))  # plus one each: no bucket is never drawn
        order = np.random.default_rng([seed, _BUCKET, number]).permutation(len(units))
        for sample in itertools.islice((s for u in order for s in expand(units[u])), PROBE):
            with contextlib.suppress(Exception):  # bad samples are counted when read, not here
                counts[source.bucket(sample)] += 1
        source.frequencies = counts / counts.sum()
    return source


def check_usable(source):
    """Start-up check: the source yields a usable sample within its first few (bounded effort)."""
    problems = []
    for _, _, ref in itertools.islice(source.samples(0, 0), STARTUP_TRIES):
        try:
            source.load(ref, source.shapes[0])
            return
        except BadSample as e:
            problems.append(f"{ref.name}: {e}")
    raise ValueError(f"--data {source.name}: none of its first {len(problems)} samples is usable "
                     f"(first: {problems[0]})")


def read_captions(specs, seed=0, limit=CAPTION_SAMPLE):
    """The captions of every --data source, reading no image: all of a source's, or for one of more than
    `limit` samples those of a random subset of its shards (or samples). Returns (captions, complete)."""
    captions, complete = [], True
    for number, (path, _) in enumerate(parse_sources(specs or ["synthetic"])):
        source = open_source(path, number, seed, shapes=[None])  # one shape: no aspect ratio is probed
        if isinstance(source, Synthetic):
            captions += synthetic_captions()
            continue
        found, units = [], np.random.default_rng([seed, _CAPTIONS, number]).permutation(len(source.units))
        for n, u in enumerate(units, 1):
            for sample in source.expand(source.units[u]):
                try:
                    found.append(read_caption(sample))
                except BadSample:
                    pass  # counted when the loader meets it
            if len(found) >= limit:
                complete = complete and n == len(units)
                break
        if not found:
            raise ValueError(f"--data {path}: not one readable caption (expected .txt, .caption or .json captions "
                             "beside the images, or \"caption\" fields)")
        captions += found
    return captions, complete


# ----------------------------------------------------------------------------- the loader

class _Stream:
    """One source's samples in order, the next few already probed for their bucket on the worker pool, and
    per bucket the samples read ahead that wait for a batch of their shape."""

    def __init__(self, source, position, pool, depth, limit):
        self.source, self.pool, self.depth, self.limit = source, pool, depth, limit
        self.order = source.samples(position["epoch"], position["consumed"])
        self.position = {"epoch": position["epoch"], "consumed": position["consumed"]}
        self.good_epoch = position["epoch"]  # last epoch that gave a usable sample
        self.pending = collections.deque()
        self.waiting = [collections.deque((epoch, Sample(*r) if isinstance(r, list) else r) for epoch, r in refs)
                        for refs in position.get("waiting", [[]] * len(source.shapes))]  # (epoch, sample)

    def next(self, k):
        """(epoch, sample, future of its (image, caption, upscaled) cropped to bucket k): the oldest sample of
        bucket k read ahead, else the next ones in order (others wait for their buckets; the position moves past them). If
        `limit` samples wait already, the oldest of the longest queue is cropped to bucket k instead: the wait
        stays bounded and every sample is used once."""
        while not self.waiting[k]:
            if sum(map(len, self.waiting)) >= self.limit:
                self.waiting[k].append(max(self.waiting, key=len).popleft())
                break
            while len(self.pending) < self.depth:
                epoch, consumed, ref = next(self.order)
                probe = self.pool.submit(self.source.bucket, ref) if len(self.waiting) > 1 else None
                self.pending.append((epoch, consumed, ref, probe))
            epoch, consumed, ref, probe = self.pending.popleft()
            self.position = {"epoch": epoch, "consumed": consumed}
            bucket = k if probe is None or probe.exception() else probe.result()  # a bad sample fails in load
            self.waiting[bucket].append((epoch, ref))
        epoch, ref = self.waiting[k].popleft()
        return epoch, ref, self.pool.submit(self.source.load, ref, self.source.shapes[k])

    def state(self):
        """The position; with buckets also the samples waiting (a file sample as the list of its fields)."""
        as_json = lambda ref: list(dataclasses.astuple(ref)) if isinstance(ref, Sample) else ref
        waiting = [[[epoch, as_json(ref)] for epoch, ref in queue] for queue in self.waiting]
        return self.position | ({"waiting": waiting} if len(waiting) > 1 else {})


class Loader:
    """Iterator of batches {"images": float32 [B, S, S, 3] in [-1, 1], "ids", "mask": int32 [B, L],
    "captions": list of B str} mixed from weighted sources; with buckets (a list of (H, W), aspect_buckets)
    the images of each batch are [B, H, W, 3], one of the buckets. state() is this process's position after
    the last batch returned; pass it back as `state` to continue with unseen data. Close it (or use `with`).
    The tokenizer needs encode(texts, max_length) -> (ids, mask) and lengths(texts) -> untruncated token counts.
    Skipped samples, upscaled images and cut captions are counted once each, in a source's first pass."""

    def __init__(self, sources, image_size, batch_size, tokenizer, max_length, seed=0, process_index=0,
                 process_count=1, num_workers=None, state=None, buckets=None):
        specs = parse_sources(sources or ["synthetic"])
        shapes = [tuple(b) for b in buckets] if buckets else [(image_size, image_size)]
        self.sources = [open_source(path, i, seed, shapes, process_index, process_count)
                        for i, (path, _) in enumerate(specs)]
        for source in self.sources:
            check_usable(source)
        weights = np.array([w for _, w in specs])
        # P(source, bucket): source s fills its weight's share of the slots, in the proportions of its own
        # buckets, so that every source's stream is asked for each bucket about as often as it supplies it.
        self.joint = weights[:, None] / weights.sum() * np.array([s.frequencies for s in self.sources])
        self.bucket_cdf = np.cumsum(self.joint.sum(0)) / self.joint.sum()
        self.bucket_phase = np.random.default_rng([seed, _BUCKET]).random()
        state = state or {"batches": 0, "sources": [{"epoch": 0, "consumed": 0}] * len(specs), "skipped": {},
                          "upscaled": 0, "cut": 0}
        if len(state["sources"]) != len(specs):
            raise ValueError(f"data state has {len(state['sources'])} sources but --data gives {len(specs)}")
        if any(len(s.get("waiting", shapes)) != len(shapes) for s in state["sources"]):
            raise ValueError(f"data state is of another set of buckets than the {len(shapes)} given")
        self.batch_size, self.tokenizer, self.max_length = batch_size, tokenizer, max_length
        self.seed, self.image_size = seed, image_size
        self._state = {"upscaled": 0, "cut": 0} | json.loads(json.dumps(state))  # a position saved before the counts
        self.skip_reasons = collections.Counter(self._state["skipped"])
        num_workers = num_workers or min(8, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="data")
        self._streams = [_Stream(source, position, self._pool, 2 * num_workers + 2, READ_AHEAD * batch_size)
                         for source, position in zip(self.sources, self._state["sources"])]
        self._queue = queue.Queue(PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._state["batches"],), daemon=True)
        self._thread.start()

    @property
    def skipped(self):
        return sum(self.skip_reasons.values())

    def state(self):
        return json.loads(json.dumps(self._state))

    def summary(self):
        """One line: samples used, and what was skipped, upscaled or cut (each counted once)."""
        st = self._state
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skip_reasons.items()))
        return (f"data: {st['batches'] * self.batch_size} samples used; {self.skipped} skipped"
                f"{f' ({reasons})' if reasons else ''}; {st['upscaled']} images upscaled to {self.image_size} px; "
                f"{st['cut']} captions cut at {self.max_length} tokens")

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop.is_set():
            raise RuntimeError("the data loader is closed")
        item = self._queue.get()
        if isinstance(item, Exception):
            self.close()
            raise item
        batch, self._state = item
        self.skip_reasons = collections.Counter(self._state["skipped"])
        return batch

    def close(self):
        self._stop.set()
        self._pool.shutdown(cancel_futures=True)
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _produce(self, batches):
        """Producer thread: assemble batch after batch into the bounded queue; an error goes there too."""
        skipped = collections.Counter(self._state["skipped"])
        upscaled, cut = self._state["upscaled"], self._state["cut"]
        try:
            while not self._stop.is_set():
                # The same draws on every process, so synthetic positions and batch shapes agree across
                # processes. The bucket is frac(phase + b * golden ratio) through the buckets' cumulative
                # frequencies: each one's count of batches stays within a few of its share, where independent
                # draws would drift by sqrt(batches).
                k = int(np.searchsorted(self.bucket_cdf, (self.bucket_phase + batches * GOLDEN) % 1, side="right"))
                rng = np.random.default_rng([self.seed, _MIX, batches])
                p = self.joint[:, k] / self.joint[:, k].sum()
                picks = rng.choice(len(self._streams), size=self.batch_size, p=p)
                slots = [(self._streams[i], *self._streams[i].next(k)) for i in picks]  # all decoding at once
                samples = [self._next_usable(stream, k, skipped, *slot) for stream, *slot in slots]
                images, captions, scaled, first = zip(*samples)
                ids, mask = self.tokenizer.encode(captions, self.max_length)
                long = np.asarray(self.tokenizer.lengths(captions)) > self.max_length
                upscaled, cut = upscaled + sum(scaled), cut + int((long & np.array(first)).sum())
                batches += 1
                batch = {"images": np.stack(images), "ids": np.asarray(ids, np.int32),
                         "mask": np.asarray(mask, np.int32), "captions": list(captions)}
                state = {"batches": batches, "sources": [s.state() for s in self._streams], "skipped": dict(skipped),
                         "upscaled": upscaled, "cut": cut}
                self._put((batch, state))
        except Exception as e:
            self._put(e)

    def _next_usable(self, stream, k, skipped, epoch, ref, future):
        """(image, caption, upscaled in its first pass, first pass) of ref, or while that is bad, of the
        stream's next samples of bucket k."""
        while True:
            first = epoch == 0
            try:
                image, caption, upscaled = future.result()
            except BadSample as e:
                if first:  # a later pass meets the same bad files again: counted and named once
                    skipped[e.reason] += 1
                    n = sum(skipped.values())
                    if n <= NAMED_SKIPS:
                        more = "; further skipped samples are only counted" if n == NAMED_SKIPS else ""
                        print(f"data: skipped {ref.name} ({e}){more}", file=sys.stderr)
                if stream.position["epoch"] > stream.good_epoch + 1:
                    raise ValueError(f"--data {stream.source.name}: a whole epoch without a usable sample") from None
                epoch, ref, future = stream.next(k)
                continue
            stream.good_epoch = stream.position["epoch"]
            return image, caption, upscaled and first, first

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

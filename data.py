"""Image-caption data for MiniT2I, host side: a sample, the Loader and its per-source streams,
then sources, buckets, bad input and synthetic scenes. Batches never depend on thread timing: orders
are functions of (seed, epoch, process), a batch's bucket and sources of (seed, batch index), so a
small position (per source: epoch, samples taken, what waits in its buckets) resumes exactly."""

import collections
import collections.abc
import concurrent.futures
import contextlib
import glob
import io
import itertools
import json
import math
import os
import re
import sys
import tarfile

import numpy as np
from PIL import Image, ImageDraw, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption", "json")  # preferred in this order when a sample has several
READ_AHEAD = 16  # samples a stream may hold back for other buckets, in batches
NAMED_SKIPS = 5  # skipped samples named in a warning; the rest are only counted
_SYNTH, _EPOCH, _MIX, _BUCKET, _CAPTIONS = 0, 1, 2, 3, 4  # separate random streams under one seed

# ----------------------------------------------------------------------------- a sample

# Where one image-caption pair lives. A part is (path, offset, size), offset None for a whole file;
# a caption may also be the text itself; `error` (reason, detail) marks one known to be bad.
Sample = collections.namedtuple("Sample", "name image caption caption_ext error",
                                defaults=(None, None, "txt", None))

def load_sample(sample, shapes):
    """Sample -> (uint8 image at the nearest of shapes, upscaled, caption), on a worker thread."""
    caption = read_caption(sample)
    return (*load_image(image_file(sample), shapes), caption)

def read_caption(sample):
    """A sample's caption, reading nothing of its image."""
    if sample.error:
        raise BadSample(*sample.error)
    text = sample.caption
    try:
        if text is not None and not isinstance(text, str):
            text = read_part(text, "missing caption").decode("utf-8-sig")
        if text is not None and sample.caption_ext == "json":
            text = caption_field(json.loads(text))
            if text is None:
                raise BadSample("missing caption", 'json without a "caption" or "text" string')
    except ValueError as e:  # UnicodeDecodeError is one
        raise BadSample("caption not UTF-8" if isinstance(e, UnicodeDecodeError)
                        else "unreadable caption", str(e)) from None
    if text is None or not text.strip():
        raise BadSample("missing caption" if text is None else "empty caption")
    return text.strip()

def caption_field(meta):
    text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
    return text if isinstance(text, str) else None

def image_file(sample):
    """A sample's image for PIL: a whole file's path (PIL reads what it needs), a member's bytes."""
    if sample.image is None:
        raise BadSample("missing image")
    path, offset, _ = sample.image
    return path if offset is None else read_part(sample.image, "unreadable image")

def read_part(part, reason):
    """The bytes of a file or tar member; `reason` is what a failed read counts as."""
    path, offset, size = part
    try:
        with open(path, "rb") as f:
            f.seek(offset or 0)
            return f.read(size)
    except OSError as e:
        raise BadSample(reason, str(e)) from None

def load_image(src, shapes, decode=True):
    """Bytes or a path -> (uint8 [H, W, 3] RGB, upscaled), upright, center-cropped to the (H, W)
    of `shapes` (an int: a square) nearest its aspect ratio; decode=False: only that (H, W)."""
    shapes = [(shapes, shapes)] if isinstance(shapes, int) else shapes
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            w, h = im.size
            # PIL only warns from 1x to 2x its pixel limit (warnings filters are not thread-safe)
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise BadSample("decompression bomb", f"{w}x{h} px")
            if min(w, h) < 8:
                raise BadSample("image too small", f"{w}x{h} px")
            exif = Image.Exif()  # the header's own: PNG's getexif() decodes the image for more
            exif.load(im.info.get("exif", b""))
            turned = exif.get(0x0112, 1) in (5, 6, 7, 8)  # orientations turned by 90 degrees
            w, h = (h, w) if turned else (w, h)
            shape = min(shapes, key=lambda s: abs(math.log(w * s[0] / (h * s[1]))))
            if not decode:
                return shape
            # JPEG: decode at 1/2..1/8 scale where that still covers the crop (stored orientation)
            im.draft("RGB", shape if turned else shape[::-1])
            ImageOps.exif_transpose(im, in_place=True)
            return crop(to_rgb(im), shape)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("decompression bomb", str(e)) from None
    except Exception as e:  # PIL reports malformed files with many exception types
        raise BadSample("unreadable image", f"{type(e).__name__}: {e}") from None

def crop(im, shape):
    """RGB image -> (uint8 [H, W, 3], upscaled): its centered crop of ratio W:H, resized."""
    (h_out, w_out), (w, h) = shape, im.size
    cw, ch = (h * w_out / h_out, h) if w * h_out >= h * w_out else (w, w * h_out / w_out)
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return np.asarray(im.resize((w_out, h_out), Image.BICUBIC, box=box)), cw < w_out

def to_rgb(im):
    """Any PIL mode -> RGB over white; 16-bit grey keeps its top 8 bits (PIL would clip at 255)."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255,) * 4), im.convert("RGBA"))
    return im if im.mode == "RGB" else im.convert("RGB")

# ----------------------------------------------------------------------------- samples to batches

class Loader(collections.abc.Iterator, contextlib.AbstractContextManager):
    """Batches {"images": float32 [B, H, W, 3] in [-1, 1], "ids", "mask": int32 [B, L], "captions"}
    from weighted --data sources, each of one of `buckets` (H, W) (default: an image_size square).
    Processes share `frequencies` (process 0's bucket_table). state(): the position to pass back as
    `state`. The tokenizer: encode(texts, max_length) -> (ids, mask), lengths(texts) -> counts."""

    def __init__(self, sources, image_size, batch_size, tokenizer, max_length, seed=0,
                 process_index=0, process_count=1, num_workers=None, state=None, buckets=None,
                 frequencies=None):
        specs = parse_sources(sources or ["synthetic"])
        shapes = [tuple(b) for b in buckets] if buckets else [(image_size, image_size)]
        if frequencies is None and process_count > 1 and len(shapes) > 1:
            raise ValueError("several processes need process 0's bucket_table as `frequencies`")
        opened = [check_usable(open_source(path, i, seed, process_index, process_count), shapes)
                  for i, (path, _) in enumerate(specs)]
        weights = np.array([w for _, w in specs])
        # P(source, bucket): each source fills its weight's share of the slots in the proportions
        # of its own buckets, so that a stream is asked for a bucket about as often as it has one.
        self.joint = weights[:, None] / weights.sum() * np.asarray(
            bucket_table(sources, seed, shapes) if frequencies is None else frequencies)
        self.bucket_cdf = np.cumsum(self.joint.sum(0)) / self.joint.sum()
        self.bucket_phase = np.random.default_rng([seed, _BUCKET]).random()
        self.shapes, self.batch_size, self.seed = shapes, batch_size, seed
        self.image_size, self.tokenizer, self.max_length = image_size, tokenizer, max_length
        fresh = {"batches": 0, "sources": [{"epoch": 0, "consumed": 0}] * len(specs), "skipped": {}}
        self._state = st = {"upscaled": 0, "cut": 0} | json.loads(json.dumps(state or fresh))
        positions = st["sources"]
        if len(positions) != len(specs):
            raise ValueError(f"data state has {len(positions)} sources; --data gives {len(specs)}")
        if any(len(p.get("waiting", shapes)) != len(shapes) for p in positions):
            raise ValueError(f"data state is of another set of buckets than these {len(shapes)}")
        self.skip_reasons = collections.Counter(st["skipped"])
        self._skipped = self.skip_reasons.copy()  # ahead: counted as the next batches are read
        self._planned, self.closed = collections.deque(), False
        workers = num_workers or min(8, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="data")
        # file reads in flight 2 x workers + 2, so that the pool never waits
        self._streams = [Stream(source, shapes, position, self._pool, 2 * workers + 2,
                                READ_AHEAD * batch_size, self._skip)
                         for source, position in zip(opened, positions)]

    def __next__(self):
        if self.closed:
            raise RuntimeError("the data loader is closed")
        st = self._state
        while len(self._planned) <= 2:  # the reads of the next two batches are under way too
            self._planned.append(self._plan(st["batches"] + len(self._planned)))
        k, slots, positions, skipped = self._planned.popleft()
        images, scaled, captions = zip(*(future.result() for _, future in slots))
        first = np.array([epoch == 0 for epoch, _ in slots])  # later passes meet the same files
        ids, mask = self.tokenizer.encode(captions, self.max_length)
        long = np.asarray(self.tokenizer.lengths(captions)) > self.max_length
        st |= {"batches": st["batches"] + 1, "sources": positions, "skipped": skipped,
               "upscaled": st["upscaled"] + int((np.array(scaled) & first).sum()),
               "cut": st["cut"] + int((long & first).sum())}
        self.skip_reasons = collections.Counter(skipped)
        shape = self.shapes[k]  # a sample served to another bucket than its own is recropped
        images = np.stack([image if image.shape[:2] == shape else
                           crop(Image.fromarray(image), shape)[0] for image in images])
        return {"images": images.astype(np.float32) / 127.5 - 1.0,
                "ids": np.asarray(ids, np.int32), "mask": np.asarray(mask, np.int32),
                "captions": list(captions)}

    def _plan(self, b):
        """Batch b's bucket k, slots [(epoch, future)], the position after it, by (seed, b) alone:
        frac(phase + b * golden ratio) through the bucket frequencies (i.i.d. strays by sqrt(b))."""
        u = (self.bucket_phase + b * (5**0.5 - 1) / 2) % 1
        k = int(np.searchsorted(self.bucket_cdf, u, side="right"))
        p = self.joint[:, k] / self.joint[:, k].sum()
        picks = np.random.default_rng([self.seed, _MIX, b]).choice(len(p), self.batch_size, p=p)
        slots = [self._streams[i].take(k) for i in picks]
        return k, slots, [s.state() for s in self._streams], dict(self._skipped)

    def _skip(self, sample, error):
        self._skipped[error.reason] += 1
        n = sum(self._skipped.values())
        if n <= NAMED_SKIPS:
            more = "; further skipped samples are only counted" if n == NAMED_SKIPS else ""
            print(f"data: skipped {sample.name} ({error}){more}", file=sys.stderr)

    def state(self):
        return json.loads(json.dumps(self._state))

    def summary(self):
        """One line: samples used, and what was skipped, upscaled or cut (each counted once)."""
        st, skipped = self._state, self.skip_reasons
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        return (f"data: {st['batches'] * self.batch_size} samples used; {sum(skipped.values())} "
                f"skipped{f' ({reasons})' if reasons else ''}; {st['upscaled']} images upscaled "
                f"to {self.image_size} px; {st['cut']} captions cut at {self.max_length} tokens")

    def __exit__(self, *exc):
        self.closed = True
        self._pool.shutdown(cancel_futures=True)

class Stream:
    """One source's samples in order, read `depth` ahead on the pool, each waiting in its bucket's
    queue for a batch of its shape (a bad one goes to `skip`); a scene is drawn as asked."""

    def __init__(self, source, shapes, position, pool, depth, limit, skip):
        self.source, self.shapes, self.pool, self.depth, self.limit, self.skip = (
            source, shapes, pool, depth, limit, skip)
        self.position = {"epoch": position["epoch"], "consumed": position["consumed"]}
        self.good_epoch = position["epoch"]  # the last epoch that gave a usable sample
        self.order = None if isinstance(source, Synthetic) else source.samples(**self.position)
        self.reading = collections.deque()  # (epoch, consumed, sample, future of its read)
        self.queues = [collections.deque() for _ in shapes]  # (epoch, sample, future) per bucket
        waited = [(e, Sample(*ref)) for queue in position.get("waiting", []) for e, ref in queue]
        for epoch, ref, future in [(e, r, pool.submit(load_sample, r, shapes)) for e, r in waited]:
            self._queue(epoch, ref, future)

    def take(self, k):
        """(epoch, future of (image, upscaled, caption)), the next sample for bucket k; once `limit`
        wait, the oldest of the longest queue (recropped): bounded, each sample served once."""
        if isinstance(self.source, Synthetic):
            index = self.position["consumed"]
            self.position["consumed"] += 1
            return self.position["epoch"], self.pool.submit(self.source.read, index, self.shapes[k])
        while not self.queues[k] and sum(map(len, self.queues)) < self.limit:
            while len(self.reading) < self.depth:  # the next samples in order, read on the pool
                item = next(self.order)  # (epoch, consumed, sample)
                self.reading.append((*item, self.pool.submit(load_sample, item[2], self.shapes)))
            epoch, consumed, ref, future = self.reading.popleft()
            self.position = {"epoch": epoch, "consumed": consumed}
            if self._queue(epoch, ref, future):
                self.good_epoch = epoch
            elif epoch > self.good_epoch + 1:
                raise ValueError(f"--data {self.source.name}: a whole epoch without a usable"
                                 " sample")
        epoch, _, future = (self.queues[k] or max(self.queues, key=len)).popleft()
        return epoch, future

    def _queue(self, epoch, ref, future):
        """Puts a read sample in its bucket's queue; False for a bad one."""
        try:
            image = future.result()[0]
        except BadSample as e:
            if epoch == 0:
                self.skip(ref, e)
            return False
        self.queues[self.shapes.index(image.shape[:2])].append((epoch, ref, future))
        return True

    def state(self):
        """The position; under buckets also the samples waiting, each as its fields."""
        waiting = [[[epoch, list(ref)] for epoch, ref, _ in queue] for queue in self.queues]
        return self.position | ({"waiting": waiting} if len(waiting) > 1 else {})

# ----------------------------------------------------------------------------- sources

def parse_sources(specs):
    """["path[:weight]", ...] -> [(path, weight)]; a weight (default 1) is split off if numeric."""
    sources = []
    for spec in specs:
        path, weight = spec, 1.0
        head, _, tail = spec.rpartition(":")
        if head:
            with contextlib.suppress(ValueError):
                path, weight = head, float(tail)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--data {spec}: the weight must be a positive number")
        sources.append((path, weight))
    return sources

def open_source(path, number, seed, process_index=0, process_count=1):
    """A --data path -> this process's share, units[process_index::process_count] of its units."""
    if path == "synthetic":
        return Synthetic(number, seed, process_index, process_count)
    expected = "expected .tar shards, a brace pattern of them, an image folder, a .jsonl manifest"
    if "{" in path:
        units = expand_braces(path)
        missing = [s for s in units if not os.path.isfile(s)]
        if missing:
            raise ValueError(f"--data {path}: {len(missing)} of {len(units)} shards do not exist,"
                             f" e.g. {missing[0]}")
    elif not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file or directory ({expected} or 'synthetic')")
    elif os.path.isdir(path):
        units = sorted(glob.glob(os.path.join(path, "*.tar"))) or scan_folder(path)
    elif path.endswith((".jsonl", ".tar")):
        units = read_manifest(path) if path.endswith(".jsonl") else [path]
    else:
        raise ValueError(f"--data {path}: unknown kind of file ({expected} or 'synthetic')")
    if not units:
        raise ValueError(f"--data {path}: no images found ({expected}; a folder needs images with"
                         " captions beside them)")
    mine = units[process_index::process_count]
    if not mine:
        kind = "shards" if isinstance(units[0], str) else "samples"
        raise ValueError(f"--data {path}: {len(units)} {kind} cannot be split over {process_count}"
                         " processes")
    return Files(path, mine, number, seed)

class Files(collections.namedtuple("Files", "name units number seed")):
    """Samples from files, reshuffled each epoch: units (shards or samples), then within each."""

    def samples(self, epoch, consumed):
        """(epoch, samples consumed once this one is, sample) from `consumed` into `epoch`, on."""
        while True:
            rng = np.random.default_rng([self.seed, _EPOCH, self.number, epoch])
            in_units = (unit[j] for unit in self.shuffled(rng) for j in rng.permutation(len(unit)))
            n = 0
            for n, sample in enumerate(shuffle_buffer(in_units, rng, 1000), 1):
                if n > consumed:
                    yield epoch, n, sample
            if n == 0:
                raise ValueError(f"--data {self.name}: an epoch without a single sample")
            epoch, consumed = epoch + 1, 0

    def shuffled(self, rng):
        """Each unit's samples (a tar shard's from its headers), the units in a random order."""
        return (index_tar(self.units[u]) if isinstance(self.units[u], str) else [self.units[u]]
                for u in rng.permutation(len(self.units)))

def shuffle_buffer(items, rng, size):
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
        else:
            j = rng.integers(size)
            yield buffer[j]
            buffer[j] = item
    yield from (buffer[j] for j in rng.permutation(len(buffer)))

class Synthetic(collections.namedtuple("Synthetic", "number seed process_index process_count")):
    """Endless scenes, each drawn at the shape asked for."""

    def read(self, i, shape):
        index = i * self.process_count + self.process_index  # hosts never draw the same scene
        scene = random_scene(np.random.default_rng([self.seed, _SYNTH, self.number, index]))
        pixels = np.round((render_scene(scene, *shape) + 1) * 127.5).astype(np.uint8)  # exact
        return pixels, False, describe(scene)

def index_tar(path):
    """A WebDataset shard -> its samples from the tar headers, paired by key (the name up to the
    basename's first dot). A damaged shard keeps the samples before the damage and a bad one."""
    parts, error = {}, None
    try:
        end = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile() and m.offset_data + m.size <= end:  # one cut short fails below
                    folder, _, base = m.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    part = (path, m.offset_data, m.size)
                    parts.setdefault(f"{folder}/{stem}", {})[ext.lower()] = part
            stop = tar.offset
        with open(path, "rb") as f:  # tarfile stops quietly at damage; a whole tar ends in zeros
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
    return samples + ([Sample(path, error=error)] if error else [])

def scan_folder(root):
    """Every image under root, sorted, with the first of its same-named CAPTION_EXTS beside it."""
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
    """A .jsonl manifest -> samples; image paths are relative to it; a bad line is a bad sample."""
    samples = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    image = (os.path.join(os.path.dirname(path), row["image"]), None, None)
                    samples.append(Sample(f"{path}:{n}", image, caption_field(row)))
                except (ValueError, KeyError, TypeError) as e:
                    error = ("bad manifest line", f"{type(e).__name__}: {e}")
                    samples.append(Sample(f"{path}:{n}", error=error))
    return samples

def expand_braces(pattern):
    """'a/{00..02}.tar' -> ['a/00.tar', 'a/01.tar', 'a/02.tar']; also comma lists '{x,y}'."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", m[1])
    options = ([str(i).zfill(len(span[1])) for i in range(int(span[1]), int(span[2]) + 1)]
               if span else m[1].split(","))
    rests = expand_braces(pattern[m.end():])
    return [pattern[:m.start()] + o + rest for o in options for rest in rests]

def read_captions(specs, seed=0, limit=50_000):
    """The captions of every --data source, reading no image: all of a source's, or of one of more
    than `limit` samples those of a random subset of its units. -> (captions, whether all)."""
    captions, complete = [], True
    for number, (path, _) in enumerate(parse_sources(specs or ["synthetic"])):
        source = open_source(path, number, seed)
        if isinstance(source, Synthetic):
            captions += synthetic_captions()
            continue
        found = []
        units = source.shuffled(np.random.default_rng([seed, _CAPTIONS, number]))
        for n, samples in enumerate(units, 1):
            for sample in samples:
                with contextlib.suppress(BadSample):  # counted when the loader meets it
                    found.append(read_caption(sample))
            if len(found) >= limit:
                complete = complete and n == len(source.units)
                break
        if not found:
            raise ValueError(f"--data {path}: not one readable caption (expected .txt, .caption or"
                             " .json captions beside the images, or \"caption\" fields)")
        captions += found
    return captions, complete

# ----------------------------------------------------------------------------- aspect-ratio buckets

def bucket_table(specs, seed, shapes):
    """float [sources, buckets]: each source's share of images nearest each bucket, from 256
    headers, plus one: every bucket is drawn (scenes: uniform). Made on process 0 for all."""
    sources = parse_sources(specs or ["synthetic"])
    table = np.ones((len(sources), len(shapes)))
    for number, (path, _) in enumerate(sources):
        source = open_source(path, number, seed)
        if isinstance(source, Files) and len(shapes) > 1:
            units = source.shuffled(np.random.default_rng([seed, _BUCKET, number]))
            for sample in itertools.islice(itertools.chain.from_iterable(units), 256):
                with contextlib.suppress(BadSample):  # counted when the loader meets it
                    shape = load_image(image_file(sample), shapes, decode=False)
                    table[number, shapes.index(shape)] += 1
    return table / table.sum(1, keepdims=True)

# ----------------------------------------------------------------------------- bad input

class BadSample(Exception):
    """A sample that cannot be used; `reason` is the short category it is counted under."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason

def check_usable(source, shapes):
    """Start-up: -> source if one of its first 32 samples has a caption and an image header."""
    if isinstance(source, Synthetic):
        return source
    problems = []
    for _, _, sample in itertools.islice(source.samples(0, 0), 32):
        try:
            read_caption(sample)
            load_image(image_file(sample), shapes, decode=False)
            return source
        except BadSample as e:
            problems.append(f"{sample.name}: {e}")
    raise ValueError(f"--data {source.name}: none of its first {len(problems)} samples is usable "
                     f"(first: {problems[0]})")

# ----------------------------------------------------------------------------- synthetic scenes

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (140, 60, 190), "orange": (245, 135, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
               "blue": COLOURS["blue"]}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"center": (0.5, 0.5), "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28),
             "bottom": (0.5, 0.72)}
PLACES = {"center": "in the center", "left": "on the left", "right": "on the right",
          "top": "at the top", "bottom": "at the bottom"}

# One synthetic image: `count` (1 or 2) same-coloured shapes; one object sits at `position`, two
# side by side. dx, dy and scale jitter the layout a little and are not in the caption.
Scene = collections.namedtuple("Scene", "shape colour background count position dx dy scale",
                               defaults=(1, "center", 0.0, 0.0, 1.0))

def random_scene(rng):
    pick = lambda options: list(options)[rng.integers(len(options))]
    colour = pick(COLOURS)
    dx, dy = rng.uniform(-0.04, 0.04, 2)
    return Scene(pick(SHAPES), colour, pick([b for b in BACKGROUNDS if b != colour]),
                 1 + int(rng.integers(2)), pick(POSITIONS), float(dx), float(dy),
                 float(rng.uniform(0.9, 1.1)))

def describe(scene):
    if scene.count == 2:
        return f"two {scene.colour} {scene.shape}s on a {scene.background} background"
    article = "an" if scene.colour[0] in "aeiou" else "a"
    return (f"{article} {scene.colour} {scene.shape} {PLACES[scene.position]} on a "
            f"{scene.background} background")

def render_scene(scene, height, width=None):
    """Scene -> float32 [height, width, 3] in [-1, 1] (width defaults to height); positions are
    fractions of the canvas, sizes of its shorter side. Drawn at 4x and box-downsampled."""
    width = width or height
    im = Image.new("RGB", (4 * width, 4 * height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    centres = [(0.27, 0.5), (0.73, 0.5)] if scene.count == 2 else [POSITIONS[scene.position]]
    r = (0.18 if scene.count == 2 else 0.21) * scene.scale * 4 * min(height, width)
    for cx, cy in centres:
        x, y = (cx + scene.dx) * 4 * width, (cy + scene.dy) * 4 * height
        box, fill = (x - r, y - r, x + r, y + r), COLOURS[scene.colour]
        if scene.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill)
        else:  # a circle or a square filling the same box
            (draw.ellipse if scene.shape == "circle" else draw.rectangle)(box, fill)
    return np.asarray(im.reduce(4), np.float32) / 127.5 - 1.0

def synthetic_captions():
    """Every caption the synthetic source can produce (414 of them), sorted."""
    layouts = [(1, p) for p in POSITIONS] + [(2, "center")]
    return sorted({describe(Scene(shape, colour, background, count, position)) for shape in SHAPES
                   for colour in COLOURS for background in BACKGROUNDS if background != colour
                   for count, position in layouts})

# Captions the generator produces, spread over its vocabulary; train.py shows progress on them.
SYNTHETIC_PROMPTS = [describe(Scene(*args)) for args in [
    ("circle", "red", "white"), ("square", "blue", "white", 1, "left"),
    ("triangle", "yellow", "black", 1, "top"), ("circle", "green", "gray", 2),
    ("square", "orange", "blue", 1, "right"), ("triangle", "purple", "white", 2),
    ("circle", "yellow", "blue", 1, "bottom"), ("square", "red", "black", 2)]]

def nearest_colour(pixels, palette):  # index into palette (RGB, 0-255) for each pixel [..., 3]
    return np.argmin(((pixels[..., None, :] - np.array(palette, np.float32)) ** 2).sum(-1), -1)

def regions(mask):
    """Label image of the 4-connected regions of a boolean mask [H, W]: each True pixel gets the
    smallest flat index in its region (spread one pixel per pass), False pixels get mask.size."""
    off = mask.size
    labels = np.where(mask, np.arange(off).reshape(mask.shape), off)
    while True:
        p = np.pad(labels, 1, constant_values=off)
        neighbours = [labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]
        new = np.where(mask, np.minimum.reduce(neighbours), off)
        if (new == labels).all():
            return labels
        labels = new

def read_scene(image):
    """describe(render_scene(...)) inverted: the captioned Scene of [S, S, 3] in [-1, 1], or None
    unless it shows one or two objects (regions of 2% of it). A shape is told by the share of its
    box it fills (triangle 1/2, circle pi/4, square 1), a position by the box's centre."""
    pixels = (np.clip(np.asarray(image, np.float32), -1, 1) + 1) * 127.5
    S = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = list(BACKGROUNDS)[nearest_colour(np.median(border, 0), list(BACKGROUNDS.values()))]
    colours = [c for c in COLOURS if c != background]  # a shape never has its background's colour
    palette = [BACKGROUNDS[background]] + [COLOURS[c] for c in colours]
    label = nearest_colour(pixels, palette)  # [S, S], 0 = background
    objects = regions(label > 0)
    ids, sizes = np.unique(objects[label > 0], return_counts=True)
    big = ids[sizes >= 0.02 * S * S]  # specks (antialiased edges, sampling noise) are no objects
    if len(big) not in (1, 2):
        return None
    colour = colours[np.bincount(label[np.isin(objects, big)]).argmax() - 1]  # the majority colour
    ys, xs = np.nonzero(objects == ids[sizes.argmax()])  # the largest object
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))  # of its box
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.9 else "square"
    centre = np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / (2 * S)
    position = list(POSITIONS)[np.argmin([np.hypot(*(centre - p)) for p in POSITIONS.values()])]
    return Scene(shape, colour, background, len(big), "center" if len(big) == 2 else position)

def faithfulness(images, captions):
    """The share of images [N, S, S, 3] (in [-1, 1]) whose read-back scene has its exact caption."""
    scenes = [read_scene(image) for image in images]
    return float(np.mean([s is not None and describe(s) == c for s, c in zip(scenes, captions)]))

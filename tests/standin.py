"""A user-like stand-in folder the code did not make, a judge for it, and a run's samples scored by
the judge: run as a script (pytest does not collect it).

    python tests/standin.py write FOLDER      # ten classes, 1,800 images with captions beside them
    python train.py --data FOLDER --out RUN
    python tests/standin.py evaluate RUN      # per guidance: accuracy, variety, coverage, copying, seams

The classes are six photograph-like textures and four glyphs in the machine's fonts, one sub-folder
each (the label; train.py reads only the captions). The judge is a small MLP on colour, gradient and
shape features of the images at the run's square size, trained on 80% of the real images; its
accuracy on the other 20% is printed first: a weak judge makes every other figure meaningless.
"""
import argparse
import glob
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import model  # noqa: E402
import sample  # noqa: E402

# Class -> captions in plain, varied phrasings; the first is the class's prompt at evaluation.
CLASSES = {
    "wood": ["a photo of wood grain", "wood", "brown wooden planks, close up",
             "the surface of an old oak board with its grain running across it", "wood texture"],
    "marble": ["a slab of polished marble", "marble", "white marble with grey veins",
               "close-up photo of a marble countertop", "veined stone, polished"],
    "clouds": ["white clouds in a blue sky", "clouds", "a cloudy sky",
               "fluffy clouds drifting across the sky on a summer afternoon", "sky with clouds"],
    "bricks": ["a red brick wall", "bricks", "an old wall of bricks and mortar",
               "close-up of a brick wall, the rows offset", "brickwork"],
    "foliage": ["green leaves", "foliage", "a bush seen up close, full of leaves",
                "dense green foliage in the shade", "leaves of a plant"],
    "water": ["rippling blue water", "water", "the surface of a lake with small waves",
              "sunlight glinting on rippled water", "a photo of water"],
    "letter_a": ["the letter A", "A", "a capital A", "an uppercase letter A printed on plain paper",
                 "the letter A in a random font"],
    "letter_s": ["the letter S", "S", "a capital S", "an uppercase letter S printed on plain paper",
                 "the letter S in a random font"],
    "digit_7": ["the number 7", "7", "the digit seven", "a big seven printed on a plain background",
                "number seven"],
    "ampersand": ["an ampersand", "&", "the and sign", "an ampersand symbol printed on plain paper",
                  "the & character"],
}
GLYPHS = {"letter_a": "A", "letter_s": "S", "digit_7": "7", "ampersand": "&"}
PER_CLASS = 180


# ------------------------------------------------------------------------------- the stand-in


def fbm(rng, h, w, cells, octaves=4):
    """Fractal noise [h, w] in about [-1, 1]: random grids of 2^k * cells cells, upsampled."""
    out = np.zeros((h, w), np.float32)
    for k in range(octaves):
        n = cells * 2**k
        grid = Image.fromarray(rng.uniform(-1, 1, (n + 1, n + 1)).astype(np.float32))
        out += np.asarray(grid.resize((w, h), Image.BICUBIC)) / 2**k
    return out / 1.9


def mix(a, b, s):
    """Colours a, b (RGB 0..255) blended by s [h, w] in [0, 1] -> [h, w, 3]."""
    s = np.clip(s, 0, 1)[..., None]
    return (1 - s) * np.asarray(a, np.float32) + s * np.asarray(b, np.float32)


def jitter(rng, rgb, amount=25):
    return np.clip(np.asarray(rgb) + rng.normal(0, amount, 3), 0, 255)


def texture(name, rng, h, w):
    """A photograph-like texture [h, w, 3] (0..255) in rotated coordinates u, v of random scale."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / 64 * rng.uniform(0.6, 1.6)
    angle = rng.uniform(0, 2 * math.pi)
    u, v = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
    n = fbm(rng, h, w, rng.integers(2, 5))
    if name == "wood":  # growth rings cut lengthwise: stripes bent by noise
        s = 0.5 + 0.5 * np.sin(2 * math.pi * (v * rng.uniform(4, 9) + 1.5 * n))
        return mix(jitter(rng, (150, 100, 55), 15), jitter(rng, (95, 55, 25), 15), s**2)
    if name == "marble":  # thin veins where a turbulent sine crosses zero
        veins = 1 - np.abs(np.sin(2 * math.pi * (u * rng.uniform(1, 3) + 2.5 * n))) ** 0.3
        return mix(jitter(rng, (232, 230, 225), 12), jitter(rng, (90, 90, 95)), veins)
    if name == "clouds":
        sky, cloud = jitter(rng, (80, 140, 220)), jitter(rng, (250, 250, 250), 5)
        return mix(sky, cloud, (n + rng.uniform(0, 0.5)) * 1.6)
    if name == "bricks":  # running bond: every other row shifted half a brick
        bw, bh = rng.uniform(0.35, 0.6), rng.uniform(0.14, 0.22)
        row = np.floor(v / bh)
        col = np.floor(u / bw + 0.5 * (row % 2))
        fu, fv = (u / bw + 0.5 * (row % 2)) % 1, (v / bh) % 1
        mortar = (fu < 0.06) | (fv < 0.12)
        shade = 1 + 0.15 * np.sin(row * 12.9898 + col * 78.233) + 0.1 * n
        brick = jitter(rng, (160, 65, 45)) * shade[..., None]
        grey = jitter(rng, (190, 185, 175), 10) + 20 * n[..., None]
        return np.where(mortar[..., None], grey, brick)
    if name == "water":  # crossing ripples with bright glints on their crests
        r = (np.sin(2 * math.pi * (u * rng.uniform(3, 7) + n))
             * np.sin(2 * math.pi * (v * rng.uniform(1, 3) + n)))
        glints = 120 * (r > 0.8)[..., None]
        return mix(jitter(rng, (20, 80, 140)), jitter(rng, (60, 150, 200)), 0.5 + 0.5 * r) + glints
    raise ValueError(name)


def foliage(rng, h, w):
    """Overlapping leaves (ellipses of varied greens) drawn at 2x over dark shade, downsampled."""
    im = Image.new("RGB", (2 * w, 2 * h), tuple(int(c) for c in jitter(rng, (25, 50, 20), 10)))
    for _ in range(int(w * h / 40)):
        leaf = Image.new("RGBA", (40, 40))
        size = rng.uniform(8, 20)
        ImageDraw.Draw(leaf).ellipse((20 - size, 20 - size / 2.5, 20 + size, 20 + size / 2.5),
                                     tuple(int(c) for c in jitter(rng, (60, 130, 40), 30)) + (255,))
        leaf = leaf.rotate(rng.uniform(0, 360), Image.BICUBIC)
        im.paste(leaf, (int(rng.uniform(-20, 2 * w - 20)), int(rng.uniform(-20, 2 * h - 20))), leaf)
    return np.asarray(im.resize((w, h), Image.LANCZOS), np.float32)


def glyph(char, rng, h, w, fonts):
    """One character in a random font, size, place, slant and colours of clear contrast."""
    bg = rng.uniform(0, 255, 3)
    fg = np.where(bg > 128, rng.uniform(0, 90, 3), rng.uniform(165, 255, 3))
    face = fonts[rng.integers(len(fonts))]
    font = ImageFont.truetype(face, int(min(h, w) * rng.uniform(0.75, 1.1)))
    layer = Image.new("L", (2 * w, 2 * h))
    ImageDraw.Draw(layer).text((w, h), char, fill=255, font=font, anchor="mm")
    layer = layer.rotate(rng.uniform(-20, 20), Image.BICUBIC)
    dx, dy = (rng.uniform(-0.15, 0.15, 2) * (w, h)).astype(int)
    left, top = w // 2 - dx, h // 2 - dy
    alpha = np.asarray(layer.crop((left, top, left + w, top + h)), np.float32)
    return mix(bg, fg, alpha / 255)


def write(folder, seed):
    fonts = sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
    if not fonts:
        sys.exit("standin.py: no .ttf fonts under /usr/share/fonts for the glyph classes")
    for c, (name, captions) in enumerate(CLASSES.items()):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(PER_CLASS):
            rng = np.random.default_rng([seed, c, i])
            side, aspect = rng.uniform(40, 120), math.exp(rng.uniform(-math.log(2), math.log(2)))
            h, w = int(side / math.sqrt(aspect)), int(side * math.sqrt(aspect))
            h, w = max(min(h, 120), 40), max(min(w, 120), 40)
            if name in GLYPHS:
                pixels = glyph(GLYPHS[name], rng, h, w, fonts)
            else:
                pixels = foliage(rng, h, w) if name == "foliage" else texture(name, rng, h, w)
            pixels = pixels * rng.uniform(0.8, 1.2) + rng.normal(0, rng.uniform(1, 8), pixels.shape)
            im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            stem = os.path.join(folder, name, f"{i:04d}")
            if i % 2:
                im.save(stem + ".jpg", quality=int(rng.integers(75, 96)))
            else:
                im.save(stem + ".png")
            caption = captions[rng.integers(len(captions))]
            ext = ("txt", "caption", "json")[i % 3]
            with open(f"{stem}.{ext}", "w") as f:
                f.write(json.dumps({"caption": caption}) if ext == "json" else caption + "\n")
    print(f"standin.py: wrote {len(CLASSES) * PER_CLASS} images in {len(CLASSES)} classes to "
          f"{folder}")


# ---------------------------------------------------------------------------------- the judge


def real_images(folder, size):
    """(images [N, size, size, 3] in [-1, 1], as train.py's square crops; labels [N])."""
    images, labels = [], []
    for c, name in enumerate(CLASSES):
        paths = sorted(p for p in glob.glob(os.path.join(folder, name, "*"))
                       if p.endswith((".png", ".jpg")))
        if not paths:
            sys.exit(f"standin.py: {folder}/{name}: no images (expected a folder made by "
                     "`standin.py write`)")
        images += [data.load_image(p, size)[0] / 127.5 - 1.0 for p in paths]  # uint8 -> [-1, 1]
        labels += [c] * len(paths)
    return np.stack(images), np.array(labels)


def features(images):
    """[N, S, S, 3] in [-1, 1] -> [N, F]: coarse colour, colour statistics, gradient orientations,
    spectrum bands, and the shape of whatever differs from the border colour (sign-free, so that a
    glyph's colours do not matter)."""
    x = np.asarray(images, np.float32)
    n, s = x.shape[:2]
    coarse = x.reshape(n, 8, s // 8, 8, s // 8, 3).mean((2, 4)).reshape(n, -1)
    grey = x.mean(-1)
    edges = np.concatenate([grey[:, 0], grey[:, -1], grey[:, :, 0], grey[:, :, -1]], 1)
    border = np.median(edges, 1)
    shape = np.abs(grey - border[:, None, None])
    shape = shape / (shape.max((1, 2), keepdims=True) + 1e-3)
    shape = shape.reshape(n, 16, s // 16, 16, s // 16).mean((2, 4)).reshape(n, -1)
    dy, dx = np.gradient(grey, axis=(1, 2))
    magnitude, angle = np.hypot(dx, dy), np.arctan2(dy, dx) % math.pi
    bins = np.minimum((angle / math.pi * 8).astype(int), 7)
    cells = [(magnitude * (bins == k)).reshape(n, 8, s // 8, 8, s // 8).mean((2, 4))
             for k in range(8)]  # [N, 8, 8] each: where edges of each orientation are
    orientation = np.stack(cells, -1).reshape(n, -1)
    power = np.abs(np.fft.fft2(grey)) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(s), np.fft.fftfreq(s)))
    bands = np.stack([np.log1p(power[:, (f >= lo) & (f < lo + 0.1)].mean(1))
                      for lo in np.arange(0, 0.7, 0.1)], 1)
    stats = np.concatenate([x.mean((1, 2)), x.std((1, 2))], 1)
    edge = magnitude.mean((1, 2))[:, None]
    return np.concatenate([coarse, shape, orientation, bands, stats, edge], 1)


def train_judge(feats, labels, seed=0, hidden=128, steps=400):
    """A one-hidden-layer MLP on standardised features (AdamW) -> predict: features -> labels."""
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w1": jax.random.normal(k1, (feats.shape[1], hidden)) / math.sqrt(feats.shape[1]),
              "b1": jnp.zeros(hidden), "b2": jnp.zeros(len(CLASSES)),
              "w2": jax.random.normal(k2, (hidden, len(CLASSES))) / math.sqrt(hidden)}
    logits = lambda p, f: jax.nn.gelu(((f - mean) / std) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    opt = optax.adamw(3e-3, weight_decay=0.05)

    @jax.jit  # the data are arguments: as closed-over constants XLA spends minutes folding them
    def step(p, state, f, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, f), y).mean()
        grads = jax.grad(loss)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state, feats, labels)
    return lambda f: np.asarray(jnp.argmax(logits(params, f), -1))


def judge(folder, size, seed=0):
    """(predict, held-out accuracy, real images, labels): trained on 80%, scored on 20%."""
    images, labels = real_images(folder, size)
    feats = features(images)
    held = np.random.default_rng(seed).random(len(labels)) < 0.2
    predict = train_judge(feats[~held], labels[~held], seed)
    return predict, float(np.mean(predict(feats[held]) == labels[held])), images, labels


# --------------------------------------------------------------------------------- evaluation


def distances(a, b):
    """Euclidean distances [len(a), len(b)] between flattened images."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sqrt(np.maximum((a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T, 0))


def mean_pairwise(x):
    d = distances(x, x)
    return d.sum() / (len(x) * (len(x) - 1))


def precision_coverage(real, *fakes, k=5):
    """[len(fakes), 2], Naeem et al. (2020): for each set, the share of its points inside some real
    point's ball (its distance to its k-th nearest other real), and of real balls holding one of its
    points. Unlike mean pairwise distance, neither grows with samples that leave the real images
    (noise, over-saturation)."""
    radius = np.sort(distances(real, real), 1)[:, k]
    inside = [distances(real, fake) < radius[:, None] for fake in fakes]  # [R, F] each
    return np.array([[x.any(0).mean(), x.any(1).mean()] for x in inside])


def beside_held_out_reals(real, fake, seed, splits=20):
    """[2, 2]: precision_coverage of fake, and of as many held-out real images, both against the same
    rest of the reals, averaged over random splits."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(splits):
        held = np.zeros(len(real), bool)
        held[rng.choice(len(real), len(fake), replace=False)] = True
        out.append(precision_coverage(real[~held], fake, real[held]))  # one radius for both
    return np.mean(out, 0)


def seams(images, patch):
    """How much the patch grid shows in images [N, S, S, 3]: the mean step between neighbouring
    pixels across patch borders over the one inside patches (real images: about 1)."""
    steps = [np.abs(np.diff(images, axis=axis)).mean((0, 3, 2 if axis == 1 else 1)) for axis in (1, 2)]
    border = np.arange(images.shape[1] - 1) % patch == patch - 1
    return sum(s[border].mean() for s in steps) / sum(s[~border].mean() for s in steps)


def draw(run, n, guidances, seed):
    """(samples {guidance: [classes, n, S, S, 3]} of every class's prompt, clipped to [-1, 1], from
    the run's default sampler; its patch size). The samples are kept in the run's folder: a changed
    judge re-scores them for free."""
    path = os.path.join(run, f"standin_samples_n{n}_seed{seed}.npz")
    cached = dict(np.load(path)) if os.path.isfile(path) else {}
    missing = [g for g in guidances if f"{g:g}" not in cached]
    cfg, params, settings = sample.load_denoiser(run)
    if missing:
        t5cfg, t5params, tokenizer = sample.load_text_encoder(settings["t5"], cfg)
        for g in missing:
            per_class = []
            for c, captions in enumerate(CLASSES.values()):
                ids, mask = tokenizer.encode([captions[0]] * n, settings["text_length"])
                noise = sample.initial_noise([jax.random.key(seed + c * n + j) for j in range(n)],
                                             (cfg.image_size,) * 2, settings["noise_scale"])
                context = sample.encode_text(t5params, t5cfg, ids, mask)
                per_class.append(np.clip(sample.sample(params, cfg, context, mask, noise, steps=20,
                                                       guidance=g, sampler="dpm++2m"), -1, 1))
            cached[f"{g:g}"] = np.stack(per_class)
            np.savez(path, **cached)
    return {g: cached[f"{g:g}"] for g in guidances}, cfg.patch_size


def evaluate(run, folder, n, guidances, seed):
    """Per guidance: prompt accuracy, and variety and nearest-real distance over the reals' own,
    in pixels and in the judge's standardised features. A flat or blurred sample sits near every
    real image, so a low nearest-real ratio alone is not copying; copies are the samples nearer a
    real image than half the reals' median nearest-neighbour distance. Precision and coverage tell
    variety that covers the real images from spread that leaves them; in pixels a blurred sample
    sits inside many real balls (coverage near 2x), so the table gives the features'."""
    samples, patch = draw(run, n, guidances, seed)
    predict, held_out, reals, labels = judge(folder, samples[guidances[0]].shape[2], seed)
    print(f"judge: {held_out:.1%} held-out accuracy on real images ({len(labels)} images)")
    real_feats = features(reals)
    mu, sd = real_feats.mean(0), real_feats.std(0) + 1e-6
    spaces = {"pixels": (lambda x: x, reals),
              "features": (lambda x: (features(x) - mu) / sd, (real_feats - mu) / sd)}
    rows = []
    for g in guidances:
        right = [np.mean(predict(features(x)) == c) for c, x in enumerate(samples[g])]
        row = {"guidance": g}
        for space, (embed, real) in spaces.items():
            variety, nearest, copies, pc = [], [], [], []
            for c, x in enumerate(samples[g]):
                own, x = real[labels == c], embed(x)
                real_nn = np.sort(distances(own, own), 1)[:, 1]  # each real's nearest other real
                d = distances(x, own).min(1)
                variety.append(mean_pairwise(x) / mean_pairwise(own))
                nearest.append(d.mean() / real_nn.mean())
                copies.append(np.mean(d < 0.5 * np.median(real_nn)))
                pc.append(beside_held_out_reals(own, x, seed + c))
            fake, held = np.mean(pc, 0)
            precision, coverage = fake / held  # 1: as real images
            row |= {f"variety_{space}": float(np.mean(variety)),
                    f"nearest_{space}": float(np.mean(nearest)),
                    f"copies_{space}": float(np.mean(copies)),
                    f"precision_{space}": float(precision), f"coverage_{space}": float(coverage)}
        row |= {"accuracy": float(np.mean(right)), "worst_class": float(np.min(right)),
                "seams": float(seams(samples[g].reshape(-1, *samples[g].shape[2:]), patch)),
                "per_class": dict(zip(CLASSES, np.round(right, 3).tolist()))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{run}, {n} samples a class, dpm++2m 20 steps, judge {held_out:.1%} on held-out real "
          "images\n")
    print(f"real images' seams at patch {patch}: {seams(reals, patch):.2f}\n")
    print("| guidance | prompt accuracy | worst class | variety vs real (pixels / features) "
          "| nearest-real vs real NN (pixels / features) | copies (pixels / features) "
          "| precision / coverage vs held-out reals (features) | seams |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r['accuracy']:.1%} | {r['worst_class']:.1%} "
              f"| {r['variety_pixels']:.2f}x / {r['variety_features']:.2f}x "
              f"| {r['nearest_pixels']:.2f}x / {r['nearest_features']:.2f}x "
              f"| {r['copies_pixels']:.1%} / {r['copies_features']:.1%} "
              f"| {r['precision_features']:.2f}x / {r['coverage_features']:.2f}x | {r['seams']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="standin.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the stand-in folder")
    w.add_argument("folder")
    e = sub.add_parser("evaluate", help="score a train.py run's samples with the judge")
    e.add_argument("run")
    e.add_argument("--data", help="the stand-in folder (default: the run's --data)")
    e.add_argument("--n", type=int, default=32, help="samples per class and guidance (default 32)")
    e.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    for p in (w, e):
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.folder, args.seed)
        return
    folder = args.data
    if folder is None:
        sources = model.read_json(os.path.join(args.run, "config.json"))["recipe"]["data"]
        if len(sources) != 1:
            parser.exit(2, f"standin.py: {args.run}/config.json: expected one --data folder, got "
                           f"{sources}; give --data\n")
        folder = sources[0]
    evaluate(args.run, folder, args.n, args.guidance, args.seed)


if __name__ == "__main__":
    main()

"""Sample images from MiniT2I: solve the flow-matching ODE from noise (t=0) to data (t=1) with DPM-Solver++(2M)
(default, 20 steps), or the reference's Euler (--sampler euler --steps 100) or Heun, and classifier-free
guidance, then write a captioned grid PNG and, with --out-dir, one PNG per image.

    python sample.py --ckpt runs/tiny --prompt "a red circle" --prompt "a blue square" --n 4 --guidance 4
    python sample.py --ckpt MiniT2I-B16 --t5 flan-t5-large --prompts-file geneval.txt --out-dir samples/
    python sample.py --ckpt runs/tiny --export-diffusers MiniT2I-tiny    # weights only, in the Diffusers layout

--ckpt is a train.py run directory (its latest checkpoint), one of its checkpoints/step_XXXXXXXX folders, or a
released Diffusers folder; run weights are the EMA ones unless --no-ema. A released folder needs --t5.
"""
import argparse
import functools
import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

import model

# A released model's settings where its config does not say: the paper's noise scale, prompt length and a
# guidance scale for its fine-tuned weights. A train.py run's come from its config.json.
RELEASED = {"noise_scale": 2.0, "text_length": 256, "guidance": 5.0}

# ------------------------------------------------------------------------------------------------ sampler


def velocity(x0_hat, x, t, a_min):
    """The flow velocity implied by the predicted clean image; a_min keeps it finite as t -> 1."""
    return (x0_hat - x) / jnp.maximum(1.0 - t, a_min)


def guided_denoiser(params, cfg, context, mask, guidance, interval, dtype):
    """denoise(x, t, per_branch) with classifier-free guidance: per_branch(x0_hat) (x0_hat itself by default)
    of the prompt and of the unconditional branch, mixed by the guidance scale. The unconditional branch is
    the same prompt with an all-zero mask (every token becomes mask_token, as in caption-drop training); both
    run as one batch of 2B, and the text adapter runs once, before the first step. Guidance applies to
    evaluations with lo <= t <= hi; elsewhere the conditional branch alone."""
    mask2 = jnp.concatenate([mask, jnp.zeros_like(mask)])
    txt2 = model.text_adapter(params, cfg, jnp.concatenate([context, context]), mask2, dtype)  # [2B, L, D], once

    def denoise(x, t, per_branch=lambda x0_hat: x0_hat):
        cond, uncond = map(per_branch, jnp.split(model.denoise(params, cfg, jnp.concatenate([x, x]), txt2, dtype), 2))
        s = jnp.where((interval[0] <= t) & (t <= interval[1]), guidance, 1.0)  # s = 1 is the conditional branch
        return uncond + s * (cond - uncond)

    return denoise


def time_grid(steps, shift=1.0):
    """steps + 1 times from 0 (noise) to 1 (data): the uniform grid, moved by SD3's shift, which lowers
    lambda = log(t / (1 - t)) by log(shift) at every time. shift < 1 puts more steps near the data."""
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    return ts if shift == 1.0 else ts / (ts + shift * (1.0 - ts))


def integrate(velocity_fn, x, steps, sampler="euler", shift=1.0):
    """Solve dx/dt = velocity_fn(x, t) from t=0 to t=1 in `steps` steps. Heun averages the velocity at both
    ends of each Euler step; on the last step the end point is t=1, where the velocity only rests on the
    a_min clamp, so that step stays Euler (as in the reference)."""
    ts = time_grid(steps, shift)

    def step(i, x):
        t, dt = ts[i], ts[i + 1] - ts[i]
        v = velocity_fn(x, t)
        x_euler = x + dt * v
        if sampler == "euler":
            return x_euler
        heun = lambda: x + dt * 0.5 * (v + velocity_fn(x_euler, ts[i + 1]))
        return jax.lax.cond(i < steps - 1, heun, lambda: x_euler)

    return jax.lax.fori_loop(0, steps, step, x)


def dpm_solver_2m(denoise, x, ts):
    """DPM-Solver++(2M) (Lu et al., 2022) on the times ts [N + 1]: one x0 per step, no clamp. With alpha_t =
    t, sigma_t = 1 - t, the first-order step x' = r x + (1 - r) x0_hat, r = sigma_t' / sigma_t, is Euler's,
    exact from t = 0 and landing on x0_hat at t' = 1. The second order extrapolates x0_hat linearly in
    lambda = log(t / (1 - t)) from the step before: x0_hat + h / (2 h_prev) (x0_hat - x0_prev), h the
    step's length in lambda. Its weight is 0 after t = 0 (h_prev infinite) and is left out on the last step
    (h infinite), and under 15 steps on the one before too, as in diffusers' DPM-Solver++: there x0_hat
    settles faster than the long step's linear extrapolation (measured on the default run at guidance 3, 6
    steps: RMS error 0.034 instead of 0.051; README)."""
    h = jnp.diff(jnp.log(ts) - jnp.log1p(-ts))  # [N], the steps in lambda; the first and the last infinite
    first_order_at_end = 2 if len(h) < 15 else 1
    weight = jnp.concatenate([jnp.zeros(1), h[1:] / (2 * h[:-1])]).at[-first_order_at_end:].set(0.0)  # [N]
    ratio = (1.0 - ts[1:]) / (1.0 - ts[:-1])  # sigma_t' / sigma_t, [N]

    def step(i, carry):
        x, x0_prev = carry
        x0_hat = denoise(x, ts[i])
        x0_2m = x0_hat + weight[i] * (x0_hat - x0_prev)
        return ratio[i] * x + (1.0 - ratio[i]) * x0_2m, x0_hat

    return jax.lax.fori_loop(0, len(h), step, (x, x))[0]


SAMPLERS = ("dpm++2m", "euler", "heun")


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "sampler", "shift", "dtype"))
def sample(params, cfg, context, mask, noise, steps=100, guidance=6.0, sampler="euler", a_min=0.05,
           guidance_interval=(0.0, 1.0), shift=1.0, dtype=jnp.float32):
    """Images [B, H, W, 3], unclipped, from noise [B, H, W, 3] (already 2 N(0, I)) and T5 features context
    [B, L, Dt] with mask [B, L]. guidance, a_min and the interval are traced: changing them does not
    recompile. Euler and Heun guide the velocity, as the reference does; dpm++2m guides x0 and needs no
    a_min. shift: the time grid's (time_grid; 1 = uniform, measured the best at guidance 3 and 5 together).
    dtype is the network's compute dtype (the integration stays float32)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
    denoise = guided_denoiser(params, cfg, context, mask, guidance, guidance_interval, dtype)
    if sampler == "dpm++2m":
        return dpm_solver_2m(denoise, noise, time_grid(steps, shift))
    velocity_fn = lambda x, t: denoise(x, t, lambda x0_hat: velocity(x0_hat, x, t, a_min))
    return integrate(velocity_fn, noise, steps, sampler, shift)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "dtype"))
def mean_flow_sample(params, cfg, context, mask, noise, steps=4, guidance=3.0, dtype=jnp.float32):
    """A MeanFlow student's images from noise in `steps` jumps of the uniform grid, one network
    pass each, no unconditional branch: the guidance scale is the student's input w. A jump from t
    to s lands on x_t + (s - t) u, u = (x0_hat - x_t) / (1 - t): dpm_solver_2m's first order."""
    txt = model.text_adapter(params, cfg, context, mask, dtype)
    ts, w = time_grid(steps), jnp.full(noise.shape[:1], guidance)

    def jump(i, x):
        h = jnp.full_like(w, ts[i + 1] - ts[i])
        x0_hat = model.mean_flow_apply(params, cfg, x, txt, h, w, dtype)
        ratio = (1.0 - ts[i + 1]) / (1.0 - ts[i])
        return ratio * x + (1.0 - ratio) * x0_hat

    return jax.lax.fori_loop(0, steps, jump, noise)


encode_text = jax.jit(model.t5_encode, static_argnums=1)  # (params, T5Config, ids, mask) -> [B, L, Dt]


def initial_noise(keys, shape, noise_scale):
    """x at t=0 [len(keys), H, W, 3] for images of shape (H, W): noise_scale N(0, I) (the run's recipe value),
    each image from its own random key, so that an image never depends on the batch it is in."""
    return jnp.stack([noise_scale * jax.random.normal(k, (*shape, 3)) for k in keys])


# ------------------------------------------------------------------------------------------------ loading


def read_json(path):
    with open(path) as f:
        return json.load(f)


def is_run(path):
    """A train.py run directory: its config.json holds the model config (a Diffusers one is flat)."""
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and "model" in read_json(config)


def latest_checkpoint(run):
    """The highest finished step: checkpoints are renamed into place, so a step_ folder is complete."""
    root = os.path.join(run, "checkpoints")
    steps = [d for d in (os.listdir(root) if os.path.isdir(root) else [])
             if d.startswith("step_") and d[5:].isdigit() and os.path.isfile(os.path.join(root, d, "state.json"))]
    if not steps:
        raise FileNotFoundError(f"{run}: no finished checkpoint in {root}")
    return os.path.join(root, max(steps, key=lambda d: int(d[5:])))


def load_denoiser(path, use_ema=True):
    """(cfg, params, settings) from a train.py run (its latest checkpoint), one of its checkpoints (copied out of
    its run too: each holds the run's config.json), or a released Diffusers folder or file. settings: the
    T5 folder (None where it is not there: a released model, a checkpoint away from its run), the text length,
    noise scale and guidance the model was trained (or released) for."""
    is_checkpoint = os.path.isfile(os.path.join(path, "state.json"))
    if not (is_checkpoint or is_run(path)):
        cfg, params = model.load_diffusers_mmjit(path)
        config = read_json(os.path.join(model.diffusers_folder(path)[0], "config.json"))
        t5 = config.get("text_encoder")  # written by export_diffusers; the released configs do not say
        return cfg, params, RELEASED | {"t5": t5 if t5 and os.path.isdir(t5) else None,
                                        "text_length": config.get("prompt_length", RELEASED["text_length"]),
                                        "noise_scale": config.get("noise_scale", RELEASED["noise_scale"])}
    ckpt = path if is_checkpoint else latest_checkpoint(path)
    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))  # RUN/checkpoints/step_XXXXXXXX
    config = read_json(os.path.join(ckpt if os.path.isfile(os.path.join(ckpt, "config.json")) else run, "config.json"))
    try:
        cfg = model.MMJiTConfig(**config["model"])
    except TypeError as e:
        raise ValueError(f"{ckpt}/config.json: not a model config ({e})") from None
    like = jax.eval_shape(functools.partial(model.init_mmjit, cfg=cfg), jax.random.key(0))
    params = model.load_params(os.path.join(ckpt, "ema.safetensors" if use_ema else "params.safetensors"), like)
    t5 = os.path.join(run, config["t5"])  # join keeps an absolute path
    recipe = config["recipe"]
    return cfg, params, {"t5": t5 if os.path.isdir(t5) else None, "text_length": config["text_length"],
                         "noise_scale": recipe.get("noise_scale", RELEASED["noise_scale"]), "guidance": recipe["guidance"]}


def export_diffusers(ckpt, out, use_ema=True):
    """A run's (or checkpoint's) weights as a released-layout Diffusers folder, with the run's text length
    (prompt_length), noise scale and T5 folder (text_encoder) in its config: load_denoiser reads them back."""
    cfg, params, settings = load_denoiser(ckpt, use_ema)
    extra = {"noise_scale": settings["noise_scale"]}
    if settings["t5"]:
        extra["text_encoder"] = os.path.abspath(settings["t5"])
    model.save_diffusers_mmjit(out, cfg, params, settings["text_length"], extra)


def load_text_encoder(path, cfg):
    """(T5Config, params, Tokenizer) from a Hugging Face T5 folder holding spiece.model."""
    t5cfg, t5params = model.load_t5(path)
    if t5cfg.d_model != cfg.txt_dim:
        raise ValueError(f"T5 width {t5cfg.d_model} does not match the checkpoint's txt_dim {cfg.txt_dim}")
    tokenizer = model.Tokenizer(os.path.join(path, "spiece.model"))
    if tokenizer.vocab_size > t5cfg.vocab_size:
        raise ValueError(f"{path}: spiece.model has {tokenizer.vocab_size} pieces, the T5 only {t5cfg.vocab_size}")
    return t5cfg, t5params, tokenizer


# ------------------------------------------------------------------------------------------------ images


def to_uint8(images):
    """[-1, 1] floats -> uint8 pixels; the only place the samples are clipped."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def make_grid(images, captions, cols=None, min_cell=128, max_lines=3):
    """A PIL image of images [N, H, W, 3] in [-1, 1], each with its caption (N strings) wrapped under it.
    Small images are enlarged (nearest neighbour) to at least min_cell pixels a side so that captions fit."""
    pixels = to_uint8(images)
    n, h, w = pixels.shape[:3]
    cols = cols or int(np.ceil(np.sqrt(n)))
    zoom = -(-min_cell // min(h, w))
    font = ImageFont.load_default()
    line_h, pad = font.getbbox("Agy")[3] + 2, 4
    chars = max(1, int((w * zoom - 2 * pad) // font.getlength("n")))
    lines = [textwrap.wrap(c, chars, max_lines=max_lines, placeholder=" ...") for c in captions]
    cell_w, cell_h = w * zoom + pad, h * zoom + pad + line_h * max(map(len, lines)) + pad
    grid = Image.new("RGB", (cols * cell_w + pad, -(-n // cols) * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(pixels, lines)):
        x, y = pad + (k % cols) * cell_w, pad + (k // cols) * cell_h
        grid.paste(Image.fromarray(image).resize((w * zoom, h * zoom), Image.NEAREST), (x, y))
        for j, line in enumerate(caption):
            draw.text((x, y + h * zoom + pad // 2 + j * line_h), line, fill="black", font=font)
    return grid


def save_png(path, image, metadata):
    """One image at its own resolution, with its prompt and sampling settings as PNG text chunks."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    Image.fromarray(to_uint8(image)).save(path, pnginfo=info)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a train.py run or checkpoint, or a released Diffusers folder")
    parser.add_argument("--no-ema", action="store_true", help="a run's raw weights instead of the EMA ones")
    parser.add_argument("--t5", help="FLAN-T5 folder with spiece.model (default: the run's own T5)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--prompts-file", help="one prompt per line (blank lines skipped)")
    parser.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: the "
                                                        f"run's recipe, 3 for tiny; {RELEASED['guidance']} for released weights)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                        help="guide only the steps at times LO <= t <= HI, t = 0 noise, t = 1 data; elsewhere the "
                             "prompt's prediction alone (default 0 1: every step)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpm++2m",
                        help="ODE solver: dpm++2m (DPM-Solver++(2M), second order, one network batch a step), "
                             "euler (the reference's) or heun (two batches a step) (default dpm++2m)")
    parser.add_argument("--steps", type=int,
                        help="solver steps, one network batch each (two for heun) (default 20; the "
                             "reference used euler with 100); a MeanFlow student's jumps "
                             "(default 4)")
    parser.add_argument("--time-shift", type=float, default=1.0, metavar="S",
                        help="time grid t -> t / (t + S (1 - t)) of a uniform one (SD3's shift): S < 1 puts more "
                             "steps near the data, S > 1 near the noise (default 1: uniform)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image k (prompt-major) starts from seed + k and its PNG records that seed, so "
                             "--n 1 --seed S reproduces it alone (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per network batch, x2 for guidance (default 8)")
    parser.add_argument("--width", type=int, help="image width, a multiple of the patch size (default: the "
                                                   "model's training size)")
    parser.add_argument("--height", type=int, help="image height, likewise")
    parser.add_argument("--out", help="grid PNG (default grid.png, or none when only --out-dir is given)")
    parser.add_argument("--out-dir", help="also write one PNG per image here, with its prompt and seed")
    parser.add_argument("--export-diffusers", metavar="DIR", help="write the weights as a Diffusers folder instead")
    args = parser.parse_args(argv)
    fail = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")  # one line, no usage

    if args.export_diffusers:  # no sampling, so no prompts
        try:
            export_diffusers(args.ckpt, args.export_diffusers, use_ema=not args.no_ema)
        except (KeyError, OSError, ValueError) as e:
            fail(f"--export-diffusers: {' '.join(str(e).split())}")
        print(f"sample.py: wrote {'raw' if args.no_ema else 'EMA'} weights in the Diffusers layout to "
              f"{args.export_diffusers}", file=sys.stderr)
        return

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file) as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--prompts-file: {e}")
    if not prompts:
        fail("no prompts: give --prompt or --prompts-file")
    for flag, value in ("--steps", args.steps), ("--n", args.n), ("--batch-size", args.batch_size):
        if value is not None and value < 1:  # no --steps: the model's default
            fail(f"{flag} must be at least 1, got {value}")
    if args.guidance is not None and args.guidance < 0:
        fail(f"--guidance must be >= 0, got {args.guidance}")
    if args.time_shift <= 0:
        fail(f"--time-shift must be > 0, got {args.time_shift}")
    if not os.path.exists(args.ckpt):
        fail(f"--ckpt {args.ckpt}: no such file or directory")
    try:
        cfg, params, settings = load_denoiser(args.ckpt, use_ema=not args.no_ema)
        if not (args.t5 or settings["t5"]):
            fail(f"--ckpt {args.ckpt} comes without its text encoder (a released model, or a checkpoint away from "
                 "its run): give --t5 DIR (the T5 folder with spiece.model)")
        t5cfg, t5params, tokenizer = load_text_encoder(args.t5 or settings["t5"], cfg)
    except KeyError as e:
        fail(f"--ckpt {args.ckpt}: missing key {e} in its config")
    except (OSError, ValueError) as e:
        fail(" ".join(str(e).split()))  # one line, whatever the message
    shape = tuple(cfg.image_size if v is None else v for v in (args.height, args.width))  # (H, W)
    for flag, value in (("--height", shape[0]), ("--width", shape[1])):
        if value < 1 or value % cfg.patch_size:
            fail(f"{flag} must be a positive multiple of the model's patch size {cfg.patch_size}, got {value}")
    if args.steps is None:
        args.steps = 4 if cfg.mean_flow else 20
    text_length, guidance = settings["text_length"], settings["guidance"] if args.guidance is None else args.guidance
    for i, prompt in enumerate(prompts):  # a prompt the model cannot read in full is said, not silently changed
        c, quoted = tokenizer.coverage([prompt], text_length), repr(prompt if len(prompt) < 60 else prompt[:57] + "...")
        if c["unknown"]:
            print(f"sample.py: warning: prompt {i + 1} {quoted} has words the tokenizer reads as <unk>", file=sys.stderr)
        if c["cut"]:
            print(f"sample.py: warning: prompt {i + 1} {quoted} is {c['median_tokens']:.0f} tokens, cut to the "
                  f"model's {text_length}", file=sys.stderr)
    out = args.out or (None if args.out_dir else "grid.png")
    for folder in (args.out_dir, out and os.path.dirname(out)):
        if folder:  # made now, not found missing after the whole job
            os.makedirs(folder, exist_ok=True)

    # Every (prompt, sample) pair in one list, cut into equal batches: the last is padded (its padding then
    # dropped) so that one compiled sampler serves them all.
    items = [(i, j) for i in range(len(prompts)) for j in range(args.n)]
    batch = min(args.batch_size, len(items))
    grid = []
    for start in tqdm(range(0, len(items), batch), desc=f"{args.sampler}, {args.steps} steps a batch", unit="batch"):
        chunk = items[start:start + batch]
        ids, mask = tokenizer.encode([prompts[i] for i, _ in chunk] + [""] * (batch - len(chunk)), text_length)
        keys = [jax.random.key(s) for s in range(args.seed + start, args.seed + start + batch)]
        noise = initial_noise(keys, shape, settings["noise_scale"])
        context = encode_text(t5params, t5cfg, ids, mask)
        if cfg.mean_flow:  # a student: --guidance is its input w; no sampler, interval or shift
            images = mean_flow_sample(params, cfg, context, mask, noise, steps=args.steps,
                                      guidance=guidance)
        else:
            images = sample(params, cfg, context, mask, noise, steps=args.steps, guidance=guidance,
                            sampler=args.sampler, guidance_interval=tuple(args.guidance_interval),
                            shift=args.time_shift)
        images = np.asarray(images)[:len(chunk)]
        if args.out_dir:
            for k, ((i, j), image) in enumerate(zip(chunk, images)):
                save_png(os.path.join(args.out_dir, f"{i:04d}_{j}.png"), image,
                         {"prompt": prompts[i], "seed": args.seed + start + k, "steps": args.steps,
                          "guidance": guidance, "sampler": args.sampler, "width": shape[1], "height": shape[0]})
        if out:  # kept only for the grid: a benchmark-sized job writes its PNGs and holds nothing
            grid.append(images)
    if out:  # one row per prompt, the prompt under each of its images (one image each: a square grid)
        make_grid(np.concatenate(grid), [prompts[i] for i, _ in items], cols=args.n if args.n > 1 else None).save(out)
    print(f"sample.py: wrote {', '.join(filter(None, [out, args.out_dir and f'{len(items)} images in {args.out_dir}']))}",
          file=sys.stderr)


if __name__ == "__main__":
    main()

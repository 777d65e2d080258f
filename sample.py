"""Sample images from MiniT2I: solve the flow-matching ODE from noise (t=0) to data (t=1) with
DPM-Solver++(2M) (default, 20 steps) or the reference's Euler (--sampler euler --steps 100), under
classifier-free guidance, then write a captioned grid PNG and, with --out-dir, one PNG per image.

    python sample.py --ckpt runs/tiny --prompt "a red circle" --prompt "a blue square" --n 4
    python sample.py --ckpt MiniT2I-B16 --t5 flan-t5-large --prompts-file geneval.txt --out-dir out/
    python sample.py --ckpt runs/tiny --export-diffusers MiniT2I-tiny  # weights, Diffusers layout

--ckpt: a train.py run (its latest checkpoint), one of its checkpoints/step_XXXXXXXX folders, or a
Diffusers folder (released or exported), EMA weights unless --no-ema; a released one needs --t5."""
import argparse
import functools
import itertools
import json
import math
import os
import re
import shutil
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

import data
import model

# A released model's settings where its config does not say (a train.py run's: its config.json).
RELEASED = {"noise_scale": 2.0, "text_length": 256, "guidance": 5.0}

# ------------------------------------------------------------------------------------------- solver

def velocity(x0_hat, x, t, a_min):
    """The flow velocity implied by the predicted clean image; a_min keeps it finite as t -> 1."""
    return (x0_hat - x) / jnp.maximum(1.0 - t, a_min)

def time_grid(steps, shift=1.0):
    """steps + 1 times from 0 (noise) to 1 (data), uniform, moved by SD3's shift (which lowers
    lambda = log(t / (1 - t)) by log(shift) everywhere: shift < 1 puts more steps near the data)."""
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    return ts if shift == 1.0 else ts / (ts + shift * (1.0 - ts))

def solve(denoise, x, ts, scales, extrapolation=None, a_min=0.0):
    """Carry x from noise (ts[0] = 0) to data (ts[N] = 1), one x0 prediction a step:

        x' = x + (t' - t) / max(1 - t, a_min) (D - x),   D = x0_hat + e_i (x0_hat - x0_prev):

    Euler's step along the velocity, and with a_min = 0 DPM-Solver++'s first-order step x' = r x +
    (1 - r) D, r = sigma_t' / sigma_t (sigma_t = 1 - t), landing on D at t' = 1. denoise(x, t, s):
    x0_hat at guidance s, scales [N]; extrapolation [N]: the e_i (dpm_2m_weights; None: Euler)."""
    n = len(ts) - 1
    e = jnp.zeros(n) if extrapolation is None else extrapolation
    w = (ts[1:] - ts[:-1]) / jnp.maximum(1.0 - ts[:-1], a_min)  # [N]: 1 - r where a_min is not hit
    def step(i, carry):
        x, x0_prev = carry
        x0_hat = denoise(x, ts[i], scales[i])
        return (1.0 - w[i]) * x + w[i] * (x0_hat + e[i] * (x0_hat - x0_prev)), x0_hat
    return jax.lax.fori_loop(0, n, step, (x, x))[0]

def dpm_2m_weights(ts, scales):
    """DPM-Solver++(2M) (Lu et al., 2022): x0_hat extrapolated linearly in lambda = log(t / (1 - t))
    from the step before, e_i = h_i / (2 h_{i-1}), h_i step i's length in lambda [N]. lambda is
    infinite at t = 0 and 1: steps 0, 1 and N-1 stay first order, and under 15 steps N-2 too (x0_hat
    settles faster there: RMS 0.034 instead of 0.051 at 6 steps; README). A step where the guidance
    scale changes is first order too: x0_hat - x0_prev is a jump between two fields there."""
    n = len(ts) - 1
    lam = jnp.log(ts[1:-1]) - jnp.log1p(-ts[1:-1])  # [N - 1], the inner times': all finite
    h = jnp.diff(lam)  # [N - 2]: h_1 .. h_{N-2}
    e = jnp.concatenate([jnp.zeros(2), h[1:] / (2 * h[:-1]), jnp.zeros(1)])[:n]  # [N]
    i = jnp.arange(n)
    same_scale = jnp.concatenate([jnp.zeros(1, bool), scales[1:] == scales[:-1]])
    return jnp.where((i < n - (2 if n < 15 else 1)) & same_scale, e, 0.0)

def guided_denoiser(params, cfg, context, mask, dtype):
    """denoise(x, t, s): x0_hat of x [B, H, W, 3] guided as uncond + s (cond - uncond), s a scalar
    or [B, 1, 1, 1]; uncond under an all-zero mask (as caption drop trains it); s = 1: cond only."""
    B, mask2 = mask.shape[0], jnp.concatenate([mask, jnp.zeros_like(mask)])
    txt2 = model.text_adapter(params, cfg, jnp.concatenate([context, context]), mask2, dtype)
    net = lambda x, txt: model.denoise(params, cfg, x, txt, dtype)
    def guided(x, s):
        cond, uncond = jnp.split(net(jnp.concatenate([x, x]), txt2), 2)
        return uncond + s * (cond - uncond)
    alone = lambda x, s: net(x, txt2[:B])
    return lambda x, t, s: jax.lax.cond(jnp.all(s == 1.0), alone, guided, x, s)

SAMPLERS = ("dpm++2m", "euler")

@functools.partial(jax.jit, static_argnames=("cfg", "steps", "sampler", "shift", "dtype"))
def sample(params, cfg, context, mask, noise, steps=100, guidance=6.0, sampler="euler", a_min=0.05,
           guidance_interval=(0.0, 1.0), shift=1.0, dtype=jnp.float32):
    """Images [B, H, W, 3], unclipped, from noise [B, H, W, 3] and T5 features context [B, L, Dt]
    with mask [B, L]; guidance on the steps that start in guidance_interval (traced, as guidance and
    a_min, Euler's clamp: no recompilation). shift: time_grid's (1, uniform, measured the best)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
    ts = time_grid(steps, shift)
    lo, hi = guidance_interval
    scales = jnp.where((lo <= ts[:-1]) & (ts[:-1] <= hi), guidance, 1.0)  # [N], by a step's start
    denoise = guided_denoiser(params, cfg, context, mask, dtype)
    if sampler == "euler":
        return solve(denoise, noise, ts, scales, a_min=a_min)
    return solve(denoise, noise, ts, scales, dpm_2m_weights(ts, scales))

@functools.partial(jax.jit, static_argnames=("cfg", "steps", "dtype"))
def mean_flow_sample(params, cfg, context, mask, noise, steps=4, guidance=3.0, dtype=jnp.float32):
    """A MeanFlow student's images in `steps` uniform jumps of h = 1 / steps, one network pass each
    (guidance is its input w): solve's Euler step on the student's x0_hat is the jump x_t + h u."""
    txt = model.text_adapter(params, cfg, context, mask, dtype)
    h, w = jnp.full(noise.shape[:1], 1.0 / steps), jnp.full(noise.shape[:1], guidance)  # [B] each
    denoise = lambda x, t, s: model.mean_flow_apply(params, cfg, x, txt, h, w, dtype)
    return solve(denoise, noise, time_grid(steps), jnp.ones(steps))

encode_text = jax.jit(model.t5_encode, static_argnums=1)  # (params, t5cfg, ids, mask) -> [B, L, Dt]

def initial_noise(keys, shape, noise_scale):
    """x at t = 0 [len(keys), H, W, 3]: noise_scale N(0, I), each image from its own key."""
    return jnp.stack([noise_scale * jax.random.normal(k, (*shape, 3)) for k in keys])

# ------------------------------------------------------------------------------------- checkpoints

ARRAYS = ("params", "ema", "mu", "nu")  # a checkpoint's state trees, one safetensors file each

class CheckpointError(Exception):
    """A checkpoint could not be written (disk full, permissions): one line, exit code 1."""

def save_checkpoint(run, state, data_state, keep):
    """Written aside, then renamed: a kill or a failed write (CheckpointError on every process)
    leaves the last one loadable. Process 0 lays out each safetensors file and writes the step, the
    process count and config.json; every process its shards (no host gathers) and data position."""
    step, first = int(state["step"]), jax.process_index() == 0
    folder = os.path.join(run, "checkpoints")
    tmp, final = os.path.join(folder, f"tmp_{step:08d}"), os.path.join(folder, f"step_{step:08d}")
    arrays = {os.path.join(tmp, f"{k}.safetensors"): model.flatten(state[k]) for k in ARRAYS}
    def attempt(writes):  # each write(path), then the same answer on every process
        error = None
        try:
            for path, write in writes:
                write(path)
        except OSError as e:
            error = f"{path}: {e.strerror or e}"
        if np.any(multihost_utils.process_allgather(np.int32(error is not None))):
            if first:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint of step {step} not saved: "
                                  f"{error or 'another process could not write'}; the last one, "
                                  "if any, is kept and the same command resumes from it")
    fresh_dir = lambda path: shutil.rmtree(path, ignore_errors=True) or os.makedirs(path)
    counts = {"step": step, "processes": jax.process_count()}
    attempt([(tmp, fresh_dir),
             *[(p, functools.partial(lay_out, tensors=t)) for p, t in arrays.items()],
             (os.path.join(tmp, "state.json"), functools.partial(write_json, content=counts)),
             (os.path.join(tmp, "config.json"),
              functools.partial(shutil.copy, os.path.join(run, "config.json")))] if first else [])
    own = os.path.join(tmp, f"data_{jax.process_index()}.json")
    attempt([(own, functools.partial(write_json, content=data_state)),
             *[(path, functools.partial(write_shards, tensors=t)) for path, t in arrays.items()]])
    if first:
        shutil.rmtree(final, ignore_errors=True)  # a damaged one, newer than the one resumed from
        os.replace(tmp, final)
        names = os.listdir(folder)  # tmp_ ones: left by a kill before a rename
        old = sorted(d for d in names if d[:5] == "step_")[:-keep]
        for name in old + [d for d in names if d[:4] == "tmp_"]:
            shutil.rmtree(os.path.join(folder, name))
    multihost_utils.sync_global_devices("checkpoint renamed")

def write_json(path, content):
    with open(path, "w") as f:
        json.dump(content, f)

def lay_out(path, tensors):
    """A safetensors file of `tensors` {name: array}: its header and size, no data yet."""
    head, _ = model.safetensors_layout(tensors)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(x.nbytes for x in tensors.values()))

def write_shards(path, tensors):
    """Into the file lay_out made: the shards of `tensors` {name: global array} that this process
    holds, one copy of each (replica 0), one on the host at a time."""
    _, starts = model.safetensors_layout(tensors)
    with open(path, "r+b") as f:
        for name, x in tensors.items():
            for shard in x.addressable_shards:
                if shard.replica_id == 0:
                    write_block(f, starts[name], x.shape, shard.index, np.asarray(shard.data))

def write_block(f, start, shape, index, block):
    """block, the values at `index` of a C-order tensor of `shape` at `start` in file f: one run for
    each index of the axes before the last one the block cuts."""
    starts = [s.indices(n)[0] for s, n in zip(index, shape)]
    cut = max([a for a in range(len(shape)) if block.shape[a] != shape[a]], default=0)
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]  # in elements
    for i in np.ndindex(block.shape[:cut]):
        offset = sum((s + j) * n for s, j, n in zip(starts, i + (0,) * (len(shape) - cut), strides))
        f.seek(start + offset * block.itemsize)
        f.write(block[i].tobytes())

def restore_checkpoint(path, state_shapes, shardings):
    """The state and this process's data position: each process reads from the memory-mapped
    arrays only the slices that its devices hold, whatever the mesh that wrote them."""
    state = {"step": jnp.int32(model.read_json(os.path.join(path, "state.json"))["step"])}
    put = lambda x, t: jax.make_array_from_callback(t.shape, t.sharding,
                                                    lambda i: np.asarray(x[i], t.dtype))
    for k in ARRAYS:
        like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state_shapes[k], shardings[k])
        file = os.path.join(path, f"{k}.safetensors")
        state[k] = model.unflatten_like(like, model.read_safetensors(file), file, put)
    data_state = model.read_json(os.path.join(path, f"data_{jax.process_index()}.json"))
    return jax.device_put(state, shardings), data_state


def checkpoint_problem(ckpt):
    """What makes a step folder unusable (a file missing, cut short or unreadable), in one line, or
    None where it is complete. Reads its json files and its arrays' headers, not its arrays."""
    path = os.path.join(ckpt, "state.json")
    try:
        state = model.read_json(path)
        # one data position per process that wrote it (counted where the count was not saved yet)
        processes = state.get("processes") or sum(re.fullmatch(r"data_\d+\.json", f) is not None
                                                  for f in os.listdir(ckpt))
        for path in [os.path.join(ckpt, f"data_{i}.json") for i in range(processes)]:
            model.read_json(path)
        for path in [os.path.join(ckpt, f"{k}.safetensors") for k in ARRAYS]:
            model.read_safetensors(path)
    except OSError as e:
        return f"{os.path.basename(path)}: {e.strerror or e}"
    except ValueError as e:  # not json, or not a safetensors file
        return f"{os.path.basename(path)}: {' '.join(str(e).removeprefix(path + ': ').split())}"
    return None

def checkpoints(run):
    """The step folders of a run, newest first, each with its checkpoint_problem."""
    root = os.path.join(run, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    names = sorted((d for d in names if re.fullmatch(r"step_\d+", d)), key=lambda d: -int(d[5:]))
    return [(p, checkpoint_problem(p)) for p in (os.path.join(root, d) for d in names)]

def latest_checkpoint(run):
    """The newest complete checkpoint. FileNotFoundError where the run has none at all; ValueError,
    saying how to go on, where none is complete."""
    found = checkpoints(run)
    if not found:
        raise FileNotFoundError(f"{run}: no checkpoint in {os.path.join(run, 'checkpoints')}")
    complete = [path for path, problem in found if problem is None]
    if not complete:
        (path, problem), root = found[0], os.path.dirname(found[0][0])
        raise ValueError(f"{path} is damaged ({problem}) and no earlier checkpoint is complete: "
                         f"move {root} aside to train this run again from step 0")
    return complete[0]

# ------------------------------------------------------------------------------------------ loading

def load_denoiser(path, use_ema=True):
    """(cfg, params, settings) of a train.py run (its latest checkpoint), a checkpoint, a Diffusers
    folder or file; settings: its T5 folder (or None), text length, noise scale and guidance."""
    is_checkpoint = os.path.isfile(os.path.join(path, "state.json"))
    config = os.path.join(path, "config.json")
    if not (is_checkpoint or os.path.isfile(config) and "model" in model.read_json(config)):
        cfg, params = model.load_diffusers_mmjit(path)
        folder = model.diffusers_folder(path)[0]
        config = model.read_json(os.path.join(folder, "config.json"))
        t5 = config.get("text_encoder")  # an export's, relative to its config; not in released ones
        t5 = t5 and os.path.join(folder, t5)
        names = dict(text_length="prompt_length", noise_scale="noise_scale", guidance="guidance")
        return cfg, params, {"t5": t5 if t5 and os.path.isdir(t5) else None,
                             **{k: config.get(name, RELEASED[k]) for k, name in names.items()}}
    ckpt = path if is_checkpoint else latest_checkpoint(path)
    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))  # RUN/checkpoints/step_XXXXXXXX
    own = os.path.isfile(os.path.join(ckpt, "config.json"))
    config = model.read_json(os.path.join(ckpt if own else run, "config.json"))
    try:
        cfg = model.MMJiTConfig(**config["model"])
    except TypeError as e:
        raise ValueError(f"{ckpt}/config.json: not a model config ({e})") from None
    like = jax.eval_shape(functools.partial(model.init_mmjit, cfg=cfg), jax.random.key(0))
    weights = os.path.join(ckpt, "ema.safetensors" if use_ema else "params.safetensors")
    t5 = os.path.join(run, config["t5"])  # join keeps an absolute path
    return cfg, model.load_params(weights, like), {
        "t5": t5 if os.path.isdir(t5) else None, "text_length": config["text_length"],
        "noise_scale": config["recipe"].get("noise_scale", RELEASED["noise_scale"]),
        "guidance": config["recipe"]["guidance"]}

def export_diffusers(ckpt, out, use_ema=True, t5=None):
    """A run's (or checkpoint's) weights as a Diffusers folder, out/transformer/, its config holding
    the settings sampling reads and the T5 as a path relative to it (t5, else the run's)."""
    cfg, params, settings = load_denoiser(ckpt, use_ema)
    t5, extra = t5 or settings["t5"], {k: settings[k] for k in ("noise_scale", "guidance")}
    extra |= {"text_encoder": os.path.relpath(t5, os.path.join(out, "transformer"))} if t5 else {}
    model.save_diffusers_mmjit(out, cfg, params, settings["text_length"], extra)

def load_text_encoder(path, cfg):
    """(T5Config, params, Tokenizer) from a Hugging Face T5 folder holding spiece.model."""
    t5cfg, t5params = model.load_t5(path)
    if t5cfg.d_model != cfg.txt_dim:
        raise ValueError(f"T5 width {t5cfg.d_model} does not match the checkpoint's txt_dim "
                         f"{cfg.txt_dim}")
    tokenizer = model.Tokenizer(os.path.join(path, "spiece.model"))
    if tokenizer.vocab_size > t5cfg.vocab_size:
        raise ValueError(f"{path}: spiece.model has {tokenizer.vocab_size} pieces, the T5 "
                         f"only {t5cfg.vocab_size}")
    return t5cfg, t5params, tokenizer

def fitted_text_length(tokenizer, captions):
    """A fitted tokenizer's text length: 99% of the captions whole, at least 16, a multiple of 8."""
    return min(256, max(16, -(-int(np.percentile(tokenizer.lengths(captions), 99)) // 8) * 8))

def encode_once(text_encoder, captions, text_length, dtype, chunk=32):
    """({caption: row}, features [N, L', Dt]) of the distinct captions, in chunks of one shape. L':
    the longest caption's tokens (the encoder masks padded keys: the same features)."""
    t5cfg, t5_params, tokenizer = text_encoder
    distinct = sorted(set(captions))
    length = int(min(text_length, tokenizer.lengths(distinct).max()))
    table = np.zeros((len(distinct), length, t5cfg.d_model), dtype)
    for i in tqdm(range(0, len(distinct), chunk), desc="T5 features of each caption, once",
                  unit="chunk", disable=jax.process_index() != 0):
        part = distinct[i:i + chunk]
        ids, mask = tokenizer.encode(part + [""] * (chunk - len(part)), length)
        table[i:i + len(part)] = np.asarray(encode_text(t5_params, t5cfg, ids, mask))[:len(part)]
    return {c: i for i, c in enumerate(distinct)}, table

def text_report(tokenizer, captions, r, features):
    """The start-up line on how the T5 reads the captions; warnings where it reads badly."""
    c, n = tokenizer.coverage(captions, r.text_length), r.text_length
    how = f"once for {len(features[0])} distinct captions" if features else "in every step"
    line = (f"text: {c['captions']} captions read, {c['unknown']:.2%} of pieces unknown, "
            f"{c['cut']:.1%} cut at {n} tokens, median {c['median_tokens']:.0f} tokens; "
            f"T5 features encoded {how}")
    warnings = []
    if c["unknown"] > 0.01:
        warnings.append(f"warning: {c['unknown']:.1%} of the caption pieces are unknown to the "
                        "tokenizer: those words all reach the model as the same <unk>")
    if c["cut"] > 0.05:
        need = int(np.percentile(tokenizer.lengths(captions), 99))
        warnings.append(f"warning: {c['cut']:.0%} of the captions are cut at --text-length {n}; "
                        f"{need} would hold 99% of them")
    return line, warnings, c

# ------------------------------------------------------------------------------------------- images

def to_uint8(images):
    """[-1, 1] floats -> uint8 pixels; the only place the samples are clipped."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)

def make_grid(images, captions, cols=None, min_cell=128, max_lines=3):
    """A PIL image of images [N, H, W, 3] in [-1, 1], each with its caption under it, small ones
    enlarged to min_cell pixels a side so that captions fit."""
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

# --------------------------------------------------------------------------- a run's grids and log

GRID_PROMPTS = 8

def grid_prompts(r, captions):
    """The grids' prompts, a few of the run's distinct captions; for the built-in shapes their own 8
    first, then 56 more (only 8 are shown; all 64 are scored for faithfulness)."""
    distinct = sorted(set(captions) - set(data.SYNTHETIC_PROMPTS if not r.data else []))
    n = GRID_PROMPTS * 7 if not r.data else min(GRID_PROMPTS, len(distinct))
    chosen = list(np.random.default_rng(r.seed).choice(distinct, n, replace=False))
    return data.SYNTHETIC_PROMPTS + chosen if not r.data else chosen

def save_grid(run, done, params, cfg, grid, r, log, bar):
    """EMA samples from the same noise each time, a grid per shape: samples/step_NNNNNN[_WxH].png;
    for the built-in shapes, the share of the square grid's 64 that show their prompt (logged)."""
    score, first = None, jax.process_index() == 0
    sampler = mean_flow_sample if cfg.mean_flow else functools.partial(sample, sampler="dpm++2m")
    for h, w in grid["shapes"]:
        noise = initial_noise(grid["keys"], (h, w), r.noise_scale)
        images = np.asarray(sampler(params, cfg, grid["context"], grid["mask"], noise,
                                    steps=r.sample_steps, guidance=r.guidance))
        name = f"step_{done:06d}" + ("" if h == w == cfg.image_size else f"_{w}x{h}") + ".png"
        if first:
            shown = make_grid(images[:GRID_PROMPTS], grid["prompts"][:GRID_PROMPTS])
            shown.save(os.path.join(run, "samples", name))
        score = data.faithfulness(images, grid["prompts"]) if h == w and not r.data else score
    if score is not None and first:
        bar.write(f"step {done}: faithfulness {score:.0%} of {len(grid['prompts'])} prompts")
        write_log(log, {"step": done, "faithfulness": score})
    if first:
        plot_log(os.path.join(run, "log.jsonl"), os.path.join(run, "samples/loss.png"))
    return score

def open_log(path, start):
    """log.jsonl, keeping the lines up to the step resumed from (the later ones are about to be
    redone), up to a line torn by a kill."""
    def before(line):
        try:
            return json.loads(line)["step"] <= start
        except (ValueError, KeyError):
            return False
    kept = list(itertools.takewhile(before, open(path))) if os.path.isfile(path) else []
    log = open(path, "w")
    log.writelines(kept)
    return log

def write_log(log, record):
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()

# the loss picture's colours of the noise levels (train.T_BUCKETS), from noise to data
T_COLOURS = [(40, 90, 200), (40, 160, 160), (220, 140, 20), (200, 40, 40)]

def t_names(n):  # the noise levels' names: "t 0.00-0.25" ...
    return [f"t {i / n:.2f}-{(i + 1) / n:.2f}" for i in range(n)]

def plot_log(path, out, size=(640, 360), margin=(60, 20, 50, 40)):
    """A picture of log.jsonl: the loss of each noise level against the step on a log scale (left
    axis), and the faithfulness of the grids of built-in shapes, 0 to 100% (right axis, black)."""
    with open(path) as f:
        records = [json.loads(line) for line in f]
    losses = [(m["step"], i, x) for m in records for i, x in enumerate(m.get("loss_by_t", [])) if x]
    if not losses:
        return
    scores = [(m["step"], m["faithfulness"]) for m in records if "faithfulness" in m]
    (W, H), (left, top, right, bottom) = size, margin
    last = max([s for s, _, _ in losses] + [s for s, _ in scores])
    lo, hi = (f(np.log10([x for _, _, x in losses])) for f in (np.min, np.max))
    lo, hi = np.floor(lo), max(np.ceil(hi), np.floor(lo) + 1)  # whole decades
    x_of = lambda step: left + (W - left - right) * step / last
    y_of = lambda fraction: H - bottom - (H - top - bottom) * fraction  # of the height, from below
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, W - right, H - bottom], outline="gray")
    for decade in range(int(lo), int(hi) + 1):
        y = y_of((decade - lo) / (hi - lo))
        draw.line([left - 4, y, left, y], fill="gray")
        draw.text((4, y - 6), f"1e{decade}", fill="black")
    draw.text((left, H - bottom + 6), "0", fill="black")
    draw.text((W - right - 40, H - bottom + 6), f"step {last}", fill="black")
    for i, (name, colour) in enumerate(zip(t_names(len(T_COLOURS)), T_COLOURS)):
        points = [(x_of(s), y_of((np.log10(x) - lo) / (hi - lo))) for s, j, x in losses if j == i]
        draw.line(points + points[-1:], fill=colour, width=2)  # a lone point: a dot
        draw.text((left + 10 + 110 * i, H - 18), name, fill=colour)
    if scores:  # a folder's run has none: no right axis either
        for fraction in (0, 0.5, 1):
            draw.text((W - right + 6, y_of(fraction) - 6), f"{fraction:.0%}", fill="black")
        draw.line([(x_of(s), y_of(x)) for s, x in scores + scores[-1:]], fill="black", width=2)
        draw.text((left + 10 + 110 * len(T_COLOURS), H - 18), "faithfulness", fill="black")
    image.save(out)

# ---------------------------------------------------------------------------------------------- CLI

class UsageError(Exception):
    """Bad input: one line (which flag or file, what was expected), exit code 2."""

def require(ok, message):
    if not ok:
        raise UsageError(message)

def checked(flag, fn, *args):
    """fn(*args); a failure to read what a flag names becomes one line that starts with the flag
    (none: the error names its input itself)."""
    try:
        return fn(*args)
    except KeyError as e:
        raise UsageError(f"{flag}: missing key {e} in its config") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError among them
        raise UsageError((flag and f"{flag}: ") + " ".join(str(e).split())) from None

def parser():
    p = argparse.ArgumentParser("sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", required=True, help="a train.py run or checkpoint, or a Diffusers folder")
    add("--no-ema", action="store_true", help="a run's raw weights instead of the EMA ones")
    add("--t5", help="FLAN-T5 folder with spiece.model (default: the run's or export's own T5)")
    add("--prompt", action="append", default=[], help="a prompt; repeat for several")
    add("--prompts-file", help="one prompt per line (blank lines skipped)")
    add("--n", type=int, default=4, help="images per prompt (default 4)")
    add("--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: the "
        f"run's, 2 for tiny; {RELEASED['guidance']} for released weights)")
    add("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
        help="guide only the steps that start at LO <= t <= HI, t = 0 noise, t = 1 data; the "
        "others run the prompt's prediction alone, at half the cost (default 0 1: every step)")
    add("--sampler", choices=SAMPLERS, default="dpm++2m", help="ODE solver: dpm++2m "
        "(DPM-Solver++(2M)) or euler (the reference's); one network batch a step (default dpm++2m)")
    add("--steps", type=int, help="solver steps (default 20; the reference used euler with 100); "
        "a MeanFlow student's jumps (default 4)")
    add("--time-shift", type=float, default=1.0, metavar="S",
        help="time grid t -> t / (t + S (1 - t)) of a uniform one (SD3's shift): S < 1 puts more "
        "steps near the data, S > 1 near the noise (default 1: uniform)")
    add("--seed", type=int, default=0, help="image k (prompt-major) starts from seed + k and its "
        "PNG records that seed, so --n 1 --seed S reproduces it alone (default 0)")
    add("--batch-size", type=int, default=8, help="images per network batch, x2 guided (default 8)")
    add("--width", type=int, help="image width, a multiple of the patch size (default: training's)")
    add("--height", type=int, help="image height, likewise")
    add("--out", help="grid PNG (default grid.png, or none when only --out-dir is given)")
    add("--out-dir", help="also write one PNG per image here, with its prompt and seed")
    add("--export-diffusers", metavar="DIR", help="write the weights as a Diffusers folder instead")
    return p

def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.export_diffusers:  # no sampling, so no prompts
            checked("--export-diffusers", export_diffusers, args.ckpt, args.export_diffusers,
                    not args.no_ema, args.t5)
            print(f"sample.py: wrote {'raw' if args.no_ema else 'EMA'} weights in the Diffusers "
                  f"layout to {args.export_diffusers}", file=sys.stderr)
        else:
            generate(args)
    except UsageError as e:
        sys.stderr.write(f"sample.py: error: {e}\n")
        sys.exit(2)

def generate(args):
    """Every (prompt, sample) pair in one list, cut into equal batches (the last padded): one
    compiled sampler serves them all."""
    read = lambda path: [line.strip() for line in open(path) if line.strip()] if path else []
    prompts = args.prompt + checked("--prompts-file", read, args.prompts_file)
    require(prompts, "no prompts: give --prompt or --prompts-file")
    for flag, value in ("--steps", args.steps), ("--n", args.n), ("--batch-size", args.batch_size):
        require(value is None or value >= 1, f"{flag} must be at least 1, got {value}")
    require((args.guidance or 0) >= 0, f"--guidance must be >= 0, got {args.guidance}")
    require(args.time_shift > 0, f"--time-shift must be > 0, got {args.time_shift}")
    require(os.path.exists(args.ckpt), f"--ckpt {args.ckpt}: no such file or directory")
    ckpt = f"--ckpt {args.ckpt}"
    cfg, params, settings = checked(ckpt, load_denoiser, args.ckpt, not args.no_ema)
    t5 = args.t5 or settings["t5"]
    require(t5, f"{ckpt} comes without its text encoder (a released model, an export or a "
            "checkpoint away from its T5): give --t5 DIR (the T5 folder with spiece.model)")
    t5cfg, t5params, tokenizer = checked(f"--t5 {t5}", load_text_encoder, t5, cfg)
    shape = tuple(cfg.image_size if v is None else v for v in (args.height, args.width))  # (H, W)
    for flag, value in (("--height", shape[0]), ("--width", shape[1])):
        require(value >= 1 and value % cfg.patch_size == 0, f"{flag} must be a positive multiple "
                f"of the model's patch size {cfg.patch_size}, got {value}")
    steps = args.steps or (4 if cfg.mean_flow else 20)  # a student jumps, a teacher solves
    text_length = settings["text_length"]
    guidance = settings["guidance"] if args.guidance is None else args.guidance
    for i, prompt in enumerate(prompts):  # a prompt the model cannot read in full is said
        c, said = tokenizer.coverage([prompt], text_length), f"sample.py: warning: prompt {i + 1} "
        said += repr(prompt if len(prompt) < 60 else prompt[:57] + "...")
        if c["unknown"]:
            print(f"{said} has words the tokenizer reads as <unk>", file=sys.stderr)
        if c["cut"]:
            print(f"{said} is {c['median_tokens']:.0f} tokens, cut to the model's {text_length}",
                  file=sys.stderr)
    out = args.out or (None if args.out_dir else "grid.png")
    for folder in filter(None, (args.out_dir, out and os.path.dirname(out))):  # now, not at the end
        os.makedirs(folder, exist_ok=True)
    items = [(i, j) for i in range(len(prompts)) for j in range(args.n)]
    batch, grid = min(args.batch_size, len(items)), []
    for start in tqdm(range(0, len(items), batch), desc=f"{args.sampler} x {steps}", unit="batch"):
        chunk = items[start:start + batch]
        ids, mask = tokenizer.encode([prompts[i] for i, _ in chunk] + [""] * (batch - len(chunk)),
                                     text_length)
        keys = [jax.random.key(s) for s in range(args.seed + start, args.seed + start + batch)]
        noise = initial_noise(keys, shape, settings["noise_scale"])
        context = encode_text(t5params, t5cfg, ids, mask)
        if cfg.mean_flow:  # a student: --guidance is its input w; no sampler, interval or shift
            images = mean_flow_sample(params, cfg, context, mask, noise, steps, guidance)
        else:
            images = sample(params, cfg, context, mask, noise, steps=steps, guidance=guidance,
                            sampler=args.sampler, shift=args.time_shift,
                            guidance_interval=tuple(args.guidance_interval))
        images = np.asarray(images)[:len(chunk)]
        for k, ((i, j), image) in enumerate(zip(chunk, images) if args.out_dir else []):
            save_png(os.path.join(args.out_dir, f"{i:04d}_{j}.png"), image, {
                "prompt": prompts[i], "seed": args.seed + start + k, "steps": steps,
                "guidance": guidance, "sampler": args.sampler, "height": shape[0],
                "width": shape[1]})
        if out:  # kept only for the grid: a benchmark-sized job writes its PNGs and holds nothing
            grid.append(images)
    if out:  # one row per prompt, the prompt under each of its images (one image each: a square)
        make_grid(np.concatenate(grid), [prompts[i] for i, _ in items],
                  cols=args.n if args.n > 1 else None).save(out)
    wrote = [out, args.out_dir and f"{len(items)} images in {args.out_dir}"]
    print(f"sample.py: wrote {', '.join(filter(None, wrote))}", file=sys.stderr)

if __name__ == "__main__":
    main()

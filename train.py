"""Train MiniT2I with flow matching: x-prediction, v-loss, AdamW, EMA. From a 2-core laptop to a pod.

    python train.py                                  # tiny model, synthetic shapes, random tiny T5, ~7 CPU-minutes
    python train.py --preset b16-pretrain --t5 flan-t5-large --data 'cc12m/{00000..02175}.tar'

Running the same command again resumes from the run directory's last checkpoint.
"""
import argparse
import dataclasses
import functools
import io
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import data
import model
import sample
from sample import CheckpointError, UsageError, checked

# ----------------------------------------------------------------------------------------------- recipes

def field(default, help):
    return dataclasses.field(default=default, metadata={"help": help})

@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every field is a command-line flag (`--batch-size`); its help is the text here."""
    model: str = field("tiny", "MM-JiT size, a key of model.PRESETS: tiny, B/32, B/16 or L/16")
    image_size: int = field(32, "training resolution in pixels, a multiple of the patch size")
    multi_aspect: bool = field(False, "aspect-ratio buckets from 1:2 to 2:1 of about image_size^2 pixels "
                                      "(data.aspect_buckets), one shape per batch; off: square center crops")
    batch_size: int = field(32, "global batch, over all devices and hosts")
    steps: int = field(480, "total training steps; raise it to train a finished run further")
    lr: float = field(1e-3, "learning rate after the warm-up")
    warmup: int = field(100, "steps of linear warm-up from 1e-6 to --lr; 0 = none")
    muon: bool = field(True, "Muon for the blocks' weight matrices, AdamW for the rest; off: AdamW for all")
    ema: float = field(0.995, "EMA decay of the weights that are sampled and saved as ema")
    ema_warmup: bool = field(True, "decay min(ema, (1+s)/(10+s)), which lets a short run's EMA catch up")
    clip: float = field(0.0, "global-norm gradient clipping; 0 = off, as in the original")
    t5: str = field("", "a Hugging Face FLAN-T5 folder; none = a small random frozen T5 with a tokenizer "
                        "fitted to the run's captions (tiny runs)")
    text_length: int = field(16, "tokens per caption with </s>; a run with the fitted tokenizer takes, unless "
                                 "given, the length that holds 99%% of its captions (at least 16)")
    data: tuple = field((), "SOURCE[:WEIGHT], repeatable: .tar shards, a brace pattern of them, an image folder, "
                            "a .jsonl manifest or 'synthetic' (the default: built-in captioned shapes)")
    caption_drop: float = field(0.1, "share of captions dropped (all mask_token) for classifier-free guidance")
    t_mu: float = field(-0.8, "centre of the logit-normal t = sigmoid(N(t_mu, t_sigma)); t = 1 is data")
    t_sigma: float = field(0.8, "spread of the logit-normal t (see --t-mu)")
    noise_scale: float = field(2.0, "x at t = 0 is noise_scale N(0, I), in training and in sampling")
    a_min: float = field(0.01, "the v-loss divides by max(1 - t, a_min)")
    precision: str = field("float32", "denoiser compute dtype, float32 or bfloat16 (weights, optimiser and "
                                      "the frozen T5 stay float32)")
    remat: bool = field(False, "recompute each block's activations in the backward pass (less memory)")
    fsdp: bool = field(False, "shard parameters and optimiser state over the data axis too")
    grad_accum: int = field(1, "micro-batches per step, run one after another inside it: the same update, "
                               "the activations of one micro-batch at a time")
    seed: int = field(0, "one seed for initialisation, step noise, sample-grid noise and data order")
    log_every: int = field(50, "steps between lines of log.jsonl")
    sample_every: int = field(160, "steps between sample grids in samples/; 0 = none")
    sample_steps: int = field(20, "dpm++2m steps of each sample grid")
    guidance: float = field(3.0, "classifier-free guidance of the grids; sample.py's default for this run")
    ckpt_every: int = field(240, "steps between checkpoints (one is also written at the end and on a stop)")
    keep: int = field(3, "checkpoints kept")
    init_from: str = field("", "fine-tune from a train.py run or checkpoint (its EMA) or released weights")
    distill_from: str = field("", "distil a train.py run or checkpoint (its EMA, frozen) into a "
                                  "few-step MeanFlow student that starts from it; the defaults "
                                  "become DISTILL's")
    r_equals_t: float = field(0.5, "distillation: share of examples with no jump (r = t): guidance "
                                   "distillation")
    w_min: float = field(1.0, "distillation: the guidance scale w the student learns is drawn per "
                              "example, uniformly in [w_min, w_max]")
    w_max: float = field(5.0, "distillation: see --w-min")

# Fields that may change when a run is resumed: they do not change what the run computes, but for
# lr: a run whose loss went non-finite goes on from its last good checkpoint with a smaller one.
RESUMABLE = {"steps", "log_every", "sample_every", "sample_steps", "guidance", "ckpt_every", "keep", "remat", "fsdp",
             "grad_accum", "lr"}
PAPER = dict(image_size=512, multi_aspect=False, batch_size=1024, ema=0.99995, ema_warmup=False, text_length=256,
             log_every=100, sample_every=5000, ckpt_every=5000, muon=False)
PRETRAIN = PAPER | dict(lr=4e-4, steps=250_000, warmup=5000, guidance=2.5)
FINETUNE = PAPER | dict(lr=4e-5, steps=40_000, warmup=1000, guidance=5.0)
RECIPES = {
    "tiny": Recipe(),
    "b32-pretrain": Recipe(model="B/32", **PRETRAIN),
    "b16-pretrain": Recipe(model="B/16", **PRETRAIN),
    "b16-finetune": Recipe(model="B/16", **FINETUNE),
    "l16-pretrain": Recipe(model="L/16", **PRETRAIN),
    "l16-finetune": Recipe(model="L/16", **FINETUNE),
}
TINY_T5 = dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2)  # the random T5 of runs without --t5
STREAMS = ("init", "step", "grid", "t5")  # random streams under the one seed: none shares bits with another
FEATURE_BYTES = 4 << 30  # T5 features of a run's distinct captions kept in host memory up to this size
GRID_PROMPTS = 8

def rng(seed, stream):
    return jax.random.fold_in(jax.random.key(seed), STREAMS.index(stream))

# ------------------------------------------------------------------------------------------- objective

def flow_matching_loss(params, cfg, images, context, mask, t, noise, a_min=0.01, dtype=jnp.float32, remat=False):
    """x-prediction trained with the v-loss, per example [B]. t: [B] in (0, 1), t = 1 is data; noise
    already scaled."""
    t = t[:, None, None, None]
    x_t = t * images + (1 - t) * noise
    x0_hat = model.mmjit_apply(params, cfg, x_t, context, mask, dtype, remat)
    v_hat = sample.velocity(x0_hat, x_t, t, a_min)  # the clip at a_min keeps t -> 1 from blowing up the loss
    v = sample.velocity(images, x_t, t, a_min)
    return jnp.mean((v_hat - v) ** 2, axis=(1, 2, 3))  # [B]

def lr_schedule(r):
    """Linear warm-up from 1e-6 over r.warmup steps, then constant (optax's schedule with 0 steps would stay
    at 1e-6 for ever, hence the branch)."""
    return optax.linear_schedule(1e-6, r.lr, r.warmup) if r.warmup else optax.constant_schedule(r.lr)

def orthogonalized(g, steps=5):
    """g [m, n] with its singular values pushed to about 1 by a quintic Newton-Schulz iteration (Muon's
    coefficients, which trade exactness for speed: the values land in about [0.7, 1.2])."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (jnp.linalg.norm(g) + 1e-8)  # every singular value below 1: inside the iteration's basin
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # x @ x.T on the short side: the cheaper product
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x if wide else x.T

def adamw_ema(state, grads, grad_norm, r):
    """AdamW (betas 0.9, 0.95, eps 1e-8; the recipe's weight decay is 0), optional global-norm clipping, then
    the EMA. Written as one elementwise function of each tensor, which XLA fuses into a few loops: half the
    time of optax's chain of transforms (110 against 215 ms a step for the 72M-parameter CPU benchmark).
    With r.muon, the blocks' weight matrices take Muon's step instead (Nesterov momentum 0.95, orthogonalized,
    scaled to AdamW's typical update size so that one --lr serves both); their nu stays 0."""
    step, b1, b2 = state["step"], 0.9, 0.95
    lr, count = lr_schedule(r)(step), step + 1.0
    scale = jnp.minimum(1.0, r.clip / grad_norm) if r.clip else 1.0
    decay = jnp.minimum(r.ema, (1.0 + step) / (10.0 + step)) if r.ema_warmup else r.ema

    def update(path, p, ema, mu, nu, g):
        g = g * scale
        if r.muon and p.ndim == 2 and "blocks" in jax.tree_util.keystr(path):  # not the embedders, final layer
            mu = 0.95 * mu + 0.05 * g  # Nesterov's look-ahead, bias-corrected as in optax's muon
            ahead = 0.95 * mu / (1 - 0.95 ** (count + 1)) + 0.05 * g / (1 - 0.95**count)
            p = p - lr * 0.2 * max(p.shape) ** 0.5 * orthogonalized(ahead)
        else:
            mu, nu = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g * g
            p = p - lr * (mu / (1 - b1**count)) / (jnp.sqrt(nu / (1 - b2**count)) + 1e-8)
        return p, decay * ema + (1 - decay) * p, mu, nu

    trees = state["params"], state["ema"], state["mu"], state["nu"], grads
    out = jax.tree_util.tree_map_with_path(update, *trees)
    params, ema, mu, nu = jax.tree.transpose(jax.tree.structure(grads), jax.tree.structure((0,) * 4), out)
    return {"params": params, "ema": ema, "mu": mu, "nu": nu, "step": step + 1}

def train_step(state, t5_params, batch, *, cfg, t5cfg, r, mesh, update=None):
    """One update from a batch: the frozen T5's features of its token ids (in float32 whatever the compute
    dtype, as in sampling), unless the batch brings them ("context": the encode-once path), then
    denoiser_step. A batch's "stop" flags (a process asked to stop sets its examples') come back as one global
    maximum, so that every process takes the same decision at the same step. update: the
    distillation's mean_flow_step in place of denoiser_step."""
    context = batch["context"] if "context" in batch else model.t5_encode(t5_params, t5cfg, batch["ids"], batch["mask"])
    update = update or denoiser_step
    state, metrics = update(state, batch["images"], context, batch["mask"], cfg=cfg, r=r, mesh=mesh)
    return state, metrics | ({"stop": jnp.max(batch["stop"])} if "stop" in batch else {})

T_BUCKETS = 4  # the loss is also told by noise level: t in [0, 1/4), ..., [3/4, 1); t = 0 is noise
T_NAMES = sample.t_names(T_BUCKETS)

def denoiser_step(state, images, context, mask, *, cfg, r, mesh):
    """Caption drop, t and noise, v-loss, AdamW, EMA. The RNG is a function of the step alone, so a
    resumed run draws exactly what an uninterrupted one would; it draws for the whole batch, so an
    example's draws depend on neither --grad-accum nor the device count."""
    step, B = state["step"], images.shape[0]
    k_drop, k_t, k_noise = jax.random.split(jax.random.fold_in(rng(r.seed, "step"), step), 3)
    mask = mask * (jax.random.uniform(k_drop, (B, 1)) >= r.caption_drop)  # a dropped caption: all mask_token
    t = jax.nn.sigmoid(r.t_mu + r.t_sigma * jax.random.normal(k_t, (B,)))
    noise = r.noise_scale * jax.random.normal(k_noise, images.shape)
    loss_fn = lambda p, *batch: flow_matching_loss(p, cfg, *batch, r.a_min, jnp.dtype(r.precision), r.remat)
    return descend(state, loss_fn, (images, context, mask, t, noise), t, r, mesh)

def descend(state, loss_fn, batch, t, r, mesh):
    """The update from the gradient of loss_fn(params, *batch)'s mean, and the step's metrics:
    besides the loss, its sum and the number of examples in each t bucket, which the loop adds up
    between log lines."""
    params = state["params"]
    losses, grads = accumulated_grads(loss_fn, params, batch, r.grad_accum,
                                      state_shardings(mesh, params, r.fsdp))
    loss, grad_norm = jnp.mean(losses), optax.tree.norm(grads)
    bucket = jnp.minimum((t * T_BUCKETS).astype(jnp.int32), T_BUCKETS - 1)  # [B]
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(r)(state["step"]),
               "loss_sum_by_t": jnp.zeros(T_BUCKETS).at[bucket].add(losses),
               "count_by_t": jnp.zeros(T_BUCKETS, jnp.int32).at[bucket].add(1)}
    return adamw_ema(state, grads, grad_norm, r), metrics

def accumulated_grads(loss_fn, params, batch, n, shardings):
    """Per-example losses [B] and the mean gradient over the batch, laid out as `shardings` (the
    state's). Each device runs its own rows as n equal micro-batches one after another (a scan: one
    compiled body) and adds up their gradients locally; one reduction per tensor after the last
    micro-batch (a reduce-scatter onto the tensor's shard under FSDP) moves the gradient once a
    step whatever n. Left to XLA, the sum over devices sat inside the scan: n times the bytes."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    specs = jax.tree.map(lambda s: s.spec, shardings)

    def reduce(g, spec):  # the mean over all devices' micro-batches, onto this device's part
        g = g / (n * jax.lax.axis_size("data"))
        axes = [i for i, name in enumerate(spec) if name == "data"]
        if axes:
            return jax.lax.psum_scatter(g, "data", scatter_dimension=axes[0], tiled=True)
        return jax.lax.psum(g, "data")

    def local(params, batch):  # on one device: the whole params, its B/D rows of the batch
        params = jax.lax.pcast(params, "data", to="varying")  # its own gradient: no implicit sum
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1),
                             batch)  # [n, B/D/n, ...]: micro-batch i holds rows i, i + n, ...

        def add(total, xs):
            losses, grads = jax.vjp(lambda p: loss_fn(p, *xs), params)
            (grads,) = grads(jnp.full_like(losses, 1 / len(losses)))  # of the micro-batch's mean
            return jax.tree.map(jnp.add, total, grads), losses

        total, losses = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), micro)  # [n, B/D/n]
        return losses.swapaxes(0, 1).reshape(-1), jax.tree.map(reduce, total, specs)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")),
                         out_specs=(P("data"), specs))(params, batch)

# ------------------------------------------------------------------------------------ distillation

# A student's defaults over its preset's (flags still override them): measured on the tiny run; for
# the paper presets, the length of the authors' branch (50K steps at batch 1024, with Muon there).
DISTILL = {"tiny": dict(steps=100, lr=5e-4, warmup=10, ema=0.99, sample_every=50, sample_steps=4,
                        ckpt_every=50),
           "paper": dict(steps=50_000, warmup=1000, sample_steps=4)}

def mean_flow_target(params, teacher, cfg, images, context, mask, t, s, w, noise, a_min, dtype,
                     remat=False):
    """The student's average velocity u and its MeanFlow target, [B, H, W, C] each, for a jump
    from t to s >= t (the papers' r) at guidance w (t, s, w: [B]).

    In this code's time (t = 1 data, t = 0 noise, sampling runs t upward) a jump lands on
    x_s = x_t + (s - t) u(x_t, t, s), u the average velocity: (s - t) u = integral_t^s v dtau.
    Differentiating in t at fixed s along the path (dx_t/dt = v): -u + (s - t) du/dt = -v, so
        u = v + (s - t) du/dt,   du/dt = v . d_x u + d_t u - d_h u   (h = s - t, an input):
    one jax.jvp through the student with tangents (v, 1, -1). (The papers, t = 0 data and r < t,
    write u = v - (t - r) du/dt.) v is the frozen teacher's guided velocity at x_t; the target is
    held fixed (stop-gradient); at s = t it is v itself: guidance distillation. u comes from the
    student's x0 as v from the teacher's (sample.velocity): at h = 0 it is a guided teacher."""
    expand = lambda a: a[:, None, None, None]
    x_t = expand(t) * images + expand(1 - t) * noise
    guided = sample.guided_denoiser(teacher, cfg, context, mask, expand(w), (0.0, 1.0), dtype)
    v = sample.velocity(guided(x_t, expand(t)), x_t, expand(t), a_min)
    txt = model.text_adapter(params, cfg, context, mask, dtype, remat)

    def u_fn(x, t, h):
        x0_hat = model.mean_flow_apply(params, cfg, x, txt, h, w, dtype, remat)
        return sample.velocity(x0_hat, x, expand(t), a_min)

    u, du_dt = jax.jvp(u_fn, (x_t, t, s - t), (v, jnp.ones_like(t), -jnp.ones_like(t)))
    return u, jax.lax.stop_gradient(v + expand(s - t) * du_dt)

def mean_flow_loss(params, teacher, cfg, *batch, a_min, dtype, remat=False):
    """MeanFlow's adaptively weighted loss (power 1): each example's squared error over its own,
    held fixed, so that the rare large errors of long jumps do not swamp the batch. Its value stays
    near 1 whatever the samples' quality: judge the grids' faithfulness instead."""
    u, target = mean_flow_target(params, teacher, cfg, *batch, a_min, dtype, remat)
    err = jnp.mean((u - target) ** 2, axis=(1, 2, 3))  # [B]
    return err / jax.lax.stop_gradient(err + 1e-3)  # [B]

def mean_flow_step(state, images, context, mask, *, teacher, cfg, r, mesh):
    """denoiser_step's counterpart for a student: no caption drop (the teacher's guidance brings the
    unconditional branch); (t, s) two sorted uniform times, s = t for a share r_equals_t; w uniform
    in [w_min, w_max], per example."""
    B = images.shape[0]
    keys = jax.random.split(jax.random.fold_in(rng(r.seed, "step"), state["step"]), 4)
    t, s = jnp.sort(jax.random.uniform(keys[0], (2, B)), axis=0)
    s = jnp.where(jax.random.uniform(keys[1], (B,)) < r.r_equals_t, t, s)
    w = jax.random.uniform(keys[2], (B,), minval=r.w_min, maxval=r.w_max)
    noise = r.noise_scale * jax.random.normal(keys[3], images.shape)
    loss_fn = lambda p, *batch: mean_flow_loss(p, teacher, cfg, *batch, a_min=r.a_min,
                                               dtype=jnp.dtype(r.precision), remat=r.remat)
    return descend(state, loss_fn, (images, context, mask, t, s, w, noise), t, r, mesh)

def distill_step(state, frozen, batch, *, cfg, t5cfg, r, mesh):
    """train_step of a student; frozen: (the T5's parameters, the teacher's)."""
    t5_params, teacher = frozen
    update = functools.partial(mean_flow_step, teacher=teacher)
    return train_step(state, t5_params, batch, cfg=cfg, t5cfg=t5cfg, r=r, mesh=mesh, update=update)

# ---------------------------------------------------------------------------------------------- sharding

def state_shardings(mesh, state_shapes, fsdp):
    """Replicate everything, or with FSDP split each matrix along its largest axis that divides evenly
    (vectors and scalars stay replicated: sharding them saves nothing)."""
    n = mesh.shape["data"]

    def spec(x):
        axes = [i for i in np.argsort(x.shape)[::-1] if x.shape[i] % n == 0]
        if not fsdp or not axes or x.ndim < 2:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*[("data" if i == axes[0] else None) for i in range(x.ndim)]))

    return jax.tree.map(spec, state_shapes)

def make_mesh(devices):
    return jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

def make_train_step(mesh, state_shapes, t5_shapes, cfg, t5cfg, r):
    """The whole step under one jit; every array of the batch is split over the "data" axis, the state donated
    in place."""
    shard_state = state_shardings(mesh, state_shapes, r.fsdp)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    step_fn = distill_step if r.distill_from else train_step
    step = jax.jit(functools.partial(step_fn, cfg=cfg, t5cfg=t5cfg, r=r, mesh=mesh),
                   in_shardings=(shard_state, jax.tree.map(lambda _: replicated, t5_shapes), batch_sharding),
                   out_shardings=(shard_state, replicated), donate_argnums=0)
    return step, shard_state, batch_sharding

def init_state(key, cfg):
    params = model.init_mmjit(key, cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"params": params, "ema": params, "mu": zeros, "nu": zeros, "step": jnp.zeros((), jnp.int32)}

def load_init_weights(path, cfg):
    """Weights to fine-tune from: a train.py run or checkpoint (its EMA), or released Diffusers weights."""
    loaded, params, _ = sample.load_denoiser(path)
    diff = [f"{k} {v} != {getattr(cfg, k)}" for k, v in dataclasses.asdict(loaded).items()
            if k != "image_size" and v != getattr(cfg, k)]  # weights do not depend on the resolution
    if diff:
        raise ValueError(f"a model of another config ({', '.join(diff)})")
    return params

# ----------------------------------------------------------------------------------------- text encoder

def make_tiny_text_encoder(folder, captions, seed):
    """A frozen random T5 with a sentencepiece model fitted to the run's own captions, saved in the Hugging
    Face layout so that the run directory is self-contained. BPE merges up to whole words, so every word of
    the captions becomes known pieces (the vocabulary follows the data: a few hundred pieces for the shapes, at
    most 8192), every character of them included; case is folded; byte fallback spells a word never seen in
    bytes instead of one shared <unk>."""
    import sentencepiece

    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=buf, model_type="bpe", vocab_size=8192, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="nmt_nfkc_cf", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, minloglevel=2)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    cfg = model.T5Config(vocab_size=model.Tokenizer(os.path.join(folder, "spiece.model")).vocab_size, **TINY_T5)
    model.save_t5(folder, cfg, jax.jit(model.init_t5, static_argnums=1)(rng(seed, "t5"), cfg))

def fitted_text_length(tokenizer, captions):
    """The text length of a run with a fitted tokenizer: 99% of its captions whole, at least 16, a multiple of 8."""
    return min(256, max(16, -(-int(np.percentile(tokenizer.lengths(captions), 99)) // 8) * 8))

def encode_once(text_encoder, captions, text_length, dtype, chunk=32):
    """({caption: row}, features [N, L', Dt]) of the distinct captions, computed once in chunks of one shape (one
    compilation). L' is the longest caption's tokens: the padding's features are never used (mask_token takes
    their place), and the encoder masks padded keys, so shorter padding gives the same features."""
    t5cfg, t5_params, tokenizer = text_encoder
    distinct = sorted(set(captions))
    length = int(min(text_length, tokenizer.lengths(distinct).max()))
    table = np.zeros((len(distinct), length, t5cfg.d_model), dtype)
    for i in tqdm(range(0, len(distinct), chunk), desc="T5 features of each caption, once", unit="chunk",
                  disable=jax.process_index() != 0):
        part = distinct[i:i + chunk]
        ids, mask = tokenizer.encode(part + [""] * (chunk - len(part)), length)
        table[i:i + len(part)] = np.asarray(sample.encode_text(t5_params, t5cfg, ids, mask))[:len(part)]
    return {c: i for i, c in enumerate(distinct)}, table

def text_report(tokenizer, captions, r, features):
    """The start-up line on how the text encoder reads the run's captions, and warnings where it reads them badly."""
    c = tokenizer.coverage(captions, r.text_length)
    line = (f"text: {c['captions']} captions read, {c['unknown']:.2%} of pieces unknown, {c['cut']:.1%} cut at "
            f"{r.text_length} tokens, median {c['median_tokens']:.0f} tokens; T5 features "
            + (f"encoded once for {len(features[0])} distinct captions" if features else "encoded in every step"))
    warnings = []
    if c["unknown"] > 0.01:
        warnings.append(f"warning: {c['unknown']:.1%} of the caption pieces are unknown to the tokenizer: those "
                        "words all reach the model as the same <unk>")
    if c["cut"] > 0.05:
        need = int(np.percentile(tokenizer.lengths(captions), 99))
        warnings.append(f"warning: {c['cut']:.0%} of the captions are cut at --text-length {r.text_length}; "
                        f"{need} would hold 99% of them")
    return line, warnings, c

# ------------------------------------------------------------------------------------------------ the run

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help=f"a recipe, one of {', '.join(RECIPES)} (default tiny); "
                                                         "the flags below override its fields")
    parser.add_argument("--out", help="run directory (default runs/<preset>, or runs/<preset>-<data> with --data)")
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize(): automatic on TPU pods and SLURM, else set "
                             "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
    for f in dataclasses.fields(Recipe):
        default = {(): "synthetic", "": "none"}.get(f.default, f.default)
        flag, help = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (tiny: {default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif f.type is tuple:
            parser.add_argument(flag, action="append", default=None, help=help)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=help)
    args = parser.parse_args(argv)
    if args.preset not in RECIPES:
        raise UsageError(f"--preset {args.preset}: unknown; choose one of {', '.join(RECIPES)}")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if getattr(args, f.name) is not None}
    base = RECIPES[args.preset]
    if overrides.get("distill_from"):
        base = dataclasses.replace(base, **DISTILL["tiny" if args.preset == "tiny" else "paper"])
    r = dataclasses.replace(base, **{k: tuple(v) if k == "data" else v
                                     for k, v in overrides.items()})
    if r.model not in model.PRESETS:
        raise UsageError(f"--model {r.model}: unknown; choose one of {', '.join(model.PRESETS)}")
    args.fit_text_length = not r.t5 and "text_length" not in overrides
    if not args.out:
        source = data.parse_sources(r.data)[0][0] if r.data else ""
        name = re.sub(r"\W+", "_", os.path.splitext(os.path.basename(os.path.normpath(source)))[0]).strip("_")
        args.out = os.path.join("runs", args.preset.replace("/", "") + (f"-{name}" if r.data else ""))
    return args, r

def check_recipe(r, cfg):
    """Every flag's value, before anything is read or written: one line naming the flag and what it must be."""
    if not r.t5 and cfg.txt_dim != TINY_T5["d_model"]:
        raise UsageError(f"--t5: the {r.model} model reads {cfg.txt_dim}-wide FLAN-T5 features; give --t5 DIR, a "
                         "Hugging Face FLAN-T5 folder (google/flan-t5-large)")
    n = jax.device_count()
    rules = [("steps", r.steps >= 1, "at least 1"), ("batch_size", r.batch_size >= 1 and r.batch_size % n == 0,
              f"a positive multiple of the {n} devices"),
             ("image_size", r.image_size >= cfg.patch_size and r.image_size % cfg.patch_size == 0,
              f"a positive multiple of the patch size {cfg.patch_size}"),
             ("text_length", r.text_length >= 2, "at least 2 (a token and </s>)"),
             ("log_every", r.log_every >= 1, "at least 1"), ("ckpt_every", r.ckpt_every >= 1, "at least 1"),
             ("keep", r.keep >= 1, "at least 1"), ("sample_every", r.sample_every >= 0, "0 (no grids) or more"),
             ("sample_steps", r.sample_steps >= 1, "at least 1"), ("warmup", r.warmup >= 0, "0 or more"),
             ("lr", r.lr > 0, "positive"), ("ema", 0 <= r.ema < 1, "in [0, 1)"),
             ("caption_drop", 0 <= r.caption_drop < 1, "in [0, 1)"), ("noise_scale", r.noise_scale > 0, "positive"),
             ("a_min", 0 < r.a_min < 1, "in (0, 1)"), ("t_sigma", r.t_sigma > 0, "positive"),
             ("clip", r.clip >= 0, "0 (off) or more"), ("guidance", r.guidance >= 0, "0 or more"),
             ("r_equals_t", 0 <= r.r_equals_t <= 1, "in [0, 1]"),
             ("w_max", r.w_max >= r.w_min >= 0, f"at least --w-min {r.w_min}, itself >= 0"),
             ("precision", r.precision in ("float32", "bfloat16"), "float32 or bfloat16"),
             ("grad_accum", r.grad_accum >= 1 and r.batch_size // n % r.grad_accum == 0,
              f"a divisor of the per-device batch ({r.batch_size} over {n} devices = {r.batch_size // n})")]
    for name, ok, expected in rules:
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(r, name)}: expected {expected}")
    for flag, path in (("--init-from", r.init_from), ("--distill-from", r.distill_from)):
        if path and not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file or directory")

def check_resume(run, config, r):
    """A run directory must hold this same run (the fields in RESUMABLE may differ) that has steps left."""
    old = model.read_json(os.path.join(run, "config.json"))
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    new = json.loads(json.dumps(config["recipe"]))
    diff = [f"{k} {old['recipe'].get(k, defaults[k])!r} -> {v!r}" for k, v in new.items()
            if k not in RESUMABLE and old.get("recipe", {}).get(k, defaults[k]) != v]
    if diff:
        raise UsageError(f"--out {run} holds another run ({'; '.join(diff)}): give the same flags to resume it, "
                         "or another --out")
    try:
        ckpt = sample.latest_checkpoint(run)
    except FileNotFoundError:  # none at all: the run starts
        return
    except ValueError as e:  # none complete
        raise UsageError(e) from None
    step = model.read_json(os.path.join(ckpt, "state.json"))["step"]
    written = sum(re.fullmatch(r"data_\d+\.json", f) is not None for f in os.listdir(ckpt))
    if written != jax.process_count():  # a process's data position is in its own split of the data
        raise UsageError(f"{ckpt} holds the data positions of {written} processes and this run has "
                         f"{jax.process_count()}: resume it on {written}")
    if step >= r.steps:
        raise UsageError(f"--out {run} is finished ({step} of --steps {r.steps}): give a larger --steps to train it "
                         "further, or another --out for a new run")

def prepare_run(run, r, fit_text_length):
    """Check everything, then make the run directory, or reopen this same run. Nothing is written before the
    checks pass, and a new run is built in RUN.partial and renamed into place: an interrupt at any moment
    leaves nothing or a run that resumes. Returns the model config, the recipe with its text length, the text
    encoder, the captions read, whether they are all of them, and the weights to fine-tune from."""
    cfg = dataclasses.replace(model.PRESETS[r.model], image_size=r.image_size,
                              mean_flow=bool(r.distill_from))
    check_recipe(r, cfg)
    captions, complete = checked("", data.read_captions, list(r.data), r.seed)  # its errors name the --data
    resume = os.path.isfile(os.path.join(run, "config.json"))
    if not resume and os.path.exists(run) and os.listdir(run):
        raise UsageError(f"--out {run}: exists and is not a train.py run (no config.json)")
    folder, first = run if resume else os.path.normpath(run) + ".partial", jax.process_index() == 0
    t5_path = os.path.abspath(r.t5) if r.t5 else os.path.join(folder, "t5")
    if first and not resume:
        shutil.rmtree(folder, ignore_errors=True)  # left by a second Ctrl-C
        if r.distill_from and not r.t5:  # the teacher's own: the features it was trained on
            shutil.copytree(sample.load_denoiser(r.distill_from)[2]["t5"], t5_path)
        elif not r.t5:
            make_tiny_text_encoder(t5_path, captions, r.seed)
    multihost_utils.sync_global_devices("text encoder ready")
    try:
        text_encoder = checked(f"--t5 {t5_path}: not a usable T5 folder", sample.load_text_encoder, t5_path, cfg)
        if fit_text_length:
            r = dataclasses.replace(r, text_length=fitted_text_length(text_encoder[2], captions))
        config = {"model": dataclasses.asdict(cfg), "t5": t5_path if r.t5 else "t5", "text_length": r.text_length,
                  "recipe": dataclasses.asdict(r)}
        if resume:
            check_resume(run, config, r)
        init = checked(f"--init-from {r.init_from}", load_init_weights, r.init_from, cfg) \
            if r.init_from and not resume else None
        if r.distill_from:  # the teacher, needed by every run of a student, resumed or not
            init = checked(f"--distill-from {r.distill_from}", load_init_weights, r.distill_from,
                           dataclasses.replace(cfg, mean_flow=False))
    except UsageError:
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    multihost_utils.sync_global_devices("checks done")  # every process has read RUN.partial before it moves
    if first:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json.tmp"), "w") as f:
            json.dump(config, f, indent=1)
        os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))
        if not resume:
            shutil.rmtree(run, ignore_errors=True)  # an empty folder the user made
            os.makedirs(os.path.dirname(os.path.abspath(run)), exist_ok=True)
            os.replace(folder, run)
    multihost_utils.sync_global_devices("run directory ready")
    return cfg, r, text_encoder, captions, complete, init

def open_log(path, start):
    """log.jsonl, keeping the lines up to the step resumed from: steps logged after the checkpoint (before a
    crash) are about to be redone, and a line torn by a kill ends what is kept."""
    kept = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] > start:
                        break
                except (ValueError, KeyError):
                    break
                kept.append(line)
    log = open(path, "w")
    log.writelines(kept)
    return log

def stop_requests():
    """A list that SIGINT or SIGTERM appends to: the run finishes its step, saves and exits. A second signal
    quits at once (checkpoints are written aside and renamed, so even that loses only the steps since the last)."""
    stop = []

    def handler(signum, frame):
        if stop:
            print("train.py: stopped at once", file=sys.stderr)
            os._exit(128 + signum)
        stop.append(signum)
        print("train.py: stopping after this step (again to quit at once)", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop

def main(argv=None):
    args, r = parse_args(argv)
    if args.distributed:  # peers found by themselves on TPU pods and SLURM; elsewhere from the environment
        env = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
        jax.distributed.initialize(**{k: int(os.environ[v]) for k, v in env.items() if v in os.environ})
    stop = stop_requests()  # after initialize(), whose preemption notifier takes SIGTERM for itself
    run, first = args.out, jax.process_index() == 0
    cfg, r, text_encoder, captions, complete, init = prepare_run(run, r, args.fit_text_length)
    t5cfg, t5_params, tokenizer = text_encoder

    mesh = make_mesh(jax.devices())
    state_shapes = jax.eval_shape(functools.partial(init_state, cfg=cfg), jax.random.key(0))
    frozen = t5_params
    if r.distill_from:  # the teacher in the compute dtype, its own copy: the step donates init
        frozen = (t5_params, jax.tree.map(lambda x: jnp.array(x, r.precision), init))
    step_fn, shardings, batch_sharding = make_train_step(mesh, state_shapes, frozen, cfg, t5cfg, r)
    frozen = jax.device_put(frozen, NamedSharding(mesh, P()))
    found = sample.checkpoints(run)  # newest first
    damaged = list(itertools.takewhile(lambda c: c[1], found))  # check_resume refused all damaged
    if len(damaged) == len(found):  # no checkpoint at all: a new run
        data_state = None
        state = jax.jit(functools.partial(init_state, cfg=cfg), out_shardings=shardings)(rng(r.seed, "init"))
        if init is not None:  # the EMA its own copy: the step donates both
            init = state["params"] | init  # a student: its new tokens' weights kept
            state = jax.device_put(state | {"params": init, "ema": jax.tree.map(jnp.copy, init)}, shardings)
    else:
        ckpt = found[len(damaged)][0]
        for path, problem in damaged if first else []:
            print(f"train.py: {path} is damaged ({problem}); resuming from {ckpt}", file=sys.stderr)
        try:
            state, data_state = sample.restore_checkpoint(ckpt, state_shapes, shardings)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot resume from {ckpt}: {e}") from None
    start = int(state["step"])

    # Encode-once: where every caption is known and the distinct ones are fewer than the encodings the steps
    # would make, their features are computed now and each step looks them up (not across hosts: each would
    # need the whole table, and multi-host runs are the large ones).
    distinct = len(set(captions))
    size = distinct * r.text_length * t5cfg.d_model * jnp.dtype(r.precision).itemsize
    features = None
    if complete and jax.process_count() == 1 and distinct < (r.steps - start) * r.batch_size and size <= FEATURE_BYTES:
        features = encode_once(text_encoder, captions, r.text_length, jnp.dtype(r.precision))
    line, warnings, coverage = text_report(tokenizer, captions, r, features)
    if first:
        print("\n".join([line, *warnings]), file=sys.stderr)

    prompts = grid_prompts(r, captions)
    ids, mask = tokenizer.encode(prompts, r.text_length)
    buckets = data.aspect_buckets(cfg.image_size, cfg.patch_size) if r.multi_aspect else [(cfg.image_size,) * 2]
    grid = {"prompts": prompts, "mask": mask, "context": sample.encode_text(t5_params, t5cfg, ids, mask),
            "keys": jax.random.split(rng(r.seed, "grid"), len(prompts)),
            "shapes": buckets[::len(buckets) // 2 or 1]}  # the tallest, square, the widest
    # The bucket frequencies of process 0's probe, on every host: hosts draw the same batch shapes.
    table = np.zeros((len(data.parse_sources(r.data or ["synthetic"])), len(buckets)), np.float32)
    if jax.process_index() == 0:
        table = data.bucket_table(list(r.data), r.seed, buckets).astype(np.float32)
    table = multihost_utils.broadcast_one_to_all(table)
    loader = data.Loader(list(r.data), cfg.image_size, r.batch_size // jax.process_count(), tokenizer,
                         r.text_length, seed=r.seed, process_index=jax.process_index(),
                         process_count=jax.process_count(), state=data_state, buckets=buckets,
                         frequencies=table)
    os.makedirs(os.path.join(run, "samples"), exist_ok=True)
    log = open_log(os.path.join(run, "log.jsonl"), start) if first else None
    write_log(log, {"step": start, "text": line, **coverage})
    bar = tqdm(range(start, r.steps), initial=start, total=r.steps, disable=not first)
    began = time.perf_counter()
    clock, last, window, by_t, score = (began, start), None, [], None, None
    with loader:
        for step in bar:
            batch = next(loader)
            batch = device_batch(batch, batch_sharding, features, stop)
            state, metrics = step_fn(state, frozen, batch)
            done = step + 1
            window.append(metrics)
            if last is not None:  # the previous step's flags: one step behind, not to stall
                check_finite(log, jax.device_get(last), done - 1, run, r)
            stopping = last is not None and bool(last["stop"])  # every process's request
            last = metrics
            saving = done % r.ckpt_every == 0 or done == r.steps or stopping
            if saving or done % r.log_every == 0:  # this step's, before anything of it is written
                check_finite(log, jax.device_get(metrics), done, run, r)
            if done % r.log_every == 0 or done == r.steps or stopping:
                clock, by_t = log_step(log, bar, metrics, window, done, clock, r, loader)
                window = []
            if saving:
                sample.save_checkpoint(run, state, loader.state(), r.keep)
            if r.sample_every and (done % r.sample_every == 0 or done == r.steps):
                score = save_grid(run, done, state["ema"], cfg, grid, r)
                if score is not None and first:  # the share of the 64 synthetic prompts whose sample shows it
                    bar.write(f"step {done}: faithfulness {score:.0%} of {len(prompts)} prompts")
                    write_log(log, {"step": done, "faithfulness": score})
                if first:
                    sample.plot_log(os.path.join(run, "log.jsonl"), os.path.join(run, "samples/loss.png"))
            if stopping:
                print(f"train.py: stopped at step {done}; resume with the same command", file=sys.stderr)
                break
    if first:
        print(loader.summary(), file=sys.stderr)
        write_log(log, {"step": int(state["step"]), "data": loader.summary()})
        log.close()
        seconds = time.perf_counter() - began
        print(run_summary(run, start, int(state["step"]), seconds, r, by_t, score), file=sys.stderr)

def device_batch(batch, sharding, features, stop):
    """The host batch as global arrays: with the encode-once table, the captions' T5 features in place of their
    ids; and this process's stop request as one flag per example (the step returns the maximum over all)."""
    out = {"images": batch["images"], "mask": batch["mask"], "stop": np.full(len(batch["mask"]), bool(stop), np.int32)}
    if features:
        index, table = features
        try:
            rows = table[[index[c] for c in batch["captions"]]]  # [B, L', Dt]
        except KeyError as e:
            raise RuntimeError(f"caption {e} was not among the captions read at start-up: was --data changed?") from None
        out["context"] = np.zeros((len(rows), batch["mask"].shape[1], rows.shape[2]), rows.dtype)
        out["context"][:, :rows.shape[1]] = rows
    else:
        out["ids"] = batch["ids"]
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in out.items()}

def write_log(log, record):
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()


def log_step(log, bar, metrics, window, done, clock, r, loader):
    """One line of log.jsonl and the progress bar: this step's loss, and the mean loss of each noise
    level over the window of steps since the last line (a step's batch may hold no example of a
    level). Returns the new clock and those means (None: no example)."""
    m = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and k != "stop"}
    window = jax.device_get([[w["loss_sum_by_t"], w["count_by_t"]] for w in window])
    sums, counts = np.sum(window, axis=0)
    by_t = [float(s / c) if c else None for s, c in zip(sums, counts)]
    now = time.perf_counter()
    m |= {"step": done, "loss_by_t": by_t, "skipped": loader.skipped,
          "images_per_s": (done - clock[1]) * r.batch_size / (now - clock[0])}
    by_t_text = " ".join("-" if x is None else f"{x:.3f}" for x in by_t)
    bar.set_postfix(loss=f"{m['loss']:.4f}", by_t=by_t_text, img_s=f"{m['images_per_s']:.0f}")
    write_log(log, m)
    return (now, done), by_t

def check_finite(log, m, step, run, r):
    """Stops the run at a step whose loss or gradient is not finite, before anything of it is saved,
    with one line naming the step, the noise levels whose loss is not finite, and how to go on."""
    if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
        return
    bad = [name for name, s, c in zip(T_NAMES, m["loss_sum_by_t"], m["count_by_t"])
           if c and not np.isfinite(s)]
    what = f"the loss is not finite at {', '.join(bad)}" if bad else "the gradient is not finite"
    try:
        go_on = f"the last good checkpoint {sample.latest_checkpoint(run)} is kept"
    except FileNotFoundError:
        go_on = "no checkpoint was saved before it"
    line = (f"step {step}: {what}; stopped, nothing of this step saved; {go_on}: the same command "
            f"with a smaller --lr (now {r.lr:g}) goes on from there")
    write_log(log, {"step": step, "stopped": line})
    sys.exit(f"train.py: {line}")

def run_summary(run, start, step, seconds, r, by_t, score):
    """The end of a run in one line: what it did, how fast, where it stands, where its files are."""
    loss = ", ".join(f"{name} {'-' if x is None else f'{x:.4f}'}"
                     for name, x in zip(T_NAMES, by_t or [None] * T_BUCKETS))
    return (f"train.py: {step - start} steps to step {step} in {seconds:.0f} s, "
            f"{(step - start) * r.batch_size / seconds:.1f} images/s; final loss by noise level: "
            + loss + ("" if score is None else f"; faithfulness {score:.0%}")
            + f"; samples in {os.path.join(run, 'samples')}, checkpoints in "
            + os.path.join(run, "checkpoints"))

def grid_prompts(r, captions):
    """The grids' prompts, a few of the run's distinct captions; for the built-in shapes their own 8 first, then
    56 more (only 8 are shown; all 64 are scored for faithfulness)."""
    distinct = sorted(set(captions) - set(data.SYNTHETIC_PROMPTS if not r.data else []))
    n = GRID_PROMPTS * 7 if not r.data else min(GRID_PROMPTS, len(distinct))
    chosen = list(np.random.default_rng(r.seed).choice(distinct, n, replace=False))
    return data.SYNTHETIC_PROMPTS + chosen if not r.data else chosen

def save_grid(run, done, params, cfg, grid, r):
    """EMA samples of the grid's prompts from the same noise every time, one grid per shape (the tallest, the
    square and the widest bucket): samples/step_NNNNNN.png at the training size, step_NNNNNN_WxH.png else.
    Returns, for the built-in shapes, the share of the square grid's samples that show their prompt."""
    score = None
    for h, w in grid["shapes"]:
        noise = sample.initial_noise(grid["keys"], (h, w), r.noise_scale)
        sampler = sample.mean_flow_sample if cfg.mean_flow else \
            functools.partial(sample.sample, sampler="dpm++2m")
        images = np.asarray(sampler(params, cfg, grid["context"], grid["mask"], noise,
                                    steps=r.sample_steps, guidance=r.guidance))
        name = f"step_{done:06d}" + ("" if h == w == cfg.image_size else f"_{w}x{h}")
        if jax.process_index() == 0:
            sample.make_grid(images[:GRID_PROMPTS], grid["prompts"][:GRID_PROMPTS]).save(
                os.path.join(run, "samples", name + ".png"))
        if h == w and not r.data:
            score = data.faithfulness(images, grid["prompts"])
    return score

if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:
        sys.exit(f"train.py: {e}")

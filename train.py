"""Train MiniT2I by flow matching: x-prediction, v-loss, AdamW (tiny: Muon), EMA. From a 2-core laptop to a pod.

    python train.py   # tiny model, synthetic shapes, random tiny T5, 3-5 minutes on 2 cores
    python train.py --preset b16-pretrain --t5 flan-t5-large --data 'cc12m/{00000..02175}.tar'

Running the same command again resumes from the run directory's last checkpoint.
"""
import argparse
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time

script = __name__ == "__main__" and sys.orig_argv[-len(sys.argv):] == sys.argv  # not -m, %run, ...
if script and sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
    # XLA allocates a CPU step's temporaries anew and glibc maps them in 4 KiB pages (tiny: a quarter of a
    # step in page faults); in huge pages a run takes 12% less time. glibc reads this at start-up only.
    os.execve(sys.executable, sys.orig_argv, os.environ | {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})

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
from sample import CheckpointError, UsageError, checked, require

# ------------------------------------------------------------------------------------------ recipes

def field(default, help):
    return dataclasses.field(default=default, metadata={"help": help})

@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every field is a command-line flag (`--batch-size`); its help is the text here."""
    model: str = field("tiny", "MM-JiT size, a key of model.PRESETS: tiny, tiny/4, B/32, B/16 or L/16")
    image_size: int = field(32, "training resolution in pixels, a multiple of the patch size")
    multi_aspect: bool = field(False, "aspect buckets 1:2..2:1, ~image_size^2 pixels; off: square")
    batch_size: int = field(32, "global batch, over all devices and hosts")
    steps: int = field(1920, "total training steps; raise it to train a finished run further")
    lr: float = field(1e-3, "learning rate after the warm-up")
    warmup: int = field(100, "steps of linear warm-up from 1e-6 to --lr; 0 = none")
    muon: bool = field(True, "Muon for the weight matrices, AdamW for the rest; off: all AdamW")
    ema: float = field(0.995, "EMA decay of the weights that are sampled and saved as ema")
    ema_warmup: bool = field(True, "decay min(ema, (1+s)/(10+s)): a short run's EMA catches up")
    clip: float = field(0.0, "global-norm gradient clipping; 0 = off, as in the original")
    t5: str = field("", "a Hugging Face FLAN-T5 folder; none: a random tiny T5, fitted tokenizer")
    text_length: int = field(16, "tokens per caption with </s> (fitted tokenizer: 99%% fit)")
    data: tuple = field((), "SOURCE[:WEIGHT], repeatable: {0..9}.tar, folder, .jsonl, 'synthetic'")
    caption_drop: float = field(0.1, "share of captions dropped (all mask_token), for guidance")
    t_mu: float = field(-0.8, "centre of logit-normal t = sigmoid(N(t_mu, t_sigma)); t = 1 is data")
    t_sigma: float = field(1.2, "spread of the logit-normal t (see --t-mu); paper: 0.8")
    noise_scale: float = field(2.0, "x at t = 0 is noise_scale N(0, I), in training and sampling")
    a_min: float = field(0.25, "the v-loss divides by max(1 - t, a_min): x0's error weighs <= 1/a_min^2")
    precision: str = field("float32", "denoiser dtype: float32 or bfloat16 (T5, weights: float32)")
    remat: bool = field(False, "recompute block activations in the backward pass (less memory)")
    fsdp: bool = field(False, "shard parameters and optimiser state over the data axis too")
    grad_accum: int = field(1, "micro-batches a step, in turn: the same update, less memory")
    seed: int = field(0, "one seed for initialisation, step noise, grid noise and data order")
    log_every: int = field(50, "steps between lines of log.jsonl")
    sample_every: int = field(640, "steps between sample grids in samples/; 0 = none")
    sample_steps: int = field(20, "dpm++2m steps of each sample grid")
    guidance: float = field(2.0, "classifier-free guidance of the grids; sample.py's default too")
    ckpt_every: int = field(640, "steps between checkpoints (also one at the end and on a stop)")
    keep: int = field(3, "checkpoints kept")
    init_from: str = field("", "fine-tune from a run or checkpoint's EMA, or released weights")
    distill_from: str = field("", "distil a run or checkpoint's EMA to a few-step MeanFlow student")
    r_equals_t: float = field(0.25, "distillation: share of examples with no jump (r = t)")
    w_min: float = field(1.0, "distillation: the student learns w in [w_min, w_max]; --guidance +-1")
    w_max: float = field(3.0, "distillation: see --w-min")

# Fields a resumed run may change: not what it computes (lr: to go on after a loss went non-finite).
RESUMABLE = {"steps", "log_every", "sample_every", "sample_steps", "guidance", "ckpt_every", "keep",
             "remat", "fsdp", "grad_accum", "lr"}
PAPER = dict(image_size=512, multi_aspect=False, batch_size=1024, ema=0.99995, ema_warmup=False, muon=False,
             text_length=256, log_every=100, sample_every=5000, ckpt_every=5000, t_sigma=0.8, a_min=0.01)
PRETRAIN = PAPER | dict(lr=4e-4, steps=250_000, warmup=5000, guidance=2.5)
FINETUNE = PAPER | dict(lr=4e-5, steps=40_000, warmup=1000, guidance=5.0)
RECIPES = {"tiny": Recipe(), "b32-pretrain": Recipe(model="B/32", **PRETRAIN),
           "b16-pretrain": Recipe(model="B/16", **PRETRAIN), "b16-finetune": Recipe(model="B/16", **FINETUNE),
           "l16-pretrain": Recipe(model="L/16", **PRETRAIN), "l16-finetune": Recipe(model="L/16", **FINETUNE)}
# tiny on data other than the built-in shapes: real pictures need patch 4's detail (photographs: 98-99% right at
# guidance 2 with the real crops' coverage; the stand-in folder: more accuracy; README: Recipes), 1.3x the time.
TINY_OWN_DATA = dict(model="tiny/4", steps=1440)
# A student's defaults over its preset's: measured on tiny; for the paper's, the authors' branch.
# Its a_min stays 0.01: in the MeanFlow target it defines the velocity, not only a weight.
DISTILL = {"tiny": dict(steps=100, lr=2.5e-4, warmup=10, ema=0.99, sample_steps=4, a_min=0.01),
           "paper": dict(steps=50_000, warmup=1000, sample_steps=4, r_equals_t=0.5)}
TINY_T5 = dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2)  # the random T5's size
STREAMS = ("init", "step", "grid", "t5")  # one seed's random streams: none shares bits with another
FEATURE_BYTES = 4 << 30  # T5 features of the distinct captions kept in host memory up to this

def rng(seed, stream):
    return jax.random.fold_in(jax.random.key(seed), STREAMS.index(stream))

# ---------------------------------------------------------------------------------------- objective

def flow_matching_loss(params, cfg, images, context, mask, t, noise, a_min=0.01, dtype=jnp.float32, remat=False):
    """x-prediction trained by the v-loss, per example [B]. t: [B], t = 1 is data; noise scaled."""
    t = t[:, None, None, None]
    x_t = t * images + (1 - t) * noise
    x0_hat = model.mmjit_apply(params, cfg, x_t, context, mask, jnp.dtype(dtype), remat)
    v_hat = sample.velocity(x0_hat, x_t, t, a_min)  # clipped: t -> 1 does not blow up the loss
    v = sample.velocity(images, x_t, t, a_min)
    return jnp.mean((v_hat - v) ** 2, axis=(1, 2, 3))  # [B]

def mean_flow_target(params, teacher, cfg, images, context, mask, t, s, w, noise, a_min, dtype,
                     remat=False):
    """The second objective, a few-step student's (--distill-from): its average velocity u and the
    MeanFlow target [B, H, W, C] for a jump from t to s >= t (the papers' r) at guidance w (t, s, w:
    [B]): x_s = x_t + (s - t) u(x_t, t, s), (s - t) u = integral_t^s v. Differentiating in t at
    fixed s along the path (dx_t/dt = v): -u + (s - t) du/dt = -v, so u = v + (s - t) du/dt,
        du/dt = v . d_x u + d_t u - d_h u   (h = s - t, an input): one jax.jvp, tangents (v, 1, -1);
    v: the frozen teacher's guided velocity. The target is held fixed; at s = t it is v."""
    expand = lambda a: a[:, None, None, None]
    x_t = expand(t) * images + expand(1 - t) * noise
    guided = sample.guided_denoiser(teacher, cfg, context, mask, dtype)
    v = sample.velocity(guided(x_t, t, expand(w)), x_t, expand(t), a_min)
    txt = model.text_adapter(params, cfg, context, mask, dtype, remat)
    def u_fn(x, t, h):
        x0_hat = model.mean_flow_apply(params, cfg, x, txt, h, w, dtype, remat)
        return sample.velocity(x0_hat, x, expand(t), a_min)
    u, du_dt = jax.jvp(u_fn, (x_t, t, s - t), (v, jnp.ones_like(t), -jnp.ones_like(t)))
    return u, jax.lax.stop_gradient(v + expand(s - t) * du_dt)

def mean_flow_loss(params, teacher, cfg, r, *batch):
    """MeanFlow's adaptively weighted loss [B]: each error over itself, held fixed (so, near 1)."""
    u, target = mean_flow_target(params, teacher, cfg, *batch, r.a_min, r.precision, r.remat)
    err = jnp.mean((u - target) ** 2, axis=(1, 2, 3))
    return err / jax.lax.stop_gradient(err + 1e-3)

# ------------------------------------------------------------------------------------------- update

def lr_schedule(r):
    """Linear warm-up from 1e-6, then constant (optax's with 0 steps stays at 1e-6 for ever)."""
    return optax.linear_schedule(1e-6, r.lr, r.warmup) if r.warmup else lambda step: r.lr

def orthogonalized(g, steps=5):
    """g [m, n], its singular values pushed to about [0.7, 1.2] by Muon's quintic Newton-Schulz."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (jnp.linalg.norm(g) + 1e-8)  # all singular values below 1: inside the iteration's basin
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # x @ x.T on the short side: the cheaper product
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x if wide else x.T

def adamw_ema(state, grads, grad_norm, r):
    """AdamW (betas 0.9, 0.95, no weight decay), clipping, then the EMA, as one elementwise function
    per tensor, fused by XLA (half optax's time). With r.muon every 2-D matrix (the text
    embedder's, the output's too) takes Muon's step (Nesterov 0.95, orthogonalized, AdamW's RMS)."""
    step, b1, b2 = state["step"], 0.9, 0.95
    lr, count = lr_schedule(r)(step), step + 1.0
    scale = jnp.minimum(1.0, r.clip / grad_norm) if r.clip else 1.0
    decay = jnp.minimum(r.ema, (1.0 + step) / (10.0 + step)) if r.ema_warmup else r.ema
    def update(p, ema, mu, nu, g):
        g = g * scale
        if r.muon and p.ndim == 2:
            mu = 0.95 * mu + 0.05 * g  # Nesterov's look-ahead, bias-corrected as in optax's muon
            ahead = 0.95 * mu / (1 - 0.95 ** (count + 1)) + 0.05 * g / (1 - 0.95**count)
            p = p - lr * 0.2 * max(p.shape) ** 0.5 * orthogonalized(ahead)
        else:
            mu, nu = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g * g
            p = p - lr * (mu / (1 - b1**count)) / (jnp.sqrt(nu / (1 - b2**count)) + 1e-8)
        return p, decay * ema + (1 - decay) * p, mu, nu
    out = jax.tree.map(update, *[state[k] for k in ("params", "ema", "mu", "nu")], grads)
    params, ema, mu, nu = jax.tree.transpose(jax.tree.structure(grads), None, out)
    return {"params": params, "ema": ema, "mu": mu, "nu": nu, "step": step + 1}

# --------------------------------------------------------------------------------------------- step

def train_step(state, frozen, batch, *, cfg, t5cfg, r, mesh):
    """One update: the frozen T5's features of the batch's ids unless it brings them (encode-once),
    then denoiser_step or a student's mean_flow_step; the largest "stop" flag: all stop together."""
    t5_params, teacher = frozen if r.distill_from else (frozen, None)
    context = batch["context"] if "context" in batch else model.t5_encode(t5_params, t5cfg, batch["ids"], batch["mask"])
    update = functools.partial(mean_flow_step, teacher=teacher) if r.distill_from else denoiser_step
    state, metrics = update(state, batch["images"], context, batch["mask"], cfg=cfg, r=r, mesh=mesh)
    return state, metrics | ({"stop": jnp.max(batch["stop"])} if "stop" in batch else {})

T_BUCKETS = 4  # the loss is also told by noise level: t in [0, 1/4), ..., [3/4, 1); t = 0 is noise
T_NAMES = sample.t_names(T_BUCKETS)

def denoiser_step(state, images, context, mask, *, cfg, r, mesh):
    """Caption drop, t, noise, v-loss, update; draws by step alone (exact resumes), batch-wide."""
    step, B = state["step"], images.shape[0]
    k_drop, k_t, k_noise = jax.random.split(jax.random.fold_in(rng(r.seed, "step"), step), 3)
    mask = mask * (jax.random.uniform(k_drop, (B, 1)) >= r.caption_drop)  # dropped: all mask_token
    t = jax.nn.sigmoid(r.t_mu + r.t_sigma * jax.random.normal(k_t, (B,)))
    noise = r.noise_scale * jax.random.normal(k_noise, images.shape)
    loss_fn = lambda p, *xs: flow_matching_loss(p, cfg, *xs, r.a_min, r.precision, r.remat)
    return descend(state, loss_fn, (images, context, mask, t, noise), t, r, mesh)

def mean_flow_step(state, images, context, mask, *, teacher, cfg, r, mesh):
    """A student's step: t < s uniform, s = t for a share r_equals_t, w ~ U[w_min, w_max]."""
    B, keys = images.shape[0], jax.random.split(jax.random.fold_in(rng(r.seed, "step"), state["step"]), 4)
    t, s = jnp.sort(jax.random.uniform(keys[0], (2, B)), axis=0)
    s = jnp.where(jax.random.uniform(keys[1], (B,)) < r.r_equals_t, t, s)
    w = jax.random.uniform(keys[2], (B,), minval=r.w_min, maxval=r.w_max)
    noise = r.noise_scale * jax.random.normal(keys[3], images.shape)
    loss_fn = lambda p, *batch: mean_flow_loss(p, teacher, cfg, r, *batch)
    return descend(state, loss_fn, (images, context, mask, t, s, w, noise), t, r, mesh)

def descend(state, loss_fn, batch, t, r, mesh):
    """The update from loss_fn's mean's gradient; the metrics (the loss also summed by t bucket)."""
    shardings = state_shardings(mesh, state["params"], r.fsdp)
    losses, grads = accumulated_grads(loss_fn, state["params"], batch, r.grad_accum, shardings)
    loss, grad_norm = jnp.mean(losses), optax.tree.norm(grads)
    bucket = jnp.minimum((t * T_BUCKETS).astype(jnp.int32), T_BUCKETS - 1)  # [B]
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(r)(state["step"]),
               "loss_sum_by_t": jnp.zeros(T_BUCKETS).at[bucket].add(losses),
               "count_by_t": jnp.zeros(T_BUCKETS, jnp.int32).at[bucket].add(1)}
    return adamw_ema(state, grads, grad_norm, r), metrics

def accumulated_grads(loss_fn, params, batch, n, shardings):
    """Per-example losses [B] and the mean gradient, laid out as `shardings`. Each device adds up
    its n micro-batches' gradients in a scan; one reduction per tensor after it (a reduce-scatter
    under FSDP) moves the gradient once a step (XLA put it in the scan: n times the bytes)."""
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

def state_shardings(mesh, state_shapes, fsdp):
    """Replicated, or with FSDP each matrix split along its largest axis that divides evenly."""
    n = mesh.shape["data"]
    def spec(x):
        axes = [i for i in np.argsort(x.shape)[::-1] if x.shape[i] % n == 0]
        if not fsdp or not axes or x.ndim < 2:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*[("data" if i == axes[0] else None) for i in range(x.ndim)]))
    return jax.tree.map(spec, state_shapes)

def make_mesh(devices):
    return jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

def make_train_step(mesh, state_shapes, frozen_shapes, cfg, t5cfg, r):
    """The whole step under one jit: the batch split over the "data" axis, the state donated."""
    shard_state, replicated = state_shardings(mesh, state_shapes, r.fsdp), NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    step = jax.jit(functools.partial(train_step, cfg=cfg, t5cfg=t5cfg, r=r, mesh=mesh),
                   in_shardings=(shard_state, jax.tree.map(lambda _: replicated, frozen_shapes), batch_sharding),
                   out_shardings=(shard_state, replicated), donate_argnums=0)
    return step, shard_state, batch_sharding

def init_state(key, cfg):
    params = model.init_mmjit(key, cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return dict(params=params, ema=params, mu=zeros, nu=zeros, step=jnp.zeros((), jnp.int32))

# --------------------------------------------------------------------------------------------- loop

def main(argv=None):
    args, r = parse_args(argv)
    if args.distributed:  # peers: automatic on TPU pods and SLURM, else from the environment
        env = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
        jax.distributed.initialize(**{k: int(os.environ[v]) for k, v in env.items() if v in os.environ})
    stop = stop_requests()  # after initialize(), whose preemption notifier takes SIGTERM for itself
    run, first = args.out, jax.process_index() == 0
    cfg, r, text_encoder, captions, complete, init = prepare_run(run, r, args.fit_text_length)
    state, step_fn, frozen, sharding, data_state = start_state(run, cfg, r, text_encoder, init)
    start = int(state["step"])
    buckets = model.aspect_buckets(cfg.image_size, cfg.patch_size) if r.multi_aspect else [(cfg.image_size,) * 2]
    features, grid, record = encoded_text(r, cfg, text_encoder, captions, complete, start, buckets)
    loader = data_loader(r, cfg, text_encoder[2], buckets, data_state)
    log = sample.open_log(os.path.join(run, "log.jsonl"), start) if first else None
    sample.write_log(log, {"step": start, **record})
    bar = tqdm(range(start, r.steps), initial=start, total=r.steps, disable=not first)
    began = time.perf_counter()
    clock, previous, window, by_t, score = (began, start), None, [], [None] * T_BUCKETS, None
    with loader:
        for step in bar:
            state, metrics = step_fn(state, frozen, device_batch(next(loader), sharding, features, stop))
            done, window = step + 1, window + [metrics]
            stopping = previous is not None and check_health(log, previous, done - 1, run, r)
            previous, saving = metrics, done % r.ckpt_every == 0 or done == r.steps or stopping
            if saving or done % r.log_every == 0:  # this step's, before anything of it is written
                check_health(log, metrics, done, run, r)
            if done % r.log_every == 0 or done == r.steps or stopping:
                (clock, by_t), window = log_step(log, bar, window, done, clock, r, loader), []
            if saving:
                sample.save_checkpoint(run, state, loader.state(), r.keep)
            if r.sample_every and (done % r.sample_every == 0 or done == r.steps):
                score = sample.save_grid(run, done, state["ema"], cfg, grid, r, log, bar)
            if stopping:
                print(f"train.py: stopped at step {done}; resume with the same command", file=sys.stderr)
                break
    if first:
        print(loader.summary(), file=sys.stderr)
        sample.write_log(log, {"step": int(state["step"]), "data": loader.summary()})
        log.close()
        seconds = time.perf_counter() - began
        print(run_summary(run, start, int(state["step"]), seconds, r, by_t, score), file=sys.stderr)

def device_batch(batch, sharding, features, stop):
    """The host batch as global arrays: the captions' T5 features from the encode-once table in
    place of their ids, and this process's stop request as one flag per example."""
    out = {k: batch[k] for k in ("images", "mask") + (() if features else ("ids",))}
    out["stop"] = np.full(len(batch["mask"]), bool(stop), np.int32)
    if features:
        index, table = features
        try:
            rows = table[[index[c] for c in batch["captions"]]]  # [B, L', Dt]
        except KeyError as e:
            raise RuntimeError(f"caption {e} was not among the captions read at start-up: "
                               "was --data changed?") from None
        out["context"] = np.pad(rows, ((0, 0), (0, batch["mask"].shape[1] - rows.shape[1]), (0, 0)))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in out.items()}

# ----------------------------------------------------------------------------------- run management

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help=f"a recipe, one of {', '.join(RECIPES)} "
                        "(default tiny); the flags below override its fields")
    parser.add_argument("--out", help="run directory (default runs/<preset>[-<data>][-distill])")
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize(): automatic on TPU pods and SLURM, else "
                             "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
    kinds = {bool: dict(action=argparse.BooleanOptionalAction), tuple: dict(action="append")}
    for f in dataclasses.fields(Recipe):
        default = {(): "synthetic", "": "none"}.get(f.default, f.default)
        own = f"; on your own data: {TINY_OWN_DATA[f.name]}" if f.name in TINY_OWN_DATA else ""
        parser.add_argument("--" + f.name.replace("_", "-"), **kinds.get(f.type, dict(type=f.type)),
                            default=None, help=f"{f.metadata['help']} (tiny: {default}{own})")
    args = parser.parse_args(argv)
    if args.preset not in RECIPES:
        raise UsageError(f"--preset {args.preset}: unknown; choose one of {', '.join(RECIPES)}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if getattr(args, f.name) is not None}
    start = args.distill_from or args.init_from  # a train.py run's weights: its model (a student's: its data too)
    if start and os.path.isfile(os.path.join(start, "config.json")):
        flag = "--distill-from" if args.distill_from else "--init-from"
        recipe = checked(flag, model.read_json, os.path.join(start, "config.json")).get("recipe", {})
        inherited = ("model", "data") if args.distill_from else ("model",)
        given = {k: recipe[k] for k in inherited if k in recipe} | given
    g = given.get("guidance", RECIPES[args.preset].guidance)  # a student learns w around it
    student = DISTILL["tiny" if args.preset == "tiny" else "paper"] | dict(w_min=max(g - 1, 0), w_max=g + 1)
    sources = checked("", data.parse_sources, list(given.get("data", RECIPES[args.preset].data)))  # [(path, weight)]
    own_data = any(path != "synthetic" for path, _ in sources)
    r = dataclasses.replace(RECIPES[args.preset], **(TINY_OWN_DATA if args.preset == "tiny" and own_data else {})
                            | (student if args.distill_from else {}) | given)
    r = dataclasses.replace(r, data=tuple(r.data))  # --data gives a list
    if r.model not in model.PRESETS:
        raise UsageError(f"--model {r.model}: unknown; choose one of {', '.join(model.PRESETS)}")
    args.fit_text_length = not r.t5 and "text_length" not in given
    if not args.out:
        source = os.path.normpath(sources[0][0]) if sources else ""
        name = re.sub(r"\W+", "_", os.path.splitext(os.path.basename(source))[0]).strip("_")
        suffix = (f"-{name}" if r.data else "") + ("-distill" if r.distill_from else "")
        args.out = os.path.join("runs", args.preset + suffix)  # never the teacher's
    return args, r

def check_recipe(r, cfg):
    """Each flag's value, before anything is read or written; a line names the flag and its rule."""
    if not r.t5 and cfg.txt_dim != TINY_T5["d_model"]:
        raise UsageError(f"--t5: the {r.model} model reads {cfg.txt_dim}-wide FLAN-T5 features; "
                         "give --t5 DIR, a Hugging Face FLAN-T5 folder (google/flan-t5-large)")
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
        require(ok, f"--{name.replace('_', '-')} {getattr(r, name)}: expected {expected}")
    for flag, path in (("--init-from", r.init_from), ("--distill-from", r.distill_from)):
        require(not path or os.path.exists(path), f"{flag} {path}: no such file or directory")

def check_resume(run, config, r):
    """A run directory must hold this same run (fields in RESUMABLE may differ) with steps left."""
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    saved = model.read_json(os.path.join(run, "config.json"))
    old = defaults | saved.get("recipe", {})
    new = {k: v for k, v in json.loads(json.dumps(config["recipe"])).items() if k not in RESUMABLE}
    diff = [f"{k} {old[k]!r} -> {v!r}" for k, v in new.items() if old[k] != v]
    diff += [f"{k} {v!r} -> {config['model'][k]!r}" for k, v in saved.get("model", {}).items()
             if k not in new and config["model"].get(k, v) != v]  # a preset changed (tiny: patch 4 -> 8)
    if diff:
        raise UsageError(f"--out {run} holds another run ({'; '.join(diff)}): give the same "
                         "flags to resume it, or another --out")
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
        raise UsageError(f"--out {run} is finished ({step} of --steps {r.steps}): give a larger "
                         "--steps to train it further, or another --out for a new run")

def prepare_run(run, r, fit_text_length):
    """Check everything, then reopen this run, or build a new one in RUN.partial and rename it into
    place: an interrupt at any moment leaves nothing or a run that resumes."""
    cfg = dataclasses.replace(model.PRESETS[r.model], image_size=r.image_size, mean_flow=bool(r.distill_from))
    check_recipe(r, cfg)
    captions, complete = checked("", data.read_captions, list(r.data), r.seed)  # errors name --data
    resume = os.path.isfile(os.path.join(run, "config.json"))
    if not resume and os.path.exists(run) and os.listdir(run):
        raise UsageError(f"--out {run}: exists and is not a train.py run (no config.json)")
    folder, first = run if resume else os.path.normpath(run) + ".partial", jax.process_index() == 0
    t5_path = os.path.abspath(r.t5) if r.t5 else os.path.join(folder, "t5")
    if first and not resume:
        shutil.rmtree(folder, ignore_errors=True)  # left by a second Ctrl-C
        if r.distill_from and not r.t5:  # the teacher's own: the features it was trained on
            flag = f"--distill-from {r.distill_from}"
            own = checked(flag, sample.load_denoiser, r.distill_from)[2]["t5"]
            require(own, f"{flag}: the teacher's T5 folder (RUN/t5) is missing; give --t5 DIR")
            shutil.copytree(own, t5_path)
        elif not r.t5:
            make_tiny_text_encoder(t5_path, captions, r.seed)
    multihost_utils.sync_global_devices("text encoder ready")
    try:
        text_encoder = checked(f"--t5 {t5_path}: not a usable T5 folder", sample.load_text_encoder, t5_path, cfg)
        if fit_text_length:
            r = dataclasses.replace(r, text_length=sample.fitted_text_length(text_encoder[2], captions))
        config = {"model": dataclasses.asdict(cfg), "t5": t5_path if r.t5 else "t5",
                  "text_length": r.text_length, "recipe": dataclasses.asdict(r)}
        if resume:
            check_resume(run, config, r)
        # the weights to start from: a student's teacher (every run), a fine-tune's (new runs)
        flag, path = ("distill", r.distill_from) if r.distill_from else ("init", "" if resume else r.init_from)
        init = path and checked(f"--{flag}-from {path}", load_init_weights, path,
                                dataclasses.replace(cfg, mean_flow=False))
    except UsageError:
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    multihost_utils.sync_global_devices("checks done")  # all have read RUN.partial before it moves
    if first:
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        with open(os.path.join(folder, "config.json.tmp"), "w") as f:
            json.dump(config, f, indent=1)
        os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))
        if not resume:
            shutil.rmtree(run, ignore_errors=True)  # an empty folder the user made
            os.makedirs(os.path.dirname(os.path.abspath(run)), exist_ok=True)
            os.replace(folder, run)
    multihost_utils.sync_global_devices("run directory ready")
    return cfg, r, text_encoder, captions, complete, init

def load_init_weights(path, cfg):
    """Weights to start from: a train.py run or checkpoint's EMA, or released Diffusers weights."""
    loaded, params, _ = sample.load_denoiser(path)
    diff = [f"{k} {v} != {getattr(cfg, k)}" for k, v in dataclasses.asdict(loaded).items()
            if k != "image_size" and v != getattr(cfg, k)]  # weights don't depend on the resolution
    if diff:
        raise ValueError(f"a model of another config ({', '.join(diff)})")
    return params

def start_state(run, cfg, r, text_encoder, init):
    """The compiled step, its frozen inputs, the state: new or the newest complete checkpoint's."""
    t5cfg, t5_params, _ = text_encoder
    mesh = make_mesh(jax.devices())
    state_shapes = jax.eval_shape(functools.partial(init_state, cfg=cfg), jax.random.key(0))
    frozen = (t5_params, jax.tree.map(lambda x: jnp.array(x, r.precision), init)) if r.distill_from else t5_params
    step_fn, shardings, batch_sharding = make_train_step(mesh, state_shapes, frozen, cfg, t5cfg, r)
    frozen = jax.device_put(frozen, NamedSharding(mesh, P()))
    found = sample.checkpoints(run)  # newest first
    damaged = list(itertools.takewhile(lambda c: c[1], found))  # check_resume refused all damaged
    if len(damaged) == len(found):  # no checkpoint at all: a new run
        state = jax.jit(functools.partial(init_state, cfg=cfg), out_shardings=shardings)(rng(r.seed, "init"))
        if init:  # the EMA its own copy: the step donates both
            init = state["params"] | init  # a student: its new tokens' weights kept
            state = jax.device_put(state | {"params": init, "ema": jax.tree.map(jnp.copy, init)}, shardings)
        return state, step_fn, frozen, batch_sharding, None
    ckpt = found[len(damaged)][0]
    for path, problem in damaged if jax.process_index() == 0 else []:
        print(f"train.py: {path} is damaged ({problem}); resuming from {ckpt}", file=sys.stderr)
    try:
        state, data_state = sample.restore_checkpoint(ckpt, state_shapes, shardings)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot resume from {ckpt}: {e}") from None
    return state, step_fn, frozen, batch_sharding, data_state

def data_loader(r, cfg, tokenizer, buckets, data_state):
    """This process's batches; process 0's bucket frequencies on every host: the same shapes."""
    table = data.bucket_table(list(r.data), r.seed, buckets).astype(np.float32) if jax.process_index() == 0 \
        else np.zeros((len(data.parse_sources(r.data or ["synthetic"])), len(buckets)), np.float32)
    return data.Loader(list(r.data), cfg.image_size, r.batch_size // jax.process_count(), tokenizer,
                       r.text_length, seed=r.seed, process_index=jax.process_index(),
                       process_count=jax.process_count(), state=data_state, buckets=buckets,
                       frequencies=multihost_utils.broadcast_one_to_all(table))

# ------------------------------------------------------------------------------------- text encoder

def make_tiny_text_encoder(folder, captions, seed):
    """A frozen random T5 and a BPE tokenizer fitted to the run's captions (whole words as pieces,
    at most 8192, case folded, unseen words as bytes, not <unk>), in Hugging Face's layout."""
    import sentencepiece
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(captions), model_writer=f, model_type="bpe", vocab_size=8192,
            hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1,
            normalization_rule_name="nmt_nfkc_cf", unk_id=2, bos_id=-1, minloglevel=2)
    cfg = model.T5Config(vocab_size=model.Tokenizer(f.name).vocab_size, **TINY_T5)
    model.save_t5(folder, cfg, jax.jit(model.init_t5, static_argnums=1)(rng(seed, "t5"), cfg))

def encoded_text(r, cfg, text_encoder, captions, complete, start, buckets):
    """The encode-once table (where it pays), the grids' inputs, the start-up record on the text."""
    t5cfg, t5_params, tokenizer = text_encoder
    distinct = len(set(captions))
    size = distinct * r.text_length * t5cfg.d_model * jnp.dtype(r.precision).itemsize
    once = complete and jax.process_count() == 1 and distinct < (r.steps - start) * r.batch_size
    features = sample.encode_once(text_encoder, captions, r.text_length, jnp.dtype(r.precision)) \
        if once and size <= FEATURE_BYTES else None
    line, warnings, coverage = sample.text_report(tokenizer, captions, r, features)
    if jax.process_index() == 0:
        print("\n".join([line, *warnings]), file=sys.stderr)
    prompts = sample.grid_prompts(r, captions)
    ids, mask = tokenizer.encode(prompts, r.text_length)
    grid = dict(prompts=prompts, mask=mask, context=sample.encode_text(t5_params, t5cfg, ids, mask),
                keys=jax.random.split(rng(r.seed, "grid"), len(prompts)),
                shapes=buckets[::len(buckets) // 2 or 1])  # the tallest, square, the widest
    return features, grid, {"text": line, **coverage}

# ------------------------------------------------------------------------------------------ logging

def stop_requests():
    """A list that SIGINT and SIGTERM append to: the run saves and exits; a second quits at once."""
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

def log_step(log, bar, window, done, clock, r, loader):
    """A line of log.jsonl and the bar; the new clock, each noise level's mean loss since then."""
    m = {k: float(v) for k, v in window[-1].items() if np.ndim(v) == 0 and k != "stop"}
    sums, counts = np.sum(jax.device_get([[w["loss_sum_by_t"], w["count_by_t"]] for w in window]), axis=0)
    by_t = [float(s / c) if c else None for s, c in zip(sums, counts)]
    now = time.perf_counter()
    m |= {"step": done, "loss_by_t": by_t, "skipped": sum(loader.skip_reasons.values()),
          "images_per_s": (done - clock[1]) * r.batch_size / (now - clock[0])}
    bar.set_postfix(loss=f"{m['loss']:.4f}", by_t=" ".join("-" if x is None else f"{x:.3f}" for x in by_t),
                    img_s=f"{m['images_per_s']:.0f}")
    sample.write_log(log, m)
    return (now, done), by_t

def check_health(log, metrics, step, run, r):
    """The step's stop flag; a non-finite loss or gradient stops the run before it is saved."""
    m = jax.device_get(metrics)
    if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
        return bool(m["stop"])
    bad = [name for name, s, c in zip(T_NAMES, m["loss_sum_by_t"], m["count_by_t"]) if c and not np.isfinite(s)]
    what = f"the loss is not finite at {', '.join(bad)}" if bad else "the gradient is not finite"
    try:
        go_on = f"the last good checkpoint {sample.latest_checkpoint(run)} is kept"
    except FileNotFoundError:
        go_on = "no checkpoint was saved before it"
    line = (f"step {step}: {what}; stopped, nothing of this step saved; {go_on}: the same command "
            f"with a smaller --lr (now {r.lr:g}) goes on from there")
    sample.write_log(log, {"step": step, "stopped": line})
    sys.exit(f"train.py: {line}")

def run_summary(run, start, step, seconds, r, by_t, score):
    """The end of a run in one line: what it did, how fast, where it stands, where its files are."""
    loss = ", ".join(f"{name} {'-' if x is None else f'{x:.4f}'}" for name, x in zip(T_NAMES, by_t))
    return (f"train.py: {step - start} steps to step {step} in {seconds:.0f} s, "
            f"{(step - start) * r.batch_size / seconds:.1f} images/s; final loss by noise level: "
            + loss + ("" if score is None else f"; faithfulness {score:.0%}") + f"; samples in "
            f"{os.path.join(run, 'samples')}, checkpoints in {os.path.join(run, 'checkpoints')}")

if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:
        sys.exit(f"train.py: {e}")

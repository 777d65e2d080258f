"""Train MiniT2I with flow matching: x-prediction, v-loss, AdamW, EMA. From a 2-core laptop to a pod.

    python train.py                                  # tiny model, synthetic shapes, random tiny T5, ~8 min on CPU
    python train.py --preset b16-pretrain --t5 flan-t5-large --data 'cc12m/{00000..02175}.tar'

Running the same command again resumes from the run directory's last checkpoint.
"""
import argparse
import dataclasses
import functools
import io
import json
import os
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

# ----------------------------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: str = "tiny"  # a key of model.PRESETS
    image_size: int = 32
    batch_size: int = 32  # global, over all devices and hosts
    steps: int = 720
    lr: float = 1e-3
    warmup: int = 100  # linear warm-up from 1e-6, then constant
    ema: float = 0.995
    ema_warmup: bool = True  # decay min(ema, (1+s)/(10+s)): lets a short run's EMA catch up
    clip: float = 0.0  # global-norm gradient clipping; 0 = off, as in the original
    t5: str = ""  # a Hugging Face T5 folder; "" = a small random frozen T5 (tiny runs)
    text_length: int = 16
    data: tuple = ()  # --data SOURCE[:WEIGHT], repeatable; () = synthetic shapes
    caption_drop: float = 0.1  # classifier-free guidance: drop the whole caption
    t_mu: float = -0.8  # t = sigmoid(N(t_mu, t_sigma)), t = 1 is data
    t_sigma: float = 0.8
    noise_scale: float = 2.0
    a_min: float = 0.01
    precision: str = "float32"  # compute dtype; parameters and optimiser stay float32
    remat: bool = False
    fsdp: bool = False  # shard parameters and optimiser state over the data axis too
    seed: int = 0
    log_every: int = 50
    sample_every: int = 240
    sample_steps: int = 20
    guidance: float = 3.0
    ckpt_every: int = 240
    keep: int = 3  # checkpoints kept
    init_from: str = ""  # a train.py run/checkpoint or released Diffusers weights to fine-tune from


PAPER = dict(image_size=512, batch_size=1024, ema=0.99995, ema_warmup=False, text_length=256, log_every=100,
             sample_every=5000, sample_steps=100, ckpt_every=5000)
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
TINY_T5 = dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2)  # for the default run
DEFAULT_PROMPTS = ["a photo of a cat", "a red bicycle leaning against a wall", "a bowl of fruit on a table",
                   "a lighthouse at sunset", "two dogs playing in the snow", "a city street at night"]


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------- objective


def flow_matching_loss(params, cfg, images, context, mask, t, noise, a_min=0.01, dtype=jnp.float32, remat=False):
    """x-prediction trained with the v-loss. t: [B] in (0, 1), t = 1 is data; noise already scaled."""
    t = t[:, None, None, None]
    x_t = t * images + (1 - t) * noise
    x0_hat = model.mmjit_apply(params, cfg, x_t, context, mask, dtype, remat)
    v_hat = (x0_hat - x_t) / jnp.maximum(1 - t, a_min)  # the clip keeps t -> 1 from blowing up the loss
    v = (images - x_t) / jnp.maximum(1 - t, a_min)
    return jnp.mean((v_hat - v) ** 2)


def lr_schedule(r):
    return optax.linear_schedule(1e-6, r.lr, r.warmup)  # linear warm-up, then constant


def adamw_ema(state, grads, grad_norm, r):
    """AdamW (betas 0.9, 0.95, eps 1e-8; the recipe's weight decay is 0), optional global-norm clipping, then
    the EMA. Written as one elementwise function of each tensor, which XLA fuses into a few loops: half the
    time of optax's chain of transforms (110 against 215 ms a step for the 72M-parameter CPU benchmark)."""
    step, b1, b2 = state["step"], 0.9, 0.95
    lr, count = lr_schedule(r)(step), step + 1.0
    scale = jnp.minimum(1.0, r.clip / grad_norm) if r.clip else 1.0
    decay = jnp.minimum(r.ema, (1.0 + step) / (10.0 + step)) if r.ema_warmup else r.ema

    def update(p, ema, mu, nu, g):
        g = g * scale
        mu, nu = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g * g
        p = p - lr * (mu / (1 - b1**count)) / (jnp.sqrt(nu / (1 - b2**count)) + 1e-8)
        return p, decay * ema + (1 - decay) * p, mu, nu

    out = jax.tree.map(update, state["params"], state["ema"], state["mu"], state["nu"], grads)
    params, ema, mu, nu = jax.tree.transpose(jax.tree.structure(grads), jax.tree.structure((0,) * 4), out)
    return {"params": params, "ema": ema, "mu": mu, "nu": nu, "step": step + 1}


def train_step(state, t5_params, batch, *, cfg, t5cfg, r):
    """One update from a batch of images and token ids: the frozen T5's features, then denoiser_step."""
    context = model.t5_encode(t5_params, t5cfg, batch["ids"], batch["mask"], jnp.dtype(r.precision))
    return denoiser_step(state, batch["images"], context, batch["mask"], cfg=cfg, r=r)


def denoiser_step(state, images, context, mask, *, cfg, r):
    """Caption drop, t and noise, v-loss, AdamW, EMA. The RNG is a function of the step alone, so a resumed
    run draws exactly what an uninterrupted one would."""
    params, step, B = state["params"], state["step"], images.shape[0]
    k_drop, k_t, k_noise = jax.random.split(jax.random.fold_in(jax.random.key(r.seed), step), 3)
    mask = mask * (jax.random.uniform(k_drop, (B, 1)) >= r.caption_drop)  # a dropped caption: all mask_token
    t = jax.nn.sigmoid(r.t_mu + r.t_sigma * jax.random.normal(k_t, (B,)))
    noise = r.noise_scale * jax.random.normal(k_noise, images.shape)
    loss, grads = jax.value_and_grad(flow_matching_loss)(
        params, cfg, images, context, mask, t, noise, r.a_min, jnp.dtype(r.precision), r.remat)
    grad_norm = optax.tree.norm(grads)
    return adamw_ema(state, grads, grad_norm, r), {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(r)(step)}


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
    """The whole step under one jit; the batch is split over the "data" axis, the state donated in place."""
    shard_state = state_shardings(mesh, state_shapes, r.fsdp)
    replicated = NamedSharding(mesh, P())
    batch_sharding = {k: NamedSharding(mesh, P("data")) for k in ("images", "ids", "mask")}
    step = jax.jit(functools.partial(train_step, cfg=cfg, t5cfg=t5cfg, r=r),
                   in_shardings=(shard_state, jax.tree.map(lambda _: replicated, t5_shapes), batch_sharding),
                   out_shardings=(shard_state, replicated), donate_argnums=0)
    return step, shard_state, batch_sharding


def init_state(key, cfg):
    params = model.init_mmjit(key, cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"params": params, "ema": params, "mu": zeros, "nu": zeros, "step": jnp.zeros((), jnp.int32)}


# ------------------------------------------------------------------------------------------- checkpoints


ARRAYS = ("params", "ema", "mu", "nu")  # the state's trees, one safetensors file each (the step goes in state.json)


def save_checkpoint(run, state, data_state, keep):
    """Write to a temporary directory, then rename: a kill at any moment leaves the last one loadable.
    Every process writes its own data position; process 0 writes the arrays (shared filesystem assumed)."""
    step = int(state["step"])
    folder = os.path.join(run, "checkpoints")
    tmp, final = os.path.join(folder, f"tmp_{step:08d}"), os.path.join(folder, f"step_{step:08d}")
    host = multihost_utils.process_allgather({k: state[k] for k in ARRAYS}, tiled=True)
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    multihost_utils.sync_global_devices("checkpoint dir")
    with open(os.path.join(tmp, f"data_{jax.process_index()}.json"), "w") as f:
        json.dump(data_state, f)
    if jax.process_index() == 0:
        for name, tree in host.items():
            model.write_safetensors(os.path.join(tmp, f"{name}.safetensors"), model.flatten(tree))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step}, f)
    multihost_utils.sync_global_devices("checkpoint written")
    if jax.process_index() == 0:
        os.replace(tmp, final)
        for old in sorted(d for d in os.listdir(folder) if d.startswith("step_"))[:-keep]:
            shutil.rmtree(os.path.join(folder, old))
    multihost_utils.sync_global_devices("checkpoint renamed")


def restore_checkpoint(path, state_shapes, shardings):
    with open(os.path.join(path, "state.json")) as f:
        step = json.load(f)["step"]
    state = {k: model.load_params(os.path.join(path, f"{k}.safetensors"), state_shapes[k])
             for k in ARRAYS}
    state["step"] = jnp.asarray(step, jnp.int32)
    data_file = os.path.join(path, f"data_{jax.process_index()}.json")
    with open(data_file) as f:
        data_state = json.load(f)
    return jax.device_put(state, shardings), data_state


def load_init_weights(path, cfg):
    """Weights to fine-tune from: a train.py run or checkpoint (its EMA), or released Diffusers weights."""
    loaded, params, _, _ = sample.load_denoiser(path)
    diff = [f"{k} {v} != {getattr(cfg, k)}" for k, v in dataclasses.asdict(loaded).items()
            if k != "image_size" and v != getattr(cfg, k)]  # weights do not depend on the resolution
    if diff:
        raise ValueError(f"a model of another config ({', '.join(diff)})")
    return params


# ----------------------------------------------------------------------------------------- text encoder


def make_tiny_text_encoder(folder, seed):
    """A frozen random T5 with a sentencepiece model fitted to the synthetic captions, saved in the
    Hugging Face layout so that the run directory is self-contained."""
    import sentencepiece

    rng = np.random.default_rng(seed)
    captions = [data.describe(data.random_scene(rng)) for _ in range(5000)]
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=buf, model_type="word", vocab_size=256, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    cfg = model.T5Config(vocab_size=model.Tokenizer(os.path.join(folder, "spiece.model")).vocab_size, **TINY_T5)
    model.save_t5(folder, cfg, jax.jit(model.init_t5, static_argnums=1)(jax.random.key(seed + 1), cfg))


# ------------------------------------------------------------------------------------------------ the run


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(RECIPES)}")
    parser.add_argument("--out", help="run directory (default runs/<preset>)")
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize(): automatic on TPU pods and SLURM, else set "
                             "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.type is tuple:
            parser.add_argument(flag, action="append", default=None, help="repeatable")
        else:
            parser.add_argument(flag, type=f.type, default=None)
    args = parser.parse_args(argv)
    if args.preset not in RECIPES:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(RECIPES)}")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if getattr(args, f.name) is not None}
    r = dataclasses.replace(RECIPES[args.preset], **{k: tuple(v) if k == "data" else v for k, v in overrides.items()})
    if r.model not in model.PRESETS:
        raise UsageError(f"unknown model {r.model!r}; choose one of {', '.join(model.PRESETS)}")
    return args, r


def prepare_run(run, r):
    """Check the run directory (a new one, or this same run to resume), find or make the text encoder, and
    only then write config.json: bad input leaves nothing behind."""
    cfg = dataclasses.replace(model.PRESETS[r.model], image_size=r.image_size)
    config = {"model": dataclasses.asdict(cfg), "t5": os.path.abspath(r.t5) if r.t5 else "t5",
              "text_length": r.text_length, "recipe": dataclasses.asdict(r)}
    path = os.path.join(run, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        for key in ("model", "t5", "text_length"):
            if old.get(key) != config[key]:
                raise UsageError(f"{path} holds a different run ({key}: {old.get(key)} != {config[key]}); "
                                 "choose another --out")
    if r.batch_size % jax.device_count():
        raise UsageError(f"--batch-size {r.batch_size} must be a multiple of the {jax.device_count()} devices")
    t5_path = os.path.join(run, config["t5"])  # an absolute path stays as it is
    if not r.t5 and jax.process_index() == 0 and not os.path.isdir(t5_path):
        make_tiny_text_encoder(t5_path, r.seed)
    multihost_utils.sync_global_devices("text encoder ready")
    try:
        text_encoder = sample.load_text_encoder(t5_path, cfg)
    except (OSError, ValueError) as e:
        raise UsageError(f"--t5 {t5_path}: not a usable T5 folder ({e})") from None
    if jax.process_index() == 0:
        os.makedirs(run, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(config, f, indent=1)
        os.replace(path + ".tmp", path)
    return cfg, text_encoder


def open_log(path, start):
    """log.jsonl, keeping the lines up to the step resumed from: steps logged after the checkpoint (before
    a crash) are about to be redone."""
    kept = []
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start]
    log = open(path, "w")
    log.writelines(kept)
    return log


def main(argv=None):
    args, r = parse_args(argv)
    if args.distributed:  # peers found by themselves on TPU pods and SLURM; elsewhere from the environment
        env = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
        jax.distributed.initialize(**{k: int(os.environ[v]) for k, v in env.items() if v in os.environ})
    run = args.out or os.path.join("runs", args.preset.replace("/", ""))
    cfg, (t5cfg, t5_params, tokenizer) = prepare_run(run, r)

    mesh = make_mesh(jax.devices())
    state_shapes = jax.eval_shape(functools.partial(init_state, cfg=cfg), jax.random.key(0))
    step_fn, shardings, batch_sharding = make_train_step(mesh, state_shapes, t5_params, cfg, t5cfg, r)
    t5_params = jax.device_put(t5_params, NamedSharding(mesh, P()))

    try:
        ckpt, data_state = sample.latest_checkpoint(run), None
    except FileNotFoundError:  # a new run
        ckpt = data_state = None
    if ckpt:
        try:
            state, data_state = restore_checkpoint(ckpt, state_shapes, shardings)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot resume from {ckpt}: {e}") from None
    else:
        state = jax.jit(functools.partial(init_state, cfg=cfg), out_shardings=shardings)(jax.random.key(r.seed))
        if r.init_from:
            try:
                params = load_init_weights(r.init_from, cfg)
            except (OSError, ValueError) as e:
                raise UsageError(f"--init-from {r.init_from}: {e}") from None
            state = jax.device_put(state | {"params": params, "ema": params}, shardings)

    loader = data.Loader(list(r.data), cfg.image_size, r.batch_size // jax.process_count(), tokenizer,
                         r.text_length, seed=r.seed, process_index=jax.process_index(),
                         process_count=jax.process_count(), state=data_state)
    prompts = data.SYNTHETIC_PROMPTS + data.random_captions(56) if not r.data else DEFAULT_PROMPTS  # 8 shown
    grid_ids, grid_mask = tokenizer.encode(prompts, r.text_length)
    grid_noise = sample.initial_noise(range(len(prompts)), cfg)  # the same noise at every sampling
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))  # finish the step, save, exit 0

    start = int(state["step"])
    os.makedirs(os.path.join(run, "samples"), exist_ok=True)
    log = open_log(os.path.join(run, "log.jsonl"), start) if jax.process_index() == 0 else None
    bar = tqdm(range(start, r.steps), initial=start, total=r.steps, disable=jax.process_index() != 0)
    last_time, last_step, metrics = time.perf_counter(), start, None
    with loader:
        for step in bar:
            batch = next(loader)
            batch = {k: jax.make_array_from_process_local_data(batch_sharding[k], batch[k]) for k in batch_sharding}
            state, metrics = step_fn(state, t5_params, batch)
            done = step + 1
            if done % r.log_every == 0 or done == r.steps or stop:
                m = {k: float(v) for k, v in metrics.items()}
                if not np.isfinite(m["loss"]):
                    sys.exit(f"train.py: loss is {m['loss']} at step {done}; stopping, the last checkpoint is kept")
                now = time.perf_counter()
                m |= {"step": done, "skipped": loader.skipped,
                      "images_per_s": (done - last_step) * r.batch_size / (now - last_time)}
                last_time, last_step = now, done
                bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['images_per_s']:.0f}")
                if log:
                    log.write(json.dumps(m) + "\n")
                    log.flush()
            if r.sample_every and (done % r.sample_every == 0 or done == r.steps):
                context = sample.encode_text(t5_params, t5cfg, grid_ids, grid_mask)
                images = sample.sample(state["ema"], cfg, context, grid_mask, grid_noise, steps=r.sample_steps,
                                       guidance=r.guidance, sampler="dpm++2m")
                if jax.process_index() == 0:
                    images = np.asarray(images)
                    sample.make_grid(images[:8], prompts[:8]).save(os.path.join(run, "samples", f"step_{done:06d}.png"))
                if log and not r.data:  # the share of the 64 synthetic prompts whose sample shows its caption
                    score = data.faithfulness(images, prompts)
                    bar.write(f"step {done}: faithfulness {score:.0%} of {len(prompts)} prompts")
                    log.write(json.dumps({"step": done, "faithfulness": score}) + "\n")
            if done % r.ckpt_every == 0 or done == r.steps or stop:
                if not np.isfinite(float(metrics["loss"])):  # never overwrite a good checkpoint with a broken one
                    sys.exit(f"train.py: loss is not finite at step {done}; stopping, the last checkpoint is kept")
                save_checkpoint(run, state, loader.state(), r.keep)
            if stop:
                print(f"train.py: stopped at step {done}; resume with the same command", file=sys.stderr)
                break
    if log:
        log.close()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)

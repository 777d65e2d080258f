"""Speed against the hardware limit: run as a script (pytest does not collect it), one JSON line a figure.

    python tests/bench.py                      # the CPU config: B width, 4 blocks, 128 px, batch 8, float32 (~3 min)
    python tests/bench.py --repeats 5 --inner 3 --sample-steps 100   # the long form, as the README's figures
    python tests/bench.py --preset B/16 --image-size 512 --text-length 256 --batch-size 64 --precision bfloat16

Model FLOPs are counted analytically (flops_per_image); a train step is 3x the forward (backward = 2x),
attention included, the frozen T5 not (the step is timed from T5 features, as in the PyTorch port's figure).
MFU is achieved FLOP/s over the peak of large matmuls of the same dtype, timed right after each measurement.
"""
import argparse
import dataclasses
import functools
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import model  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from conftest import compiles as compiled_names  # noqa: E402


def flops(cfg, text_length, shape):
    """Forward FLOPs of one image as (text adapter, double blocks and the rest): 2 per multiply-add of
    every matmul, attention scores and mixing included, for images of shape (H, W). The last double block's
    text stream ends at its keys and values (its queries, output projection and SwiGLU feed nothing), so it
    is not counted."""
    D, A, F, L = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.mlp_hidden, text_length
    N = shape[0] * shape[1] // cfg.patch_size**2  # image tokens
    block = 2 * (D * 3 * A + A * D + 3 * D * F)  # per token: qkv, output projection, SwiGLU
    attention = lambda queries, keys: 2 * 2 * queries * keys * A  # q k^T and p v
    adapter = 2 * L * cfg.txt_dim * D + cfg.txt_preamble_depth * (L * block + attention(L, L))
    double = cfg.depth * ((L + N) * block + attention(L + N, L + N))
    double -= L * 2 * (D * A + A * D + 3 * D * F) + attention(L, L + N)  # the last block's dead text part
    patch = 2 * N * (cfg.patch_size**2 * cfg.in_channels * cfg.pca_channels + cfg.pca_channels * D)
    final = 2 * N * D * cfg.patch_size**2 * cfg.in_channels
    return adapter, double + patch + final


def flops_per_image(cfg, text_length, shape):
    return sum(flops(cfg, text_length, shape))


def seconds(fn, inner):
    start = time.perf_counter()
    for _ in range(inner):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / inner


_matmul = jax.jit(jnp.matmul)


def matmul_flops(dtype, sizes):
    """FLOP/s of the fastest of these square matmuls (the library's speed varies with the size)."""
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        jax.block_until_ready(_matmul(a, b))
        best = max(best, 2 * n**3 / seconds(lambda: _matmul(a, b), 2))
    return best


def timed(fn, flops, args, inner=1):
    """Seconds per call, MFU and peak, medians over args.repeats timings of `inner` calls after a warm-up
    call, and the number of compilations inside the timings (0 unless something retraces). Each timing is
    paired with a peak measured right after it: a shared machine's speed drifts by 10-20% over minutes, and
    a pair sees the same machine."""
    jax.block_until_ready(fn())
    times, mfus, peaks, compiles = [], [], [], 0
    for _ in range(args.repeats):
        with compiled_names() as compiled:
            times.append(seconds(fn, inner))
        compiles += len(compiled)
        peaks.append(matmul_flops(jnp.dtype(args.precision), args.peak_sizes))
        mfus.append(flops / times[-1] / peaks[-1])
    return float(np.median(times)), float(np.median(mfus)), float(np.median(peaks)), compiles


def peak_memory_bytes():
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS"


def report(**fields):
    print(json.dumps(fields), flush=True)


def bench_train(cfg, args):
    r = train.Recipe(batch_size=args.batch_size, precision=args.precision, remat=args.remat, fsdp=args.fsdp,
                     grad_accum=args.grad_accum)
    init = functools.partial(train.init_state, cfg=cfg)
    mesh = train.make_mesh(jax.devices())
    shardings = train.state_shardings(mesh, jax.eval_shape(init, jax.random.key(0)), r.fsdp)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    step = jax.jit(functools.partial(train.denoiser_step, cfg=cfg, r=r, mesh=mesh), donate_argnums=0)
    B, L = args.batch_size, args.text_length
    images = jax.random.uniform(jax.random.key(1), (B, *args.shape, 3), minval=-1, maxval=1)
    context = jax.random.normal(jax.random.key(2), (B, L, cfg.txt_dim))
    mask = jnp.ones((B, L), jnp.int32)

    def run():
        nonlocal state
        with jax.transfer_guard("disallow"):  # nothing crosses to or from the host inside the step
            state, metrics = step(state, images, context, mask)
        return metrics["loss"]

    flops = 3 * flops_per_image(cfg, L, args.shape) * B
    step_s, mfu, peak, compiles = timed(run, flops, args, args.inner)
    mem, source = peak_memory_bytes()
    report(measure="train_step", shape=args.shape, images_per_s=B / step_s, seconds=step_s, flops_per_image=flops / B,
           tflops=flops / step_s / 1e12, mfu=mfu, peak_tflops=peak / 1e12, peak_memory_gib=mem / 2**30,
           memory_source=source, compiles_after_warmup=compiles)
    return state["ema"]


def bench_sample(cfg, params, args):
    B, L, steps = args.batch_size, args.text_length, args.sample_steps
    context = jax.random.normal(jax.random.key(3), (B, L, cfg.txt_dim))
    mask = jnp.ones((B, L), jnp.int32)
    noise = sample.initial_noise(jax.random.split(jax.random.key(0), B), args.shape, 2.0)
    dtype = jnp.dtype(args.precision)
    run = lambda: sample.sample(params, cfg, context, mask, noise, steps=steps, guidance=4.0, dtype=dtype)
    adapter, denoiser = flops(cfg, L, args.shape)
    flops_total = 2 * B * (adapter + steps * denoiser)  # two branches; the text adapter once, not every step
    call_s, mfu, peak, compiles = timed(run, flops_total, args)
    report(measure="sampling", steps=steps, seconds_per_image=call_s / B, tflops=flops_total / call_s / 1e12,
           mfu=mfu, peak_tflops=peak / 1e12, compiles_after_warmup=compiles)


def bench_data(cfg, args):
    """Decode + resize + crop of 1024 x 768 JPEGs streamed from a tar shard, to the model's resolution."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "00000.tar")
        with tarfile.open(shard, "w") as tar:
            for i in range(128):
                pixels = rng.integers(0, 256, (24, 32, 3), np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).resize((1024, 768), Image.BICUBIC).save(buf, "JPEG", quality=90)
                for name, payload in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        tokenizer = type("Ids", (), {"encode": lambda self, p, n: (np.ones((len(p), n), np.int32),) * 2,
                                     "lengths": lambda self, p: np.ones(len(p), np.int64)})()
        with data.Loader([shard], cfg.image_size, 16, tokenizer, 8) as loader:
            next(loader)
            rates = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(6):
                    next(loader)
                rates.append(6 * 16 / (time.perf_counter() - start))
    report(measure="data_loading", image_size=cfg.image_size, images_per_s=float(np.median(rates)),
           workers=min(8, os.cpu_count()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="B/16", help="model preset; the CPU config overrides its depth")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--height", type=int, help="train and sample at this height (default --image-size)")
    parser.add_argument("--width", type=int, help="and width: 1:2 and 2:1 against 1:1 at the same pixel count")
    parser.add_argument("--text-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per train step")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", type=int, default=2, help="train steps per timing")
    parser.add_argument("--peak-sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "sample", "data"])
    args = parser.parse_args()
    args.shape = (args.height or args.image_size, args.width or args.image_size)
    cfg = dataclasses.replace(model.PRESETS[args.preset], depth=args.depth, image_size=args.image_size)
    report(measure="setup", dtype=args.precision, peak_sizes=args.peak_sizes, device=str(jax.devices()[0].device_kind),
           devices=jax.device_count(), config=dataclasses.asdict(cfg), batch_size=args.batch_size,
           grad_accum=args.grad_accum, text_length=args.text_length)
    params = None
    if "train" not in args.skip:
        params = bench_train(cfg, args)
    if "sample" not in args.skip:
        params = params if params is not None else model.init_mmjit(jax.random.key(0), cfg)
        bench_sample(cfg, params, args)
    if "data" not in args.skip:
        bench_data(cfg, args)


if __name__ == "__main__":
    main()

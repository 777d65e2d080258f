"""train.py: the objective against the reference, exact resumption, data parallelism, signals, bad input."""
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import model
import sample
import train
from conftest import FIXTURES, ROOT, SMALL_RUN as SMALL, TRAIN, script


def test_loss_matches_reference():
    cfg, params = model.load_diffusers_mmjit(os.path.join(FIXTURES, "mmjit_tiny"))
    io = np.load(os.path.join(FIXTURES, "mmjit_tiny", "io.npz"))
    with jax.default_matmul_precision("highest"):
        loss = jax.jit(train.flow_matching_loss, static_argnums=1)(
            params, cfg, io["img"], io["context"], io["mask"], io["t"], io["noise"], 0.01).mean()
    np.testing.assert_allclose(float(loss), float(io["loss"]), rtol=1e-5)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adamw_ema_matches_optax(clip):
    """The fused update against optax's AdamW (weight decay 0) chained after clipping, and an explicit EMA."""
    r = train.Recipe(lr=1e-2, warmup=3, clip=clip, ema=0.9, muon=False)
    tx = optax.adamw(train.lr_schedule(r), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    tx = optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
    rng = np.random.default_rng(0)
    params = {"a": {"weight": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}, "b": jnp.ones(5)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = {"params": params, "ema": params, "mu": zeros, "nu": zeros, "step": jnp.zeros((), jnp.int32)}
    ref, ref_ema, opt_state = params, params, tx.init(params)
    for i in range(5):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        state = train.adamw_ema(state, grads, optax.tree.norm(grads), r)
        updates, opt_state = tx.update(grads, opt_state, ref)
        ref = optax.apply_updates(ref, updates)
        decay = min(0.9, (1 + i) / (10 + i))
        ref_ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ref_ema, ref)
    # float32 rounding of the same formula in another order: updates are ~1e-2, differences ~1e-8.
    for got, want in [(state["params"], ref), (state["ema"], ref_ema)]:
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert int(state["step"]) == 5


def test_muon_takes_the_weight_matrices_and_adamw_the_rest():
    """--muon: every 2-D weight matrix (a block's, an embedder's) follows optax's Muon (its RMS matched to
    AdamW's, 0.2); biases, norms and conv kernels AdamW exactly as without it."""
    r = train.Recipe(lr=1e-2, warmup=3, muon=True)
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {"double_blocks": [{"w": normal(6, 10), "b": jnp.ones(10)}], "embedder": normal(4, 6),
              "kernel": normal(2, 2, 3, 4)}
    matrices = lambda t: {"w": t["double_blocks"][0]["w"], "embedder": t["embedder"]}
    rest = lambda t: {"b": t["double_blocks"][0]["b"], "kernel": t["kernel"]}
    muon = optax.contrib.muon(train.lr_schedule(r), consistent_rms=0.2)
    adamw = optax.adamw(train.lr_schedule(r), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    refs = [(matrices(params), muon, muon.init(matrices(params))), (rest(params), adamw, adamw.init(rest(params)))]
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = {"params": params, "ema": params, "mu": zeros, "nu": zeros, "step": jnp.zeros((), jnp.int32)}
    for _ in range(5):
        grads = jax.tree.map(lambda x: normal(*x.shape), params)
        state = train.adamw_ema(state, grads, optax.tree.norm(grads), r)
        refs = [(optax.apply_updates(p, tx.update(g, s, p)[0]), tx, tx.update(g, s, p)[1])
                for (p, tx, s), g in zip(refs, (matrices(grads), rest(grads)))]
    got = state["params"]
    # float32 matrix products in another order: updates are ~1e-2, differences ~1e-7.
    for name, ref in refs[0][0].items():
        np.testing.assert_allclose(matrices(got)[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, ref in refs[1][0].items():
        np.testing.assert_allclose(rest(got)[name], ref, rtol=1e-6, atol=1e-7, err_msg=name)
    assert not any(r.muon for name, r in train.RECIPES.items() if name != "tiny")  # the paper's: AdamW


def test_grad_accum_matches_one_batch():
    """One batch of 8 as 1, 2 and 4 micro-batches: the same loss, gradient and update. The weights are
    random everywhere (a fresh init's zero final layer would leave every other gradient zero); the model
    conftest's one-block test preset (the released fixture's 2 + 2 blocks: 87 CPU s from an empty cache, this 64)"""
    from test_sample import random_params

    cfg = dataclasses.replace(model.PRESETS["test"], image_size=16, txt_dim=16)
    params = random_params(model.init_mmjit, cfg, 0)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    context = rng.normal(size=(8, 6, cfg.txt_dim)).astype(np.float32)
    mask = (np.arange(6) < rng.integers(1, 7, (8, 1))).astype(np.int32)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = {"params": params, "ema": params, "mu": zeros, "nu": zeros, "step": jnp.asarray(3, jnp.int32)}
    out = {}
    with jax.default_matmul_precision("highest"):
        for n in (1, 2, 4):
            r = train.Recipe(grad_accum=n, caption_drop=0.5, warmup=1)  # lr 1e-3 at step 3; drops half the captions
            step = functools.partial(train.denoiser_step, cfg=cfg, r=r, mesh=train.make_mesh(jax.devices()[:1]))
            out[n] = jax.jit(step)(state, images, context, mask)
    (ref, ref_metrics) = out[1]
    for n in (2, 4):
        got, metrics = out[n]
        # Only the order of the sums over the batch differs: float32 rounding (measured 4e-9 on first moments
        # up to 0.017; 6e-9 up to 0.047 on this model). Adam's first step is about +-lr = 1e-3 whatever the
        # gradient's size, so where a gradient is near eps = 1e-8 that rounding moves its step by a fraction of
        # lr (measured up to 4e-6; 1.2e-7 here); 2e-5 allows for it, while a wrong draw or weighting moves the
        # loss by percents and steps by 1e-3.
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-6)
        for name, atol in (("mu", 1e-7), ("params", 2e-5)):  # mu = 0.1 x the gradient after this first update
            for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(ref[name])):
                np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_grad_accum_must_divide_the_per_device_batch():
    cfg = model.PRESETS["tiny"]
    train.check_recipe(train.Recipe(batch_size=32, grad_accum=4), cfg)
    for accum in (3, 64, 0):
        with pytest.raises(train.UsageError, match=f"--grad-accum {accum}: expected a divisor of the per-device batch"):
            train.check_recipe(train.Recipe(batch_size=32, grad_accum=accum), cfg)


def read_log(run):
    """The step lines of log.jsonl (the others: the start-up text line, the data summary at the end)."""
    with open(os.path.join(run, "log.jsonl")) as f:
        return [m for m in map(json.loads, f) if "loss" in m]


def straight_and_split(folder):
    """SMALL runs with aspect-ratio buckets, each command a process of its own: 12 steps (drawing its grids at the
    end), and 6 steps then 6 more from the checkpoint (keeping 1). The two runs, the split run's data position at
    step 6, and the three CompletedProcesses."""
    straight, split = os.path.join(folder, "straight"), os.path.join(folder, "split")
    run = lambda *args: subprocess.run([*TRAIN, *SMALL, "--multi-aspect", *args], cwd=ROOT, capture_output=True,
                                       text=True, timeout=240)
    procs = [run("--out", straight, "--steps", "12", "--ckpt-every", "12", "--sample-every", "12",
                 "--sample-steps", "2"), run("--out", split, "--steps", "6", "--ckpt-every", "6")]
    position = os.path.join(split, "checkpoints", "step_00000006", "data_0.json")
    position = model.read_json(position) if os.path.isfile(position) else None
    procs.append(run("--out", split, "--steps", "12", "--ckpt-every", "6", "--keep", "1"))
    return straight, split, position, procs


@pytest.mark.background.with_args(straight_and_split)
def test_resume_is_exact(background):
    """6 steps, then 6 more from the checkpoint in a new process, give the losses of 12 uninterrupted steps; with
    aspect-ratio buckets, whose samples read ahead for other shapes are part of the saved data position. The
    uninterrupted run also draws its sample grids at the end (they change nothing of the training): the square
    one, the tallest and the widest bucket's, the square one scored for faithfulness on its 64 prompts."""
    straight, split, position, procs = background
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(position["sources"][0]["waiting"]) == len(model.aspect_buckets(16, 4)) == 3
    a, b = read_log(straight), read_log(split)
    assert [m["step"] for m in b] == list(range(1, 13))
    # Same program, same inputs, same device: bit-identical, not merely close.
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert a[-1]["loss"] < a[0]["loss"]
    assert os.listdir(os.path.join(split, "checkpoints")) == ["step_00000012"]  # keep=1 pruned the rest
    for name in sample.ARRAYS:
        x = model.read_safetensors(os.path.join(straight, "checkpoints", "step_00000012", f"{name}.safetensors"))
        y = model.read_safetensors(os.path.join(split, "checkpoints", "step_00000012", f"{name}.safetensors"))
        assert all(np.array_equal(x[k], y[k]) for k in x)
    with open(os.path.join(straight, "log.jsonl")) as f:
        scores = [m["faithfulness"] for m in map(json.loads, f) if "faithfulness" in m]
    assert len(scores) == 1 and 0 <= scores[0] <= 1  # one grid; an untrained net's score is near 0
    assert f"step 12: faithfulness {scores[0]:.0%} of 64 prompts" in procs[0].stdout
    assert sorted(os.listdir(os.path.join(straight, "samples"))) == ["loss.png", "step_000012.png",
                                                                      "step_000012_12x20.png", "step_000012_20x12.png"]


DEVICES_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import dataclasses, functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    import model, train
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = model.MMJiTConfig(image_size=16, patch_size=4, txt_dim=32, hidden_size=64, depth=1, num_heads=2,
                            head_dim=32, pca_channels=8, txt_preamble_depth=1)  # 1 preamble block: less to trace
    t5cfg = model.T5Config(vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1)
    t5 = model.init_t5(jax.random.key(1), t5cfg)
    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
             "ids": rng.integers(2, 40, (8, 6)).astype(np.int32), "mask": np.ones((8, 6), np.int32)}
    out = {}
    init = functools.partial(train.init_state, cfg=cfg)
    start = jax.device_get(jax.jit(init)(jax.random.key(0)))  # on the host: each run donates its own copy
    shapes = jax.eval_shape(init, jax.random.key(0))
    for n, fsdp, accum in [(1, False, 1), (4, False, 1), (2, False, 2), (4, True, 2)]:
        r = train.Recipe(batch_size=8, fsdp=fsdp, lr=1e-2, warmup=1, grad_accum=accum)
        step, shardings, batch_sharding = train.make_train_step(train.make_mesh(jax.devices()[:n]), shapes, t5, cfg, t5cfg, r)
        state = jax.device_put(start, shardings)
        sharded = jax.device_put(batch, batch_sharding)
        assert len(sharded["images"].sharding.device_set) == n
        if fsdp:
            assert sum("data" in s.spec for s in jax.tree.leaves(shardings["mu"])) > 10
        step = step.lower(state, t5, sharded).compile()
        if not fsdp:  # replicated weights: the gradient all-reduce is the only collective; no batch row moves
            assert not any(op in step.as_text() for op in ("all-gather", "all-to-all", "collective-permute"))
        for _ in range(2):
            state, metrics = step(state, t5, sharded)
        out[f"{n}-{fsdp}-{accum}"] = {"loss": float(metrics["loss"]),
                                      "params": {k: np.asarray(v).tolist() for k, v in model.flatten(state["params"]).items()
                                                 if k.startswith("double_blocks.0.img_qkv")}}
    # The sharded initialisation of a bigger model, compiled only: no device holds a whole model's worth.
    big = functools.partial(train.init_state, cfg=dataclasses.replace(model.PRESETS["L/16"], depth=4))
    big_shapes = jax.eval_shape(big, jax.random.key(0))
    shardings = train.state_shardings(train.make_mesh(jax.devices()), big_shapes, True)
    memory = jax.jit(big, out_shardings=shardings).lower(jax.random.key(0)).compile().memory_analysis()
    out["init"] = {"params": sum(x.size * 4 for x in jax.tree.leaves(big_shapes["params"])),
                   "temp": memory.temp_size_in_bytes, "outputs": memory.output_size_in_bytes}
    print(json.dumps(out))
""")


@pytest.mark.background.with_args(script, DEVICES_SCRIPT)
def test_data_parallel_matches_single_device(background):
    """The same global batch on 1 and on 4 (simulated) devices, and accumulated over 2 micro-batches on 2
    devices and with FSDP on 4: same loss and update. FSDP initialisation is sharded."""
    proc = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Per device: a quarter of the 4 state trees (so about one params' worth, a few replicated vectors more)
    # and a temporary of about one block's noise (measured 0.28x the parameters; the whole-model draw took 1.8x).
    init = out.pop("init")
    assert init["outputs"] < 1.05 * init["params"] and init["temp"] < 0.5 * init["params"], init
    ref = out.pop("1-False-1")
    assert len(out) == 3
    for name in out:
        # Only the order of the cross-device sums differs: float32 rounding, far below the update size (1e-2).
        np.testing.assert_allclose(out[name]["loss"], ref["loss"], rtol=1e-5)
        for k, v in ref["params"].items():
            np.testing.assert_allclose(out[name]["params"][k], v, atol=1e-5)


HLO_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import collections, functools, json, re, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    import model, train
    cfg = model.MMJiTConfig(image_size=16, patch_size=4, txt_dim=32, hidden_size=64, depth=1, num_heads=2,
                            head_dim=32, pca_channels=8, txt_preamble_depth=1)  # 1 preamble block: less to trace
    shapes = jax.eval_shape(functools.partial(train.init_state, cfg=cfg), jax.random.key(0))
    batch = {"images": jax.ShapeDtypeStruct((8, 16, 16, 3), np.float32),  # T5 features: no T5 to compile
             "context": jax.ShapeDtypeStruct((8, 6, 32), np.float32), "mask": jax.ShapeDtypeStruct((8, 6), np.int32)}
    COLLECTIVE = r"= (.*?) (all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute)(?:-start)?\\("
    out = {"params": sum(x.size for x in jax.tree.leaves(shapes["params"]))}
    for fsdp, accum in [(False, 1), (False, 2), (False, 4), (True, 1), (True, 4)]:
        # AdamW, as in the paper presets: Muon's orthogonalisation of an FSDP-sharded matrix adds
        # collectives of its own (the update's, not the gradient's)
        r = train.Recipe(batch_size=8, fsdp=fsdp, grad_accum=accum, muon=False)
        step, _, _ = train.make_train_step(train.make_mesh(jax.devices()), shapes, {}, cfg, None, r)
        hlo = step.lower(shapes, {}, batch).compile().as_text()
        bodies, name = {}, None  # computation name -> its lines
        for line in hlo.splitlines():
            start = re.match(r"(?:ENTRY )?(%[\\w.-]+) .*\\{$", line)
            name = start.group(1) if start else name
            bodies.setdefault(name, []).append(line)
        loops = set(re.findall(r"body=(%[\\w.-]+)", hlo))
        reached = set()  # every computation a loop body runs, through calls of any kind
        while loops - reached:
            reached |= loops
            loops |= {c for b in reached for line in bodies[b] for c in re.findall(r"=(%[\\w.-]+)", line)}
        ops, in_loops, reduced = collections.Counter(), 0, 0
        for name, lines in bodies.items():
            for line in lines:
                hit = re.search(COLLECTIVE, line)
                if not hit:
                    continue
                ops[hit.group(2)] += 1
                in_loops += name in reached
                if hit.group(2) in ("all-reduce", "reduce-scatter"):  # a reduce-scatter: 1 of 2 halves out
                    size = sum(int(np.prod([int(d) for d in s.split(",") if d]))
                               for s in re.findall(r"[a-z]+\\d*\\[([\\d,]*)\\]", hit.group(1)))
                    reduced += size * (2 if hit.group(2) == "reduce-scatter" else 1)
        out[f"{fsdp}-{accum}"] = {"ops": ops, "in_loops": in_loops, "reduced": reduced}
    print(json.dumps(out))
""")


@pytest.mark.background.with_args(script, HLO_SCRIPT)
def test_grad_accum_reduces_the_gradient_once_per_step(background):
    """The compiled step on 2 simulated devices, 1, 2 and 4 micro-batches: no collective inside a loop (the
    scan over micro-batches included), the same collectives whatever the number of micro-batches, and the
    reductions move one gradient's worth (reduce-scatters of the sharded tensors under FSDP), besides a few
    scalars: the loss and its sums and counts by noise level."""
    proc = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    params = out.pop("params")
    for runs in ([out["False-1"], out["False-2"], out["False-4"]], [out["True-1"], out["True-4"]]):
        assert all(run["in_loops"] == 0 for run in runs), runs
        assert all(run["ops"] == runs[0]["ops"] and run["reduced"] == runs[0]["reduced"] for run in runs), runs
        # At most one gradient (XLA drops the reduction of gradients it knows are 0: the last block's text
        # stream feeds nothing) and the loss's sums and counts by noise level.
        assert all(run["reduced"] <= params + 2 * train.T_BUCKETS + 1 for run in runs), (params, runs)
    assert out["True-4"]["ops"]["reduce-scatter"] > 0 and "reduce-scatter" not in out["False-4"]["ops"]


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def stopped_after_its_first_log_line(folder, processes=1, env=lambda i: {}):
    """A SMALL run of `processes` processes (environment env(i)) told to train 10,000 steps, SIGTERM sent to the
    last one once the log has a line: the run's folder, and each process's exit code and stderr."""
    run = os.path.join(folder, "run")
    procs = [subprocess.Popen([*TRAIN, *SMALL, "--out", run, "--steps", "10000", "--ckpt-every", "10000",
                               *(["--distributed"] if processes > 1 else [])], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=os.environ | env(i)) for i in range(processes)]
    log, deadline = os.path.join(run, "log.jsonl"), time.time() + 180
    while time.time() < deadline and not (os.path.exists(log) and read_log(run)):
        time.sleep(0.2)
    procs[-1].send_signal(signal.SIGTERM)
    errs = [proc.communicate(timeout=240)[1] for proc in procs]
    return run, [(proc.returncode, err) for proc, err in zip(procs, errs)]


@pytest.mark.background.with_args(stopped_after_its_first_log_line)
def test_sigterm_saves_and_exits_cleanly(background):
    run, [(code, err)] = background
    assert code == 0, err[-2000:]
    step = read_log(run)[-1]["step"]
    assert os.listdir(os.path.join(run, "checkpoints")) == [f"step_{step:08d}"]
    assert "resume with the same command" in err


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("--preset", "xl-nonsense", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--preset xl-nonsense: unknown" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_bad_t5_folder(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(train.UsageError, match="not a usable T5 folder"):
        train.main(SMALL + ["--out", str(tmp_path / "run"), "--t5", str(tmp_path / "t5")])
    with pytest.raises(train.UsageError, match="not a usable T5 folder"):
        train.main(SMALL + ["--out", str(tmp_path / "run2"), "--t5", str(tmp_path / "missing")])
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()  # nothing left behind


def test_other_config_in_out_dir_and_wrong_init(small_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(small_run, run)  # conftest's SMALL run of 2 steps
    before = open(os.path.join(run, "config.json")).read()
    with pytest.raises(train.UsageError, match="holds another run .image_size 16 -> 24"):
        train.main(SMALL + ["--image-size", "24", "--out", run, "--steps", "3"])
    assert open(os.path.join(run, "config.json")).read() == before
    # A run of a preset that has changed since (tiny was patch 4): named before its weights are read.
    config = json.loads(before)
    config["model"]["patch_size"] = 2
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(train.UsageError, match=r"holds another run \(patch_size 2 -> 4\)"):
        train.main(SMALL + ["--out", run, "--steps", "3"])
    # A checkpoint of another shape (16 px vs 24 px changes nothing in the weights; another text encoder
    # width does): the error names the key, and no run directory is left half-made.
    other = str(tmp_path / "other")
    with pytest.raises(train.UsageError, match="--init-from .*(shape|config)"):
        train.main(SMALL + ["--out", other, "--init-from", os.path.join(FIXTURES, "mmjit_tiny"), "--steps", "1"])
    assert not os.path.isdir(os.path.join(other, "checkpoints"))


def test_non_finite_loss_stops_at_its_step_and_goes_on_with_a_smaller_lr(small_run, tmp_path):
    """An absurd --lr after a good checkpoint: step 3's update blows the weights up, step 4's loss is not
    finite. The run stops there (found one step behind, at step 5: no log line or save is due at 4), names
    the step and the noise levels, writes nothing of it, and the same command with a smaller --lr goes on
    from the last good checkpoint."""
    run = str(tmp_path / "run")
    args = SMALL + ["--out", run, "--log-every", "100", "--ckpt-every", "5", "--steps", "6"]
    shutil.copytree(small_run, run)  # conftest's 2 steps (logged each), its checkpoint at step 2
    with pytest.raises(SystemExit) as stopped:
        train.main(args + ["--lr", "1e30"])
    assert stopped.value.code != 0 and str(stopped.value).splitlines() == [str(stopped.value)]
    last = os.path.join(run, "checkpoints", "step_00000002")
    assert re.fullmatch(r"train.py: step 4: the loss is not finite at t \d.\d\d-\d.\d\d.*; stopped, nothing of "
                        rf"this step saved; the last good checkpoint {re.escape(last)} is kept: the same "
                        r"command with a smaller --lr \(now 1e\+30\) goes on from there", str(stopped.value))
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step_00000002"]
    train.main(args + ["--lr", "1e-3"])
    assert [m["step"] for m in read_log(run)] == [1, 2, 6] and all(np.isfinite(m["loss"]) for m in read_log(run))


def test_loss_by_noise_level_picture_and_summary(tmp_path, capsys):
    """t held in [0.75, 1): every example in the last noise-level bucket, whose mean loss is then the
    step's loss; the others empty. The grid's step draws samples/loss.png; the run ends with one summary
    line."""
    run = str(tmp_path / "run")
    train.main(SMALL + ["--out", run, "--steps", "2", "--t-mu", "2.2", "--t-sigma", "0.01",  # t = 0.90
                        "--sample-every", "2", "--sample-steps", "1"])
    for m in read_log(run):  # float32 sum / count against the mean: rounding
        assert m["loss_by_t"][:3] == [None] * 3 and m["loss_by_t"][3] == pytest.approx(m["loss"], rel=1e-5)
    assert Image.open(os.path.join(run, "samples", "loss.png")).size == (640, 360)
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"train.py: 2 steps to step 2 in \d+ s, [\d.]+ images/s; final loss by noise level: "
                        r"t 0.00-0.25 -, t 0.25-0.50 -, t 0.50-0.75 -, t 0.75-1.00 [\d.]+; faithfulness \d+%; "
                        rf"samples in {re.escape(run)}/samples, checkpoints in {re.escape(run)}/checkpoints",
                        err[-1]), err[-1]


def test_loss_picture(tmp_path):
    """Every noise level's curve and the faithfulness curve (black) drawn inside the axes' box, with its
    axis on the right; a folder's run (no faithfulness) has no right axis."""
    losses = [{"step": s, "loss": 1.0, "loss_by_t": [2 / s, 1 / s, 0.1, None if s < 30 else 0.02]}
              for s in range(10, 101, 10)]
    for scores in ([{"step": s, "faithfulness": s / 200} for s in (50, 100)], []):
        log = tmp_path / "log.jsonl"
        log.write_text("".join(json.dumps(m) + "\n" for m in [{"step": 0, "text": "the start-up line"}]
                               + losses + scores))
        sample.plot_log(str(log), str(tmp_path / "loss.png"))
        picture = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
        colours = {tuple(c) for c in picture[30:-50, 70:-60].reshape(-1, 3)}  # inside the box
        assert set(sample.T_COLOURS) | ({(0, 0, 0)} if scores else set()) <= colours
        assert (picture[:325, -48:] != 255).any() == bool(scores)  # right of the box: its percentages


def test_failed_save_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch):
    """The disk fills up while step 2's weights are written: the run stops with one line naming the file,
    step 1's checkpoint stays the latest with no half-written folder beside it, and the same command resumes."""
    run = str(tmp_path / "run")
    args = SMALL + ["--out", run, "--steps", "2", "--ckpt-every", "1"]
    write, restore, failed = sample.write_shards, sample.restore_checkpoint, []

    def disk_full_once(path, *a, **k):
        if "tmp_00000002" in path and not failed:
            failed.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(path, *a, **k)

    monkeypatch.setattr(sample, "write_shards", disk_full_once)
    with pytest.raises(train.CheckpointError) as e:
        train.main(args)
    assert str(e.value).splitlines() == [str(e.value)] and failed[0] in str(e.value)
    assert "No space left on device" in str(e.value)
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step_00000001"]
    sample.load_denoiser(run)  # loads step 1, the latest
    restored = []
    monkeypatch.setattr(sample, "restore_checkpoint", lambda path, *a: restored.append(path) or restore(path, *a))
    train.main(args)  # space is back: the same command
    assert restored == [os.path.join(run, "checkpoints", "step_00000001")]
    assert [m["step"] for m in read_log(run)] == [1, 2]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000001", "step_00000002"]


PORT = 20000 + os.getpid() % 20000
HOSTS = lambda i: {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_NUM_PROCESSES": "2",
                   "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{PORT}", "JAX_PROCESS_ID": str(i)}


@pytest.mark.background.with_args(stopped_after_its_first_log_line, 2, HOSTS)
def test_two_hosts_on_loopback(background):
    """Two processes, one CPU device each, joined by jax.distributed over loopback (gloo collectives): each
    feeds half of the global batch, process 0 writes the arrays, each process its own data position. SIGTERM
    reaches only process 1, as a preemption notice may: both must stop after the same step and save it."""
    run, ends = background
    for code, err in ends:
        assert code == 0, err[-3000:]
    assert "stopped at step" in err
    steps = [m["step"] for m in read_log(run)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < 10000
    ckpt = os.path.join(run, "checkpoints", f"step_{steps[-1]:08d}")
    assert {"data_0.json", "data_1.json", "params.safetensors", "state.json"} <= set(os.listdir(ckpt))


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A run of 3 steps that kept the checkpoint of each."""
    run = str(tmp_path_factory.mktemp("checkpoints") / "run")
    train.main(SMALL + ["--out", run, "--steps", "3", "--ckpt-every", "1"])
    return run


def damaged_copy(run, tmp_path, damages):
    """A copy of the run, files of its checkpoints removed or cut by a byte: {path: action}."""
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    for name, action in damages.items():
        path = os.path.join(copy, "checkpoints", name)
        if action == "remove":
            os.remove(path)
        else:
            os.truncate(path, os.path.getsize(path) - 1)
    return copy


@pytest.mark.parametrize("name, action", [("data_0.json", "remove"), ("mu.safetensors", "cut")])
def test_a_damaged_checkpoint_is_named_and_the_one_before_used(three_checkpoints, tmp_path, capsys,
                                                               name, action):
    """The newest checkpoint lost a file, or one was cut short (a copy that did not finish, a full
    disk): the run names it in one line and resumes from the one before, never from step 0, and
    writes the damaged step again in its place; sample.py takes the one before too."""
    run = damaged_copy(three_checkpoints, tmp_path, {f"step_00000003/{name}": action})
    folder = os.path.join(run, "checkpoints")
    damaged, before = os.path.join(folder, "step_00000003"), os.path.join(folder, "step_00000002")
    _, ema, _ = sample.load_denoiser(run)
    saved = model.read_safetensors(os.path.join(before, "ema.safetensors"))
    assert all(np.array_equal(v, saved[k]) for k, v in model.flatten(ema).items())
    capsys.readouterr()
    train.main(SMALL + ["--out", run, "--steps", "3", "--ckpt-every", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if " is damaged (" in line]
    assert len(lines) == 1 and lines[0].startswith(f"train.py: {damaged} is damaged (")
    assert name in lines[0] and lines[0].endswith(f"resuming from {before}")
    assert [m["step"] for m in read_log(run)] == [1, 2, 3]  # 1 and 2 kept, 3 done again
    assert sorted(os.listdir(folder)) == ["step_00000001", "step_00000002", "step_00000003"]
    assert sample.checkpoint_problem(damaged) is None


def test_no_complete_checkpoint_says_how_to_go_on(three_checkpoints, tmp_path):
    """Every checkpoint damaged (each in another way): one line naming the newest and what to do,
    and the run left as it was."""
    run = damaged_copy(three_checkpoints, tmp_path, {"step_00000001/ema.safetensors": "remove",
                                                     "step_00000002/state.json": "cut",
                                                     "step_00000003/params.safetensors": "cut"})
    problems = [problem for _, problem in sample.checkpoints(run)]
    for problem, name in zip(problems, ["params.safetensors", "state.json", "ema.safetensors"]):
        assert problem.startswith(name + ": ") and "\n" not in problem
    log = open(os.path.join(run, "log.jsonl")).read()
    folder = os.path.join(run, "checkpoints")
    with pytest.raises(train.UsageError, match=f"{folder}/step_00000003 is damaged .* no earlier "
                                               f"checkpoint is complete: move {folder} aside"):
        train.main(SMALL + ["--out", run, "--steps", "4", "--ckpt-every", "1"])
    assert open(os.path.join(run, "log.jsonl")).read() == log
    with pytest.raises(ValueError, match="no earlier checkpoint is complete"):
        sample.load_denoiser(run)


def test_another_process_count_is_refused(three_checkpoints, tmp_path):
    """Each process's data position is in its own split of the data: a checkpoint written by 2
    processes (faked: a second position file) is not resumed by 1."""
    run = damaged_copy(three_checkpoints, tmp_path, {})
    ckpt = os.path.join(run, "checkpoints", "step_00000003")
    assert model.read_json(os.path.join(ckpt, "state.json")) == {"step": 3, "processes": 1}
    shutil.copy(os.path.join(ckpt, "data_0.json"), os.path.join(ckpt, "data_1.json"))
    with open(os.path.join(ckpt, "state.json"), "w") as f:
        json.dump({"step": 3, "processes": 2}, f)
    with pytest.raises(train.UsageError, match=f"{ckpt} holds the data positions of 2 processes "
                                               "and this run has 1: resume it on 2"):
        train.main(SMALL + ["--out", run, "--steps", "4", "--ckpt-every", "1"])


SHARDS_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    import sample, train
    from jax.experimental import multihost_utils
    jax.distributed.initialize(num_processes=2, process_id=int(sys.argv[3]))
    run, me = sys.argv[2], jax.process_index()
    if me == 0:
        os.makedirs(run)
        with open(os.path.join(run, "config.json"), "w") as f:
            f.write("{}")
    multihost_utils.sync_global_devices("run")

    def memory(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1]) << 10

    out = []
    saves = [(16, False), (16, False), (16384, False), (16384, True)]  # rows, FSDP
    for step, (rows, fsdp) in enumerate(saves, 1):
        rng = np.random.default_rng(step)
        host = {k: {"w": rng.normal(size=(rows, 256)), "b": rng.normal(size=6)}
                for k in sample.ARRAYS}
        host = jax.tree.map(lambda x: x.astype(np.float32), host) | {"step": np.int32(step)}
        shardings = train.state_shardings(train.make_mesh(jax.devices()), host, fsdp)
        put = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i])
        state = jax.block_until_ready(jax.tree.map(put, host, shardings))
        before = memory("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size (VmHWM) starts again from here
        sample.save_checkpoint(run, state, {"process": me}, keep=1)
        out.append({"rows": rows, "fsdp": fsdp, "growth": memory("VmHWM") - before})
        # Restored with FSDP onto this process's 2 devices alone (4 -> 2).
        shapes = jax.eval_shape(lambda: host)
        shardings = train.state_shardings(train.make_mesh(jax.local_devices()), shapes, True)
        ckpt = os.path.join(run, "checkpoints", f"step_{step:08d}")
        restored, position = sample.restore_checkpoint(ckpt, shapes, shardings)
        assert position == {"process": me}
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(host)):
            assert np.array_equal(a, b)
    print(json.dumps(out))
""")


def two_processes(folder, source):
    """source in two processes of 2 CPU devices each joined over loopback, its argv[1:] ROOT, a run folder and
    the process's index: the stdout, stderr and exit code of each."""
    env = os.environ | {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_PLATFORMS": "cpu",
                        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{PORT + 1}"}
    procs = [subprocess.Popen([sys.executable, "-c", source, ROOT, os.path.join(folder, "run"), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    return [proc.communicate(timeout=240) + (proc.returncode,) for proc in procs]


@pytest.mark.background.with_args(two_processes, SHARDS_SCRIPT)
def test_each_process_writes_only_its_shards(background):
    """Two processes of 2 CPU devices each: a state replicated on the 4 devices, then split over
    them (FSDP), saved, and restored with FSDP on 2 devices. No process gathers the state: process
    1, which writes nothing of a replicated state, holds nothing more during the save whatever the
    model's size, and under FSDP each process holds one shard at a time, never the other's."""
    out = []
    for stdout, stderr, code in background:
        assert code == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    state, shard = 4 * 16384 * 256 * 4, 16384 // 4 * 256 * 4  # bytes: 4 trees of 16 MiB; a quarter
    small, large = out[1][1:3]  # the first save is left out: it compiles the collectives it uses
    # The gather of every tensor grew process 1 by more than the state (measured 84 MB for 64 MiB
    # replicated, 52 MB under FSDP); now by a page (4 kB), and under FSDP by one shard (4 MiB).
    assert large["growth"] - small["growth"] < state / 32, out
    for process in out:
        assert process[3]["growth"] < 1.5 * shard, out

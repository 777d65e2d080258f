"""train.py: the objective against the reference, exact resumption, data parallelism, signals, bad input."""
import json
import os
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

import model
import train
from conftest import FIXTURES, ROOT, SMALL_RUN as SMALL


def test_loss_matches_reference():
    cfg, params = model.load_diffusers_mmjit(os.path.join(FIXTURES, "mmjit_tiny"))
    io = np.load(os.path.join(FIXTURES, "mmjit_tiny", "io.npz"))
    with jax.default_matmul_precision("highest"):
        loss = jax.jit(train.flow_matching_loss, static_argnums=1)(
            params, cfg, io["img"], io["context"], io["mask"], io["t"], io["noise"], 0.01)
    np.testing.assert_allclose(float(loss), float(io["loss"]), rtol=1e-5)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adamw_ema_matches_optax(clip):
    """The fused update against optax's AdamW (weight decay 0) chained after clipping, and an explicit EMA."""
    r = train.Recipe(lr=1e-2, warmup=3, clip=clip, ema=0.9)
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


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_is_exact(tmp_path):
    """10 steps, then 10 more from the checkpoint, give the losses of 20 uninterrupted steps."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(SMALL + ["--out", straight, "--steps", "20", "--ckpt-every", "20"])
    train.main(SMALL + ["--out", split, "--steps", "10", "--ckpt-every", "10"])
    train.main(SMALL + ["--out", split, "--steps", "20", "--ckpt-every", "10", "--keep", "1"])
    a, b = read_log(straight), read_log(split)
    assert [m["step"] for m in b] == list(range(1, 21))
    # Same program, same inputs, same device: bit-identical, not merely close.
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert a[-1]["loss"] < a[0]["loss"]
    assert os.listdir(os.path.join(split, "checkpoints")) == ["step_00000020"]  # keep=1 pruned the rest
    for name in train.ARRAYS:
        x = model.read_safetensors(os.path.join(straight, "checkpoints", "step_00000020", f"{name}.safetensors"))
        y = model.read_safetensors(os.path.join(split, "checkpoints", "step_00000020", f"{name}.safetensors"))
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_sample_grid_logs_faithfulness(tmp_path, capsys):
    """A synthetic run scores each sample grid: the share of its 64 prompts read back from their samples
    (data.faithfulness), in log.jsonl and on the console; the PNG shows the first 8."""
    run = str(tmp_path / "run")
    train.main(SMALL + ["--out", run, "--steps", "1", "--sample-every", "1"])
    scores = [m["faithfulness"] for m in read_log(run) if "faithfulness" in m]
    assert len(scores) == 1 and 0 <= scores[0] <= 1  # one grid; an untrained net's score is near 0
    assert f"step 1: faithfulness {scores[0]:.0%} of 64 prompts" in capsys.readouterr().out
    assert os.listdir(os.path.join(run, "samples")) == ["step_000001.png"]


DEVICES_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import dataclasses, functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    import model, train
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = model.MMJiTConfig(image_size=16, patch_size=4, txt_dim=32, hidden_size=64, depth=1, num_heads=2,
                            head_dim=32, pca_channels=8)
    t5cfg = model.T5Config(vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1)
    t5 = model.init_t5(jax.random.key(1), t5cfg)
    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
             "ids": rng.integers(2, 40, (8, 6)).astype(np.int32), "mask": np.ones((8, 6), np.int32)}
    out = {}
    init = functools.partial(train.init_state, cfg=cfg)
    start = jax.device_get(jax.jit(init)(jax.random.key(0)))  # on the host: each run donates its own copy
    for n, fsdp in [(1, False), (4, False), (4, True)]:
        r = train.Recipe(batch_size=8, fsdp=fsdp, lr=1e-2, warmup=1)
        shapes = jax.eval_shape(init, jax.random.key(0))
        step, shardings, batch_sharding = train.make_train_step(train.make_mesh(jax.devices()[:n]), shapes, t5, cfg, t5cfg, r)
        state = jax.device_put(start, shardings)
        sharded = jax.device_put(batch, batch_sharding)
        assert len(sharded["images"].sharding.device_set) == n
        if fsdp:
            assert sum("data" in s.spec for s in jax.tree.leaves(shardings["mu"])) > 10
        for _ in range(2):
            state, metrics = step(state, t5, sharded)
        out[f"{n}-{fsdp}"] = {"loss": float(metrics["loss"]),
                              "params": {k: np.asarray(v).tolist() for k, v in model.flatten(state["params"]).items()
                                         if k.startswith("double_blocks.0.img_qkv")}}
    print(json.dumps(out))
""")


def test_data_parallel_matches_single_device():
    """The same global batch on 1 and on 4 (simulated) devices, plain and FSDP: same loss and update."""
    proc = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT, ROOT], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = out["1-False"]
    for name in ("4-False", "4-True"):
        # Only the order of the cross-device sums differs: float32 rounding, far below the update size (1e-2).
        np.testing.assert_allclose(out[name]["loss"], ref["loss"], rtol=1e-5)
        for k, v in ref["params"].items():
            np.testing.assert_allclose(out[name]["params"][k], v, atol=1e-5)


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *SMALL, "--out", run, "--steps", "100000",
                             "--ckpt-every", "100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = os.path.join(run, "log.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 0):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    step = read_log(run)[-1]["step"]
    assert os.listdir(os.path.join(run, "checkpoints")) == [f"step_{step:08d}"]
    assert b"resume with the same command" in err


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("--preset", "xl-nonsense", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown preset 'xl-nonsense'" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_bad_t5_folder(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(train.UsageError, match="not a usable T5 folder"):
        train.main(SMALL + ["--out", str(tmp_path / "run"), "--t5", str(tmp_path / "t5")])
    with pytest.raises(train.UsageError, match="not a usable T5 folder"):
        train.main(SMALL + ["--out", str(tmp_path / "run2"), "--t5", str(tmp_path / "missing")])
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()  # nothing left behind


def test_other_config_in_out_dir_and_wrong_init(tmp_path):
    run = str(tmp_path / "run")
    train.main(SMALL + ["--out", run, "--steps", "1", "--ckpt-every", "1"])
    before = open(os.path.join(run, "config.json")).read()
    with pytest.raises(train.UsageError, match="holds a different run"):
        train.main(SMALL[:1] + ["24"] + SMALL[2:] + ["--out", run, "--steps", "2"])
    assert open(os.path.join(run, "config.json")).read() == before
    # A checkpoint of another shape (16 px vs 24 px changes nothing in the weights; another text encoder
    # width does): the error names the key, and no run directory is left half-made.
    other = str(tmp_path / "other")
    with pytest.raises(train.UsageError, match="--init-from .*(shape|config)"):
        train.main(SMALL + ["--out", other, "--init-from", os.path.join(FIXTURES, "mmjit_tiny"), "--steps", "1"])
    assert not os.path.isdir(os.path.join(other, "checkpoints"))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    train.main(SMALL + ["--out", run, "--steps", "1", "--ckpt-every", "1"])
    path = os.path.join(run, "checkpoints", "step_00000001", "params.safetensors")
    params = dict(model.read_safetensors(path))
    params["final_layer.linear.bias"] = np.full_like(params["final_layer.linear.bias"], np.nan)  # a diverged model
    model.write_safetensors(path, params)
    with pytest.raises(SystemExit, match="loss is nan at step 2; stopping") as stopped:
        train.main(SMALL + ["--out", run, "--steps", "3", "--ckpt-every", "1"])
    assert stopped.value.code != 0
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step_00000001"]  # nothing written over it


def test_two_hosts_on_loopback(tmp_path):
    """Two processes, one CPU device each, joined by jax.distributed over loopback (gloo collectives): each
    feeds half of the global batch, process 0 writes the arrays, each process its own data position."""
    run, port = str(tmp_path / "run"), 20000 + os.getpid() % 20000
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *SMALL, "--out", run, "--steps", "2",
                               "--ckpt-every", "2", "--distributed"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=os.environ | {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_NUM_PROCESSES": "2",
                                                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-3000:]
    assert [m["step"] for m in read_log(run)] == [1, 2]
    ckpt = os.path.join(run, "checkpoints", "step_00000002")
    assert {"data_0.json", "data_1.json", "params.safetensors", "state.json"} <= set(os.listdir(ckpt))

"""MeanFlow distillation (train.py --distill-from): the identity's JVP against finite differences,
the target at r = t, exact resumption, and a tiny student that draws its captions in 4 jumps."""
import dataclasses
import functools
import json
import os
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import model
import sample
import train
from conftest import SMALL_RUN, script


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_distillation_resumes_exactly(tmp_path, small_run):
    """A student's 4 steps, then 4 more from its checkpoint, equal 8 uninterrupted ones, bit for
    bit: the teacher is reloaded on resume and every draw (t, r, w, noise) is the step's. Then the
    student's export to the Diffusers layout, and a teacher without its T5 folder."""
    teacher, straight, split = (str(tmp_path / n) for n in ("teacher", "straight", "split"))
    shutil.copytree(small_run, teacher)  # a SMALL_RUN of 2 steps (conftest's, shared: a copy, as its T5 goes below)
    student = SMALL_RUN + ["--distill-from", teacher, "--sample-every", "0"]
    train.main(student + ["--out", straight, "--steps", "8", "--ckpt-every", "8"])
    train.main(student + ["--out", split, "--steps", "4", "--ckpt-every", "4"])
    train.main(student + ["--out", split, "--steps", "8", "--ckpt-every", "4"])
    a, b = read_log(straight), read_log(split)
    assert [m["step"] for m in b if "loss" in m] == list(range(1, 9))
    assert [m["loss"] for m in a if "loss" in m] == [m["loss"] for m in b if "loss" in m]
    last = lambda run, name: model.read_safetensors(
        os.path.join(run, "checkpoints", "step_00000008", f"{name}.safetensors"))
    for name in sample.ARRAYS:
        x, y = last(straight, name), last(split, name)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert any(k.startswith("mf_embedder.") for k in x)

    # Exported, the student says what it is and samples as its run does: 4 jumps by default, or 1.
    export = str(tmp_path / "export")
    sample.main(["--ckpt", straight, "--export-diffusers", export])
    assert model.read_json(os.path.join(export, "transformer", "config.json"))["mean_flow"] is True
    pngs = {}
    for ckpt, steps in [(straight, []), (export, []), (export, ["--steps", "1"])]:
        out = str(tmp_path / f"grid{len(pngs)}.png")
        sample.main(["--ckpt", ckpt, "--prompt", "a red circle", "--n", "2", "--guidance", "3",
                     "--out", out, *steps])
        pngs[len(pngs)] = np.asarray(Image.open(out))
    np.testing.assert_array_equal(pngs[0], pngs[1])
    assert not np.array_equal(pngs[1], pngs[2])

    # A teacher whose T5 folder is gone: one line that says so, and no student run left behind.
    shutil.rmtree(os.path.join(teacher, "t5"))
    missing = r"--distill-from .*: the teacher.s T5 folder .* is missing; give --t5"
    with pytest.raises(sample.UsageError, match=missing):
        train.main(student + ["--out", str(tmp_path / "orphan")])
    assert not any(name.startswith("orphan") for name in os.listdir(tmp_path))


CFG = model.MMJiTConfig(image_size=8, patch_size=4, txt_dim=16, hidden_size=32, depth=1,
                        txt_preamble_depth=1, num_heads=2, head_dim=16, pca_channels=8,
                        mean_flow=True)


def small_problem():
    """A random student and teacher (last layers and the student's token MLP made non-zero, so that
    x, h and w all matter), and a batch of 3 with one jump of each kind: from noise, midway, none"""
    keys = jax.random.split(jax.random.key(0), 6)
    init = jax.jit(model.init_mmjit, static_argnums=1)  # one program, not one per operation
    student = init(keys[0], CFG)
    student["mf_embedder"]["fc2"]["weight"] = 0.2 * jax.random.normal(keys[1], (2, 32, 32))
    teacher = init(keys[2], dataclasses.replace(CFG, mean_flow=False))
    for params in (student, teacher):
        params["final_layer"]["linear"]["weight"] = 0.1 * jax.random.normal(keys[3], (32, 48))
    images = jax.random.uniform(keys[4], (3, 8, 8, 3), minval=-1, maxval=1)
    noise = 2.0 * jax.random.normal(keys[5], (3, 8, 8, 3))
    context = jax.random.normal(keys[1], (3, 5, 16))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    t, s, w = jnp.array([0.0, 0.3, 0.6]), jnp.array([0.5, 0.8, 0.6]), jnp.array([1.0, 3.0, 5.0])
    return student, teacher, (images, context, mask, t, s, w, noise)


# Compiled whole: run op by op, this file's few evaluations compiled some 400 small programs (40 s).
jump_target = jax.jit(train.mean_flow_target, static_argnums=(2, 11))  # (..., cfg, ..., dtype)


@jax.jit
def teacher_velocity(teacher, images, context, mask, t, s, w, noise):
    """x_t and the teacher's guided velocity there, written out: v = (x0_g - x_t) / (1 - t) with
    x0_g = uncond + w (cond - uncond), the unconditional branch an all-zero mask."""
    t4, w4 = t[:, None, None, None], w[:, None, None, None]
    x_t = t4 * images + (1 - t4) * noise
    cond = model.mmjit_apply(teacher, CFG, x_t, context, mask)
    uncond = model.mmjit_apply(teacher, CFG, x_t, context, jnp.zeros_like(mask))
    return x_t, (uncond + w4 * (cond - uncond) - x_t) / (1 - t4)


def test_jump_target_is_the_flow_derivative_by_finite_differences():
    """target - v = (r - t) du/dt, du/dt the derivative of the student's u(x, t, r) along the
    teacher's guided path (x moving at v) with r fixed: the JVP's tangents (v, 1, and -1 for
    h = r - t), checked by central differences of u itself. In float32 with step 1e-3 the
    differences carry rounding of ~1e-3 of du/dt's scale (measured: 1.5e-3 at most); the
    tolerance, 1e-2 of it, is far below what a wrong tangent changes (h's sign flipped: 0.8 of the
    scale)."""
    student, teacher, batch = small_problem()
    images, context, mask, t, s, w, noise = batch
    u, target = jump_target(student, teacher, CFG, *batch, 0.01, jnp.float32)
    x_t, v = teacher_velocity(teacher, *batch)
    txt = jax.jit(model.text_adapter, static_argnums=1)(student, CFG, context, mask)

    @jax.jit
    def u_at(x, t):
        x0 = model.mean_flow_apply(student, CFG, x, txt, s - t, w)
        return (x0 - x) / (1 - t)[:, None, None, None]

    np.testing.assert_allclose(u, u_at(x_t, t), atol=1e-5)
    eps = 1e-3
    du_dt = (u_at(x_t + eps * v, t + eps) - u_at(x_t - eps * v, t - eps)) / (2 * eps)  # [3,8,8,3]
    jump = (s - t)[:2, None, None, None]
    scale = float(jnp.abs(du_dt[:2]).max())
    np.testing.assert_allclose((target - v)[:2] / jump, du_dt[:2], atol=1e-2 * scale)
    assert scale > 0.1  # a derivative worth checking


def test_no_jump_target_is_the_teachers_guided_velocity():
    """At r = t the target is the teacher's guided velocity whatever the student: guidance
    distillation. Where the student jumps, it is not."""
    student, teacher, batch = small_problem()
    _, target = jump_target(student, teacher, CFG, *batch, 0.01, jnp.float32)
    _, v = teacher_velocity(teacher, *batch)
    np.testing.assert_allclose(target[2], v[2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(target[:2], v[:2], atol=1e-2)


def test_tiny_student_draws_its_captions_in_four_jumps(memorised_shapes):
    """A small teacher learns four captioned scenes (test_overfit's, shared); a student distilled from
    it through train.py's jitted step draws each caption in 4 single-pass jumps from fresh noise,
    and swapping the captions swaps the images: the student reads the text, not the noise."""
    from test_overfit import CFG as SCENES_CFG, SHAPES, psnr

    teacher, context, mask = memorised_shapes["state"]["ema"], memorised_shapes["context"], memorised_shapes["mask"]
    shape, images = SHAPES[0], memorised_shapes["images"][0]  # the wide canvas, [4, 12, 24, 3]
    # the captions' T5 features, as train.py's encode-once feeds them (the teacher learnt from them too)
    batch = jax.device_put({"images": np.tile(images, (4, 1, 1, 1)), "context": np.tile(context, (4, 1, 1)),
                            "mask": np.tile(mask, (4, 1))})
    student_cfg = dataclasses.replace(SCENES_CFG, mean_flow=True)
    r = train.Recipe(batch_size=16, ema=0.0, ema_warmup=False, lr=1e-3, warmup=10, distill_from="teacher",
                     w_min=1.0, w_max=2.0)  # EMA: raw weights
    init = functools.partial(train.init_state, cfg=student_cfg)
    frozen = ({}, teacher)  # no T5: the features come in the batch
    step, shardings, _ = train.make_train_step(train.make_mesh(jax.devices()), jax.eval_shape(init, jax.random.key(0)),
                                               frozen, student_cfg, None, r)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    state |= {"params": state["params"] | jax.tree.map(jnp.copy, teacher),  # the teacher's weights, its own
              "ema": state["ema"] | jax.tree.map(jnp.copy, teacher)}  # new tokens
    # The student starts as its teacher, which already draws these four in 4 jumps: the steps are there to
    # show that distilling keeps it so. A wrong target breaks it fast (measured: with du/dt's sign flipped,
    # or a zero target, the own-caption PSNR fell to 2-7 dB by step 50); 150 steps changed nothing more.
    for _ in range(75):
        state, _ = step(state, frozen, batch)
    student = state["ema"]

    noise = sample.initial_noise(jax.random.split(jax.random.key(1), 4), shape, 2.0)
    for order in (np.arange(4), np.array([1, 2, 3, 0])):
        out = np.asarray(sample.mean_flow_sample(student, student_cfg, context[order], mask[order],
                                                 noise, steps=4, guidance=1.0))
        # >= 18 dB: an RMS error under 0.25 on the [-1, 1] scale; every other scene under 12 dB
        for i, j in enumerate(order):
            scores = [psnr(out[i], im) for im in images]
            others = [x for k, x in enumerate(scores) if k != j]
            assert scores[j] >= 18 and max(others) < 12, (order, scores)


DEVICES_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import dataclasses, functools, json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    import model, train
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = model.MMJiTConfig(image_size=8, patch_size=4, txt_dim=16, hidden_size=32, depth=1, txt_preamble_depth=1,
                            num_heads=2, head_dim=16, pca_channels=8, mean_flow=True)
    teacher = jax.tree.map(np.array, model.init_mmjit(jax.random.key(1),
                                                      dataclasses.replace(cfg, mean_flow=False)))
    teacher["final_layer"]["linear"]["weight"] += 0.1  # not the zero start: a teacher that matters
    other = jax.tree.map(lambda x: 1.1 * x, teacher)
    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32),
             "context": rng.normal(size=(4, 5, 16)).astype(np.float32),
             "mask": np.ones((4, 5), np.int32)}
    init = functools.partial(train.init_state, cfg=cfg)
    start = jax.device_get(jax.jit(init)(jax.random.key(0)))
    start |= {"params": start["params"] | teacher,
              "ema": start["ema"] | jax.tree.map(np.copy, teacher)}
    out = {}
    for n, fsdp, precision in [(1, False, "float32"), (2, True, "float32"), (2, False, "bfloat16")]:
        r = train.Recipe(batch_size=4, fsdp=fsdp, precision=precision, distill_from="x", lr=1e-2,
                         warmup=1, muon=False)
        frozen = ({}, jax.tree.map(lambda x: np.asarray(x, precision), teacher))
        step, shardings, batch_sharding = train.make_train_step(
            train.make_mesh(jax.devices()[:n]), jax.eval_shape(init, jax.random.key(0)), frozen,
            cfg, None, r)
        sharded = jax.device_put(batch, batch_sharding)
        step = step.lower(jax.device_put(start, shardings), frozen, sharded).compile()
        another = ({}, jax.tree.map(lambda x: np.asarray(x, precision), other))
        _, changed = step(jax.device_put(start, shardings), another, sharded)  # the same program
        state, first = step(jax.device_put(start, shardings), frozen, sharded)
        state, metrics = step(state, frozen, sharded)
        out[f"{n}-{fsdp}-{precision}"] = {
            "loss": float(metrics["loss"]), "changed": float(changed["loss"]),
            "first": float(first["loss"]),
            "qkv": np.asarray(state["params"]["double_blocks"][0]["img_qkv"]["weight"]).tolist()}
    print(json.dumps(out))
""")


@pytest.mark.background.with_args(script, DEVICES_SCRIPT, timeout=120)
def test_distillation_on_two_devices(background):
    """Two steps of a student on 1 and on 2 (simulated) devices, with FSDP, and data-parallel in
    bfloat16: the same loss and update in float32, finite in bfloat16. The teacher is an input of
    the compiled step (a closure would make it a constant): the same program with another teacher
    gives another loss."""
    proc = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = out.pop("1-False-float32")
    for name, m in out.items():
        assert np.isfinite(m["loss"]) and abs(m["changed"] - m["first"]) > 1e-3, (name, m)
        if name.endswith("float32"):
            np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-5)
            np.testing.assert_allclose(m["qkv"], ref["qkv"], atol=1e-5)

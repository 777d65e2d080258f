"""sample.py: the solvers against the reference's samples and exact solutions, guidance, seeds, the
CLI end to end, export."""
import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import model
import sample
import train
from conftest import FIXTURES, ROOT
MMJIT = os.path.join(FIXTURES, "mmjit_tiny")
SPIECE = os.path.join(FIXTURES, "tokenizer_tiny", "spiece.model")


def test_matches_reference():
    """The reference's sampler, Euler with 100 steps, guided throughout."""
    cfg, params = model.load_diffusers_mmjit(MMJIT)
    io = np.load(os.path.join(MMJIT, "io.npz"))
    with jax.default_matmul_precision("highest"):
        out = sample.sample(params, cfg, io["context"], io["mask"], io["noise"],
                            steps=int(io["sample_steps"]), guidance=float(io["cfg_scale"]),
                            sampler="euler", a_min=float(io["sample_a_min"]))
    # The last row has an all-zero mask (both branches equal); the last step's 1 - t is below a_min.
    np.testing.assert_allclose(out, io["sample"], atol=1e-4, rtol=0)


def gaussian_data(mean, std):
    """The exact x0 predictor for data N(mean, std^2) per coordinate, noise 2 N(0, I): E[x0 | x_t].
    """
    def denoise(x, t):
        var = t**2 * std**2 + (1 - t) ** 2 * sample.RELEASED["noise_scale"]**2  # of x_t
        return mean + t * std**2 * (x - t * mean) / var
    return denoise


def dpm(denoise, x, ts, scales=None):
    scales = jnp.ones(len(ts) - 1) if scales is None else scales
    return sample.solve(denoise, x, ts, scales, sample.dpm_2m_weights(ts, scales))


def test_dpm_solver_ends_on_x0():
    """One step from t = 0 to 1 returns the network's x0 itself; a predictor that always returns the
    true clean image keeps x on the straight path t x0 + (1 - t) x_0 and ends on x0 at any step
    count."""
    key_x0, key_noise = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(key_x0, (2, 8, 8, 3))
    noise = 2 * jax.random.normal(key_noise, x0.shape)
    clean = lambda x, t, s: x0
    np.testing.assert_array_equal(dpm(clean, noise, sample.time_grid(1)), x0)  # 0 x + 1 x0
    for steps in (2, 3, 4, 7, 16):
        for shift in (1.0, 3.0):
            out = dpm(clean, noise, sample.time_grid(steps, shift))
            np.testing.assert_allclose(out, x0, atol=1e-6)  # float32 rounding of a few mul-adds


def test_dpm_solver_is_second_order():
    """Gaussian data: the exact x0 predictor and the exact end point of the ODE, x0 = mean + std / 2
    x_0, are known. Halving the step nearly quarters the error. Not quite: both ends of [0, 1] lie
    at infinite lambda, where every grid's steps stay long in lambda, which adds a log factor (~ 4
    log N / log 2N)."""
    mean, std = jnp.array([0.5, -0.3, 0.8, 0.0]), jnp.array([0.5, 0.7, 1.0, 1.5])
    gaussian, x = gaussian_data(mean, std), jnp.array([1.5, -2.0, 0.7, 3.0])
    denoise = lambda x, t, s: gaussian(x, t)
    exact = mean + std / sample.RELEASED["noise_scale"] * x
    solve = jax.jit(lambda ts: dpm(denoise, x, ts))
    error = {shift: [float(jnp.abs(solve(sample.time_grid(n, shift)) - exact).max())
                     for n in (32, 64, 128, 256)] for shift in (1.0, 0.5)}
    for e in error.values():
        for coarse, fine in zip(e[1:], e[2:]):
            assert 2.9 < coarse / fine < 4.5, error  # measured 3.06, 3.30 (shift 1); 3.34, 3.44
    euler = sample.solve(denoise, x, sample.time_grid(256), jnp.ones(256))
    assert error[1.0][0] < float(jnp.abs(euler - exact).max())  # 32 steps beat Euler's 256


def test_dpm_solver_across_a_guidance_switch():
    """Guidance 4 on part of the way only, Gaussian data (conditional N(0.5, 1), unconditional N(0,
    1), both predictors exact), against the same ODE solved in 256 times more steps: 20 steps are
    about as close with an interval as without one (measured RMS 0.0067 for [0, 0.7), 0.0109 for
    [0.3, 1], 0.0117 guided throughout). Extrapolating across the switch took the jump between the
    two fields for curvature: 0.067 and 0.034."""
    cond, uncond = gaussian_data(0.5, 1.0), gaussian_data(0.0, 1.0)
    denoise = lambda x, t, s: uncond(x, t) + s * (cond(x, t) - uncond(x, t))
    x = 2 * jax.random.normal(jax.random.key(1), (256,))

    def rms_error(lo, hi):
        """A step is guided where it starts in [lo, hi): both grids switch at the same time."""
        out = []
        for n in (20, 20 * 256):
            ts = sample.time_grid(n)
            guided = (ts[:-1] > lo - 1e-6) & (ts[:-1] < hi - 1e-6)
            out.append(dpm(denoise, x, ts, jnp.where(guided, 4.0, 1.0)))
        return float(jnp.sqrt(jnp.mean((out[0] - out[1]) ** 2)))

    everywhere = rms_error(0.0, 2.0)
    for lo, hi in (0.0, 0.7), (0.3, 2.0):
        error = rms_error(lo, hi)
        assert error < 2 * everywhere, (lo, hi, error, everywhere)


def test_unguided_steps_run_the_conditional_batch_alone(monkeypatch):
    """Outside the guidance interval (and at guidance 1) a step costs one batch of B, not 2B."""
    cfg, params = model.load_diffusers_mmjit(MMJIT)
    io = np.load(os.path.join(MMJIT, "io.npz"))
    rows, denoise = [], model.denoise

    def counted(params, cfg, x, txt, dtype):
        jax.debug.callback(lambda: rows.append(x.shape[0]))
        return denoise(params, cfg, x, txt, dtype)

    monkeypatch.setattr(model, "denoise", counted)
    B = io["noise"].shape[0]
    run = jax.jit(sample.sample.__wrapped__, static_argnames=("cfg", "steps", "sampler"))  # counted
    for guidance, interval, expected in (3.0, (0.3, 1.0), 2 * 7 + 3), (1.0, (0.0, 1.0), 10):
        rows.clear()
        run(params, cfg, io["context"], io["mask"], io["noise"], steps=10, guidance=guidance,
            sampler="dpm++2m", guidance_interval=interval)
        assert sum(rows) == expected * B, (guidance, interval, rows)  # 7 steps start at t >= 0.3


def test_dpm_solver_guides_x0():
    """One step from t = 0 is the guided x0 of the noise: the conditional and unconditional
    (all-zero mask) predictions mixed by the scale, with the reference's network."""
    cfg, params = model.load_diffusers_mmjit(MMJIT)
    io = np.load(os.path.join(MMJIT, "io.npz"))
    with jax.default_matmul_precision("highest"):
        out = sample.sample(params, cfg, io["context"], io["mask"], io["noise"], steps=1,
                            guidance=3.0, sampler="dpm++2m")
        cond, uncond = (model.mmjit_apply(params, cfg, io["noise"], io["context"], m)
                        for m in (io["mask"], np.zeros_like(io["mask"])))
    np.testing.assert_allclose(out, uncond + 3.0 * (cond - uncond), atol=1e-5)  # other batching


def test_guidance_interval():
    """Outside the interval the velocity is the conditional one (guidance 1), whatever the scale.
    The settings are the reference test's: guidance and the interval are traced, so its compile is
    reused."""
    cfg, params = model.load_diffusers_mmjit(MMJIT)
    io = np.load(os.path.join(MMJIT, "io.npz"))
    with jax.default_matmul_precision("highest"):
        run = lambda s, interval: sample.sample(
            params, cfg, io["context"], io["mask"], io["noise"], steps=int(io["sample_steps"]),
            guidance=s, sampler="euler", a_min=float(io["sample_a_min"]),
            guidance_interval=interval)
        unguided, always = run(1.0, (0.0, 1.0)), run(3.0, (0.0, 1.0))
        never, late = run(3.0, (2.0, 3.0)), run(3.0, (0.5, 1.0))
    np.testing.assert_allclose(never, unguided, atol=1e-5)
    np.testing.assert_allclose(always, io["sample"], atol=1e-4)
    assert 1e-2 < float(jnp.abs(late - unguided).max())
    assert 1e-2 < float(jnp.abs(late - always).max())


def test_noise_depends_on_seed_only():
    shape = (8, 12)  # (H, W)
    noise = lambda seeds, scale=2.0: sample.initial_noise([jax.random.key(s) for s in seeds], shape,
                                                          scale)
    whole = noise(range(10, 14))
    np.testing.assert_array_equal(whole, jnp.concatenate([noise([10, 11]), noise([12, 13])]))
    np.testing.assert_array_equal(whole, noise(range(10, 14)))
    assert float(jnp.abs(whole[0] - whole[1]).mean()) > 1  # each seed its own noise
    assert whole.shape == (4, 8, 12, 3) and 1.8 < float(whole.std()) < 2.2  # 2 N(0, I)
    np.testing.assert_allclose(noise(range(10, 14), 0.5), whole / 4, rtol=1e-6)  # the run's scale


def test_latest_checkpoint(tmp_path):
    for name, finished in (("step_00000002", True), ("step_00000010", True), ("step_00000020", False),
                           ("tmp_00000030", True)):
        folder = tmp_path / "checkpoints" / name
        os.makedirs(folder)
        if finished:
            (folder / "state.json").write_text('{"step": 1, "processes": 1}')
            (folder / "data_0.json").write_text("{}")
            for k in sample.ARRAYS:
                model.write_safetensors(str(folder / f"{k}.safetensors"), {})
    assert sample.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "step_00000010")


def test_make_grid_enlarges_and_captions():
    captions = ["a much longer caption " * 6, "b", "c", "d"]
    grid = sample.make_grid(np.zeros((4, 32, 32, 3)), captions, cols=2)
    assert grid.width >= 2 * 128 and grid.height >= 2 * (128 + 3 * 10)  # long captions: 3 lines
    pixels = np.asarray(grid)
    assert (pixels[4:132, 4:132] == 128).all()  # the first image, 4x enlarged (0 is mid-grey)
    assert (pixels[132:180, 4:132] < 100).any()  # black text on white under it


def random_params(init, cfg, seed):
    """Random weights in the structure `init` builds, drawn by numpy (cheaper than compiling jax's
    initialisers for a one-off). Norm scales and biases near 1."""
    rng = np.random.default_rng(seed)
    like = jax.eval_shape(functools.partial(init, cfg=cfg), jax.random.key(0))
    def draw(t):
        z = rng.standard_normal(t.shape)
        return 1 + 0.1 * z if t.ndim == 1 else z / np.sqrt(t.shape[0])

    return jax.tree.map(lambda t: draw(t).astype(np.float32), like)


TINY_T5 = model.T5Config(vocab_size=96, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=1)


@pytest.fixture(scope="module")
def run_dir(small_run):
    return small_run  # conftest's: 2 steps, a checkpoint at step 2 (shared with test_distill)


def read_pngs(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with Image.open(os.path.join(folder, name)) as im:
            out[name] = (np.asarray(im), dict(im.text))
    return out


def test_cli_end_to_end(run_dir, tmp_path, monkeypatch):
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--n", "2", "--steps", "3",
            "--guidance", "3"]
    # 4 images in batches of 3: the second batch is padded.
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", run_dir, *args, "--seed", "5",
                           "--batch-size", "3", "--out", str(tmp_path / "grid_a.png"),
                           "--out-dir", str(tmp_path / "a")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "grid_a.png") as grid:
        assert grid.width >= 2 * 128 and grid.height >= 2 * 128  # 2 x 2 cells, enlarged to 128
    a = read_pngs(tmp_path / "a")
    assert list(a) == ["0000_0.png", "0000_1.png", "0001_0.png", "0001_1.png"]
    pixels, meta = a["0001_0.png"]
    size = model.read_json(os.path.join(run_dir, "config.json"))["model"]["image_size"]
    assert pixels.shape == (size, size, 3)
    assert meta == {"prompt": "a blue square", "seed": "7", "steps": "3", "guidance": "3.0",
                    "sampler": "dpm++2m", "width": str(size), "height": str(size)}

    # In-process from here (one compile for all): another batch size gives the same images, the
    # same seed the same pixels, and the checkpoint folder itself the run's. (Other seeds need not
    # give other pixels here: a barely trained net ignores its input, its final layer at zero.)
    monkeypatch.chdir(tmp_path)
    for folder, ckpt in (("b", run_dir), ("c", run_dir), ("d", sample.latest_checkpoint(run_dir))):
        sample.main([*args, "--ckpt", ckpt, "--seed", "5", "--batch-size", "4",
                     "--out-dir", folder])
    b, c, d = (read_pngs(tmp_path / folder) for folder in "bcd")
    assert not os.path.exists("grid.png")  # --out-dir alone writes no grid
    for name in a:
        assert np.abs(a[name][0].astype(int) - b[name][0]).max() <= 1  # batch shape: float rounding
        np.testing.assert_array_equal(b[name][0], c[name][0])
        np.testing.assert_array_equal(b[name][0], d[name][0])


def test_cli_width_and_height(run_dir, tmp_path):
    """A 2:1 job of a model trained at 16 x 16: every PNG and the grid's cells are 24 x 12."""
    sample.main(["--ckpt", run_dir, "--prompt", "a red circle", "--prompt", "a blue square",
                 "--steps", "2", "--n", "1", "--width", "24", "--height", "12",
                 "--out-dir", str(tmp_path / "pngs"), "--out", str(tmp_path / "grid.png")])
    pngs = read_pngs(tmp_path / "pngs")
    assert len(pngs) == 2 and all(p.shape == (12, 24, 3) and m["width"] == "24"
                                  and m["height"] == "12" for p, m in pngs.values())
    with Image.open(tmp_path / "grid.png") as grid:  # 2 cells side by side, each 11x (128 / 12)
        assert grid.width >= 2 * 24 * 11 and grid.height >= 12 * 11


@pytest.mark.parametrize("use_ema, name", [(True, "ema"), (False, "params")])
def test_load_run_weights(run_dir, use_ema, name):
    cfg, params, settings = sample.load_denoiser(run_dir, use_ema=use_ema)
    ckpt = sample.latest_checkpoint(run_dir)
    saved = model.read_safetensors(os.path.join(ckpt, name + ".safetensors"))
    for key, value in model.flatten(params).items():
        np.testing.assert_array_equal(value, saved[key])
    assert settings == {"t5": os.path.join(run_dir, "t5"), "text_length": 12, "noise_scale": 2.0,
                        "guidance": train.Recipe().guidance}


@pytest.fixture(scope="module")
def released_t5(tmp_path_factory):
    """A T5 as wide as the fixture's released model (txt_dim 16), with a sentencepiece model."""
    folder = str(tmp_path_factory.mktemp("t5"))
    model.save_t5(folder, TINY_T5, random_params(model.init_t5, TINY_T5, 3))
    shutil.copy(SPIECE, folder)
    return folder


def test_cli_released_model(released_t5, tmp_path):
    out = str(tmp_path / "grid.png")
    sample.main(["--ckpt", MMJIT, "--t5", released_t5, "--prompt", "a cat", "--n", "1",
                 "--steps", "2", "--out", out])
    with Image.open(out) as grid:
        assert grid.width >= 128 and grid.height >= 128


def truncated_run(run_dir, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    ema = os.path.join(sample.latest_checkpoint(run), "ema.safetensors")
    with open(ema, "r+b") as f:
        f.truncate(os.path.getsize(ema) // 2)
    return run


X = ["--prompt", "x"]


@pytest.mark.parametrize("case, message", [
    (lambda run, tmp: ["--ckpt", str(tmp / "nowhere"), *X], "no such file or directory"),
    (lambda run, tmp: ["--ckpt", truncated_run(run, tmp), "--prompt", "x"], "truncated"),
    (lambda run, tmp: ["--ckpt", MMJIT, "--t5", os.path.join(FIXTURES, "t5_tiny"), "--prompt", "x"],
     "T5 width 32 does not match the checkpoint's txt_dim 16"),
    (lambda run, tmp: ["--ckpt", MMJIT, "--prompt", "x"], "give --t5 DIR"),
    (lambda run, tmp: ["--ckpt", run], "no prompts"),
    (lambda run, tmp: ["--ckpt", run, "--prompts-file", str(tmp / "none.txt")], "--prompts-file"),
    (lambda run, tmp: ["--ckpt", run, *X, "--steps", "0"], "--steps must be at least 1"),
    (lambda run, tmp: ["--ckpt", run, *X, "--guidance", "-1"], "--guidance must be >= 0"),
    (lambda run, tmp: ["--ckpt", run, "--prompt", "x", "--width", "18"],
     "--width must be a positive multiple of the model's patch size 4, got 18"),
    (lambda run, tmp: ["--ckpt", run, *X, "--height", "0"], "--height must be a positive multiple"),
    (lambda run, tmp: ["--ckpt", run, *X, "--time-shift", "0"], "--time-shift must be > 0"),
])
def test_bad_input(run_dir, tmp_path, capsys, case, message):
    with pytest.raises(SystemExit) as exit:
        sample.main(case(run_dir, tmp_path))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("sample.py: error:") and message in err, err
    assert err.count("\n") == 1


def test_bad_input_in_a_real_process(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", truncated_run(run_dir, tmp_path),
                           "--prompt", "x"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("sample.py: error:"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, name", [([], "ema"), (["--no-ema"], "params")])
def test_export_diffusers_round_trip(run_dir, tmp_path, monkeypatch, flags, name):
    """A run exported (no prompts needed) and read back: bit-identical weights, and samples with
    every setting the run's, guidance included (the run's 2, where a released model's default is 5). Its
    config names no absolute path; a copy elsewhere samples the same with --t5."""
    out = str(tmp_path / "export")
    sample.main(["--ckpt", run_dir, "--export-diffusers", out, *flags])
    cfg, params, settings = sample.load_denoiser(out)
    ckpt = sample.latest_checkpoint(run_dir)
    saved = model.read_safetensors(os.path.join(ckpt, name + ".safetensors"))
    assert cfg == sample.load_denoiser(run_dir)[0]
    assert settings["text_length"] == 12 and settings["guidance"] == train.Recipe().guidance  # not RELEASED
    assert os.path.samefile(settings["t5"], os.path.join(run_dir, "t5"))  # found through the config
    for key, value in model.flatten(params).items():
        np.testing.assert_array_equal(value, saved[key])
    config = model.read_json(os.path.join(out, "transformer", "config.json"))
    assert not [v for v in config.values() if isinstance(v, str) and os.path.isabs(v)], config
    moved = str(tmp_path / "elsewhere" / "export")
    shutil.copytree(out, moved)
    assert sample.load_denoiser(moved)[2]["t5"] is None  # its T5 left behind: sampling it asks --t5
    monkeypatch.chdir(tmp_path)  # test_cli_end_to_end's settings: its compiled sampler serves
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--n", "2", "--steps", "3",
            "--batch-size", "4", *flags]  # no --guidance: each folder's own
    sample.main([*args, "--ckpt", run_dir, "--out-dir", "pngs_run"])
    sample.main([*args, "--ckpt", out, "--out-dir", "pngs_export"])  # no --t5: the config names it
    sample.main([*args, "--ckpt", moved, "--t5", os.path.join(run_dir, "t5"),
                 "--out-dir", "pngs_moved"])
    run = read_pngs(tmp_path / "pngs_run")
    for folder in "pngs_export", "pngs_moved":
        export = read_pngs(tmp_path / folder)
        assert list(run) == list(export)
        for k in run:
            np.testing.assert_array_equal(run[k][0], export[k][0])
            assert run[k][1] == export[k][1] and run[k][1]["guidance"] == str(train.Recipe().guidance)


def test_released_layout_imported_then_exported_is_unchanged(tmp_path):
    """The fixture in the released layout, imported and exported: the same tensor names, dtypes and
    shapes, the same values for every tensor the model uses, and the same config."""
    cfg, params = model.load_diffusers_mmjit(MMJIT)
    config = model.read_json(os.path.join(MMJIT, "config.json"))
    model.save_diffusers_mmjit(str(tmp_path), cfg, params, config["prompt_length"])
    assert model.read_json(str(tmp_path / "transformer" / "config.json")) == config
    ref = model.read_safetensors(os.path.join(MMJIT, "diffusion_pytorch_model.safetensors"))
    out = model.read_safetensors(str(tmp_path / "transformer" / "diffusion_pytorch_model"
                                     ".safetensors"))
    assert list(out) == list(ref)
    for k, v in ref.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        if k.startswith(("model.net.t_embedder.", "model.net.pooled_embedder.")):  # unused: 0s
            assert not out[k].any(), k
        else:
            np.testing.assert_array_equal(out[k], v, err_msg=k)


def test_seams_tell_a_patch_grid_from_a_smooth_image():
    """tests/standin.py's seams, behind the README's figures: 1 for a smooth image, far
    above 1 where every 8 px patch is offset on its own, and only at that grid's borders."""
    import standin
    y, x = np.mgrid[0:32, 0:32] / 31.0
    smooth = np.stack([x, y, x * y], -1)[None] * np.ones((4, 1, 1, 1))  # [4, 32, 32, 3]
    offsets = np.random.default_rng(0).uniform(-0.3, 0.3, (4, 4, 4, 1))  # one a patch
    blocky = smooth + offsets.repeat(8, 1).repeat(8, 2)
    assert standin.seams(smooth, 8) == pytest.approx(1.0)  # a ramp: every step alike, 1 exactly
    assert standin.seams(blocky, 8) > 3
    assert standin.seams(blocky, 6) < 2  # another grid's borders miss the jumps mostly


def test_precision_and_coverage_tell_variety_from_spread():
    """tests/standin.py's precision and coverage beside held-out reals, behind MEASUREMENTS' figures:
    fresh draws of the real distribution score about 1 on both; one repeated point covers little;
    points off the data score 0 precision, however spread out they are."""
    import standin
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    same = standin.beside_held_out_reals(real, rng.normal(size=(16, 8)), seed=0)
    ratio = same[0] / same[1]
    assert np.all(np.abs(ratio - 1) < 0.3), ratio  # 16 points are noisy: 0.75-1.14 over 8 seeds (seed 0: 1.08)
    collapsed = standin.beside_held_out_reals(real, np.repeat(real[:1], 16, 0), seed=0)
    assert collapsed[0, 1] < 0.25 * collapsed[1, 1]  # one ball's neighbours, not sixteen's (0.03-0.17x)
    far = standin.beside_held_out_reals(real, rng.normal(size=(16, 8)) * 3 + 10, seed=0)
    assert far[0, 0] == 0 and far[0, 1] == 0
    assert standin.mean_pairwise(rng.normal(size=(16, 8)) * 3 + 10) > 2 * standin.mean_pairwise(real)

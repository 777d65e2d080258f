"""train.py and sample.py as a user meets them: every flag does what it says, every mistake is refused before
anything is written, an interrupt at any moment leaves nothing or a run that resumes, and the text encoder reads
the run's own captions. The data is a user's folder (conftest.write_user_folder), not the built-in shapes."""
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import data
import model
import sample
import train
from conftest import FIXTURES, ROOT, SMALL_RUN, TRAIN, USER_CAPTIONS, write_user_folder



def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The user's four pictures, and two samples that cannot be used: a caption that is not UTF-8 and a JPEG cut
    short (its caption is fine: it is read at start-up, and the image fails when the loader decodes it)."""
    folder = write_user_folder(tmp_path_factory.mktemp("user") / "my pictures")
    shutil.copy(os.path.join(folder, "img0.png"), os.path.join(folder, "latin1.png"))
    with open(os.path.join(folder, "latin1.txt"), "wb") as f:
        f.write("un caf\xe9 cr\xe8me".encode("latin-1"))
    with open(os.path.join(folder, "img1.jpg"), "rb") as f, open(os.path.join(folder, "cut.jpg"), "wb") as g:
        g.write(f.read()[:200])
    with open(os.path.join(folder, "cut.txt"), "w") as f:
        f.write("a photo cut short")
    return folder


@pytest.fixture(scope="module")
def user_run(folder, tmp_path_factory):
    """Two steps on the user's folder with flags that each leave a trace."""
    run = str(tmp_path_factory.mktemp("runs") / "mine")
    train.main(SMALL_RUN + ["--data", folder, "--out", run, "--steps", "2", "--ckpt-every", "1", "--keep", "1",
                            "--warmup", "0", "--lr", "2e-3", "--noise-scale", "1", "--sample-every", "2"])
    return run


# ----------------------------------------------------------------------------- flags that work

def test_each_flag_leaves_its_trace(user_run):
    log = read_log(user_run)
    steps = [m for m in log if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["lr"] == pytest.approx(2e-3, rel=1e-6) for m in steps)  # --warmup 0: the full rate at once
    assert os.listdir(os.path.join(user_run, "checkpoints")) == ["step_00000002"]  # --ckpt-every 1 --keep 1
    assert sorted(os.listdir(os.path.join(user_run, "samples"))) == ["loss.png", "step_000002.png"]
    assert model.read_json(os.path.join(user_run, "config.json"))["recipe"]["noise_scale"] == 1
    # The start-up line: the tokenizer was fitted to these captions, and four distinct captions pay to encode once.
    text = log[0]["text"]
    assert text.startswith("text: 5 captions read, 0.00% of pieces unknown, 0.0% cut at 12 tokens") and \
        "encoded once for 5 distinct captions" in text
    # The summary, each counted once though met again: 8 samples over two passes of the folder's 4 good ones,
    # one of them smaller than 16 px, and the 2 bad ones.
    assert log[-1]["data"] == ("data: 8 samples used; 2 skipped (1 caption not UTF-8, 1 unreadable image); "
                               "1 images upscaled to 16 px; 0 captions cut at 12 tokens")
    assert steps[-1]["skipped"] == 2


def test_grids_of_a_data_run_show_its_captions(folder):
    r = train.Recipe(data=(folder,))
    assert sorted(sample.grid_prompts(r, data.read_captions([folder])[0])) == sorted(USER_CAPTIONS + ["a photo cut short"])
    shapes = sample.grid_prompts(train.Recipe(), data.synthetic_captions())  # 8 shown, 64 scored
    assert shapes[:8] == data.SYNTHETIC_PROMPTS and len(shapes) == 64 and set(shapes) <= set(data.synthetic_captions())


def default_run(folder):
    """`python train.py` with every default but the size and length: its run folder and CompletedProcess."""
    run = os.path.join(folder, "run")
    return run, subprocess.run([sys.executable, "train.py", "--out", run, "--image-size", "16", "--batch-size", "4",
                                "--steps", "2", "--sample-every", "2", "--sample-steps", "2"], cwd=ROOT,
                               capture_output=True, text=True, timeout=240)


@pytest.mark.background.with_args(default_run)
def test_the_default_preset_trains_end_to_end(background):
    """The other run tests train the small `test` model: here the tiny preset's own MM-JiT and random T5, as
    a user starts it (a process of its own), train, save, draw and score a grid."""
    run, proc = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(run)
    assert [(m["step"], bool(np.isfinite(m["loss"]))) for m in log if "loss" in m] == [(2, True)]
    assert json.load(open(os.path.join(run, "config.json")))["model"] == dataclasses.asdict(
        dataclasses.replace(model.PRESETS["tiny"], image_size=16))
    assert any("faithfulness" in m for m in log) and os.listdir(os.path.join(run, "checkpoints")) == ["step_00000002"]


def test_data_without_out_gets_its_own_run_directory():
    assert train.parse_args([])[0].out == os.path.join("runs", "tiny")
    assert train.parse_args(["--data", "/home/me/my pictures/"])[0].out == os.path.join("runs", "tiny-my_pictures")
    assert train.parse_args(["--data", "pets.jsonl:2"])[0].out == os.path.join("runs", "tiny-pets")
    with pytest.raises(train.UsageError, match="--data pets.jsonl:0: the weight must be a positive number"):
        train.parse_args(["--data", "pets.jsonl:0"])  # one line, not a traceback, without --out too


def test_tiny_trains_patch_4_longer_on_your_own_data():
    """The tiny preset: patch 8 for 1920 steps on the built-in shapes (the 5-minute demo), patch 4 for 1440 on
    any other source, mixed with the shapes or not; flags still win, and the paper presets do not change."""
    def shape(*argv):
        r = train.parse_args(list(argv))[1]
        return r.model, r.steps

    assert shape() == shape("--data", "synthetic") == shape("--data", "synthetic:2") == ("tiny", 1920)
    assert shape("--data", "my pictures") == shape("--data", "synthetic", "--data", "pets.jsonl:2") == ("tiny/4", 1440)
    assert shape("--data", "my pictures", "--model", "tiny", "--steps", "5") == ("tiny", 5)
    assert shape("--preset", "b16-pretrain", "--data", "cc12m.tar") == ("B/16", 250_000)


def test_a_student_learns_on_its_teachers_data(user_run, folder):
    """Without --data, a student distils on the data its teacher was trained on (not the built-in shapes), with
    its teacher's model; from a checkpoint folder too; --data still overrides the data."""
    args, r = train.parse_args(["--distill-from", user_run])
    assert r.data == (folder,) and args.out == os.path.join("runs", "tiny-my_pictures-distill")
    assert r.model == "test" and r.steps == train.DISTILL["tiny"]["steps"]  # the teacher's, the student's
    ckpt = os.path.join(user_run, "checkpoints", os.listdir(os.path.join(user_run, "checkpoints"))[0])
    assert train.parse_args(["--distill-from", ckpt])[1].data == (folder,)
    assert train.parse_args(["--distill-from", user_run, "--data", "synthetic"])[1].data == ("synthetic",)


def test_a_students_guidance_range_is_centred_on_its_presets_guidance():
    """The student learns w in [g - 1, g + 1] around the guidance its preset samples at (tiny 2, the
    fine-tune 5): a fine-tune's student is not left to extrapolate; flags still override it."""
    ranges = {p: train.parse_args(["--preset", p, "--distill-from", "nowhere"])[1] for p in ("tiny", "b16-finetune")}
    assert [(r.w_min, r.w_max) for r in ranges.values()] == [(1.0, 3.0), (4.0, 6.0)]
    r = train.parse_args(["--distill-from", "nowhere", "--guidance", "0.5", "--w-max", "7"])[1]
    assert (r.w_min, r.w_max) == (0.0, 7.0)


def test_paper_presets_and_students_keep_the_specs_noise_levels():
    """Only the tiny teacher draws t wider and caps the loss weight (a_min 0.25): the paper presets keep
    SPEC's t = sigmoid(N(-0.8, 0.8)) and a_min 0.01, and every student a_min 0.01, which in the MeanFlow
    target defines the velocity near t = 1, not only a weight."""
    spec = (-0.8, 0.8, 0.01, 2.0)
    for preset in set(train.RECIPES) - {"tiny"}:
        r = train.parse_args(["--preset", preset])[1]
        assert (r.t_mu, r.t_sigma, r.a_min, r.noise_scale) == spec, preset
    for preset in ("tiny", "b16-finetune"):
        assert train.parse_args(["--preset", preset, "--distill-from", "nowhere"])[1].a_min == 0.01
    assert train.parse_args([])[1].a_min > 0.01 and train.parse_args(["--a-min", "0.01"])[1].a_min == 0.01


def test_noise_scale_reaches_the_sampler(user_run, tmp_path):
    """Two copies of a run that differ only in noise_scale sample different images from one seed."""
    other = str(tmp_path / "other")
    shutil.copytree(user_run, other)
    config = model.read_json(os.path.join(other, "config.json"))
    config["recipe"]["noise_scale"] = 2.0
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(config, f)
    os.remove(os.path.join(other, "checkpoints", "step_00000002", "config.json"))  # so the run's config is read
    images = {}
    for run in (user_run, other):
        out = str(tmp_path / f"{os.path.basename(run)}.png")
        sample.main(["--ckpt", run, "--prompt", USER_CAPTIONS[0], "--n", "1", "--steps", "2", "--out-dir", out])
        with Image.open(os.path.join(out, "0000_0.png")) as im:
            images[run] = np.asarray(im, np.int32)
            assert im.text["guidance"] == str(train.Recipe().guidance)  # the run's recipe guidance by default
    # A run of two steps barely reads its input, so the pixels move by little; with one noise scale they would
    # be bit-identical (same seed, same program: test_sample.test_cli_end_to_end).
    assert (images[user_run] != images[other]).any()


# ----------------------------------------------------------------------------- mistakes refused up front

@pytest.mark.parametrize("flags, message", [
    (["--image-size", "30"], "--image-size 30: expected a positive multiple of the patch size 4"),
    (["--batch-size", "0"], "--batch-size 0: expected a positive multiple of the"),
    (["--log-every", "0"], "--log-every 0: expected at least 1"),
    (["--ckpt-every", "0"], "--ckpt-every 0: expected at least 1"),
    (["--keep", "0"], "--keep 0: expected at least 1"),
    (["--steps", "0"], "--steps 0: expected at least 1"),
    (["--steps", "-5"], "--steps -5: expected at least 1"),
    (["--warmup", "-1"], "--warmup -1: expected 0 or more"),
    (["--precision", "float16"], "--precision float16: expected float32 or bfloat16"),
    (["--preset", "b32-pretrain", "--model", "B/32"], "the B/32 model reads 1024-wide FLAN-T5 features; give --t5 DIR"),
    (["--data", "/no/such/path"], "--data /no/such/path: no such file or directory"),
    (["--data", "EMPTY"], "no images found"),
    (["--data", "NO_CAPTIONS"], "not one readable caption"),
    (["--init-from", "/no/such/run"], "--init-from /no/such/run: no such file or directory"),
    (["--preset", "nonsense"], "--preset nonsense: unknown"),
])
def test_startup_mistakes_write_nothing(tmp_path, flags, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nocap").mkdir()
    (tmp_path / "nocap" / "a.png").write_bytes(b"")
    (tmp_path / "nocap" / "a.txt").write_text("   ")
    flags = [{"EMPTY": str(tmp_path / "empty"), "NO_CAPTIONS": str(tmp_path / "nocap")}.get(f, f) for f in flags]
    with pytest.raises(train.UsageError, match=message):
        train.main(SMALL_RUN + ["--out", str(tmp_path / "run")] + flags)
    assert sorted(os.listdir(tmp_path)) == ["empty", "nocap"]  # no run directory, no RUN.partial


def test_a_mistake_is_one_line_and_exit_2_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"train.py: error: --data {tmp_path / 'nowhere'}: no such file or directory")
    assert os.listdir(tmp_path) == []


def test_run_directory_of_another_run_or_finished(user_run, folder):
    config = open(os.path.join(user_run, "config.json")).read()
    same = SMALL_RUN + ["--data", folder, "--out", user_run, "--keep", "1", "--warmup", "0", "--noise-scale", "1"]
    with pytest.raises(train.UsageError, match=r"holds another run \(seed 0 -> 3\): give the same"):
        train.main(same + ["--lr", "1e-3", "--seed", "3"])
    with pytest.raises(train.UsageError, match="is finished .2 of --steps 2.: give a larger --steps"):
        train.main(same + ["--lr", "2e-3", "--steps", "2"])
    assert open(os.path.join(user_run, "config.json")).read() == config


# ----------------------------------------------------------------------------- runs that go on

def test_fine_tuning_starts_from_the_source_weights(user_run, tmp_path):
    """--init-from takes the source's EMA weights (a learning rate of 1e-12 leaves them where they are), and
    its model without --model; not its data."""
    r = train.parse_args(["--init-from", user_run, "--data", "elsewhere"])[1]
    assert r.model == "test" and r.data == ("elsewhere",) and train.parse_args(["--init-from", user_run])[1].data == ()
    tuned = str(tmp_path / "tuned")
    train.main(SMALL_RUN + ["--out", tuned, "--init-from", user_run, "--steps", "1", "--lr", "1e-12", "--warmup", "0"])
    source = model.read_safetensors(os.path.join(sample.latest_checkpoint(user_run), "ema.safetensors"))
    after = model.read_safetensors(os.path.join(sample.latest_checkpoint(tuned), "params.safetensors"))
    for k, v in source.items():
        np.testing.assert_allclose(after[k], v, atol=1e-9)
    assert np.abs(source["final_layer.linear.weight"]).max() > 0  # trained, so not a fresh initialisation


def test_a_torn_log_line_does_not_stop_a_resume(small_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(small_run, run)  # conftest's 2 steps, a checkpoint at step 2
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 0.5, "gra')  # killed while writing
    train.main(SMALL_RUN + ["--out", run, "--steps", "3", "--ckpt-every", "1"])
    assert [m["step"] for m in read_log(run) if "loss" in m] == [1, 2, 3]


def interrupted_during_start_up(folder):
    """SMALL runs of 3 steps sent Ctrl-C twice, and once, as soon as their run folder appears:
    {presses: (the run, its stderr, its exit code)}."""
    out = {}
    for presses in (2, 1):
        run = os.path.join(folder, f"run{presses}")
        proc = subprocess.Popen(TRAIN + SMALL_RUN + ["--out", run, "--steps", "3"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(run + ".partial") or os.path.exists(run)):
            time.sleep(0.02)
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        out[presses] = run, proc.communicate(timeout=180)[1], proc.returncode
    return out


@pytest.mark.background.with_args(interrupted_during_start_up)
def test_interrupts_during_start_up_leave_a_run_that_resumes(background):
    """Ctrl-C while the run directory is being made: once finishes start-up, saves and exits 0; twice quits at
    once. Either way the same command then trains."""
    for presses, (run, err, code) in background.items():
        assert code == (0 if presses == 1 else 128 + signal.SIGINT), err[-2000:]
        assert "Traceback" not in err
        train.main(SMALL_RUN + ["--out", run, "--steps", "3"])  # the same command (in this process: cheaper)
        assert [m["step"] for m in read_log(run) if "loss" in m][-1] == 3
        assert not os.path.exists(run + ".partial")


# ----------------------------------------------------------------------------- the text encoder

def test_fitted_tokenizer_knows_every_word_and_spells_new_ones(tmp_path):
    captions = data.read_captions([write_user_folder(tmp_path / "pics")])[0] + data.synthetic_captions()
    train.make_tiny_text_encoder(str(tmp_path / "t5"), captions, seed=0)
    tok = model.Tokenizer(str(tmp_path / "t5" / "spiece.model"))
    pieces = lambda text: [tok.sp.id_to_piece(i) for i in tok.sp.encode(text)]
    for word in {w.strip(",") for c in captions for w in c.split()}:  # each word of the data: known pieces
        assert all(p != "<unk>" and not p.startswith("<0x") for p in pieces(word)), (word, pieces(word))
    assert pieces("zebra")[0] == "▁zebra" and pieces("Zebra") == pieces("zebra")  # whole, case folded
    new = pieces("quokka")  # never seen: spelt, not one shared unknown piece
    assert "<unk>" not in new and any(p.startswith("<0x") or len(p.strip("▁")) < 6 for p in new) and len(new) > 1
    assert tok.coverage(["a quokka on a glacier"], 16)["unknown"] == 0
    assert 300 < tok.vocab_size < 8192  # follows the data: 256 bytes, the words and their parts


def test_coverage_numbers_on_a_crafted_set():
    tok = model.Tokenizer(os.path.join(FIXTURES, "tokenizer_tiny", "spiece.model"))  # no byte fallback
    # "a red circle": 6 pieces + </s> = 7 tokens; "a 猫 on a mat": 9 pieces, one of them <unk>, + </s> = 10
    assert tok.coverage(["a red circle", "a 猫 on a mat"], 8) == {"captions": 2, "unknown": 1 / 15, "cut": 0.5,
                                                                   "median_tokens": 8.5}
    r = train.Recipe(text_length=8)
    line, warnings, _ = sample.text_report(tok, ["a red circle", "a 猫 on a mat"], r, None)
    assert line == ("text: 2 captions read, 6.67% of pieces unknown, 50.0% cut at 8 tokens, median 8 tokens; "
                    "T5 features encoded in every step")  # median 8.5 printed to the even 8
    assert len(warnings) == 2 and "unknown" in warnings[0] and "--text-length 8; 9 would hold 99%" in warnings[1]
    assert sample.fitted_text_length(tok, ["a red circle"]) == 16  # at least 16
    assert sample.fitted_text_length(tok, ["a b c d e f g h i j k"] * 99 + ["short"]) == 24  # 22 tokens -> 24


def test_encode_once_equals_encoding_in_the_step():
    """The same update from a batch of token ids (T5 inside the step) and from the encode-once table."""
    cfg = model.MMJiTConfig(image_size=8, patch_size=4, txt_dim=32, hidden_size=32, depth=1, txt_preamble_depth=1,
                            num_heads=2, head_dim=16, pca_channels=8)
    t5cfg = model.T5Config(vocab_size=80, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
    t5 = model.init_t5(jax.random.key(1), t5cfg)
    tok = model.Tokenizer(os.path.join(FIXTURES, "tokenizer_tiny", "spiece.model"))
    captions = ["a red circle", "a cat", "a red circle", "x"]
    r = train.Recipe(batch_size=4, lr=1e-2, warmup=0)
    init = functools.partial(train.init_state, cfg=cfg)
    step, shardings, batch_sharding = train.make_train_step(train.make_mesh(jax.devices()), jax.eval_shape(
        init, jax.random.key(0)), t5, cfg, t5cfg, r)
    ids, mask = tok.encode(captions, 12)
    host = {"images": np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32), "ids": ids,
            "mask": mask, "captions": captions}
    features = sample.encode_once((t5cfg, t5, tok), captions, 12, jnp.float32)
    assert len(features[0]) == 3 and features[1].shape == (3, 7, 32)  # distinct captions; the longest is 7 tokens
    out = {}
    with jax.default_matmul_precision("highest"):
        for name, table in (("in the step", None), ("once", features)):
            state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
            state, metrics = step(state, t5, train.device_batch(host, batch_sharding, table, []))
            out[name] = (float(metrics["loss"]), state["params"])
    # The encoder sees 7 instead of 12 positions (masked keys: the same features up to float rounding, ~1e-7).
    np.testing.assert_allclose(out["once"][0], out["in the step"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["once"][1]), jax.tree.leaves(out["in the step"][1])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fixtures_live_in_the_repository():
    """A fresh clone has no ../shared beside it: the golden files the tests read are in tests/fixtures."""
    assert os.path.commonpath([FIXTURES, ROOT]) == ROOT
    for name in ("mmjit_tiny/io.npz", "mmjit_tiny/diffusion_pytorch_model.safetensors", "t5_tiny/io.npz",
                 "tokenizer_tiny/spiece.model", "tokenizer_tiny/tokens.json", "param_counts.json"):
        assert os.path.isfile(os.path.join(FIXTURES, name)), name


# ----------------------------------------------------------------------------- sample.py

def test_sample_says_what_it_did_and_what_it_could_not_read(user_run, tmp_path, capsys):
    long = " ".join(["a very long prompt"] * 10)  # 40 words: more than the run's 12 tokens
    out = str(tmp_path / "grid.png")
    sample.main(["--ckpt", user_run, "--prompt", long, "--prompt", USER_CAPTIONS[1], "--n", "1", "--steps", "1",
                 "--out", out])
    err = capsys.readouterr().err.splitlines()
    n = model.Tokenizer(os.path.join(user_run, "t5", "spiece.model")).lengths([long])[0]
    assert n > 12 and [line for line in err if "warning" in line] == [
        f"sample.py: warning: prompt 1 {long[:57] + '...'!r} is {n} tokens, cut to the model's 12"]
    assert err[-1] == f"sample.py: wrote {out}" and os.path.isfile(out)


def test_sample_warns_of_unknown_pieces(tmp_path, capsys):
    """A tokenizer without byte fallback (the fixture's) reads 猫 as <unk>: the prompt is named."""
    t5 = str(tmp_path / "t5")
    t5cfg = model.T5Config(vocab_size=96, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=1)
    model.save_t5(t5, t5cfg, model.init_t5(jax.random.key(0), t5cfg))
    shutil.copy(os.path.join(FIXTURES, "tokenizer_tiny", "spiece.model"), t5)
    sample.main(["--ckpt", os.path.join(FIXTURES, "mmjit_tiny"), "--t5", t5, "--prompt", "a 猫 on a mat",
                 "--n", "1", "--steps", "1", "--out", str(tmp_path / "g.png")])
    assert "sample.py: warning: prompt 1 'a 猫 on a mat' has words the tokenizer reads as <unk>" in capsys.readouterr().err


def test_a_checkpoint_copied_out_of_its_run(user_run, tmp_path, capsys):
    lone = str(tmp_path / "lone")
    shutil.copytree(sample.latest_checkpoint(user_run), lone)
    with pytest.raises(SystemExit) as exit:
        sample.main(["--ckpt", lone, "--prompt", "x"])
    assert exit.value.code == 2 and "comes without its text encoder" in capsys.readouterr().err
    sample.main(["--ckpt", lone, "--t5", os.path.join(user_run, "t5"), "--prompt", "x", "--n", "1", "--steps", "1",
                 "--out", str(tmp_path / "g.png")])
    assert os.path.isfile(tmp_path / "g.png")


def test_a_given_t5_folder_is_used_where_it_is(user_run, tmp_path, capsys):
    """--t5 (here another run's tokenizer and encoder): the run records its path, and the coverage line reads the
    run's captions with it (the shapes' words, unknown to a tokenizer fitted to the user's folder, are spelt)."""
    t5, run = os.path.join(user_run, "t5"), str(tmp_path / "run")
    train.main(SMALL_RUN + ["--t5", t5, "--out", run, "--steps", "1"])
    assert model.read_json(os.path.join(run, "config.json"))["t5"] == os.path.abspath(t5)
    assert not os.path.exists(os.path.join(run, "t5")) and not os.path.exists(run + ".partial")
    assert "text: 414 captions read, 0.00% of pieces unknown" in capsys.readouterr().err


@pytest.mark.parametrize("partitionable", [True, False])
def test_random_streams_share_no_bits(monkeypatch, partitionable):
    """Every draw from one seed, in either of jax's threefry modes: the initialisation's (a draw a block,
    mask_token), the T5's, two steps' caption drop, t and noise, and the grid's. No 32-bit word of one
    draw is a word of another, but by chance (about 0.75 expected among these 80,000 words). With the
    partitionable default, split(key)[1] is fold_in(key, 1), which once gave mask_token the first words
    of img_embedder.proj1."""
    draws, uniform, normal = [], jax.random.uniform, jax.random.normal

    def recorded(dist):
        def draw(key, shape=(), *args, **kwargs):
            draws.append(np.asarray(jax.random.bits(key, shape)).ravel())  # the words it consumes
            return dist(key, shape, *args, **kwargs)
        return draw

    monkeypatch.setattr(jax.random, "uniform", recorded(uniform))
    monkeypatch.setattr(jax.random, "normal", recorded(normal))
    cfg = model.MMJiTConfig(txt_dim=16, hidden_size=32, depth=2, txt_preamble_depth=1, num_heads=2,
                            head_dim=16, pca_channels=8)
    t5cfg = model.T5Config(vocab_size=96, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2)
    with jax.threefry_partitionable(partitionable):
        model.init_mmjit(train.rng(0, "init"), cfg)
        model.init_t5(train.rng(0, "t5"), t5cfg)
        for step in range(2):  # as train.denoiser_step draws them
            k_drop, k_t, k_noise = jax.random.split(jax.random.fold_in(train.rng(0, "step"), step), 3)
            jax.random.uniform(k_drop, (4, 1)), jax.random.normal(k_t, (4,))
            jax.random.normal(k_noise, (4, 16, 16, 3))
        sample.initial_noise(jax.random.split(train.rng(0, "grid"), 4), (16, 16), 2.0)
    words = np.concatenate(draws).astype(np.uint64)
    owner = np.repeat(np.arange(len(draws), dtype=np.uint64), [len(d) for d in draws])
    distinct = np.unique(words << 32 | owner) >> 32  # each word once per draw it is in
    assert len(draws) == 5 + 3 + 6 + 4 and len(distinct) > 30000  # draws: init, T5, steps, grid
    shared = len(distinct) - len(np.unique(distinct))
    assert shared <= 3, shared  # measured 1 in each mode; mask_token alone shared 16


def test_every_flag_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in train.dataclasses.fields(train.Recipe):
        help = " ".join(f.metadata["help"].replace("%%", "%").split())
        assert f"--{f.name.replace('_', '-')}" in text and help[:40] in text and len(help) > 10, f.name


def test_train_py_restarts_itself_only_as_a_script():
    """On Linux `python train.py` re-executes itself once with glibc's huge-page tunable; run in a host
    process (a notebook's %run, runpy) it must not replace that process: the code after it still runs."""
    code = ("import os, runpy, sys; sys.argv = ['train.py', '--help']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print('still here', e.code, os.environ.get('GLIBC_TUNABLES'))\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    # replaced, the process would start over with the tunable set and print it
    assert proc.returncode == 0 and proc.stdout.strip().endswith("still here 0 None"), proc.stderr[-2000:]

"""The tiny overfit test: the proof that text conditioning works end to end.

A small MM-JiT learns four captioned scenes, each on a wide (2:1) and a tall (1:2) canvas, through train.py's
own jitted step (caption drop and all; one batch shape per step, as multi-aspect training feeds it). Then on
both canvases each caption, sampled from fresh noise, must give back its own image, and swapping the captions
must swap the images: the only thing telling the four apart is the text. (Square inputs are the parity
tests' and the default run's; a third shape here would cost two more compilations.) Twice: on the built-in
shapes, and on a user's folder (other pictures, sizes and formats, captions in words the shapes never use)
read and cropped by data.py, with the tokenizer fitted to that folder's captions as train.py fits it.

The step takes the captions' T5 features, as train.py's encode-once feeds them for a few distinct captions
(test_run.test_encode_once_equals_encoding_in_the_step: the same update as encoding in the step): so both
datasets, whose fitted T5s differ in vocabulary, train and sample with the same compiled programs. The
shapes' model is shared (conftest.memorised_shapes): test_distill's student starts from it.
"""
import functools

import jax
import numpy as np
import pytest

import data
import model
import sample
import train
from conftest import USER_CAPTIONS, compiles, write_user_folder

SCENES = [data.Scene("circle", "red", "white"), data.Scene("square", "blue", "black", 1, "left"),
          data.Scene("triangle", "yellow", "gray", 1, "top"), data.Scene("circle", "green", "blue", 2)]
# Measured with this model (hidden 64; Muon), the least own-caption PSNR, shapes / user folder: 18.2 / 21.5 dB
# at 200 steps, 25.9 / 23.0 at 240, 27.6 / 24.5 at 280 (the last 50 losses 0.05 / 0.05): 280 leaves 4.5 dB
# above the 20 asked. (Hidden 128, as before, passed from 200 steps but at 4x the cost of a step: the step is
# mostly Muon's orthogonalisation, cubic in the width.)
STEPS = 280
SHAPES = [(12, 24), (24, 12)]  # (H, W): 2:1 and 1:2, 18 patches of 4 x 4 each
CFG = model.MMJiTConfig(image_size=16, patch_size=4, txt_dim=128, hidden_size=64, depth=2, txt_preamble_depth=1,
                        num_heads=2, head_dim=32, pca_channels=16)


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * np.log10(4.0 / np.mean((np.clip(a, -1, 1) - b) ** 2)))


def memorise(folder, dataset):
    """CFG trained STEPS steps on the four scenes of `dataset` on both canvases: a dict of what the tests
    read (the state; the captions, their mask and T5 features; the images per shape; the losses; the names
    of the programs compiled after the first steps and after all)."""
    source = "synthetic" if dataset == "shapes" else write_user_folder(folder / "pictures")
    train.make_tiny_text_encoder(str(folder / "t5"), data.read_captions([source])[0], seed=0)
    t5cfg, t5_params, tokenizer = sample.load_text_encoder(str(folder / "t5"), CFG)
    if dataset == "shapes":
        captions = [data.describe(s) for s in SCENES]
        images = [np.stack([data.render_scene(s, *shape) for s in SCENES]) for shape in SHAPES]  # [4, H, W, 3] each
    else:  # the folder's four samples as the loader crops them to each canvas, in caption order
        images = []
        for shape in SHAPES:
            with data.Loader([source], CFG.image_size, 4, tokenizer, 12, buckets=[shape]) as loader:
                batch = next(loader)
            captions = sorted(batch["captions"])
            images.append(batch["images"][np.argsort(batch["captions"])])
    ids, mask = tokenizer.encode(captions, 12)
    context = np.asarray(sample.encode_text(t5_params, t5cfg, ids, mask))  # [4, 12, 128]
    batches = [{"images": np.tile(x, (4, 1, 1, 1)), "context": np.tile(context, (4, 1, 1)),
                "mask": np.tile(mask, (4, 1))} for x in images]

    r = train.Recipe(batch_size=16, lr=2e-3, warmup=20, ema_warmup=False, ema=0.0)  # EMA = raw weights here
    init = functools.partial(train.init_state, cfg=CFG)
    step, shardings, _ = train.make_train_step(train.make_mesh(jax.devices()), jax.eval_shape(init, jax.random.key(0)),
                                               {}, CFG, None, r)  # no T5 in the step: the features come in
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    batches = jax.device_put(batches)
    losses = []
    with compiles() as compiled:
        for i in range(len(SHAPES)):
            state, metrics = step(state, {}, batches[i])
            losses.append(metrics["loss"])
        first = list(compiled)
        with jax.transfer_guard("disallow"):  # the loop moves nothing between host and device
            for i in range(len(SHAPES), STEPS):
                state, metrics = step(state, {}, batches[i % len(SHAPES)])
                losses.append(metrics["loss"])
    return dict(state=state, captions=captions, mask=mask, context=context, images=images,
                losses=np.array(losses), compiled=(first, list(compiled)))


@pytest.mark.parametrize("dataset", ["shapes", "user folder"])
def test_tiny_overfit(tmp_path, request, dataset):
    run = request.getfixturevalue("memorised_shapes") if dataset == "shapes" else memorise(tmp_path, dataset)
    if dataset != "shapes":
        assert run["captions"] == sorted(USER_CAPTIONS)
    first, compiled = run["compiled"]
    assert first == ["jit(train_step)"] * len(SHAPES)  # one program per shape
    assert compiled == ["jit(train_step)"] * len(SHAPES)  # and nothing was compiled again
    losses = run["losses"]
    # (a) The v-loss starts near 1.4-1.9 (measured); memorising four images takes it to about 0.05 (measured,
    # last 50 steps, see STEPS). 0.2 still means |x0_hat - x| under 0.45 (1 - t) per pixel: the images are learnt.
    assert losses[-50:].mean() < 0.2 and losses[:10].mean() > 0.8, losses[::50]

    state, context, mask = run["state"], run["context"], run["mask"]
    perm = np.array([1, 2, 3, 0])
    for shape, want in zip(SHAPES, run["images"]):
        noise = sample.initial_noise(jax.random.split(jax.random.key(1), 4), shape, 2.0)
        out = np.asarray(sample.sample(state["ema"], CFG, context, mask, noise, steps=25, guidance=1.0))
        # (b) Each caption gives back its own image: >= 20 dB is an RMS error under 0.2 on the [-1, 1] scale.
        for i in range(4):
            assert psnr(out[i], want[i]) >= 20, (shape, [psnr(out[i], im) for im in want])
        if dataset == "shapes":  # "on the left" is on the left of this canvas: the blue square's pixels too
            blue = np.abs(out[1] - (np.array(data.COLOURS["blue"]) / 127.5 - 1)).max(-1) < 0.3  # [H, W]
            assert blue.sum() > 4 and np.nonzero(blue)[1].mean() < shape[1] / 2, shape
        # (c) The same noise under another image's caption gives that image, not the one of the noise's slot.
        swapped = np.asarray(sample.sample(state["ema"], CFG, context[perm], mask[perm], noise, steps=25,
                                           guidance=1.0))
        for i, j in enumerate(perm):
            assert psnr(swapped[i], want[j]) >= 20 and psnr(swapped[i], want[i]) < 15, \
                (shape, [psnr(swapped[i], im) for im in want])

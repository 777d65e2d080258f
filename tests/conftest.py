import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")  # an unchanged copy of ../shared/fixtures: a clone needs nothing beside it


# Tests compile the same small programs many times over (each run of train.main, each subprocess): JAX's
# persistent compilation cache, shared through the environment with the subprocesses, compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "minit2i-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402  (after the environment it reads at import)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import model  # noqa: E402

# A small train.py run (16 px images, 12 text tokens, batch 4) that the tests of train.py and sample.py
# share: square only (one compiled step per run; the tests that are about buckets turn --multi-aspect back
# on), and a one-block MM-JiT. Their subject is the run (resume, signals, checkpoints, logs), not the model:
# the tiny preset costs 4x the CPU time a run. The overfit tests train a tiny-sized model.
model.PRESETS["test"] = model.MMJiTConfig(patch_size=4, hidden_size=64, depth=1, txt_preamble_depth=1, num_heads=2,
                                          head_dim=32, pca_channels=8)
SMALL_RUN = ["--model", "test", "--image-size", "16", "--batch-size", "4", "--text-length", "12",
             "--log-every", "1", "--sample-every", "0", "--no-multi-aspect"]
# train.py in a process of its own, with the test preset known
TRAIN = [sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
         "import conftest, train; train.main()"]


@contextlib.contextmanager
def compiles():
    """The names of the functions XLA compiles inside the block, from the events behind jax's compile log."""
    names = []

    def listener(event, seconds, fun_name="?", **_):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# A user's own folder, as they arrive with it: no shapes, words the synthetic captions never use, mixed sizes,
# aspect ratios and formats, captions as .txt, .caption and .json beside the images.
USER_CAPTIONS = ["a sunset sky fading from tangerine into violet", "zebra stripes standing upright, ink on paper",
                 "a chessboard of moss and bark squares", "moonlight spilling over a midnight ocean"]


def user_image(i, width, height):
    """uint8 [height, width, 3] picture number i of USER_CAPTIONS, drawn at any size."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    if i == 0:  # horizontal gradient, orange to violet
        rgb = np.stack([250 - 110 * x, 150 - 110 * x, 40 + 180 * x], -1)
    elif i == 1:  # vertical stripes
        rgb = np.repeat(((x * 8).astype(int) % 2 * 230 + 15)[..., None], 3, -1)
    elif i == 2:  # checkerboard, green and brown
        cell = ((x * 4).astype(int) + (y * 4).astype(int)) % 2
        rgb = np.where(cell[..., None], [60, 140, 50], [120, 80, 40])
    else:  # dark blue, a bright band of light across the middle
        glow = np.exp(-((y - 0.5 * height / max(width, height)) * 8) ** 2)
        rgb = np.stack([20 + 200 * glow, 30 + 200 * glow, 90 + 150 * glow], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_user_folder(folder, sizes=((48, 30), (22, 40), (14, 14), (64, 28))):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, ((w, h), caption) in enumerate(zip(sizes, USER_CAPTIONS)):
        Image.fromarray(user_image(i, w, h)).save(os.path.join(folder, f"img{i}.{'jpg' if i % 2 else 'png'}"), quality=95)
        ext = ("txt", "caption", "json", "txt")[i]
        with open(os.path.join(folder, f"img{i}.{ext}"), "w") as f:
            f.write(json.dumps({"caption": caption}) if ext == "json" else caption + "\n")
    return str(folder)


@pytest.fixture(scope="session")
def memorised_shapes(tmp_path_factory):
    """test_overfit's small MM-JiT after learning the four built-in scenes: that test's subject, and the
    teacher test_distill's student starts from (trained once for both)."""
    from test_overfit import memorise

    return memorise(tmp_path_factory.mktemp("memorised"), "shapes")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A finished SMALL_RUN of 2 steps, its checkpoint at step 2: test_sample's run to sample from; copied by
    test_distill as its teacher and by the tests that resume, tear or reconfigure a run. Read it; change only a copy."""
    import train

    run = str(tmp_path_factory.mktemp("small") / "run")
    train.main(SMALL_RUN + ["--out", run, "--steps", "2", "--ckpt-every", "2"])
    return run


# ------------------------------------------------------------------------------------ background checks
# The suite's tests run on one core (its CPU time is its wall time). Those that spend it in processes of their
# own (simulated devices, two hosts, signals) and need nothing from the others are marked
# background.with_args(fn, *args, **kwargs): fn(folder, *args, **kwargs) runs in a thread from the end of
# collection, one such fn at a time, so that their processes use the core the rest leave idle; the test's
# `background` fixture waits for fn's result. folder: a new directory, removed after the test.
BACKGROUND = pytest.StashKey()
POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1)


def pytest_configure(config):
    config.addinivalue_line("markers", "background(fn, *args, **kwargs): fn(folder, ...) run in a thread from "
                                       "the end of collection; the `background` fixture is its result")


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        for item in session.items:
            mark = item.get_closest_marker("background")
            if mark:
                folder = tempfile.mkdtemp(prefix="minit2i-test-")
                item.stash[BACKGROUND] = folder, POOL.submit(mark.args[0], folder, *mark.args[1:], **mark.kwargs)


def pytest_sessionfinish(session):
    POOL.shutdown(cancel_futures=True)  # an interrupted session: no check starts after it


@pytest.fixture
def background(request):
    folder, future = request.node.stash[BACKGROUND]
    yield future.result()
    shutil.rmtree(folder, ignore_errors=True)


def script(folder, source, *args, timeout=240):
    """Python source run in a new process in folder, its sys.argv[1:] ROOT and args: the CompletedProcess."""
    return subprocess.run([sys.executable, "-c", source, ROOT, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=folder)

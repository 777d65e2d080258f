import contextlib
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")  # an unchanged copy of ../shared/fixtures: a clone needs nothing beside it

# A small train.py run (16 px images, 12 text tokens, batch 4) that the tests of train.py and sample.py share.
SMALL_RUN = ["--image-size", "16", "--batch-size", "4", "--text-length", "12", "--log-every", "1", "--sample-every", "0"]

# Tests compile the same small programs many times over (each run of train.main, each subprocess): JAX's
# persistent compilation cache, shared through the environment with the subprocesses, compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "minit2i-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402  (after the environment it reads at import)


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

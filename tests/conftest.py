"""Shared test setup: keep JAX on the CPU and quiet, and make each test's randomness fixed."""

import atexit
import os
import shutil
import tempfile


def _session_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The embedded default corpus is prepared into a cache on first use
# (funnel_jax/training/pretrain_data.py): one per test session, not the user's ~/.cache.
if "FUNNEL_JAX_CACHE" not in os.environ:
    os.environ["FUNNEL_JAX_CACHE"] = _session_dir("funnel_jax_test_cache_")
# The XLA compilation cache the commands' tests share (--compile-cache COMPILE_CACHE): a test
# that runs the same command several times (a reference, a killed run, its restart) compiles
# its programs once per session, not in each process; never the user's ~/.cache.
if "FUNNEL_JAX_COMPILE_CACHE" not in os.environ:
    os.environ["FUNNEL_JAX_COMPILE_CACHE"] = _session_dir("funnel_jax_test_xla_")


# The longest modules first (measured: `--durations` of a full run), so that with pytest-xdist's
# `--dist loadfile` (pyproject addopts) the two workers end together instead of one of them
# starting a several-minute module last.
SLOWEST_FIRST = (
    "test_mesh.py",
    "test_multihost.py",
    "test_training.py",
    "test_reliability.py",
    "test_benchmark.py",
    "test_pretrain_prepared.py",
    "test_notebook.py",
    "test_parity.py",
    "test_finetune_reliability.py",
    "test_aot.py",
    "test_finetune_multiprocess.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within

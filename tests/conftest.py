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

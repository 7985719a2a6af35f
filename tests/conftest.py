"""Shared test setup: keep JAX on the CPU and quiet, and make each test's randomness fixed."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The embedded default corpus is prepared into a cache on first use
# (funnel_jax/training/pretrain_data.py): one per test session, not the user's ~/.cache.
if "FUNNEL_JAX_CACHE" not in os.environ:
    import tempfile

    os.environ["FUNNEL_JAX_CACHE"] = tempfile.mkdtemp(prefix="funnel_jax_test_cache_")

"""Shared test setup: keep JAX on the CPU and quiet, and make each test's randomness fixed."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

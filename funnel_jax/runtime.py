"""Process-level settings applied by the entry points before JAX starts.

On CPU hosts XLA allocates large temporary buffers every training step; with glibc's malloc
they are unmapped and mapped again each time and the page faults cost a measurable share of
the step. jemalloc with its decay disabled keeps them mapped. As is common for JAX on TPU VMs,
the entry points re-execute themselves with jemalloc preloaded when the library is installed
(Debian/Ubuntu: `apt-get install libjemalloc2`). Opt out with FUNNEL_JAX_NO_JEMALLOC=1.
"""

from __future__ import annotations

import glob
import os
import sys

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,background_thread:false"
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def find_jemalloc() -> str | None:
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    hits = glob.glob("/usr/lib/*/libjemalloc.so*")
    return hits[0] if hits else None


def jemalloc_active() -> bool:
    return "jemalloc" in os.environ.get("LD_PRELOAD", "")


def use_jemalloc() -> None:
    """Re-exec the current command with jemalloc preloaded, if installed and not yet active.

    Call it first thing in `main`, before importing jax. A no-op when jemalloc is missing,
    already loaded, disabled by FUNNEL_JAX_NO_JEMALLOC=1, or when not run as a command.
    """
    if os.environ.get("FUNNEL_JAX_NO_JEMALLOC") or jemalloc_active():
        return
    lib = find_jemalloc()
    if lib is None or not sys.argv or not sys.argv[0]:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    argv = [sys.executable, *sys.orig_argv[1:]] if hasattr(sys, "orig_argv") else None
    if not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def enable_compile_cache(directory: str) -> None:
    """Persist XLA compilations under `directory` ('' = off): a restarted job skips recompiling."""
    if not directory:
        return
    import jax

    path = os.path.expanduser(directory)
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as e:  # noqa: BLE001 (a cache is an optimisation only)
        print(f"warning: no compilation cache ({e})", file=sys.stderr)


# --- accelerator compile settings ----------------------------------------------------------

# Chosen from deviceless compiles of the `large` train step (experiments/aot_compile.py,
# BENCHMARKS.md "Compiling for GPU and TPU"). Each is a compile-time choice that keeps the
# model's maths; the run-time cost of each is stated in BENCHMARKS.md.
GPU_COMPILER_OPTIONS: dict[str, object] = {
    # cuBLAS / cuBLASLt for every GEMM instead of emitting (and, on a real GPU, autotuning) a
    # Triton kernel per GEMM shape.
    "xla_gpu_enable_triton_gemm": False,
    # Layer norms and softmaxes as XLA's own reduction fusions instead of Triton "softmax"
    # fusions: with those, priority fusion took 58 of the 67 s of HLO passes of the `large`
    # train step; without, the HLO passes take 13 s (BENCHMARKS.md). Same maths; 25 more
    # kernels.
    "xla_disable_hlo_passes": "triton-softmax-rewriter",
}
GPU_JAX_SETTINGS: dict[str, object] = {
    # Threefry (the same random bits as on CPU/TPU, so dropout and checkpoints' RNG streams
    # stay identical) emitted as one CUDA kernel instead of an unrolled chain of integer ops.
    "jax_threefry_gpu_kernel_lowering": True,
}
TPU_COMPILER_OPTIONS: dict[str, object] = {}
TPU_JAX_SETTINGS: dict[str, object] = {}


# For checking a configuration, not for training: XLA's lowest optimization level
# (`experiments.aot_compile --settings compile-check`). The TPU `large` step then compiles in
# about a third of the time with the same collectives and about 2% more memory, but the program
# is less optimised: the TPU compiler's cost model puts its compute at 3.3 times the default
# program's (an estimate; BENCHMARKS.md, session 10). No entry point applies it.
COMPILE_CHECK_JAX_SETTINGS: dict[str, object] = {"jax_optimization_level": "O0"}


def accelerator_settings(platform: str) -> dict[str, dict[str, object]]:
    """{'jax': jax.config settings, 'compiler_options': XLA options} for 'cuda'/'gpu', 'tpu'
    or 'cpu' (nothing for cpu)."""
    platform = {"gpu": "cuda", "rocm": "cuda"}.get(platform, platform)
    if platform == "cuda":
        return {"jax": dict(GPU_JAX_SETTINGS), "compiler_options": dict(GPU_COMPILER_OPTIONS)}
    if platform == "tpu":
        return {"jax": dict(TPU_JAX_SETTINGS), "compiler_options": dict(TPU_COMPILER_OPTIONS)}
    return {"jax": {}, "compiler_options": {}}


def platform_before_start() -> str:
    """The platform jax will start on, found without starting a backend (which would read
    XLA_FLAGS too early): the first of JAX_PLATFORMS / jax_platforms if set, else 'cuda' or
    'tpu' when their jax plugin is installed, else 'cpu'."""
    import importlib.util

    import jax

    named = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if named.strip():
        return named.split(",")[0].strip()
    for module, platform in (
        ("jax_cuda13_plugin", "cuda"),
        ("jax_cuda12_plugin", "cuda"),
        ("libtpu", "tpu"),
    ):
        if importlib.util.find_spec(module) is not None:
            return platform
    return "cpu"


def apply_accelerator_settings(platform: str | None = None) -> dict[str, dict[str, object]]:
    """Apply `accelerator_settings` for `platform` (default: `platform_before_start()`) to this
    process: the jax.config settings directly, the XLA options appended to XLA_FLAGS (read when
    the backend starts: call this before the first computation). Returns what was applied.

    The entry points call it after parsing flags; FUNNEL_JAX_NO_ACCEL_SETTINGS=1 opts out.
    """
    if os.environ.get("FUNNEL_JAX_NO_ACCEL_SETTINGS"):
        return {"jax": {}, "compiler_options": {}}
    import jax

    if platform is None:
        platform = platform_before_start()
    settings = accelerator_settings(platform)
    for name, value in settings["jax"].items():
        jax.config.update(name, value)
    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    for name, value in settings["compiler_options"].items():
        if f"--{name}=" not in flags:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            extra.append(f"--{name}={text}")
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return settings

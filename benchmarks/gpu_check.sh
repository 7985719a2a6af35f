#!/usr/bin/env bash
# The GPU check for a short device lease (about 10 minutes on an H200), one command:
#
#   bash benchmarks/gpu_check.sh LOGDIR [STAGE ...]   # default stages: env train parity memory
#
# Every stage has its own time limit and writes its log into LOGDIR. The compile settings are
# the ones the entry points apply on GPU (funnel_jax/runtime.py accelerator_settings, measured
# in BENCHMARKS.md "Compiling for GPU and TPU"): cuBLAS instead of Triton GEMMs and the threefry
# dropout bits as one kernel; both are passed here through the environment so that every
# program (benchmark, tests) compiles the same way, and one persistent compilation cache is
# shared by all stages (a rerun in the same lease skips the compiles).
#
# Stages:
#   env     GPU, driver and package versions
#   aot     deviceless compile of the large train step with the repository's tool (the numbers
#           BENCHMARKS.md compares against: kernels, temporaries, compile seconds on this host)
#   train   large, bf16, length 512, batch 16, dropout on: compile (timed, cache on), step time,
#           MFU, and the ratio to PyTorch eager with autocast, alternating rounds
#   parity  the float32 parity subset vs transformers (JAX on the GPU, matmuls at 'highest')
#   memory  large, bf16, length 512, batch 32: train-step memory per remat policy (full, dots,
#           none) and the PyTorch reference's
set -u
LOGDIR=${1:?usage: bash benchmarks/gpu_check.sh LOGDIR [STAGE ...]}
shift
mkdir -p "$LOGDIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
export TF_CPP_MIN_LOG_LEVEL=3
# funnel_jax.runtime.GPU_COMPILER_OPTIONS / GPU_JAX_SETTINGS (keep in step with them)
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false \
  --xla_disable_hlo_passes=triton-softmax-rewriter"
export JAX_THREEFRY_GPU_KERNEL_LOWERING=1
CACHE_DIR=${CACHE_DIR:-/tmp/funnel_jax_compile_cache}
PY=${PY:-python3}
BENCH="$PY -m experiments.benchmark --config large --dtype bfloat16 --seq-len 512 \
  --compile-cache $CACHE_DIR"
stages=${*:-env train parity memory}
echo "gpu_check $(date +%T) stages: $stages; XLA_FLAGS=$XLA_FLAGS" | tee "$LOGDIR/summary.log"
for stage in $stages; do
  echo "=== $stage $(date +%T)" | tee -a "$LOGDIR/summary.log"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
        2>&1 | tee "$LOGDIR/env.log"
      timeout 60 $PY -c "import jax, flax, optax, torch, transformers
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 \
        | tee -a "$LOGDIR/env.log" ;;
    aot)
      JAX_PLATFORMS=cpu timeout 300 $PY -m experiments.aot_compile --target h200 --config large \
        --seq-len 512 --batch-size 16 --settings fast-compile --json "$LOGDIR/aot.json" \
        2>&1 | tee "$LOGDIR/aot.log" ;;
    train)
      # Prints each compile time as it happens, the step times, MFU and the ratio to torch.
      timeout 300 $BENCH --batch-size 16 --only train --repeats 5 --iters 5 \
        --output "$LOGDIR/BENCH_train.md" 2>&1 | tee "$LOGDIR/train.log" \
        | grep -E "compil|train|MFU|ratio|x torch" ;;
    parity)
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 $PY -m pytest -q -s -p no:cacheprovider \
        tests/test_parity.py -k "base_model or head_outputs or bfloat16 or (funnel_model and 16)" \
        2>&1 | tee "$LOGDIR/parity.log" | grep -E "passed|failed|error|worst" ;;
    memory)
      timeout 180 $BENCH --batch-size 32 --only memory --memory-policies full,dots,none \
        --output "$LOGDIR/BENCH_memory.md" 2>&1 | tee "$LOGDIR/memory.log" ;;
    *) echo "unknown stage $stage" | tee -a "$LOGDIR/summary.log" ;;
  esac
  echo "    exit ${PIPESTATUS[0]} $(date +%T)" | tee -a "$LOGDIR/summary.log"
done
echo "=== done $(date +%T)" | tee -a "$LOGDIR/summary.log"

#!/usr/bin/env bash
# The GPU checks, as one script for a short device lease (see DEVELOPERS.md).
#
#   bash benchmarks/gpu_check.sh [STAGE ...]     # default: env probe train memory parity
#
# Stages (each has its own time limit, and writes its log and table under $OUT):
#   env      GPU, driver and package versions
#   probe    compile time of the train step: small and large, unrolled and --scan-layers,
#            threefry and rbg dropout keys
#   parity   float32 parity subset vs transformers (JAX on the GPU, matmuls at 'highest')
#   train    large, bf16, length 512, batch 16: JAX (einsum and fused_bias attention) vs PyTorch
#            eager with autocast and fused AdamW, alternating; MFU; per-op profile
#   memory   large, bf16, length 512, batch 32: train-step memory for remat full / none, and
#            the PyTorch reference's
#   forward  forward rows incl. torch.compile;  compile  train step vs torch.compile
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
export TF_CPP_MIN_LOG_LEVEL=3
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
CACHE="--compile-cache /tmp/jax_cache"  # later stages reuse the probe's compilations
BENCH="$PY -m experiments.benchmark --config large --dtype bfloat16 --seq-len 512 $CACHE"
stages=${*:-env probe train memory parity}
for stage in $stages; do
  echo "=== $stage $(date +%T)"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      $PY -c "import jax, flax, optax, orbax.checkpoint, torch, transformers, tokenizers as t
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', t.__version__)"
      ;;
    probe)
      # threefry dropout bits are hashed in XLA ops (on CPU they double the compile time);
      # rbg keys draw them with one RngBitGenerator op each. Session 2: `large` with threefry
      # did not compile in 240 s, so it is tried last.
      for run in "small:threefry2x32" "large:rbg" "large --scan-layers:rbg" "large:threefry2x32"; do
        cfg=${run%%:*}; prng=${run##*:}
        echo "probe: $cfg, dropout keys $prng" | tee -a "$OUT/probe.log"
        JAX_DEFAULT_PRNG_IMPL=$prng timeout 120 $PY -m experiments.benchmark --dtype bfloat16 \
          --seq-len 512 $CACHE --batch-size 16 --only train --no-torch --repeats 1 --iters 2 \
          --output "" --config $cfg 2>&1 | grep -E "^config|compiled|train step:" \
          | tee -a "$OUT/probe.log"
      done ;;
    parity)
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout 120 $PY -m pytest -q -s -p no:cacheprovider \
        tests/test_parity.py -k "base_model or head_outputs or bfloat16 or (funnel_model and 16)" \
        2>&1 | tee "$OUT/parity.log" | grep -E "passed|failed|error|worst" ;;
    train)
      timeout 240 $BENCH --batch-size 16 --only train --attention-impl einsum,fused_bias \
        --repeats 5 --iters 5 --profile /tmp/prof --output "$OUT/BENCH_train.md" \
        2>&1 | tee "$OUT/train.log"
      tar czf "$OUT/profile_train.tgz" -C /tmp prof 2>/dev/null ;;
    memory)
      timeout 180 $BENCH --batch-size 32 --only memory --memory-policies full,none \
        --output "$OUT/BENCH_memory.md" 2>&1 | tee "$OUT/memory.log" ;;
    forward)
      timeout 300 $BENCH --batch-size 16 --only forward --attention-impl einsum,fused_bias \
        --torch-compile --repeats 5 --iters 10 --output "$OUT/BENCH_forward.md" \
        2>&1 | tee "$OUT/forward.log" ;;
    compile)
      timeout 300 $BENCH --batch-size 16 --only train --torch-compile --repeats 5 --iters 5 \
        --output "$OUT/BENCH_compile.md" 2>&1 | tee "$OUT/compile.log" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)"

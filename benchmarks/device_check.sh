#!/usr/bin/env bash
# Issue 18's one prepared GPU check: JAX vs the PyTorch reference, side by side, in one device call.
#
#   benchmarks/device_check.sh              # on the GPU machine (one `run` call, <= 9 minutes)
#   benchmarks/device_check.sh --dry-run    # anywhere: the same path with tiny shapes on a CPU
#
# Writes into $OUT (default ./device_check_out): side_by_side.json (the one JSON: images/s, ms/step,
# peak memory, versions, ratios to the best PyTorch configuration), side_by_side.log, nvidia_smi.txt.
# The GPU image has jax, flax, optax and torch but not ml-collections (configs/common.py imports it):
# its wheel (76 KB, pure Python; absl-py and PyYAML are in the image) travels in .whl/, made here by
# `benchmarks/fetch_wheels.sh`. Nothing else is installed; no TensorFlow is imported on this path.
#
# Environment: PYTHON (default python3), RUNS (task:batch list), TORCH_CONFIGS, DEADLINE_S (default
# 500: runs that would start later are recorded as skipped; the JSON is rewritten after each child),
# SIDE_BY_SIDE_ARGS (more flags for benchmarks/side_by_side.py, e.g. "--xla_flags=...").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_check_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1

if ! "$PYTHON" -c "import ml_collections" 2>/dev/null; then
  if ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/ml_collections-*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "ml_collections is missing and .whl/ has no wheel: run benchmarks/fetch_wheels.sh here" \
      "and name .whl in carry" >&2
    exit 2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

if [ $dry = 1 ]; then
  exec "$PYTHON" benchmarks/side_by_side.py --tiny --runs "${RUNS:-aifr:2,fas:2,infer:2}" \
    --torch_configs "${TORCH_CONFIGS:-amp_eager,channels_last}" --output "$OUT/side_by_side.json" \
    ${SIDE_BY_SIDE_ARGS:-}
fi

{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv; } >"$OUT/nvidia_smi.txt" 2>&1
# Most important first, so that a deadline cuts the least needed: AIFR 256 (the 10,000 images/s
# target), FAS 128, inference 256, AIFR 128.
"$PYTHON" benchmarks/side_by_side.py --runs "${RUNS:-aifr:256,fas:128,infer:256,aifr:128}" \
  --torch_configs "${TORCH_CONFIGS:-amp_eager,channels_last,channels_last_compile}" \
  --deadline_s "${DEADLINE_S:-500}" --output "$OUT/side_by_side.json" ${SIDE_BY_SIDE_ARGS:-} \
  2>&1 | tee "$OUT/side_by_side.log"

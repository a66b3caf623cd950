#!/usr/bin/env bash
# The GPU benchmark of issue 6 and the worker's CUDA test, in one call on the device machine.
# DIR holds what the call carries: gpu_moe_bench and the worker's `training` and `fused` test
# binaries (built with the `cuda` feature, see docs/GPU.md), torch_moe.py and table.py.
# Results go to $OUT: results.jsonl (one JSON line per run), table.txt, logs.
#   benches/gpu/run.sh DIR [configs] [dtypes]     e.g. run.sh .gpu "small base" "bf16 f32"
set -u
DIR=${1:-.gpu}
CONFIGS=${2:-small base}
DTYPES=${3:-bf16 f32}
STEPS=${STEPS:-25}
WARMUP=${WARMUP:-5}
OUT=${OUT:-/tmp/potluck-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' | tee -a "$OUT/gpu.txt"
# The worker's ignored CUDA tests: `training` (the model trains like the CPU) and `fused`
# (each fused kernel against the plain ops), whichever binaries DIR holds.
for t in fused training; do
  if [ -x "$DIR/$t" ] && [ -z "${SKIP_TEST:-}" ]; then
    echo "== worker CUDA test: $t"
    timeout 300 "$DIR/$t" --ignored --nocapture --test-threads 1 cuda_ >"$OUT/cuda_test_$t.log" 2>&1
    echo "exit $?" >>"$OUT/cuda_test_$t.log"
    grep -E "eval loss|match|test result|panicked|exit|Error|error" "$OUT/cuda_test_$t.log"
  fi
done
for cfg in $CONFIGS; do
  for dt in $DTYPES; do
    echo "== $cfg $dt"
    timeout 240 "$DIR/gpu_moe_bench" --config "$cfg" --dtype "$dt" --device cuda \
      --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/results.jsonl" ${BENCH_ARGS:-} \
      >"/tmp/candle-$cfg-$dt.log" 2>&1 \
      || { echo "candle $cfg $dt failed: exit $?"; tail -5 "/tmp/candle-$cfg-$dt.log"; }
    timeout 240 python3 "$DIR/torch_moe.py" --config "$cfg" --dtype "$dt" \
      --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/results.jsonl" \
      >"/tmp/torch-$cfg-$dt.log" 2>&1 \
      || { echo "pytorch $cfg $dt failed: exit $?"; tail -5 "/tmp/torch-$cfg-$dt.log"; }
    cat "/tmp/candle-$cfg-$dt.log" "/tmp/torch-$cfg-$dt.log" >>"$OUT/bench.log"
  done
done
python3 "$DIR/table.py" "$OUT/results.jsonl" | tee "$OUT/table.txt"

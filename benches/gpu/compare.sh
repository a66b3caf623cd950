#!/usr/bin/env bash
# One device call of issue 6: the worker's CUDA tests, then for each config and dtype the
# new candle build (with --breakdown), the baseline build (gpu_moe_bench_base, if present)
# and PyTorch, interleaved so that all three come from the same minute. DIR holds the
# binaries (xz-compressed or not), torch_moe.py and table.py. Tables go to stdout, JSON
# lines to $OUT/{new,base,torch}.jsonl.
#   benches/gpu/compare.sh DIR [configs] [dtypes]
# dtypes may include tf32 (f32 with TF32 matrix products on both sides, an opt-in row; the
# baseline binary is not run for it). VARIANTS="label:--flag value;label2@f32:..." also runs
# the new build with those extra arguments (for every dtype, or the one after @; JSON to
# $OUT/new-LABEL.jsonl, tables below), and
# MICRO="small:f32 base:bf16" runs `gpu_moe_bench --micro` for those at the end.
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
BIN=/tmp/potluck-bin
mkdir -p "$BIN"
for f in "$DIR"/*; do
  case "$f" in
    *.xz) xz -dc "$f" >"$BIN/$(basename "$f" .xz)"; chmod +x "$BIN/$(basename "$f" .xz)" ;;
    *) cp "$f" "$BIN/" ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' | tee -a "$OUT/gpu.txt"
for t in fused training; do
  if [ -x "$BIN/$t" ] && [ -z "${SKIP_TEST:-}" ]; then
    echo "== worker CUDA test: $t"
    timeout 300 "$BIN/$t" --ignored --nocapture --test-threads 1 cuda_ >"$OUT/cuda_test_$t.log" 2>&1
    echo "exit $?" >>"$OUT/cuda_test_$t.log"
    grep -E "eval loss|match|test result|panicked|exit|Error|error" "$OUT/cuda_test_$t.log"
  fi
done
bench() { # name binary jsonl extra-args config dtype
  timeout 240 "$BIN/$2" --config "$5" --dtype "$6" --device cuda --warmup "$WARMUP" \
    --steps "$STEPS" --json "$OUT/$3" $4 >>"$OUT/bench-$1.log" 2>&1 \
    || { echo "$1 $5 $6 failed: exit $?"; tail -5 "$OUT/bench-$1.log"; }
}
for cfg in $CONFIGS; do
  for dt in $DTYPES; do
    echo "== $cfg $dt $(date +%T)"
    bench new gpu_moe_bench new.jsonl --breakdown "$cfg" "$dt"
    IFS=';' read -ra vs <<<"${VARIANTS:-}"
    for v in "${vs[@]}"; do # label[@dtype]:args (with @dtype, for that dtype only)
      [ -n "$v" ] || continue
      name=${v%%:*}
      if [[ $name == *@* ]]; then [ "${name#*@}" = "$dt" ] || continue; name=${name%@*}; fi
      bench "new-$name" gpu_moe_bench "new-$name.jsonl" "${v#*:}" "$cfg" "$dt"
    done
    [ -x "$BIN/gpu_moe_bench_base" ] && [ "$dt" != tf32 ] \
      && bench base gpu_moe_bench_base base.jsonl "" "$cfg" "$dt"
    timeout 240 python3 "$BIN/torch_moe.py" --config "$cfg" --dtype "$dt" \
      --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/torch.jsonl" >>"$OUT/bench-torch.log" 2>&1 \
      || { echo "pytorch $cfg $dt failed: exit $?"; tail -5 "$OUT/bench-torch.log"; }
  done
done
echo "== new build against PyTorch"
python3 "$BIN/table.py" "$OUT/new.jsonl" "$OUT/torch.jsonl" | tee "$OUT/table-new.txt"
if [ -f "$OUT/base.jsonl" ]; then
  echo "== baseline build against PyTorch"
  python3 "$BIN/table.py" "$OUT/base.jsonl" "$OUT/torch.jsonl" | tee "$OUT/table-base.txt"
fi
for f in "$OUT"/new-*.jsonl; do
  [ -f "$f" ] || continue
  echo "== variant $(basename "$f" .jsonl) against PyTorch"
  python3 "$BIN/table.py" "$f" "$OUT/torch.jsonl" | tee "$OUT/table-$(basename "$f" .jsonl).txt"
done
for m in ${MICRO:-}; do
  echo "== micro ${m%%:*} ${m#*:}"
  timeout 120 "$BIN/gpu_moe_bench" --micro --config "${m%%:*}" --dtype "${m#*:}" --device cuda \
    --warmup 3 --steps 15 2>&1 | tee -a "$OUT/micro.jsonl" | python3 -c '
import json, sys
for l in sys.stdin:
    if l.startswith("{"):
        r = json.loads(l); print("%9.3f ms  %s" % (r["median_ms"], r["micro"]))
    else:
        print(l, end="")'
done
echo "== breakdown of the new build (forward / backward / optimizer ms, host ms)"
python3 - "$OUT/new.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    b = r.get("breakdown_ms")
    if b:
        print(r["config"], r["dtype"], json.dumps(b), "pad ratio mean/max",
              r.get("pad_ratio_mean"), r.get("pad_ratio_max"))
PY

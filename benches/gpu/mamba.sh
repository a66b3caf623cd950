#!/usr/bin/env bash
# One device call of issue 24: the worker's CUDA Mamba tests, then, for each context, the
# worker's Mamba and attention models (gpu_mamba_bench) and transformers' Mamba
# (torch_mamba.py) in each mode, one after another so all come from the same minutes. A run
# past TIMEOUT seconds keeps the last JSON line it printed, with "timeout_s" added, or gets
# one with "error": "timeout" if it printed none. DIR holds the binaries
# (xz-compressed or not). JSON lines go to $OUT/mamba.jsonl, a table to stdout. SKIP_TEST
# skips the tests, SKIP_OURS the worker's runs, TORCH_STEPS sets the timed steps of torch runs
# (default 3, 1 from 32K on). CHECKPOINT=1 runs the worker's models with gradient
# checkpointing per block (gpu_mamba_bench --checkpoint).
#   benches/gpu/mamba.sh DIR [contexts] [torch modes]
set -u
DIR=${1:-.gpu}
CONTEXTS=${2:-2048 8192 32768}
MODES=${3-eager mambapy compiled compiled-mambapy}
TIMEOUT=${TIMEOUT:-120}
OUT=${OUT:-/tmp/potluck-gpu-out}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CKPT_FLAG=""
[ "${CHECKPOINT:-}" = 1 ] && CKPT_FLAG=--checkpoint
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -x "$BIN/mamba" ] && [ -z "${SKIP_TEST:-}" ]; then
  echo "== worker CUDA tests: mamba"
  timeout 300 "$BIN/mamba" --ignored --nocapture --test-threads 1 cuda_ >"$OUT/cuda_test_mamba.log" 2>&1
  echo "exit $?" >>"$OUT/cuda_test_mamba.log"
  grep -E "scan |grad |hybrid|test result|panicked|exit" "$OUT/cuda_test_mamba.log" | head -80
fi
# measure LABEL COMMAND...: one JSON line, or a timeout/crash line naming LABEL.
measure() {
  local label=$1; shift
  local line
  local rc=0
  line=$(timeout "$TIMEOUT" "$@" 2>>"$OUT/stderr.log" >"$OUT/run.out"; echo $? >"$OUT/run.rc"; tail -1 "$OUT/run.out")
  rc=$(cat "$OUT/run.rc")
  # A run cut off after printing a partial result keeps it, marked as timed out.
  if [ "$rc" = 124 ] && [ "${line:0:1}" = "{" ]; then
    line="${line%\}},\"timeout_s\":$TIMEOUT}"
  fi
  if [ -z "$line" ] || [ "${line:0:1}" != "{" ]; then
    if [ "$rc" = 124 ]; then line="{\"label\":\"$label\",\"error\":\"timeout ${TIMEOUT}s\"}"
    else line="{\"label\":\"$label\",\"error\":\"exit $rc\"}"; fi
  fi
  echo "$line" | tee -a "$OUT/mamba.jsonl"
}
[ -x "$BIN/gpu_mamba_bench" ] || [ -n "${SKIP_OURS:-}" ] || { echo "no gpu_mamba_bench in $DIR"; exit 1; }
for ctx in $CONTEXTS; do
  for m in mamba attention; do
    [ -n "${SKIP_OURS:-}" ] && continue
    measure "potluck-$m-$ctx${CKPT_FLAG:+-checkpoint}" "$BIN/gpu_mamba_bench" --model $m --context $ctx --dtype bf16 \
      --device cuda --warmup 2 --steps 5 ${CKPT_FLAG}
  done
  for mode in $MODES; do
    steps=${TORCH_STEPS:-3}; [ "$ctx" -ge 32768 ] && steps=1
    measure "transformers-$mode-$ctx" python3 "$HERE/torch_mamba.py" --mode $mode --context $ctx \
      --dtype bf16 --warmup 1 --steps $steps
  done
done
python3 - "$OUT/mamba.jsonl" <<'PY'
import json, sys
print(f"{'impl':28} {'model':10} {'context':>7} {'tokens/s':>10} {'step ms':>9} {'GiB':>6}")
for l in open(sys.argv[1]):
    r = json.loads(l)
    if "error" in r:
        print(f"{r.get('label', r.get('impl')):28} {r['error']}")
        continue
    if "tokens_per_s" not in r:
        print(f"{r['impl']:28} {r['model']:10} {r['context']:>7} warm-up {r['warmup_s']:.1f} s, cut off")
        continue
    note = f" ({r['partial']}, cut off)" if "partial" in r else ""
    print(f"{r['impl']:28} {r['model']:10} {r['context']:>7} {r['tokens_per_s']:>10.0f} "
          f"{r['median_step_ms']:>9.1f} {r['memory_gib'] or 0:>6.1f}{note}")
PY

#!/usr/bin/env bash
# One device call of issue 20's benchmark: LoRA and QLoRA fine-tuning of a random
# TinyLlama-shaped base (1.1B), the worker's (gpu_lora_bench) and PyTorch + PEFT's
# (torch_peft.py), for each base format and checkpointing mode, ours then PyTorch's, one after
# another so all come from the same minutes. PyTorch has no int8 run (only bf16 and bitsandbytes'
# NF4). A run past TIMEOUT seconds keeps the last JSON line it printed, with "timeout_s" added,
# or gets one with "error" if it printed none. DIR holds gpu_lora_bench (xz-compressed or not).
# JSON lines go to $OUT/lora.jsonl, a table to stdout. The random base is written once into
# BASE_DIR (default /tmp/potluck-lora-base, 4.4 GB of f32; the first run pays ~30 s for it).
# SEQ and BATCH set the shape of a step (default 2048 x 1), STEPS the timed steps (default 5),
# DROPOUT the adapters' dropout (default 0.05), SKIP_OURS / SKIP_TORCH skip one side.
#   benches/gpu/lora.sh DIR [bases] [checkpoint modes]
#   benches/gpu/lora.sh .gpu "bf16 nf4 int8" "off on"
set -u
DIR=${1:-.gpu}
BASES=${2:-bf16 nf4 int8}
CKPTS=${3:-off on}
TIMEOUT=${TIMEOUT:-120}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-1}
STEPS=${STEPS:-5}
DROPOUT=${DROPOUT:-0.05}
BASE_DIR=${BASE_DIR:-/tmp/potluck-lora-base}
OUT=${OUT:-/tmp/potluck-gpu-out}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
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
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
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
  echo "$line" | tee -a "$OUT/lora.jsonl"
}
[ -x "$BIN/gpu_lora_bench" ] || [ -n "${SKIP_OURS:-}" ] || { echo "no gpu_lora_bench in $DIR"; exit 1; }
# Write the random base once, untimed (a 2-token step on the CPU), so no measured run pays
# for it or is cut off by it.
if [ -z "${SKIP_OURS:-}" ]; then
  echo "== the random base in $BASE_DIR"
  timeout 300 "$BIN/gpu_lora_bench" --shape tinyllama --device cpu --seq 2 --warmup 0 --steps 1 \
    --base-dir "$BASE_DIR" >"$OUT/base.json" 2>>"$OUT/stderr.log"
  echo "exit $? $(cat "$OUT/base.json")"
fi
for base in $BASES; do
  for ck in $CKPTS; do
    flag=""; [ "$ck" = on ] && flag=--checkpoint
    [ -n "${SKIP_OURS:-}" ] || measure "potluck-$base-ckpt-$ck" "$BIN/gpu_lora_bench" --shape tinyllama \
      --base "$base" --device cuda --batch "$BATCH" --seq "$SEQ" --dropout "$DROPOUT" \
      --warmup 2 --steps "$STEPS" --base-dir "$BASE_DIR" $flag
    [ "$base" = int8 ] && continue
    [ -n "${SKIP_TORCH:-}" ] || measure "torch-peft-$base-ckpt-$ck" python3 "$HERE/torch_peft.py" --shape tinyllama \
      --base "$base" --batch "$BATCH" --seq "$SEQ" --dropout "$DROPOUT" --warmup 2 --steps "$STEPS" $flag
  done
done
python3 - "$OUT/lora.jsonl" <<'PY'
import json, sys
print(f"{'impl':12} {'base':5} {'ckpt':5} {'tokens/s':>9} {'step ms':>9} {'GiB':>6} {'loss first/last':>16}")
for l in open(sys.argv[1]):
    r = json.loads(l)
    if "error" in r:
        print(f"{r.get('label', r.get('impl', '?'))} {r.get('base', '')}: {r['error']}")
        continue
    if "tokens_per_s" not in r:
        print(f"{r['impl']:12} {r['base']:5} {str(r['checkpoint']):5} warm-up only, cut off")
        continue
    note = f" ({r['partial']}, cut off)" if "partial" in r else ""
    loss = f"{r.get('first_loss', float('nan')):.3f}/{r.get('last_loss', float('nan')):.3f}"
    print(f"{r['impl']:12} {r['base']:5} {str(r['checkpoint']):5} {r['tokens_per_s']:>9.0f} "
          f"{r['median_step_ms']:>9.1f} {r['memory_gib'] or 0:>6.2f} {loss:>16}{note}")
PY

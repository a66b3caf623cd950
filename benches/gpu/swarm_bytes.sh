#!/usr/bin/env bash
# One device call of issue 23: the swarm_bytes harness on the GPU with the saved corpus.
# DIR holds `swarm_bytes` (built with `../shared/gpu/build-cuda.sh -p potluck-benches
# --features cuda --bin swarm_bytes`), `train.bin`, `eval.bin` and `corpus.json` as
# `swarm_bytes --save-corpus` writes them (each file may be xz-compressed); the harness
# refuses a split whose blake3 differs from corpus.json. The other arguments go to
# swarm_bytes. JSON lines go to $OUT/swarm_bytes.jsonl (one per finished run, so a run cut
# off by the time limit keeps what finished), the table to stdout.
#   benches/gpu/swarm_bytes.sh DIR --model small --device cuda --modes a,b,sign ...
set -u
DIR=$1; shift
OUT=${OUT:-/tmp/potluck-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
W=/tmp/potluck-swarm-bytes
mkdir -p "$W/corpus"
for f in "$DIR"/*; do
  name=$(basename "$f" .xz)
  case "$f" in
    *.xz) xz -dc -T0 "$f" >"$W/$name" ;;
    *) cp "$f" "$W/$name" ;;
  esac
done
chmod +x "$W/swarm_bytes"
mv "$W"/train.bin "$W"/eval.bin "$W"/corpus.json "$W/corpus/"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$W/swarm_bytes" --load-corpus "$W/corpus" "$@" 2>"$OUT/stderr.log" | tee "$OUT/swarm_bytes.jsonl"
echo "exit ${PIPESTATUS[0]}"

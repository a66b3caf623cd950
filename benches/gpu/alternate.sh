#!/usr/bin/env bash
# Candle builds alternated in one call, ROUNDS times (default 3) for each CONFIG:DTYPE, so that
# builds whose step times differ by less than the spread between calls can be told apart;
# prints each run's median step (ms). After compare.sh has unpacked the binaries:
#   benches/gpu/alternate.sh "base:bf16 small:bf16" gpu_moe_bench gpu_moe_bench_base
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
BIN=/tmp/potluck-bin
cds=$1; shift
for cd in $cds; do
  for i in $(seq 1 ${ROUNDS:-3}); do
    for f in "$@"; do
      timeout 120 $BIN/$f --config ${cd%%:*} --dtype ${cd#*:} --device cuda --warmup 5 --steps 25 2>/dev/null \
        | python3 -c "import sys,json; j=json.loads(sys.stdin.read().strip().splitlines()[-1]); print('$cd $f', round(j['median_step_ms'],2))"
    done
  done
done

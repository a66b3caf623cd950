#!/usr/bin/env bash
# Kernel time by kernel name over a short run of the candle benchmark under Nsight Compute
# (one metric, gpu__time_duration; ncu serialises kernels, so only sums mean anything):
#   benches/gpu/profile.sh BIN_DIR CONFIG DTYPE   (after compare.sh unpacked the binaries)
# One warm-up step and one timed step run under the profiler; totals are per two steps.
set -u
BIN=${1:-/tmp/potluck-bin}; CFG=${2:-small}; DT=${3:-bf16}
OUT=${OUT:-/tmp/potluck-gpu-out}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout ${PROFILE_TIMEOUT:-240} "$NCU" --clock-control none --metrics gpu__time_duration.sum \
  --csv --page raw "$BIN/gpu_moe_bench" --config "$CFG" --dtype "$DT" --device cuda \
  --warmup 1 --steps 1 >"$OUT/ncu-$CFG-$DT.csv" 2>"$OUT/ncu-$CFG-$DT.err"
echo "ncu exit $?"
python3 - "$OUT/ncu-$CFG-$DT.csv" <<'PY'
import csv, sys, collections
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
r = list(csv.reader(rows))
if not r:
    sys.exit("no rows")
h = r[0]; ki = h.index("Kernel Name"); ti = h.index("gpu__time_duration.sum")
tot = collections.Counter(); cnt = collections.Counter(); unit = r[1][ti]
for x in r[2:]:
    try:
        v = float(x[ti].replace(",", ""))
    except ValueError:
        continue
    name = x[ki].split("(")[0].split("<")[0][:60]
    tot[name] += v; cnt[name] += 1
s = sum(tot.values())
print(f"kernels {sum(cnt.values())}, total {s:.0f} {unit} (two steps plus set-up)")
for k, v in tot.most_common(25):
    print(f"{v:12.0f} {100*v/s:5.1f}% {cnt[k]:6d}  {k}")
PY

#!/usr/bin/env bash
# Four real `potluck` daemons in their own network namespaces, on a bridge whose every link is
# shaped to RATE (default 100mbit) with tc tbf in both directions, each daemon pinned to a
# core and capped to a share of it. One run with overlap off, then one with overlap on (same
# manifest otherwise); each replica logs where each round's time went (`round timing`, see
# daemon/src/train/session.rs `RoundTiming`). Prints one JSON object per replica and round,
# then one summary object per mode, on stdout.
#
#   sudo benches/netns/run.sh [MANIFEST.toml]
#
# Environment: POTLUCK_BIN (default target/release/potluck), RATE (100mbit), QUOTA_PCT (45:
# the share of its core each peer may use), MODES ("off on"), KEEP (keep the work dir).
#
# CPU split on a 2-core machine: peers 1 and 2 on CPU 0, peers 3 and 4 on CPU 1 (taskset),
# each in its own cgroup capped at QUOTA_PCT% of one core (cfs quota), so no peer can take
# more than its share and the four train at the same pace. With more cores, peer i gets core
# i-1 (mod the core count).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lab.sh
. "$here/lab.sh"
QUOTA_PCT=${QUOTA_PCT:-45}
MODES=${MODES:-"off on"}
MANIFEST=${1:-$here/bench.toml}
PEERS=4
CG=/sys/fs/cgroup/cpu/potluck-bench-$$
NS=plb$$

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, tc, cgroups)" >&2; exit 2; }
for t in ip tc taskset python3; do
    command -v $t >/dev/null || { echo "$t not found" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "no potluck binary at $BIN (cargo build --release -p potluck-daemon)" >&2; exit 2; }
[ -f "$MANIFEST" ] || { echo "no manifest $MANIFEST" >&2; exit 2; }
if grep -q '^overlap' "$MANIFEST"; then
    echo "$MANIFEST sets overlap; the benchmark sets it per mode" >&2
    exit 2
fi
work=$(mktemp -d /tmp/potluck-netns-bench.XXXXXX)
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    lab_del_net $PEERS
    for i in $(seq 1 $PEERS); do rmdir "$CG/p$i" 2>/dev/null || true; done
    rmdir "$CG" 2>/dev/null || true
    [ -n "${KEEP:-}" ] && echo "work dir kept: $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT

# The network: every peer's upload and download are each limited to RATE (lab.sh).
lab_net $PEERS "$RATE"

# CPU: one cgroup per peer, capped at QUOTA_PCT% of a core, and one core per peer.
cores=$(nproc)
mkdir -p "$CG"
for i in $(seq 1 $PEERS); do
    mkdir -p "$CG/p$i"
    echo 100000 > "$CG/p$i/cpu.cfs_period_us"
    echo $((QUOTA_PCT * 1000)) > "$CG/p$i/cpu.cfs_quota_us"
done
core_of() {
    if [ "$cores" -ge $PEERS ]; then echo $(( ($1 - 1) % cores )); else echo $(( ($1 - 1) * cores / PEERS )); fi
}

start_daemon() { # peer data_dir log [bootstrap]
    local i=$1 dir=$2 log=$3 boot=${4:-}
    local args=(daemon --data-dir "$dir" --listen /ip4/10.78.0.$i/udp/4001/quic-v1 --no-mdns --log-format json)
    [ -n "$boot" ] && args+=(--bootstrap "$boot")
    # The cgroup and the core are set before exec, so every thread of the daemon inherits them.
    RAYON_NUM_THREADS=1 POTLUCK_LOG="info,libp2p_kad=error" \
        ip netns exec "$NS-$i" sh -c 'echo $$ > "$0/cgroup.procs"; c=$1; shift; exec taskset -c "$c" "$@"' \
        "$CG/p$i" "$(core_of "$i")" "$BIN" "${args[@]}" 2> "$log" > /dev/null &
    pids+=($!)
}

for mode in $MODES; do
    case $mode in on) overlap=true ;; off) overlap=false ;; *) echo "mode $mode: on or off" >&2; exit 2 ;; esac
    d=$work/$mode
    mkdir -p "$d"
    { echo "overlap = $overlap"; cat "$MANIFEST"; } > "$d/run.toml"
    start_daemon 1 "$d/p1" "$d/p1.log"
    wait_for 30 cli 1 id --data-dir "$d/p1" || { echo "peer 1 did not start" >&2; cat "$d/p1.log" >&2; exit 1; }
    id1=$(cli 1 id --data-dir "$d/p1")
    for i in $(seq 2 $PEERS); do
        start_daemon "$i" "$d/p$i" "$d/p$i.log" "/ip4/10.78.0.1/udp/4001/quic-v1/p2p/$id1"
        wait_for 30 cli "$i" id --data-dir "$d/p$i" || { echo "peer $i did not start" >&2; exit 1; }
    done
    run_id=$(cli 1 run start --data-dir "$d/p1" "$d/run.toml")
    for i in $(seq 2 $PEERS); do
        cli "$i" run join --data-dir "$d/p$i" --coordinator "$id1" --run "$run_id" \
            --addr "/ip4/10.78.0.1/udp/4001/quic-v1/p2p/$id1" >/dev/null
    done
    started=$SECONDS
    # The run ends when the coordinator's replica says so (or fails).
    while :; do
        st=$(cli 1 run status --json --data-dir "$d/p1" 2>/dev/null || echo '{}')
        state=$(json_get "$st" state)
        case $state in finished|failed*) break ;; esac
        if [ $((SECONDS - started)) -gt 3600 ]; then echo "run did not finish in an hour" >&2; exit 1; fi
        sleep 2
    done
    sleep 3 # let the other replicas log their last round
    echo "$st" > "$d/status.json"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
    python3 "$here/report.py" "$mode" "$d" $PEERS "$RATE" "$QUOTA_PCT" $((SECONDS - started))
done

#!/usr/bin/env bash
# The fault drill of issue 17: five real `potluck` daemons in their own network namespaces,
# on links shaped to RATE (lab.sh), train one run whose coordinator (peer 1) names peer 2 as
# its successor, while
#   - peer 3 is killed (SIGKILL) and started again on its data dir (it resumes by itself),
#   - peer 4 is cut off (its link down) for CUT_ROUNDS rounds, then healed,
#   - junk is thrown at peer 5 (random UDP datagrams and TCP connections that never speak),
#   - the coordinator is killed for good near the end.
# It fails unless peers 2 to 5 all finish the run on one committed root and peer 2's ledger
# is one verified chain. It prints one JSON object per fault on stdout: the rounds the fault
# touched, their wall time at the successor (peer 2) and the median round's.
#
#   sudo benches/netns/drill.sh [MANIFEST.toml]
#
# Environment: POTLUCK_BIN (default target/release/potluck), RATE (100mbit), ROUNDS (24),
# CUT_ROUNDS (3), KEEP (keep the work dir). No CPU pinning: on 2 cores the five daemons share
# them, so compare round times within one run only.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lab.sh
. "$here/lab.sh"
ROUNDS=${ROUNDS:-24}
CUT_ROUNDS=${CUT_ROUNDS:-3}
MANIFEST=${1:-$here/drill.toml}
PEERS=5
NS=pld$$

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, tc)" >&2; exit 2; }
for t in ip tc python3; do
    command -v $t >/dev/null || { echo "$t not found" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "no potluck binary at $BIN (cargo build --release -p potluck-daemon)" >&2; exit 2; }
work=$(mktemp -d /tmp/potluck-drill.XXXXXX)
declare -A pid

cleanup() {
    for p in "${pid[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${pid[@]}"; do wait "$p" 2>/dev/null || true; done
    lab_del_net $PEERS
    [ -n "${KEEP:-}" ] && echo "work dir kept: $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
lab_net $PEERS "$RATE"

start_daemon() { # peer [bootstrap]
    local i=$1 boot=${2:-}
    local args=(daemon --data-dir "$work/p$i" --no-mdns --log-format json
        --listen /ip4/10.78.0.$i/udp/4001/quic-v1 --listen /ip4/10.78.0.$i/tcp/4001)
    [ -n "$boot" ] && args+=(--bootstrap "$boot")
    POTLUCK_LOG="info,libp2p_kad=error" ip netns exec "$NS-$i" "$BIN" "${args[@]}" \
        2>> "$work/p$i.log" > /dev/null &
    pid[$i]=$!
}

status() { # peer: its run status as JSON ({} when it does not answer)
    cli "$1" run status --json --data-dir "$work/p$1" 2>/dev/null || echo '{}'
}

# The successor's view: the round in progress and the last committed one.
round_now() { json_get "$(status 2)" round; }
committed_now() { json_get "$(status 2)" committed_round; }

wait_committed() { # round: until the successor holds it
    local until=$((SECONDS + 1800))
    while [ "$(committed_now || echo 0)" -lt "$1" ] 2>/dev/null; do
        [ $SECONDS -lt $until ] || { echo "round $1 was never committed" >&2; exit 1; }
        sleep 1
    done
}

faults=()
note_fault() { # name: the round in progress now
    faults+=("$1:$(round_now)")
    echo "drill: $1 in round $(round_now)" >&2
}

sed "s/^rounds = .*/rounds = $ROUNDS/" "$MANIFEST" > "$work/run.toml"
start_daemon 1
wait_for 30 cli 1 id --data-dir "$work/p1" || { echo "peer 1 did not start" >&2; exit 1; }
id1=$(cli 1 id --data-dir "$work/p1")
boot="/ip4/10.78.0.1/udp/4001/quic-v1/p2p/$id1"
for i in $(seq 2 $PEERS); do
    start_daemon "$i" "$boot"
    wait_for 30 cli "$i" id --data-dir "$work/p$i" || { echo "peer $i did not start" >&2; exit 1; }
done
id2=$(cli 2 id --data-dir "$work/p2")
run_id=$(cli 1 run start --data-dir "$work/p1" "$work/run.toml" --successor "$id2")
for i in $(seq 2 $PEERS); do
    cli "$i" run join --data-dir "$work/p$i" --coordinator "$id1" --run "$run_id" --addr "$boot" >/dev/null
done
started=$SECONDS

# A replica killed and started again.
wait_committed 3
note_fault "replica killed and restarted"
kill -9 "${pid[3]}"; wait "${pid[3]}" 2>/dev/null || true
sleep 5
start_daemon 3 "$boot"

# A replica cut off for CUT_ROUNDS rounds, then healed.
wait_committed 7
note_fault "replica cut off"
cut_at=$(committed_now)
ip -n "$NS-hub" link set b4 down
wait_committed $((cut_at + CUT_ROUNDS))
ip -n "$NS-hub" link set b4 up
note_fault "cut replica healed"

# Junk at a replica: datagrams at its QUIC port, connections that never speak at its TCP
# port (bounded in count and time).
wait_committed $((cut_at + CUT_ROUNDS + 2))
note_fault "junk thrown"
ip netns exec "$NS-1" python3 - <<'PY' || true
import os, socket, time
end = time.time() + 20
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
held = []
for n in range(4000):
    if time.time() > end:
        break
    u.sendto(os.urandom(1200), ("10.78.0.5", 4001))
    if n % 40 == 0 and len(held) < 100:
        try:
            t = socket.create_connection(("10.78.0.5", 4001), timeout=2)
            t.send(os.urandom(64))
            held.append(t)
        except OSError:
            pass
    time.sleep(0.002)
time.sleep(5)
PY

# The coordinator killed for good near the end.
wait_committed $((ROUNDS - 3))
note_fault "coordinator killed for good"
kill -9 "${pid[1]}"; wait "${pid[1]}" 2>/dev/null || true
unset 'pid[1]'

# Every survivor finishes on one root.
roots=()
for i in $(seq 2 $PEERS); do
    until=$((SECONDS + 1800))
    while :; do
        st=$(status "$i")
        case $(json_get "$st" state) in finished) break ;; failed) echo "peer $i failed: $st" >&2; exit 1 ;; esac
        [ $SECONDS -lt $until ] || { echo "peer $i did not finish: $st" >&2; exit 1; }
        sleep 2
    done
    roots+=("$(json_get "$st" committed_root)")
    echo "drill: peer $i finished: round $(json_get "$st" committed_round), root $(json_get "$st" committed_root), role $(json_get "$st" role), coordinator $(json_get "$st" coordinator)" >&2
done
for r in "${roots[@]}"; do
    [ "$r" = "${roots[0]}" ] || { echo "the survivors ended on different roots: ${roots[*]}" >&2; exit 1; }
done
cli 2 checkpoints --data-dir "$work/p2" >&2 || { echo "peer 2's ledger does not verify" >&2; exit 1; }
echo "drill: all survivors on root ${roots[0]} after $((SECONDS - started)) s" >&2

python3 - "$work/p2.log" "${faults[@]}" <<'PY'
import json, statistics, sys
walls = {}
for line in open(sys.argv[1], errors="replace"):
    try:
        ev = json.loads(line)
    except ValueError:
        continue
    f = ev.get("fields", {})
    if ev.get("target") == "potluck::timing" and f.get("message") == "round timing":
        walls[f["round"]] = f["wall_ms"]
median = statistics.median(walls.values()) if walls else None
for spec in sys.argv[2:]:
    name, _, r = spec.rpartition(":")
    r = int(r or 0)
    touched = {k: v for k, v in walls.items() if r <= k <= r + 1}
    print(json.dumps({"bench": "netns_drill", "fault": name, "round": r,
                      "round_ms": touched, "median_round_ms": median}))
PY

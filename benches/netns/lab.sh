# Shared by the netns scripts (source it): a bridge in a hub namespace with one veth pair per
# peer, every link shaped to RATE in both directions with tc tbf, and helpers to run the
# `potluck` CLI inside a peer's namespace. Needs root and iproute2. Peer i has the address
# 10.78.0.i in namespace "$NS-i"; the scripts own these namespaces and delete them on exit
# (lab_del_net). Source it after setting `here` to the script's folder.

root=$(cd "$here/../.." && pwd)
BIN=${POTLUCK_BIN:-$root/target/release/potluck}
RATE=${RATE:-100mbit}

# lab_net PEERS RATE: the namespaces, the bridge and the shaped links.
lab_net() {
    local peers=$1 rate=$2 i
    ip netns add "$NS-hub"
    ip -n "$NS-hub" link set lo up
    ip -n "$NS-hub" link add br0 type bridge
    ip -n "$NS-hub" link set br0 up
    for i in $(seq 1 "$peers"); do
        ip netns add "$NS-$i"
        ip -n "$NS-$i" link set lo up
        ip -n "$NS-$i" link add v$i type veth peer name b$i
        ip -n "$NS-$i" link set b$i netns "$NS-hub"
        ip -n "$NS-hub" link set b$i master br0
        ip -n "$NS-hub" link set b$i up
        ip -n "$NS-$i" addr add 10.78.0.$i/24 dev v$i
        ip -n "$NS-$i" link set v$i up
        tc -n "$NS-$i" qdisc add dev v$i root tbf rate "$rate" burst 64kb latency 50ms
        tc -n "$NS-hub" qdisc add dev b$i root tbf rate "$rate" burst 64kb latency 50ms
    done
}

# lab_del_net PEERS: deletes the namespaces (and with them the links).
lab_del_net() {
    local i
    for i in $(seq 1 "$1") hub; do ip netns del "$NS-$i" 2>/dev/null || true; done
}

# cli PEER ARGS...: the potluck CLI inside peer PEER's namespace.
cli() {
    local i=$1; shift
    ip netns exec "$NS-$i" "$BIN" "$@"
}

# wait_for SECONDS COMMAND...: until COMMAND succeeds; fails after SECONDS.
wait_for() {
    local until=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $until ] || return 1
        sleep 0.5
    done
}

# json_get JSON KEY: one top-level field of a JSON object ("" when absent).
json_get() {
    python3 -c 'import json,sys
try: v = json.loads(sys.argv[1]).get(sys.argv[2], "")
except Exception: v = ""
print(v)' "$1" "$2"
}

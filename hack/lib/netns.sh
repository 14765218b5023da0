# shellcheck shell=bash
# Part of hack/local-cluster.sh (sourced; not run on its own): the netns
# network (see "Network" and "Partial cuts" in its header). The bridge, one
# namespace and veth per node, and their removal; the prefix that runs a
# command inside a node's namespace; the policy-routing rules the partial cuts
# are made of. In the loopback mode none of this exists.

netns_name() { echo "tandem-$1"; }
veth_name() { echo "tandem-$1"; }

in_node_prefix() { if [ "$(net_mode)" = netns ]; then echo ip netns exec "$(netns_name "$1")"; fi; }

net_up() {
  [ "$(net_mode)" = netns ] || return 0
  log "Creating bridge $BRIDGE ($BRIDGE_IP/24) and a network namespace per node"
  ip link add "$BRIDGE" type bridge
  ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local n ns veth
  for n in "${NODES[@]}"; do
    ns=$(netns_name "$n")
    veth=$(veth_name "$n")
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "$veth-p"
    ip link set "$veth-p" netns "$ns"
    ip -n "$ns" link set "$veth-p" name eth0
    ip -n "$ns" addr add "$(node_ip "$n")/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
  done
}

# our_netns: the node namespaces present, ours or a crashed run's.
our_netns() { ip netns list 2>/dev/null | awk '$1 ~ /^tandem-node-/ {print $1}'; }

# netns_pids: the processes running inside our_netns.
netns_pids() {
  local ns
  for ns in $(our_netns); do ip netns pids "$ns" 2>/dev/null; done
}

# net_down removes every node namespace and tandem link (the veths and the
# bridge), whatever network mode the last run had. Needs root; without it there
# is nothing of ours to remove.
net_down() {
  local ns l
  if command -v ip >/dev/null && [ "$(id -u)" = 0 ]; then
    for ns in $(our_netns); do
      ip netns delete "$ns" 2>/dev/null || true
    done
    for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^tandem-(node-|br0$)' || true); do
      ip link delete "$l" 2>/dev/null || true
    done
  fi
}

link_state() {
  [ "$(net_mode)" = netns ] || {
    echo "loopback"
    return
  }
  ip -o link show "$(veth_name "$1")" 2>/dev/null | grep -q 'state UP\|,UP' && echo up || echo down
}

# The cut rules' preference: before the main table's lookup (32766).
CUT_PREF=1000

need_netns() {
  [ "$(net_mode)" = netns ] ||
    die "partition/cut/heal need the netns network (run 'up' as root); on loopback the nodes are not isolated"
}

# add_cut NODE RULE...: a prohibit rule in NODE's namespace.
add_cut() {
  local n=$1
  shift
  ip -n "$(netns_name "$n")" rule add pref "$CUT_PREF" "$@" prohibit
}

# del_cuts NODE [SELECTOR...]: delete NODE's cut rules (those matching SELECTOR).
del_cuts() {
  local n=$1 ns
  shift
  ns=$(netns_name "$n")
  for _ in $(seq 64); do
    ip -n "$ns" rule del pref "$CUT_PREF" "$@" prohibit 2>/dev/null || break
  done
}

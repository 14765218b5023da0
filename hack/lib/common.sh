# shellcheck shell=bash
# Part of hack/local-cluster.sh (sourced; not run on its own): messages,
# errors, the nodes' names and addresses, kubectl. The settings it uses
# (ROOT, BIN, STATE, NODES, the ports...) are defined by hack/local-cluster.sh.

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

node_index() {
  case $1 in
  node-a) echo 1 ;; node-b) echo 2 ;; node-c) echo 3 ;;
  *) die "unknown node '$1' (nodes: ${NODES[*]})" ;;
  esac
}

# network mode of the running cluster (or the one `up` will choose)
net_mode() {
  if [ -f "$STATE/network" ]; then
    cat "$STATE/network"
    return
  fi
  case ${TANDEM_NETWORK:-auto} in
  netns | loopback) echo "$TANDEM_NETWORK" ;;
  auto) if [ "$(id -u)" = 0 ] && command -v ip >/dev/null; then echo netns; else echo loopback; fi ;;
  *) die "TANDEM_NETWORK must be auto, netns or loopback (got '$TANDEM_NETWORK')" ;;
  esac
}

node_ip() {
  local i
  i=$(node_index "$1")
  if [ "$(net_mode)" = netns ]; then echo "198.18.0.1$i"; else echo "127.0.0.1$i"; fi
}

api_ip() { if [ "$(net_mode)" = netns ]; then echo "$BRIDGE_IP"; else echo 127.0.0.1; fi; }
node_dir() { echo "$STATE/nodes/$1"; }

kubectl() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

port_busy() { # PORT: anything listening on it in this network namespace
  ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

require_up() {
  # shellcheck disable=SC2015 # alive only runs when the state exists; either failing dies
  [ -f "$STATE/network" ] && alive kube-apiserver ||
    die "the local cluster is not running (start it with: $0 up)"
}

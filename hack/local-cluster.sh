#!/usr/bin/env bash
# A three-node Tandem cluster on this machine, without Docker or a kubelet:
# etcd, kube-apiserver, the Tandem manager and one Tandem agent per simulated
# node (node-a, node-b, node-c), all built from source into bin/.
#
#   hack/local-cluster.sh up                          build, start everything, write .local/kubeconfig
#   hack/local-cluster.sh down                        stop everything, remove namespaces/links/state (keeps .local/logs)
#   hack/local-cluster.sh status                      processes, links, Nodes, VolumePairs
#   hack/local-cluster.sh kill-node NODE              SIGKILL the node's agent, stop its heartbeat (Ready=Unknown), cut its link
#   hack/local-cluster.sh restore-node NODE           bring the link back, restart agent (same data dir) and heartbeat
#   hack/local-cluster.sh partition NODE              cut the node's link only (processes keep running)
#   hack/local-cluster.sh heal NODE                   restore the node's link and remove every cut below that involves NODE
#   hack/local-cluster.sh cut NODE PEER               cut NODE <-> PEER only (both directions; API server and manager still reachable)
#   hack/local-cluster.sh cut-api NODE                cut NODE -> API server only (its agent and heartbeat cannot reach kube-apiserver)
#   hack/local-cluster.sh cut-control NODE            cut manager <-> NODE's agent control API only (the agent's replies are dropped)
#   hack/local-cluster.sh replica-path NODE NS/NAME   print the path of that member's backing file
#   hack/local-cluster.sh kill-agent NODE             SIGKILL only the node's agent (link and heartbeat stay)
#   hack/local-cluster.sh start-agent NODE            start the node's agent again (same data dir)
#   hack/local-cluster.sh kill-manager                SIGKILL the manager
#   hack/local-cluster.sh start-manager               start the manager again
#   hack/local-cluster.sh env                         print shell variables describing the running cluster
#
# Network. As root, each node is its own network namespace "tandem-<node>"
# with a veth "tandem-<node>" on the bridge "tandem-br0" (198.18.0.1/24, an
# address range reserved for benchmarking, RFC 2544); node-a is 198.18.0.11,
# node-b .12, node-c .13. The node's agent and its heartbeat run inside the
# namespace, so cutting the veth isolates the node from the API server, the
# manager and its peers. Nothing is routed or NATed beyond the bridge. Without
# root (or with TANDEM_NETWORK=loopback) the nodes are 127.0.0.11-13 on the
# loopback device: no isolation, so `partition`, `cut*` are not supported and
# `kill-node` only kills processes.
#
# Partial cuts (cut, cut-api, cut-control) are policy-routing rules inside the
# node's namespace (this kernel has no netfilter/tc drop actions): a "prohibit"
# rule at preference 1000 for the peer's address, for TCP to the API server's
# port, or for TCP from the control port 7400 to the bridge address (the
# manager and any client in the root namespace). Existing connections are cut
# too (their packets are refused on the way out). `heal NODE` deletes every
# such rule in NODE's namespace and the peers' rules that name NODE's address.
#
# API server. kube-apiserver serves TLS with a certificate signed by a CA
# generated here with openssl (covering 127.0.0.1 and 198.18.0.1), and
# authenticates bearer tokens from a --token-auth-file: "admin" (in
# system:masters; used by .local/kubeconfig and the heartbeats), "tandem-manager"
# and one "tandem-agent:<node>" per agent. Authorization is RBAC: the manager
# gets the ClusterRole generated from the controller's markers
# (config/rbac/role.yaml), the agents the namespaced Role in
# config/rbac/agent_role.yaml, so a missing permission shows up here as it
# would in a real cluster. There is no kube-controller-manager and no
# scheduler: Pods are never run. hack/localcluster/nodesim stands in for the
# kubelets' Node heartbeats and for the node-lifecycle controller (Ready=Unknown
# after 40 s without a heartbeat).
#
# State lives in .local/ (git-ignored): kubeconfig, pki/, etcd/, nodes/<node>/
# (each agent's data dir), pids/, logs/. `down` is idempotent and also cleans
# up after a crashed or interrupted `up`.
#
# Environment: TANDEM_NETWORK=auto|netns|loopback, TANDEM_API_PORT (16443),
# TANDEM_ETCD_PORT (23790; peer port +10), TANDEM_MANAGER_METRICS_PORT (18080),
# TANDEM_MANAGER_PROBE_PORT (18081), MANAGER_ARGS / AGENT_ARGS (extra flags).
set -euo pipefail

# The script is in parts, sourced below from hack/lib/ (each file's header
# says what it holds): common.sh (messages, node names and addresses, kubectl),
# processes.sh (pid files; starting and stopping etcd, kube-apiserver, the
# heartbeats, the agents and the manager), netns.sh (bridge, namespaces,
# veths, the cut rules), pki.sh (CA, certificates, tokens, kubeconfigs),
# cluster.sh (up, down, status, env, replica-path) and faults.sh (kill-node,
# restore-node, partition, heal, cut*, kill-/start-agent, kill-/start-manager).
# They share the settings below.

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/bin
STATE=$ROOT/.local
PIDS=$STATE/pids
LOGS=$STATE/logs
PKI=$STATE/pki
KUBECONFIG_FILE=$STATE/kubeconfig
KUBECTL=$BIN/kubectl
OPNS=tandem-system
NODES=(node-a node-b node-c)
BRIDGE=tandem-br0
BRIDGE_IP=198.18.0.1
API_PORT=${TANDEM_API_PORT:-16443}
ETCD_PORT=${TANDEM_ETCD_PORT:-23790}
ETCD_PEER_PORT=$((ETCD_PORT + 10))
METRICS_PORT=${TANDEM_MANAGER_METRICS_PORT:-18080}
PROBE_PORT=${TANDEM_MANAGER_PROBE_PORT:-18081}
CONTROL_PORT=7400
REPL_PORT=7401
NBD_PORT=10809

PROG=$(basename "$0")

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

# shellcheck source-path=SCRIPTDIR
{
  # shellcheck source=lib/common.sh
  source "$ROOT/hack/lib/common.sh"
  # shellcheck source=lib/processes.sh
  source "$ROOT/hack/lib/processes.sh"
  # shellcheck source=lib/netns.sh
  source "$ROOT/hack/lib/netns.sh"
  # shellcheck source=lib/pki.sh
  source "$ROOT/hack/lib/pki.sh"
  # shellcheck source=lib/cluster.sh
  source "$ROOT/hack/lib/cluster.sh"
  # shellcheck source=lib/faults.sh
  source "$ROOT/hack/lib/faults.sh"
}

need_node_arg() { [ -n "${1:-}" ] || die "usage: $PROG $verb NODE (one of ${NODES[*]})"; }

verb=${1:-}
[ $# -gt 0 ] && shift
case $verb in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
kill-node) need_node_arg "$@" && cmd_kill_node "$1" ;;
restore-node) need_node_arg "$@" && cmd_restore_node "$1" ;;
partition) need_node_arg "$@" && cmd_partition "$1" 0 ;;
heal) need_node_arg "$@" && cmd_heal "$1" ;;
cut)
  [ $# -eq 2 ] || die "usage: $PROG cut NODE PEER"
  cmd_cut "$1" "$2"
  ;;
cut-api) need_node_arg "$@" && cmd_cut_api "$1" ;;
cut-control) need_node_arg "$@" && cmd_cut_control "$1" ;;
replica-path)
  [ $# -eq 2 ] || die "usage: $PROG replica-path NODE NAMESPACE/NAME"
  cmd_replica_path "$1" "$2"
  ;;
env) cmd_env ;;
kill-agent) need_node_arg "$@" && cmd_kill_agent "$1" ;;
start-agent) need_node_arg "$@" && cmd_start_agent "$1" ;;
kill-manager) cmd_kill_manager ;;
start-manager) cmd_start_manager ;;
-h | --help | help) usage ;;
"")
  usage >&2
  exit 2
  ;;
*)
  printf '%s: unknown verb %s\n\n' "$PROG" "$verb" >&2
  usage >&2
  exit 2
  ;;
esac

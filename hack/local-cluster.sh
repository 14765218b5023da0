#!/usr/bin/env bash
# A three-node Kubernetes cluster on this machine, without Docker or a
# registry, with Tandem installed from its own manifests: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, and per node
# (node-a, node-b, node-c) a containerd and a kubelet, all built from source
# into bin/ (containerd, runc and the CNI plugins come from Debian). Tandem's
# image is built by `make image` and imported into every node; the manager
# Deployment and the agent DaemonSet run as Pods (config/default, or the Helm
# chart with TANDEM_INSTALL=helm). See hack/lib/kubelet.sh for how a node is
# made (network and mount namespaces, a cgroup) and what `down` restores.
#
# TANDEM_NODES=process starts the older, lighter cluster instead: the manager
# and one agent per node as plain processes, the Nodes' heartbeats simulated
# (hack/localcluster/nodesim), no kubelet, no Pods.
#
#   hack/local-cluster.sh up                          build, start everything, write .local/kubeconfig
#   hack/local-cluster.sh down                        stop everything, remove namespaces/links/cgroups/state, restore the sysctls (keeps .local/logs)
#   hack/local-cluster.sh status                      processes, links, Nodes, Tandem's Pods, VolumePairs
#   hack/local-cluster.sh kill-node NODE              the node is gone: kubelet, containerd, every container SIGKILLed, link cut
#   hack/local-cluster.sh restore-node NODE           bring the link back and the node up again with its disk
#   hack/local-cluster.sh partition NODE              cut the node's link only (processes keep running)
#   hack/local-cluster.sh heal NODE                   restore the node's link and remove every cut below that involves NODE
#   hack/local-cluster.sh cut NODE PEER               cut NODE <-> PEER only (both directions; API server and manager still reachable)
#   hack/local-cluster.sh cut-api NODE                cut NODE -> API server only (its kubelet, agent and Pods cannot reach kube-apiserver)
#   hack/local-cluster.sh cut-control NODE            cut the managers <-> NODE's agent control API only (the agent's replies are dropped)
#   hack/local-cluster.sh replica-path NODE NS/NAME   print the path of that member's backing file
#   hack/local-cluster.sh kill-agent NODE             SIGKILL only the node's agent; it stays down (its kubelet paused) until start-agent
#   hack/local-cluster.sh start-agent NODE            start the node's agent again (same data dir)
#   hack/local-cluster.sh kill-manager                SIGKILL the manager(s); they stay down (Deployment scaled to 0) until start-manager
#   hack/local-cluster.sh start-manager               start the manager(s) again
#   hack/local-cluster.sh env                         print shell variables describing the running cluster
#   hack/local-cluster.sh procs                       print NAME PID METRICS_URL of the (leading) manager and the agents
#   hack/local-cluster.sh cost [SECONDS]              measure the cluster's CPU and memory over SECONDS (60), e.g. idle
#
# Network. As root, each node is its own network namespace "tandem-<node>"
# with a veth "tandem-<node>" on the bridge "tandem-br0" (198.18.0.1/24, an
# address range reserved for benchmarking, RFC 2544); node-a is 198.18.0.11,
# node-b .12, node-c .13. Everything of a node runs inside its namespace (its
# kubelet, containerd and Pods; with TANDEM_NODES=process its agent and
# heartbeat), so cutting the veth isolates the node from the API server, the
# managers and its peers. Pods get 10.244.<i>.0/24 on a bridge inside the
# node, masqueraded to the node's address; the host routes to them through
# the node. Nothing is routed or NATed beyond that. With TANDEM_NODES=process
# and without root (or TANDEM_NETWORK=loopback) the nodes are 127.0.0.11-13
# on the loopback device: no isolation, so `partition`, `cut*` are not
# supported and `kill-node` only kills processes. Real nodes need root.
#
# Partial cuts (cut, cut-api, cut-control) are policy-routing rules inside the
# node's namespace (this kernel has no netfilter/tc drop actions): a "prohibit"
# rule at preference 1000 for the peer's address, for TCP to the API server's
# port, or for TCP from the control port 7400 to the bridge address (the
# manager and any client in the root namespace; with real nodes also to the
# nodes' addresses and the Pod network, where the managers are). Existing connections are cut
# too (their packets are refused on the way out). `heal NODE` deletes every
# such rule in NODE's namespace and the peers' rules that name NODE's address.
#
# API server. kube-apiserver serves TLS with a certificate signed by a CA
# generated here with openssl (covering 127.0.0.1, 198.18.0.1 and the
# "kubernetes" Service, 10.0.0.1), and authenticates bearer tokens from a
# --token-auth-file: "admin" (in system:masters; used by .local/kubeconfig),
# the kubelets as system:node:<node> (group system:nodes),
# system:kube-controller-manager and system:kube-scheduler; it reaches the
# kubelets with a client certificate. Authorization is Node,RBAC with the
# NodeRestriction admission plugin. Tandem's Pods use their ServiceAccounts
# and the RBAC of config/rbac (or the chart), so a missing permission or a
# wrong manifest fails here as it would on a user's cluster. With
# TANDEM_NODES=process the manager and the agents authenticate as
# "tandem-manager" and "tandem-agent:<node>" with the same roles, and
# hack/localcluster/nodesim stands in for the kubelets' heartbeats and the
# node-lifecycle controller.
#
# State lives in .local/ (git-ignored): kubeconfig, pki/, etcd/, nodes/<node>/
# (each node's disk: root/var/lib/{kubelet,containerd,tandem}; the agent's
# data dir is root/var/lib/tandem, see replica-path), pids/, logs/ (and
# logs/nodes/<node>/pods/: the containers' logs). `down` is idempotent and
# also cleans up after a crashed or interrupted `up`.
#
# Environment: TANDEM_NODES=kubelet|process, TANDEM_INSTALL=kustomize|helm,
# TANDEM_NETWORK=auto|netns|loopback (process nodes only), TANDEM_API_PORT (16443),
# TANDEM_ETCD_PORT (23790; peer port +10), TANDEM_MANAGER_METRICS_PORT (18080),
# TANDEM_MANAGER_PROBE_PORT (18081), MANAGER_ARGS / AGENT_ARGS (extra flags;
# process nodes only).
set -Eeuo pipefail
# set -e ends the script silently: say which command failed, and where.
trap 'echo "local-cluster.sh: ${BASH_SOURCE[0]##*/}:$LINENO: \"$BASH_COMMAND\" failed (exit $?)" >&2' ERR

# The script is in parts, sourced below from hack/lib/ (each file's header
# says what it holds): common.sh (messages, node names and addresses, kubectl),
# processes.sh (pid files; starting and stopping etcd, kube-apiserver, the
# heartbeats, the agents and the manager), netns.sh (bridge, namespaces,
# veths, the cut rules), pki.sh (CA, certificates, tokens, kubeconfigs),
# cluster.sh (up, down, status, env, replica-path, procs), faults.sh
# (kill-node, restore-node, partition, heal, cut*, kill-/start-agent,
# kill-/start-manager) and kubelet.sh (real nodes: containerd, kubelet, the
# control plane's controllers, installing Tandem). They share the settings
# below.

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/bin
STATE=$ROOT/.local
PIDS=$STATE/pids
LOGS=$STATE/logs
PKI=$STATE/pki
KUBECONFIG_FILE=$STATE/kubeconfig
KUBECTL=$BIN/kubectl
IMAGES=$BIN/images
OPNS=tandem-system
NODES=(node-a node-b node-c)
BRIDGE=tandem-br0
BRIDGE_IP=198.18.0.1
NODE_NETWORK=198.18.0.0/24
# Real nodes: node-<i>'s Pods get 10.244.<i>.0/24.
POD_NETWORK=10.244.0.0/16
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
  sed -n '2,/^set -Eeuo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
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
  # shellcheck source=lib/kubelet.sh
  source "$ROOT/hack/lib/kubelet.sh"
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
procs) cmd_procs ;;
cost) cmd_cost "${1:-60}" ;;
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

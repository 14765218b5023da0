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

prog=$(basename "$0")

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$prog" "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- helpers

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
netns_name() { echo "tandem-$1"; }
veth_name() { echo "tandem-$1"; }
node_dir() { echo "$STATE/nodes/$1"; }

# ours PID: the process exists, is not a zombie, and was started by this
# script for this checkout (every command line we start names $STATE/).
ours() {
  local pid=$1 cmd
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmd == *"$STATE/"* ]]
}

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }
alive() { ours "$(pid_of "$1")"; }

# start_bg NAME CMD...: start CMD detached (own session), log to logs/NAME.log.
start_bg() {
  local name=$1
  shift
  mkdir -p "$PIDS" "$LOGS"
  printf '=== %s starting: %s\n' "$(date -Is)" "$*" >>"$LOGS/$name.log"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo $pid >"$PIDS/$name.pid"
  # Until the child has exec'd, its command line is this script's: wait for
  # the exec so `alive` does not mistake a starting process for a dead one.
  for _ in $(seq 50); do
    ours "$pid" || ! kill -0 "$pid" 2>/dev/null && break
    sleep 0.02
  done
}

# stop_proc NAME [SIGNAL]: signal the recorded process and wait (≤10 s) for it to go.
stop_proc() {
  local name=$1 sig=${2:-TERM} pid
  pid=$(pid_of "$name")
  if ours "$pid"; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 100); do ours "$pid" || break; sleep 0.1; done
    if ours "$pid"; then
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
  fi
  rm -f "$PIDS/$name.pid"
}

# wait_for SECONDS WHAT CMD...: run CMD until it succeeds; die after SECONDS,
# or as soon as the process named by $WATCH (if set) has exited.
wait_for() {
  local t=$1 what=$2
  shift 2
  local deadline=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    # Twice, 0.2 s apart: while `ip netns exec` execs the process, its
    # command line can read empty for an instant.
    if [ -n "${WATCH:-}" ] && ! alive "$WATCH" && sleep 0.2 && ! alive "$WATCH"; then
      die "$WATCH exited while waiting for $what; last lines of its log:
$(tail -n 5 "$LOGS/$WATCH.log" 2>/dev/null)"
    fi
    if ((SECONDS >= deadline)); then
      die "timed out after ${t}s waiting for $what"
    fi
    sleep 0.3
  done
}

kubectl() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

port_busy() { # PORT: anything listening on it in this network namespace
  ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

require_up() {
  # shellcheck disable=SC2015 # alive only runs when the state exists; either failing dies
  [ -f "$STATE/network" ] && alive kube-apiserver ||
    die "the local cluster is not running (start it with: $0 up)"
}

# ---------------------------------------------------------------- teardown

# teardown stops every process this checkout's cluster started (by recorded
# pid; as a safety net also any process in our namespaces or running one of
# bin/'s binaries with our state dir on its command line), then removes the
# namespaces, links and state. Tolerates missing pieces.
teardown() {
  local pids=() p exe ns
  # Stop in dependency order, gently first.
  # shellcheck disable=SC2012 # the pid files are named by this script (NAME.pid, no spaces)
  for name in $(ls "$PIDS" 2>/dev/null | sed -n 's/\.pid$//p' | sort -r); do
    case $name in kube-apiserver | etcd) continue ;; esac
    p=$(pid_of "$name")
    ours "$p" && pids+=("$p")
  done
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^tandem-node-/ {print $1}'); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do pids+=("$p"); done
  done
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case $exe in
    "$BIN"/agent* | "$BIN"/manager* | "$BIN"/tandem-nodesim*) ours "${p#/proc/}" && pids+=("${p#/proc/}") ;;
    esac
  done
  kill_all "${pids[@]}"
  # Then the API server, then etcd (an API server whose etcd is gone shuts
  # down slowly).
  for name in kube-apiserver etcd; do
    pids=()
    p=$(pid_of "$name")
    ours "$p" && pids+=("$p")
    for p in /proc/[0-9]*; do
      exe=$(readlink "$p/exe" 2>/dev/null) || continue
      [[ $exe == "$BIN/$name"* ]] && ours "${p#/proc/}" && pids+=("${p#/proc/}")
    done
    kill_all "${pids[@]}"
  done
  rm -rf "$PIDS"

  if command -v ip >/dev/null && [ "$(id -u)" = 0 ]; then
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^tandem-node-/ {print $1}'); do
      ip netns delete "$ns" 2>/dev/null || true
    done
    for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^tandem-(node-|br0$)' || true); do
      ip link delete "$l" 2>/dev/null || true
    done
  fi
  # Keep the logs of the last run for post-mortems.
  if [ -d "$STATE" ]; then
    find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  fi
}

kill_all() {
  [ $# -gt 0 ] || return 0
  local p left
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 50); do
    left=0
    for p in "$@"; do ours "$p" && left=1; done
    [ $left = 0 ] && break
    sleep 0.1
  done
  for p in "$@"; do ours "$p" && kill -KILL "$p" 2>/dev/null; done
  # Give init a moment to reap them, so no zombie lingers in `ps`.
  for _ in $(seq 30); do
    left=0
    for p in "$@"; do [ -e "/proc/$p" ] && left=1; done
    [ $left = 0 ] && return 0
    sleep 0.1
  done
  return 0
}

# ---------------------------------------------------------------- up

build() {
  log "Building bin/manager, bin/agent and bin/tandem-nodesim"
  (cd "$ROOT" && go build -o "$BIN/manager" ./cmd/manager && go build -o "$BIN/agent" ./cmd/agent &&
    go build -o "$BIN/tandem-nodesim" ./hack/localcluster/nodesim)
  if [ ! -x "$BIN/etcd" ] || [ ! -x "$BIN/kube-apiserver" ] || [ ! -x "$BIN/kubectl" ]; then
    log "Building etcd, kube-apiserver and kubectl from source (first time only: 15-20 minutes on 2 cores)"
  fi
  "$ROOT/hack/tools.sh" etcd kubernetes
}

gen_pki() {
  mkdir -p "$PKI"
  local ip
  ip=$(api_ip)
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=tandem-local-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,IP:$ip,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
      "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature,keyEncipherment" >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 30 -extfile apiserver.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    # Bearer tokens: token,user,uid,"groups"
    {
      echo "$(openssl rand -hex 24),admin,admin,\"system:masters\""
      echo "$(openssl rand -hex 24),tandem-manager,tandem-manager,\"tandem:managers\""
      for n in "${NODES[@]}"; do echo "$(openssl rand -hex 24),tandem-agent:$n,tandem-agent-$n,\"tandem:agents\""; done
    } >tokens.csv
    chmod 600 ./*.key tokens.csv
  )
  # The agents' control API / replication token, shared with the manager.
  openssl rand -hex 24 >"$STATE/agent-token"
  chmod 600 "$STATE/agent-token"
}

token_of() { awk -F, -v u="$1" '$2 == u {print $1}' "$PKI/tokens.csv"; }

write_kubeconfig() { # FILE USER
  local ca
  ca=$(base64 -w0 <"$PKI/ca.crt")
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tandem-local
  cluster:
    server: https://$(api_ip):$API_PORT
    certificate-authority-data: $ca
users:
- name: $2
  user:
    token: $(token_of "$2")
contexts:
- name: tandem-local
  context:
    cluster: tandem-local
    user: $2
    namespace: default
current-context: tandem-local
EOF
  chmod 600 "$1"
}

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

start_etcd() {
  # shellcheck disable=SC2174 # only etcd's data dir must be 0700 (etcd checks); its parent is the state dir
  mkdir -p -m 700 "$STATE/etcd"
  # --unsafe-no-fsync: a throw-away cluster on a disk shared with builds;
  # slow fsyncs would only make Lease renewals flaky.
  start_bg etcd "$BIN/etcd" --name local --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
  WATCH=etcd wait_for 30 "etcd to answer on 127.0.0.1:$ETCD_PORT (see $LOGS/etcd.log)" curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
}

start_apiserver() {
  local ip
  ip=$(api_ip)
  # No endpoint reconciler: nothing here uses the "kubernetes" Service, and it
  # refuses a loopback --advertise-address (the loopback network mode).
  start_bg kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$ip" --advertise-address "$ip" --secure-port "$API_PORT" --endpoint-reconciler-type none \
    --cert-dir "$PKI" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" --token-auth-file "$PKI/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true
  local admin
  admin=$(token_of admin)
  WATCH=kube-apiserver wait_for 120 "kube-apiserver to be ready on https://$ip:$API_PORT (see $LOGS/kube-apiserver.log)" \
    curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $admin" "https://$ip:$API_PORT/readyz"
}

install_api() {
  log "Installing the CRDs, namespace $OPNS and RBAC"
  kubectl apply -f "$ROOT/config/crd/bases" >/dev/null
  kubectl create namespace "$OPNS" >/dev/null
  kubectl apply -f "$ROOT/config/rbac/role.yaml" >/dev/null
  kubectl create clusterrolebinding tandem-manager-local --clusterrole tandem-manager --user tandem-manager >/dev/null
  # The manager's Leases live in the operator namespace only (its Role).
  kubectl apply -f "$ROOT/config/rbac/leader_election_role.yaml" >/dev/null
  kubectl -n "$OPNS" create rolebinding tandem-manager-leases-local --role tandem-leader-election --user tandem-manager >/dev/null
  if [ -f "$ROOT/config/rbac/agent_role.yaml" ]; then
    kubectl apply -f "$ROOT/config/rbac/agent_role.yaml" >/dev/null
  else
    kubectl -n "$OPNS" create role tandem-agent --verb get,list,watch,create,update,patch --resource leases.coordination.k8s.io >/dev/null
  fi
  kubectl -n "$OPNS" create rolebinding tandem-agent-local --role tandem-agent --group tandem:agents >/dev/null
  # The agents' shared token, where the kubectl plugin (and the Helm chart)
  # expect it.
  kubectl -n "$OPNS" create secret generic tandem-agent-token --from-file=token="$STATE/agent-token" >/dev/null
  wait_for 30 "the VolumePair CRD to be established" kubectl wait --for condition=Established --timeout 5s crd/volumepairs.storage.tandem.dev
}

start_heartbeat() {
  local n=$1
  # shellcheck disable=SC2046 # the prefix is a command (ip netns exec NS) or nothing: split it into words
  start_bg "heartbeat-$n" $(in_node_prefix "$n") "$BIN/tandem-nodesim" heartbeat --kubeconfig "$KUBECONFIG_FILE" --node "$n" --address "$(node_ip "$n")"
}

in_node_prefix() { if [ "$(net_mode)" = netns ]; then echo ip netns exec "$(netns_name "$1")"; fi; }

start_agent() {
  local n=$1 ip
  ip=$(node_ip "$n")
  mkdir -p "$(node_dir "$n")"
  # shellcheck disable=SC2046,SC2086
  start_bg "agent-$n" $(in_node_prefix "$n") "$BIN/agent" --node "$n" --data-dir "$(node_dir "$n")" \
    --namespace "$OPNS" --kubeconfig "$STATE/kube/agent-$n.kubeconfig" --token-file "$STATE/agent-token" \
    --control-address "$ip:$CONTROL_PORT" --replication-address "$ip:$REPL_PORT" --nbd-address "$ip:$NBD_PORT" \
    --advertise-address "$ip" ${AGENT_ARGS:-}
}

agent_ready() { # NODE: the agent answers and has registered its Lease
  curl -fsS --max-time 2 "http://$(node_ip "$1"):$CONTROL_PORT/healthz" &&
    kubectl -n "$OPNS" get lease "tandem-agent-$1"
}

node_ready() {
  [ "$(kubectl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

start_manager() {
  # shellcheck disable=SC2086
  start_bg manager "$BIN/manager" --namespace "$OPNS" --agent-token-file "$STATE/agent-token" \
    --kubeconfig "$STATE/kube/manager.kubeconfig" \
    --metrics-bind-address "127.0.0.1:$METRICS_PORT" --health-probe-bind-address "127.0.0.1:$PROBE_PORT" \
    --zap-time-encoding rfc3339nano ${MANAGER_ARGS:-}
  WATCH=manager wait_for 30 "the manager's health probe on 127.0.0.1:$PROBE_PORT (see $LOGS/manager.log)" curl -fsS "http://127.0.0.1:$PROBE_PORT/healthz"
}

up_failed() {
  local rc=$?
  trap - EXIT INT TERM
  if [ $rc != 0 ]; then
    printf '%s: up failed (exit %s); cleaning up. Logs are kept in %s\n' "$prog" "$rc" "$LOGS" >&2
    for f in "$LOGS"/*.log; do
      [ -f "$f" ] || continue
      printf -- '--- last lines of %s\n' "${f#"$ROOT"/}" >&2
      tail -n 5 "$f" >&2
    done
    teardown
  fi
  exit $rc
}

cmd_up() {
  command -v openssl >/dev/null || die "openssl is required (Debian: apt-get install openssl)"
  command -v curl >/dev/null || die "curl is required"
  command -v go >/dev/null || die "go is required"
  local mode
  for p in etcd kube-apiserver manager; do
    if alive "$p"; then
      die "a local cluster is already running ($p has pid $(pid_of "$p")); run '$0 down' first"
    fi
  done
  teardown # leftovers of a crashed run
  mode=$(net_mode)
  if [ "$mode" = netns ]; then
    [ "$(id -u)" = 0 ] || die "TANDEM_NETWORK=netns needs root"
    command -v ip >/dev/null || die "iproute2 (ip) is required for network namespaces"
  fi
  trap up_failed EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$STATE" "$LOGS" "$PIDS" "$STATE/kube"
  for f in "$LOGS"/*.log; do [ -f "$f" ] && mv -f "$f" "$f.prev"; done
  build
  echo "$mode" >"$STATE/network"
  for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$METRICS_PORT" "$PROBE_PORT" "$API_PORT"; do
    if port_busy "$port"; then die "port $port is already in use (set TANDEM_API_PORT, TANDEM_ETCD_PORT, TANDEM_MANAGER_*_PORT to move)"; fi
  done
  log "Network: $mode; generating certificates and tokens"
  gen_pki
  net_up
  log "Starting etcd (127.0.0.1:$ETCD_PORT)"
  start_etcd
  log "Starting kube-apiserver (https://$(api_ip):$API_PORT)"
  start_apiserver
  write_kubeconfig "$KUBECONFIG_FILE" admin
  write_kubeconfig "$STATE/kube/manager.kubeconfig" tandem-manager
  for n in "${NODES[@]}"; do write_kubeconfig "$STATE/kube/agent-$n.kubeconfig" "tandem-agent:$n"; done
  install_api
  log "Starting the Node heartbeats and the node-lifecycle stand-in"
  start_bg lifecycle "$BIN/tandem-nodesim" lifecycle --kubeconfig "$KUBECONFIG_FILE"
  for n in "${NODES[@]}"; do start_heartbeat "$n"; done
  for n in "${NODES[@]}"; do WATCH=heartbeat-$n wait_for 30 "Node $n to be Ready (see $LOGS/heartbeat-$n.log)" node_ready "$n"; done
  log "Starting the manager"
  start_manager
  log "Starting the agents"
  for n in "${NODES[@]}"; do start_agent "$n"; done
  for n in "${NODES[@]}"; do WATCH=agent-$n wait_for 30 "the agent on $n to answer and register (see $LOGS/agent-$n.log)" agent_ready "$n"; done
  trap - EXIT INT TERM
  local rel=${KUBECONFIG_FILE#"$ROOT"/}
  cat >&2 <<EOF

Local cluster is up ($mode network).
  API server   https://$(api_ip):$API_PORT   kubeconfig: $rel
  nodes        $(for n in "${NODES[@]}"; do printf '%s=%s ' "$n" "$(node_ip "$n")"; done)
  agents       control :$CONTROL_PORT, replication :$REPL_PORT, NBD :$NBD_PORT on each node address
  logs         ${LOGS#"$ROOT"/}/
Try:
  bin/kubectl --kubeconfig $rel get nodes
  bin/kubectl --kubeconfig $rel apply -f config/samples/storage_v1alpha1_volumepair_async.yaml
  bin/kubectl --kubeconfig $rel get vp -o wide -w
  $0 kill-node node-a
  $0 down
EOF
}

# ---------------------------------------------------------------- other verbs

cmd_down() {
  teardown
  log "Local cluster stopped and cleaned up (logs kept in ${LOGS#"$ROOT"/}/)"
}

link_state() {
  [ "$(net_mode)" = netns ] || {
    echo "loopback"
    return
  }
  ip -o link show "$(veth_name "$1")" 2>/dev/null | grep -q 'state UP\|,UP' && echo up || echo down
}

cmd_status() {
  if [ ! -f "$STATE/network" ]; then
    echo "The local cluster is not running."
    return 1
  fi
  echo "Network: $(net_mode)   API server: https://$(api_ip):$API_PORT   kubeconfig: ${KUBECONFIG_FILE#"$ROOT"/}"
  echo
  printf '%-20s %-8s %s\n' PROCESS PID STATE
  local name p
  for name in etcd kube-apiserver manager lifecycle $(for n in "${NODES[@]}"; do echo "heartbeat-$n agent-$n"; done); do
    p=$(pid_of "$name")
    if ours "$p"; then printf '%-20s %-8s %s\n' "$name" "$p" running; else printf '%-20s %-8s %s\n' "$name" - stopped; fi
  done
  echo
  printf '%-8s %-14s %s\n' NODE ADDRESS LINK
  for n in "${NODES[@]}"; do printf '%-8s %-14s %s\n' "$n" "$(node_ip "$n")" "$(link_state "$n")"; done
  if alive kube-apiserver; then
    echo
    kubectl get nodes -o wide 2>&1 || true
    echo
    kubectl get volumepairs -A -o wide 2>&1 || true
  fi
}

cmd_kill_node() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  stop_proc "agent-$n" KILL
  stop_proc "heartbeat-$n" KILL
  if [ "$(net_mode)" = netns ]; then
    ip link set "$(veth_name "$n")" down
  fi
  # What the node-lifecycle controller would do after its grace period.
  "$BIN/tandem-nodesim" mark-unknown --kubeconfig "$KUBECONFIG_FILE" --node "$n" ||
    log "warning: could not mark Node $n Ready=Unknown"
  if [ "$(net_mode)" = netns ]; then
    log "Node $n killed: agent SIGKILLed, heartbeats stopped (Ready=Unknown), link $(veth_name "$n") down"
  else
    log "Node $n killed: agent SIGKILLed, heartbeats stopped (Ready=Unknown); loopback network: no link to cut"
  fi
}

cmd_restore_node() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  if [ "$(net_mode)" = netns ]; then
    ip link set "$(veth_name "$n")" up
  fi
  alive "heartbeat-$n" || start_heartbeat "$n"
  if alive "agent-$n"; then
    log "The agent on $n is already running (pid $(pid_of "agent-$n"))"
  else
    start_agent "$n"
  fi
  WATCH=agent-$n wait_for 30 "the agent on $n to answer and register (see $LOGS/agent-$n.log)" agent_ready "$n"
  WATCH=heartbeat-$n wait_for 30 "Node $n to be Ready" node_ready "$n"
  log "Node $n restored: link up, agent (same data dir $(node_dir "$n" | sed "s|^$ROOT/||")) and heartbeats running"
}

cmd_partition() {
  local n=$1 up=$2
  node_index "$n" >/dev/null
  require_up
  [ "$(net_mode)" = netns ] ||
    die "partition/heal need the netns network (run 'up' as root); on loopback the nodes are not isolated"
  if [ "$up" = 1 ]; then
    ip link set "$(veth_name "$n")" up
    log "Node $n healed: link $(veth_name "$n") up"
  else
    ip link set "$(veth_name "$n")" down
    log "Node $n partitioned: link $(veth_name "$n") down (its agent and heartbeat keep running, cut off)"
  fi
}

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

cmd_cut() {
  local n=$1 peer=$2
  node_index "$n" >/dev/null
  node_index "$peer" >/dev/null
  [ "$n" != "$peer" ] || die "cut wants two different nodes"
  require_up
  need_netns
  add_cut "$n" to "$(node_ip "$peer")"
  add_cut "$peer" to "$(node_ip "$n")"
  log "Cut $n <-> $peer (policy routing; API server and manager still reachable)"
}

cmd_cut_api() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  need_netns
  add_cut "$n" to "$(api_ip)" ipproto tcp dport "$API_PORT"
  log "Cut $n -> API server $(api_ip):$API_PORT (agent and heartbeat cannot reach it)"
}

cmd_cut_control() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  need_netns
  add_cut "$n" to "$(api_ip)" ipproto tcp sport "$CONTROL_PORT"
  log "Cut manager <-> control API of $n (replies from :$CONTROL_PORT to $(api_ip) dropped)"
}

cmd_heal() {
  local n=$1 other
  node_index "$n" >/dev/null
  require_up
  need_netns
  ip link set "$(veth_name "$n")" up
  del_cuts "$n"
  for other in "${NODES[@]}"; do
    [ "$other" = "$n" ] || del_cuts "$other" to "$(node_ip "$n")"
  done
  log "Node $n healed: link $(veth_name "$n") up, no cut rules involving it"
}

cmd_replica_path() {
  local n=$1 ref=$2
  node_index "$n" >/dev/null
  [[ $ref == */* ]] || die "replica-path wants NAMESPACE/NAME, got '$ref'"
  local p
  p="$(node_dir "$n")/volumes/${ref%%/*}/${ref#*/}/data"
  echo "$p"
  [ -f "$p" ] || {
    printf '%s: warning: %s does not exist (yet)\n' "$prog" "$p" >&2
    return 1
  }
}

cmd_env() {
  require_up
  echo "KUBECONFIG=$KUBECONFIG_FILE"
  echo "TANDEM_NETWORK=$(net_mode)"
  echo "TANDEM_AGENT_TOKEN_FILE=$STATE/agent-token"
  echo "TANDEM_NAMESPACE=$OPNS"
  for n in "${NODES[@]}"; do
    echo "TANDEM_$(echo "${n#node-}" | tr '[:lower:]' '[:upper:]')_IP=$(node_ip "$n")"
  done
}

cmd_kill_agent() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  stop_proc "agent-$n" KILL
  log "Agent on $n SIGKILLed (link and heartbeat untouched)"
}

cmd_start_agent() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  alive "agent-$n" || start_agent "$n"
  WATCH=agent-$n wait_for 30 "the agent on $n to answer and register (see $LOGS/agent-$n.log)" agent_ready "$n"
  log "Agent on $n running"
}

cmd_kill_manager() {
  require_up
  stop_proc manager KILL
  log "Manager SIGKILLed"
}

cmd_start_manager() {
  require_up
  if alive manager; then
    log "The manager is already running (pid $(pid_of manager))"
    return
  fi
  start_manager
  log "Manager running"
}

need_node_arg() { [ -n "${1:-}" ] || die "usage: $prog $verb NODE (one of ${NODES[*]})"; }

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
  [ $# -eq 2 ] || die "usage: $prog cut NODE PEER"
  cmd_cut "$1" "$2"
  ;;
cut-api) need_node_arg "$@" && cmd_cut_api "$1" ;;
cut-control) need_node_arg "$@" && cmd_cut_control "$1" ;;
replica-path)
  [ $# -eq 2 ] || die "usage: $prog replica-path NODE NAMESPACE/NAME"
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
  printf '%s: unknown verb %s\n\n' "$prog" "$verb" >&2
  usage >&2
  exit 2
  ;;
esac

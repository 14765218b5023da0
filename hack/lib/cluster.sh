# shellcheck shell=bash
# Part of hack/local-cluster.sh (sourced; not run on its own): the verbs on
# the whole cluster. up (build, credentials, network, etcd, kube-apiserver,
# then the real nodes and Tandem's Pods (kubelet.sh), or the API objects,
# heartbeats, manager and agents as processes; cleans up after itself when a
# step fails), down, status, env, replica-path and procs.

build() {
  log "Building bin/manager, bin/agent and bin/tandem-nodesim"
  (cd "$ROOT" && go build -o "$BIN/manager" ./cmd/manager && go build -o "$BIN/agent" ./cmd/agent &&
    go build -o "$BIN/tandem-nodesim" ./hack/localcluster/nodesim)
  if [ ! -x "$BIN/etcd" ] || [ ! -x "$BIN/kube-apiserver" ] || [ ! -x "$BIN/kubectl" ]; then
    log "Building etcd, kube-apiserver and kubectl from source (first time only: about 10 minutes on 2 cores)"
  fi
  "$ROOT/hack/tools.sh" etcd kubernetes
  if [ "$(node_mode)" = kubelet ]; then
    log "Building kubelet, kube-scheduler and kube-controller-manager (first time only: about 2 minutes after kube-apiserver) and Tandem's images (make image)"
    "$ROOT/hack/tools.sh" kubernetes-node
    [ "${TANDEM_INSTALL:-kustomize}" != helm ] || "$ROOT/hack/tools.sh" helm
    make -C "$ROOT" --no-print-directory image >"$LOGS/image.log" 2>&1 || die "make image failed: $(tail -n 5 "$LOGS/image.log")"
  fi
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
  # Nodes, read for the agents' NBD allow-list (agent_role.yaml's ClusterRole).
  kubectl create clusterrolebinding tandem-agent-nodes-local --clusterrole tandem-agent-nodes --group tandem:agents >/dev/null
  # The agents' shared token, where the kubectl plugin (and the Helm chart)
  # expect it.
  kubectl -n "$OPNS" create secret generic tandem-agent-token --from-file=token="$STATE/agent-token" >/dev/null
  wait_for 30 "the VolumePair CRD to be established" kubectl wait --for condition=Established --timeout 5s crd/volumepairs.storage.tandem.dev
}

# teardown stops every process this checkout's cluster started, then removes
# the namespaces, links and state (but the logs). Tolerates missing pieces.
teardown() {
  stop_nodes
  stop_all
  remove_node_cgroups
  restore_sysctls
  net_down
  # Keep the logs of the last run for post-mortems.
  if [ -d "$STATE" ]; then
    find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  fi
}

up_failed() {
  local rc=$?
  trap - EXIT INT TERM
  if [ $rc != 0 ]; then
    printf '%s: up failed (exit %s); cleaning up. Logs are kept in %s\n' "$PROG" "$rc" "$LOGS" >&2
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
  if [ "$(node_mode)" = kubelet ]; then
    [ "$mode" = netns ] ||
      die "real nodes (TANDEM_NODES=kubelet, the default) need the netns network (root and iproute2): each node is a network namespace; TANDEM_NODES=process runs without"
    local c
    for c in containerd runc ctr iptables nsenter unshare; do
      command -v "$c" >/dev/null || die "$c is required for the nodes (Debian: apt-get install containerd runc containernetworking-plugins iptables util-linux)"
    done
    if [ ! -x /usr/lib/cni/bridge ] || [ ! -x /usr/lib/cni/host-local ]; then
      die "the CNI plugins are required in /usr/lib/cni (Debian: apt-get install containernetworking-plugins)"
    fi
  fi
  if [ "$mode" = netns ]; then
    [ "$(id -u)" = 0 ] || die "TANDEM_NETWORK=netns needs root"
    command -v ip >/dev/null || die "iproute2 (ip) is required for network namespaces"
  fi
  trap up_failed EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$STATE" "$LOGS" "$PIDS" "$STATE/kube"
  for f in "$LOGS"/*.log; do [ -f "$f" ] && mv -f "$f" "$f.prev"; done
  if [ -d "$LOGS/nodes" ]; then rm -rf "$LOGS/nodes.prev" && mv "$LOGS/nodes" "$LOGS/nodes.prev"; fi
  build
  echo "$mode" >"$STATE/network"
  node_mode >"$STATE/nodes-mode.tmp" && mv "$STATE/nodes-mode.tmp" "$STATE/nodes-mode"
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
  if [ "$(node_mode)" = kubelet ]; then
    up_kubelet_nodes
  else
    up_process_nodes
  fi
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

# up_process_nodes: the manager and the agents as processes, the Nodes'
# heartbeats simulated.
up_process_nodes() {
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
}

cmd_down() {
  teardown
  log "Local cluster stopped and cleaned up (logs kept in ${LOGS#"$ROOT"/}/)"
}

cmd_status() {
  if [ ! -f "$STATE/network" ]; then
    echo "The local cluster is not running."
    return 1
  fi
  echo "Nodes: $(node_mode)   Network: $(net_mode)   API server: https://$(api_ip):$API_PORT   kubeconfig: ${KUBECONFIG_FILE#"$ROOT"/}"
  echo
  printf '%-24s %-8s %s\n' PROCESS PID STATE
  local name p
  local names
  if [ "$(node_mode)" = kubelet ]; then
    names="etcd kube-apiserver kube-controller-manager kube-scheduler $(for n in "${NODES[@]}"; do echo "holder-$n containerd-$n kubelet-$n"; done)"
  else
    names="etcd kube-apiserver manager lifecycle $(for n in "${NODES[@]}"; do echo "heartbeat-$n agent-$n"; done)"
  fi
  for name in $names; do
    p=$(pid_of "$name")
    if ! ours "$p"; then
      printf '%-24s %-8s %s\n' "$name" - stopped
    elif [ "$(awk '{sub(/^.*\) /, ""); print $1}' "/proc/$p/stat" 2>/dev/null)" = T ]; then
      printf '%-24s %-8s %s\n' "$name" "$p" "paused (kill-agent; start-agent resumes it)"
    else
      printf '%-24s %-8s %s\n' "$name" "$p" running
    fi
  done
  echo
  printf '%-8s %-14s %s\n' NODE ADDRESS LINK
  for n in "${NODES[@]}"; do printf '%-8s %-14s %s\n' "$n" "$(node_ip "$n")" "$(link_state "$n")"; done
  if alive kube-apiserver; then
    echo
    kubectl get nodes -o wide 2>&1 || true
    echo
    [ "$(node_mode)" = process ] || { echo; kubectl -n "$OPNS" get pods -o wide 2>&1 || true; }
    echo
    kubectl get volumepairs -A -o wide 2>&1 || true
  fi
}

cmd_replica_path() {
  local n=$1 ref=$2
  node_index "$n" >/dev/null
  [[ $ref == */* ]] || die "replica-path wants NAMESPACE/NAME, got '$ref'"
  local p
  p="$(node_data_dir "$n")/volumes/${ref%%/*}/${ref#*/}/data"
  echo "$p"
  [ -f "$p" ] || {
    printf '%s: warning: %s does not exist (yet)\n' "$PROG" "$p" >&2
    return 1
  }
}

# cmd_procs prints NAME PID METRICS_URL for the manager (the leader, with
# real nodes) and each node's agent: what the load test samples.
cmd_procs() {
  require_up
  local n p
  if [ "$(node_mode)" = kubelet ]; then
    local leader pod ip node
    leader=$(kubectl -n "$OPNS" get lease tandem-manager.storage.tandem.dev -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
    pod=${leader%%_*}
    if [ -n "$pod" ]; then
      read -r ip node <<<"$(kubectl -n "$OPNS" get pod "$pod" -o jsonpath='{.status.podIP} {.spec.nodeName}' 2>/dev/null)"
      p=""
      [ -z "$node" ] || p=$(container_pids "$node" /usr/local/bin/manager | awk '{print $1}')
      [ -z "$p" ] || [ -z "$ip" ] || echo "manager $p http://$ip:8080/metrics"
    fi
    for n in "${NODES[@]}"; do
      p=$(container_pids "$n" /usr/local/bin/agent | awk '{print $1}')
      [ -z "$p" ] || echo "agent-$n $p http://$(node_ip "$n"):$CONTROL_PORT/metrics"
    done
    return 0
  fi
  alive manager && echo "manager $(pid_of manager) http://127.0.0.1:$METRICS_PORT/metrics"
  for n in "${NODES[@]}"; do
    alive "agent-$n" && echo "agent-$n $(pid_of "agent-$n") http://$(node_ip "$n"):$CONTROL_PORT/metrics"
  done
  return 0
}

cmd_env() {
  require_up
  echo "KUBECONFIG=$KUBECONFIG_FILE"
  echo "TANDEM_NETWORK=$(net_mode)"
  echo "TANDEM_NODES=$(node_mode)"
  echo "TANDEM_AGENT_TOKEN_FILE=$STATE/agent-token"
  echo "TANDEM_NAMESPACE=$OPNS"
  for n in "${NODES[@]}"; do
    echo "TANDEM_$(echo "${n#node-}" | tr '[:lower:]' '[:upper:]')_IP=$(node_ip "$n")"
  done
}

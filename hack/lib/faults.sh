# shellcheck shell=bash
# Part of hack/local-cluster.sh (sourced; not run on its own): the fault
# verbs. Killing and restoring a node, its agent or the manager, and (netns
# network only) the cuts: a node's whole link (partition, heal) or one path
# (cut, cut-api, cut-control; policy-routing rules, see netns.sh).

cmd_kill_node() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  if [ "$(node_mode)" = kubelet ]; then
    kill_node_tasks "$n"
    ip link set "$(veth_name "$n")" down
    rm -f "$PIDS/holder-$n.pid" "$PIDS/containerd-$n.pid" "$PIDS/kubelet-$n.pid"
    log "Node $n killed: kubelet, containerd and every container on it SIGKILLed (cgroup /$(node_cgroup "$n") frozen first), link $(veth_name "$n") down"
    return
  fi
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
  if [ "$(node_mode)" = kubelet ]; then
    ip link set "$(veth_name "$n")" up
    if alive "kubelet-$n"; then
      # A kill-agent may have paused it.
      kill -CONT "$(pid_of "kubelet-$n")"
      log "Node $n is already running (kubelet pid $(pid_of "kubelet-$n"))"
    else
      start_node "$n"
    fi
    WATCH=kubelet-$n wait_for 120 "Node $n to be Ready (see $LOGS/kubelet-$n.log)" node_ready "$n"
    wait_for 120 "the agent on $n to answer and register" agent_ready "$n"
    log "Node $n restored: link up, containerd and kubelet running, agent Pod ready (same disk $(node_root "$n" | sed "s|^$ROOT/||"))"
    return
  fi
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
  if [ "$(node_mode)" = kubelet ]; then
    # The managers are Pods: their requests come from a node's address
    # (masqueraded) or, on this node, from its Pod network.
    add_cut "$n" to "$NODE_NETWORK" ipproto tcp sport "$CONTROL_PORT"
    add_cut "$n" to "$POD_NETWORK" ipproto tcp sport "$CONTROL_PORT"
    log "Cut managers <-> control API of $n (replies from :$CONTROL_PORT to the nodes, the host and the Pods dropped)"
    return
  fi
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

cmd_kill_agent() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  if [ "$(node_mode)" = kubelet ]; then
    local p
    p=$(container_pids "$n" /usr/local/bin/agent)
    [ -n "$p" ] || die "no agent container process on $n"
    # The agent stays down until start-agent: the node's kubelet, which
    # would restart it within 2 s, is paused (SIGSTOP) meanwhile; its Node
    # heartbeats pause with it (NotReady after the grace period, 50 s).
    kill -STOP "$(pid_of "kubelet-$n")"
    # shellcheck disable=SC2086 # one or more pids
    kill -KILL $p
    # SIGKILL is delivered asynchronously: the agent is down when its
    # processes are gone, not when kill returns (a test wipes its disk next;
    # a dying agent must not answer or write after that).
    # shellcheck disable=SC2086
    wait_for 10 "the agent on $n (pid $p) to exit" all_gone $p
    log "Agent container on $n SIGKILLed (pid $p); kubelet-$n paused until start-agent"
    return
  fi
  stop_proc "agent-$n" KILL
  log "Agent on $n SIGKILLed (link and heartbeat untouched)"
}

cmd_start_agent() {
  local n=$1
  node_index "$n" >/dev/null
  require_up
  if [ "$(node_mode)" = kubelet ]; then
    local k
    k=$(pid_of "kubelet-$n")
    ours "$k" || die "node $n is down (no kubelet): restore-node $n"
    kill -CONT "$k"
    wait_for 120 "the agent on $n to answer and register (its kubelet restarts it)" agent_ready "$n"
    log "Agent on $n running (kubelet-$n resumed)"
    return
  fi
  alive "agent-$n" || start_agent "$n"
  WATCH=agent-$n wait_for 30 "the agent on $n to answer and register (see $LOGS/agent-$n.log)" agent_ready "$n"
  log "Agent on $n running"
}

cmd_kill_manager() {
  require_up
  if [ "$(node_mode)" = kubelet ]; then
    local n p all=""
    for n in "${NODES[@]}"; do
      p=$(container_pids "$n" /usr/local/bin/manager)
      all+=" $p"
    done
    # Every manager crashes and stays down until start-manager: SIGKILL,
    # and the Deployment scaled to 0 so that no kubelet restarts them (one
    # restarted before its Pod's deletion arrives cannot lead: the dead
    # leader's lease has not run out).
    # shellcheck disable=SC2086 # one or more pids
    [ -z "${all// /}" ] || kill -KILL $all
    kubectl -n "$OPNS" get deployment tandem-manager -o jsonpath='{.spec.replicas}' >"$STATE/manager-replicas"
    kubectl -n "$OPNS" scale deployment tandem-manager --replicas 0 >/dev/null
    log "Managers SIGKILLed (pids${all:- none}); Deployment scaled to 0 until start-manager"
    return
  fi
  stop_proc manager KILL
  log "Manager SIGKILLed"
}

cmd_start_manager() {
  require_up
  if [ "$(node_mode)" = kubelet ]; then
    local want
    want=$(cat "$STATE/manager-replicas" 2>/dev/null || echo 2)
    [ "$want" -gt 0 ] 2>/dev/null || want=2
    kubectl -n "$OPNS" scale deployment tandem-manager --replicas "$want" >/dev/null
    wait_for 120 "the manager Deployment to be available" kubectl -n "$OPNS" rollout status deployment/tandem-manager --timeout 2s
    log "Managers running ($want replicas)"
    return
  fi
  if alive manager; then
    log "The manager is already running (pid $(pid_of manager))"
    return
  fi
  start_manager
  log "Manager running"
}

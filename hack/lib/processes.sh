# shellcheck shell=bash
# Part of hack/local-cluster.sh (sourced; not run on its own): the processes
# of the cluster. Each one is started detached with its pid in
# .local/pids/NAME.pid and its output in .local/logs/NAME.log; a pid counts as
# ours only while its command line names this checkout's .local/, so a stale
# pid file never makes us signal a stranger. Then how each component is
# started (etcd, kube-apiserver, the heartbeats, the agents, the manager) and
# how `down` stops them all.

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

# all_gone PID...: none of the processes runs any more (gone, or a zombie
# that only awaits its parent's wait).
all_gone() {
  local p st
  for p in "$@"; do
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) || continue
    [ -z "$st" ] || [ "$st" = Z ] || return 1
  done
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

# stop_all stops every process this checkout's cluster started (by recorded
# pid; as a safety net also any process in our namespaces or running one of
# bin/'s binaries with our state dir on its command line), and forgets their
# pid files. Tolerates missing pieces.
stop_all() {
  local procs=() p exe name
  # Stop in dependency order, gently first.
  # shellcheck disable=SC2012 # the pid files are named by this script (NAME.pid, no spaces)
  for name in $({ ls "$PIDS" 2>/dev/null || true; } | sed -n 's/\.pid$//p' | sort -r); do
    case $name in kube-apiserver | etcd) continue ;; esac
    p=$(pid_of "$name")
    ours "$p" && procs+=("$p")
  done
  for p in $(netns_pids); do procs+=("$p"); done
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case $exe in
    "$BIN"/agent* | "$BIN"/manager* | "$BIN"/tandem-nodesim* | "$BIN"/kube-controller-manager* | "$BIN"/kube-scheduler* | "$BIN"/kubelet*) ours "${p#/proc/}" && procs+=("${p#/proc/}") ;;
    esac
  done
  kill_all "${procs[@]}"
  # Then the API server, then etcd (an API server whose etcd is gone shuts
  # down slowly).
  for name in kube-apiserver etcd; do
    procs=()
    p=$(pid_of "$name")
    ours "$p" && procs+=("$p")
    for p in /proc/[0-9]*; do
      exe=$(readlink "$p/exe" 2>/dev/null) || continue
      [[ $exe == "$BIN/$name"* ]] && ours "${p#/proc/}" && procs+=("${p#/proc/}")
    done
    kill_all "${procs[@]}"
  done
  rm -rf "$PIDS"
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
  # Aggregator routing: there is no kube-proxy, so the API server calls a
  # webhook's Service (Tandem's Pod placement webhook) at the address of one
  # of its ready Pods, which the host routes to, instead of its ClusterIP.
  start_bg kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$ip" --advertise-address "$ip" --secure-port "$API_PORT" --endpoint-reconciler-type none \
    --cert-dir "$PKI" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" --token-auth-file "$PKI/tokens.csv" \
    --authorization-mode "$([ "$(node_mode)" = kubelet ] && echo Node,RBAC || echo RBAC)" \
    --enable-admission-plugins NodeRestriction \
    --kubelet-client-certificate "$PKI/kubelet-client.crt" --kubelet-client-key "$PKI/kubelet-client.key" --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true --enable-aggregator-routing=true
  local admin
  admin=$(token_of admin)
  WATCH=kube-apiserver wait_for 120 "kube-apiserver to be ready on https://$ip:$API_PORT (see $LOGS/kube-apiserver.log)" \
    curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $admin" "https://$ip:$API_PORT/readyz"
}

start_heartbeat() {
  local n=$1
  # shellcheck disable=SC2046 # the prefix is a command (ip netns exec NS) or nothing: split it into words
  start_bg "heartbeat-$n" $(in_node_prefix "$n") "$BIN/tandem-nodesim" heartbeat --kubeconfig "$KUBECONFIG_FILE" --node "$n" --address "$(node_ip "$n")"
}

# host_client_address: where the stories' NBD clients connect from (the
# host): the bridge's address, or loopback. The agents' NBD allow-list
# (default: the cluster's nodes) admits it as well.
host_client_address() { if [ "$(net_mode)" = netns ]; then echo "$BRIDGE_IP"; else echo 127.0.0.1; fi; }

start_agent() {
  local n=$1 ip
  ip=$(node_ip "$n")
  mkdir -p "$(node_dir "$n")"
  # shellcheck disable=SC2046,SC2086
  start_bg "agent-$n" $(in_node_prefix "$n") "$BIN/agent" --node "$n" --data-dir "$(node_dir "$n")" \
    --namespace "$OPNS" --kubeconfig "$STATE/kube/agent-$n.kubeconfig" --token-file "$STATE/agent-token" \
    --control-address "$ip:$CONTROL_PORT" --replication-address "$ip:$REPL_PORT" --nbd-address "$ip:$NBD_PORT" \
    --advertise-address "$ip" --nbd-allowed-clients "nodes,$(host_client_address)" ${AGENT_ARGS:-}
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

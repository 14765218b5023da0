# shellcheck shell=bash
# Part of hack/local-cluster.sh (sourced; not run on its own): real nodes
# (TANDEM_NODES=kubelet). Per node a containerd and a kubelet built from
# source, inside the node's network namespace and a mount namespace of its own;
# the control plane's kube-controller-manager and kube-scheduler; Tandem
# installed from its manifests (config/default, or the Helm chart with
# TANDEM_INSTALL=helm); killing a node is freezing and SIGKILLing everything
# in its cgroup.
#
# A node is three things the host keeps apart:
#   - its network namespace tandem-<node> (netns.sh), where containerd, the
#     kubelet, the host-network Pods (the agent) and the node's Pod bridge
#     (cni0, 10.244.<i>.0/24, masqueraded to the node's address) live;
#   - a mount namespace, held by a "holder" process, in which
#     .local/nodes/<node>/root/{var/lib,run} are mounted over /var/lib and /run,
#     and .local/logs/nodes/<node> over /var/log: the kubelet's and
#     containerd's state, the hostPath /var/lib/tandem (the agent's data dir)
#     and every mount they make (secret tmpfs, Pod network namespaces) are the
#     node's own and vanish with the namespace; the Pods' logs
#     (/var/log/pods/<namespace>_<pod>_<uid>/<container>/N.log) outlive
#     `down` with the other logs;
#   - a cgroup /tandem-<node> in every hierarchy: the holder, containerd (and
#     so its shims) and the kubelet in /tandem-<node>/system, the Pods under
#     the kubelet's cgroupRoot /tandem-<node> (kubepods...). kill-node freezes
#     that tree, SIGKILLs every task in it and thaws it: the node is gone at
#     once, nothing of it keeps running.
#
# What the host keeps of it, and `down` restores: the sysctls the kubelet sets
# (kernel.panic, kernel.panic_on_oops, vm.overcommit_memory; saved in
# .local/sysctls before the first kubelet starts) and the cgroup directories.
# The kubelet's iptables chains and the bridge plugin's ip_forward are in the
# node's network namespace and go with it.
#
# There is no kube-proxy: the one Service the Pods use, "kubernetes"
# (10.0.0.1:443), is DNATed to the API server in each node's namespace.

NODE_SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory)
SANDBOX_IMAGE=tandem.local/pause:1
SERVICE_IP=10.0.0.1

# node_mode: process (the agents as processes, Node heartbeats simulated) or
# kubelet (real nodes); fixed by `up` for the cluster's lifetime.
node_mode() {
  if [ -f "$STATE/nodes-mode" ]; then
    cat "$STATE/nodes-mode"
    return
  fi
  case ${TANDEM_NODES:-kubelet} in
  process | kubelet) echo "${TANDEM_NODES:-kubelet}" ;;
  *) die "TANDEM_NODES must be process or kubelet (got '$TANDEM_NODES')" ;;
  esac
}

node_root() { echo "$(node_dir "$1")/root"; }
# The agent's data dir as the host sees it.
node_data_dir() { if [ "$(node_mode)" = kubelet ]; then echo "$(node_root "$1")/var/lib/tandem"; else node_dir "$1"; fi; }
node_cgroup() { echo "tandem-$1"; }
pod_cidr() { echo "10.244.$(node_index "$1").0/24"; }

# cgroup_hierarchies: the mounted cgroup hierarchies (v1 controllers, and the
# v2 "unified" one of a hybrid host).
cgroup_hierarchies() { awk '$3 == "cgroup" || $3 == "cgroup2" {print $2}' /proc/mounts; }

# make_node_cgroups NODE: /tandem-NODE and /tandem-NODE/system in every
# hierarchy (cpuset needs cpus and mems before a task may join).
make_node_cgroups() {
  local h d cg
  cg=$(node_cgroup "$1")
  for h in $(cgroup_hierarchies); do
    for d in "$h/$cg" "$h/$cg/system"; do
      mkdir -p "$d"
      if [ -f "$d/cpuset.cpus" ]; then
        cat "$(dirname "$d")/cpuset.cpus" >"$d/cpuset.cpus"
        cat "$(dirname "$d")/cpuset.mems" >"$d/cpuset.mems"
      fi
    done
  done
}

# node_tasks NODE: every task in the node's cgroup tree (pids hierarchy, or the
# first one that has the tree).
node_tasks() {
  local h cg
  cg=$(node_cgroup "$1")
  for h in $(cgroup_hierarchies); do
    [ -d "$h/$cg" ] || continue
    find "$h/$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
    return
  done
}

# node_fuse_conns NODE: the FUSE connections of the volumes the node's CSI
# node plugin serves (mounts of type fuse.tandem in its tasks' mount
# namespaces; the connection's number is the mount's minor device number).
node_fuse_conns() {
  local p
  for p in $(node_tasks "$1"); do
    # A task may exit meanwhile, or be a zombie (a CNI plugin its parent
    # has not reaped yet): it has no mount table to read.
    awk '$0 ~ / - fuse\.tandem / { split($3, d, ":"); print d[2] }' "/proc/$p/mountinfo" 2>/dev/null || true
  done | sort -u
}

# abort_fuse_conns IDS: abort those FUSE connections (fusectl, mounted for
# the purpose when it is not). A node plugin killed while one of its own
# threads waits on a volume it serves (an unmount flushing through the loop
# device) cannot finish dying: the kernel holds that thread until the
# connection goes. Aborting it fails the pending I/O and lets it go, and the
# loop device clears itself.
abort_fuse_conns() {
  local c mounted=0
  if ! grep -q ' /sys/fs/fuse/connections fusectl ' /proc/mounts; then
    mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null && mounted=1
  fi
  for c in $1; do
    [ -w "/sys/fs/fuse/connections/$c/abort" ] && echo 1 >"/sys/fs/fuse/connections/$c/abort" 2>/dev/null
  done
  [ "$mounted" = 0 ] || umount /sys/fs/fuse/connections 2>/dev/null || true
}

# kill_node_tasks NODE: freeze the node's tree, SIGKILL every task, thaw,
# abort the FUSE connections its node plugin served, and wait (≤10 s) until
# it is empty.
kill_node_tasks() {
  local n=$1 cg fz p
  cg=$(node_cgroup "$n")
  fz=""
  for h in $(cgroup_hierarchies); do
    [ -f "$h/$cg/freezer.state" ] && fz="$h/$cg/freezer.state"
  done
  [ -n "$fz" ] && echo FROZEN >"$fz" 2>/dev/null
  local conns
  conns=$(node_fuse_conns "$n")
  for p in $(node_tasks "$n"); do kill -KILL "$p" 2>/dev/null || true; done
  [ -n "$fz" ] && echo THAWED >"$fz" 2>/dev/null
  [ -z "$conns" ] || abort_fuse_conns "$conns"
  for _ in $(seq 100); do
    [ -z "$(node_tasks "$n")" ] && return 0
    for p in $(node_tasks "$n"); do kill -KILL "$p" 2>/dev/null || true; done
    sleep 0.1
  done
  log "warning: tasks left in cgroup $cg: $(node_tasks "$n" | tr '\n' ' ')"
}

# remove_node_cgroups: every /tandem-node-* cgroup directory, deepest first
# (after their tasks are gone).
remove_node_cgroups() {
  local h
  for h in $(cgroup_hierarchies); do
    for d in "$h"/tandem-node-*; do
      [ -d "$d" ] || continue
      find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
  done
}

save_sysctls() {
  [ -f "$STATE/sysctls" ] && return 0
  local k
  for k in "${NODE_SYSCTLS[@]}"; do echo "$k=$(sysctl -n "$k")"; done >"$STATE/sysctls.tmp"
  mv "$STATE/sysctls.tmp" "$STATE/sysctls"
}

restore_sysctls() {
  [ -f "$STATE/sysctls" ] || return 0
  local kv
  while read -r kv; do
    [ -n "$kv" ] && sysctl -q -w "$kv" >/dev/null
  done <"$STATE/sysctls"
  rm -f "$STATE/sysctls"
}

# node_run NODE CMD...: run CMD in the node's cgroup, mount and network
# namespaces (hack/localcluster/in-node).
node_run() {
  local n=$1 holder
  shift
  holder=$(pid_of "holder-$n")
  ours "$holder" || die "node $n is not running (no mount namespace holder)"
  "$ROOT/hack/localcluster/in-node" "$(node_cgroup "$n")" "$holder" "$(netns_name "$n")" "$@"
}

write_node_config() {
  local n=$1 d ip
  d=$(node_dir "$n")
  ip=$(node_ip "$n")
  mkdir -p "$d/cni" "$(node_root "$n")"/{var/lib/tandem,var/lib/kubelet,run} "$LOGS/nodes/$n"
  cat >"$d/containerd.toml" <<EOF
# containerd for $n; paths are inside the node's mount namespace.
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$SANDBOX_IMAGE"
  # root here lacks CAP_SYS_RESOURCE: without this, runc fails to lower
  # a container's oom_score_adj ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni"
EOF
  cat >"$d/cni/10-tandem.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "tandem-pods",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$(pod_cidr "$n")"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This kernel mounts cgroup v1 hierarchies.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$(node_cgroup "$n")
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
# No cluster DNS: Pods resolve with the host's resolv.conf.
resolvConf: /etc/resolv.conf
# The images exist only in this node's containerd (nothing can pull them
# again): never collect them, and do not evict on a busy build disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
# A killed container (kill-agent) comes back within 2 s, not after minutes of
# crash-loop back-off.
crashLoopBackOff: {maxContainerRestartPeriod: 2s}
nodeStatusReportFrequency: 10s
EOF
  write_kubeconfig "$d/kubelet.kubeconfig" "system:node:$n"
}

# node_netns_setup NODE: what kube-proxy would do for the one Service the Pods
# use, and a route to reach it.
node_netns_setup() {
  local n=$1 ns
  ns=$(netns_name "$n")
  ip -n "$ns" route add "$SERVICE_IP/32" via "$BRIDGE_IP"
  # The node's Pods, from the host and the other nodes (gone with the bridge
  # and the namespaces).
  ip route add "$(pod_cidr "$n")" via "$(node_ip "$n")" dev "$BRIDGE"
  local other
  for other in "${NODES[@]}"; do
    [ "$other" = "$n" ] || ip -n "$ns" route add "$(pod_cidr "$other")" via "$(node_ip "$other")"
  done
  local chain
  for chain in PREROUTING OUTPUT; do
    ip netns exec "$ns" iptables -w -t nat -A "$chain" -d "$SERVICE_IP/32" -p tcp --dport 443 \
      -j DNAT --to-destination "$(api_ip):$API_PORT" -m comment --comment "tandem local cluster: Service kubernetes"
  done
}

start_holder() {
  local n=$1 h cg
  cg=$(node_cgroup "$n")
  : >"$(node_dir "$n")/holder"
  # tail -f on a file that never grows: a process that waits forever and
  # names this checkout's state on its command line (so `ours` knows it).
  start_bg "holder-$n" unshare --mount --propagation slave tail -f "$(node_dir "$n")/holder"
  local pid
  pid=$(pid_of "holder-$n")
  for h in $(cgroup_hierarchies); do
    [ -f "$h/$cg/system/cgroup.procs" ] && echo "$pid" >"$h/$cg/system/cgroup.procs"
  done
  # Wait until unshare has exec'd tail inside the new namespace.
  for _ in $(seq 50); do
    [ "$(readlink "/proc/$pid/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] && break
    sleep 0.05
  done
  local r
  r=$(node_root "$n")
  # /var/lib shared within the node (still a slave of the host's mounts):
  # the CSI node plugin's mounts for Pods (Bidirectional, under
  # /var/lib/kubelet) must reach the kubelet, as on a real node.
  nsenter -t "$pid" -m -- sh -c "mount --bind '$r/var/lib' /var/lib && mount --make-rshared /var/lib && mount --bind '$LOGS/nodes/$n' /var/log && mount --bind '$r/run' /run"
}

start_node() {
  local n=$1
  # /run is a tmpfs on a real node: a node that comes back (restore-node)
  # starts without the runtime state of its last life.
  rm -rf "$(node_root "$n")/run" && mkdir -p "$(node_root "$n")/run"
  make_node_cgroups "$n"
  start_holder "$n"
  local in_node=("$ROOT/hack/localcluster/in-node" "$(node_cgroup "$n")" "$(pid_of "holder-$n")" "$(netns_name "$n")")
  start_bg "containerd-$n" "${in_node[@]}" containerd --config "$(node_dir "$n")/containerd.toml"
  WATCH=containerd-$n wait_for 30 "containerd on $n (see $LOGS/containerd-$n.log)" node_run "$n" ctr --address /run/containerd/containerd.sock version
  local img
  for img in "$IMAGES"/*.tar; do
    node_run "$n" ctr --address /run/containerd/containerd.sock -n k8s.io images import "$img" >/dev/null ||
      die "could not import $img into $n's containerd"
  done
  start_bg "kubelet-$n" "${in_node[@]}" "$BIN/kubelet" --config "$(node_dir "$n")/kubelet.yaml" \
    --kubeconfig "$(node_dir "$n")/kubelet.kubeconfig" --hostname-override "$n" --node-ip "$(node_ip "$n")" \
    --cert-dir "$(node_dir "$n")/pki" --v 1
}

start_kcm() {
  start_bg kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$STATE/kube/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-name tandem-local --controllers '*'
}

start_scheduler() {
  start_bg kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$STATE/kube/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false
}

# install_tandem: Tandem from its own manifests, the image being the one
# `make image` built (imported into every node, never pulled).
install_tandem() {
  kubectl create namespace "$OPNS" >/dev/null
  kubectl -n "$OPNS" create secret generic tandem-agent-token --from-file=token="$STATE/agent-token" >/dev/null
  case ${TANDEM_INSTALL:-kustomize} in
  kustomize)
    # config/default, with the host (the bridge's address, where the
    # stories' NBD clients run) admitted by the agents' NBD allow-list.
    log "Installing Tandem: kubectl apply -k hack/localcluster/install (config/default, NBD clients from $BRIDGE_IP allowed)"
    kubectl apply -k "$ROOT/hack/localcluster/install" >"$LOGS/install.log" 2>&1 || die "kubectl apply -k hack/localcluster/install failed: $(tail -n 5 "$LOGS/install.log")"
    ;;
  helm)
    log "Installing Tandem: helm install tandem charts/tandem"
    # The image make image built (config/default names the same), and the
    # token Secret created above (the chart would generate its own).
    "$BIN/helm" --kubeconfig "$KUBECONFIG_FILE" install tandem "$ROOT/charts/tandem" -n "$OPNS" --wait=false \
      --set image.repository=ghcr.io/tandem-storage/tandem --set image.tag=dev \
      --set agent.tokenSecret.existingSecret=tandem-agent-token --set "agent.nbdAllowedClients={nodes,$BRIDGE_IP}" >"$LOGS/install.log" 2>&1 ||
      die "helm install failed: $(tail -n 5 "$LOGS/install.log")"
    ;;
  *) die "TANDEM_INSTALL must be kustomize or helm (got '$TANDEM_INSTALL')" ;;
  esac
  wait_for 30 "the VolumePair CRD to be established" kubectl wait --for condition=Established --timeout 5s crd/volumepairs.storage.tandem.dev
}

tandem_ready() {
  kubectl -n "$OPNS" rollout status daemonset/tandem-agent --timeout 2s &&
    kubectl -n "$OPNS" rollout status deployment/tandem-manager --timeout 2s
}

# up_kubelet_nodes: the rest of `up` for real nodes (after the API server).
up_kubelet_nodes() {
  write_kubeconfig "$STATE/kube/kube-controller-manager.kubeconfig" system:kube-controller-manager
  write_kubeconfig "$STATE/kube/kube-scheduler.kubeconfig" system:kube-scheduler
  log "Starting kube-controller-manager and kube-scheduler"
  start_kcm
  start_scheduler
  save_sysctls
  local n
  for n in "${NODES[@]}"; do
    log "Starting node $n: containerd and kubelet in namespace $(netns_name "$n"), cgroup /$(node_cgroup "$n")"
    write_node_config "$n"
    node_netns_setup "$n"
    start_node "$n"
  done
  for n in "${NODES[@]}"; do WATCH=kubelet-$n wait_for 120 "Node $n to be Ready (see $LOGS/kubelet-$n.log)" node_ready "$n"; done
  # Onto a cluster whose nodes are there, as a user would: the managers'
  # anti-affinity needs two nodes to place them.
  install_tandem
  log "Waiting for Tandem's Pods (agent DaemonSet, manager Deployment)"
  wait_for 180 "Tandem's DaemonSet and Deployment to be rolled out (kubectl -n $OPNS get pods)" tandem_ready
  for n in "${NODES[@]}"; do wait_for 60 "the agent on $n to answer and register" agent_ready "$n"; done
}

# stop_nodes: every local-cluster node's processes and Pods, whatever mode or
# run left them (by cgroup), then the FUSE connections they orphaned.
stop_nodes() {
  local h d n
  for h in $(cgroup_hierarchies); do
    for d in "$h"/tandem-node-*; do
      [ -d "$d" ] || continue
      n=${d##*/tandem-}
      kill_node_tasks "$n"
    done
  done
  abort_orphaned_fuse_conns
}

# abort_orphaned_fuse_conns: abort every FUSE connection when no process on
# the host has /dev/fuse open, i.e. when none of them has a server left. A
# node plugin Pod deleted while its unstage waited on a volume it served can
# leave one behind (the mount gone with the Pod's mount namespace, so
# node_fuse_conns cannot find it; the loop device still holding the file):
# its requests wait for ever, and so does every `sync` on the host. Nothing
# is aborted while any FUSE server runs, ours or anyone's.
abort_orphaned_fuse_conns() {
  local f mounted=0 conns
  for f in /proc/[0-9]*/fd/*; do
    [ "$(readlink "$f" 2>/dev/null)" != /dev/fuse ] || return 0
  done
  if ! grep -q ' /sys/fs/fuse/connections fusectl ' /proc/mounts; then
    mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null && mounted=1
  fi
  conns=$(find /sys/fs/fuse/connections -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null)
  [ "$mounted" = 0 ] || umount /sys/fs/fuse/connections 2>/dev/null || true
  [ -z "$conns" ] || { log "aborting FUSE connections without a server: $(echo "$conns" | tr '\n' ' ')"; abort_fuse_conns "$conns"; }
}

# container_pids NODE PROGRAM [SUBCOMMAND]: the node's processes whose
# command is PROGRAM (as the container sees its path), e.g.
# /usr/local/bin/agent, run with SUBCOMMAND as its first argument, or, with
# none given, with no subcommand (a first argument that is a flag): the
# agent's image also runs the CSI node plugin ("agent csi-node"), which is
# not the agent.
container_pids() {
  local n=$1 prog=$2 sub=${3:-} p argv
  for p in $(node_tasks "$n"); do
    mapfile -t argv < <(tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null)
    [ "${argv[0]:-}" = "$prog" ] || continue
    if [ -n "$sub" ]; then
      [ "${argv[1]:-}" = "$sub" ] || continue
    else
      case ${argv[1]:-} in "" | -*) ;; *) continue ;; esac
    fi
    printf '%s ' "$p"
  done
  return 0
}

# cpuacct_dir, memory_dir: where those v1 controllers are mounted.
cpuacct_dir() { awk '$3 == "cgroup" && $4 ~ /(^|,)cpuacct(,|$)/ {print $2; exit}' /proc/mounts; }
memory_dir() { awk '$3 == "cgroup" && $4 ~ /(^|,)memory(,|$)/ {print $2; exit}' /proc/mounts; }

# cmd_cost [SECONDS]: the CPU (% of one core) and memory (RSS) the cluster
# uses over SECONDS (60): the control plane's processes, and every node's
# containerd, kubelet, shims and containers (their cgroup's cpuacct, which
# counts short-lived children too), or the process nodes' agents and
# heartbeats.
cmd_cost() {
  local secs=${1:-60}
  require_up
  if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then die "cost wants a number of seconds, got '$secs'"; fi
  local pids=() p n name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler manager lifecycle; do
    p=$(pid_of "$name")
    ours "$p" && pids+=("$p")
  done
  local cgs=() rss_node=0
  for n in "${NODES[@]}"; do
    for name in "heartbeat-$n" "agent-$n"; do
      p=$(pid_of "$name")
      ours "$p" && pids+=("$p")
    done
    if [ "$(node_mode)" = kubelet ]; then
      cgs+=("$(cpuacct_dir)/$(node_cgroup "$n")/cpuacct.usage")
      rss_node=$((rss_node + $(awk '$1 == "total_rss" {print int($2 / 1024)}' "$(memory_dir)/$(node_cgroup "$n")/memory.stat")))
    fi
  done
  usage() { # jiffies of the processes as ns, plus the cgroups' ns
    local t=0 p c hz
    hz=$(getconf CLK_TCK)
    for p in "${pids[@]}"; do
      # (a process that exits meanwhile counts 0)
      t=$((t + $(awk -v hz="$hz" '{sub(/^.*\) /, ""); printf "%d", ($12 + $13) * 1e9 / hz}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    for c in "${cgs[@]}"; do t=$((t + $(cat "$c"))); done
    echo "$t"
  }
  local before after rss
  before=$(usage)
  sleep "$secs"
  after=$(usage)
  rss=$(for p in "${pids[@]}"; do awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true; done | awk -v n="$rss_node" '{s += $1} END {print s + n}')
  awk -v b="$before" -v a="$after" -v s="$secs" -v rss="$rss" -v mode="$(node_mode)" \
    'BEGIN {printf "cluster idle cost (%s nodes): %.1f%% of one core over %ds, %.0f MiB resident\n", mode, 100 * (a - b) / 1e9 / s, s, rss / 1024}'
}

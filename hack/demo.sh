#!/usr/bin/env bash
# Tandem's failover/failback story on a local three-node cluster
# (hack/local-cluster.sh), with a real NBD client:
#
#   1. bring the cluster up and create an Async VolumePair (256Mi, node-a
#      primary, node-b backup, failback Automatic, default failover settings)
#   2. write 32 MiB through the pair's endpoint with qemu-io; wait until the
#      backup holds it
#   3. kill node-a (kubelet, containerd and every container on it, link cut) and time how
#      long until a write through the new status.endpoint (node-b) succeeds
#   4. SWAP: write more on node-b, check the old data is there
#   5. bring node-a back: COPY of only the changed regions, with progress;
#      NORMAL; automatic failback to PAIR with node-a at the next epoch
#   6. check every pattern through node-a's export, compare both replicas'
#      backing files (sha256)
#   7. replace node-b by node-c in the spec (a retired node): full copy to
#      node-c, in sync, node-b's replica deleted
#   8. (real nodes) a StatefulSet's Pod writes durable records to a claim of
#      the StorageClass tandem; its node (the writer's) is killed; time until
#      it writes again on the other member, check every acknowledged record;
#      then print a summary
#
#   hack/demo.sh           run it (about a minute once bin/ holds the tools; from a
#                          fresh clone with cold Go caches 12 minutes, most of it
#                          building Kubernetes)
#   KEEP=1 hack/demo.sh    leave the cluster running afterwards for exploring
#
# Environment: KEEP=1 keeps the cluster; DEMO_RESYNC_RATE (bytes/s, default
# 8388608) caps the resync so COPY is visible for a few seconds (0 = unlimited;
# the copy then takes a fraction of a second); DEMO_NAME (demo).
# Needs root for the per-node network namespaces (otherwise the nodes share
# the loopback device and "cutting the link" is skipped), qemu-io (Debian
# qemu-utils), curl, and nbdinfo/nbdcopy (libnbd-bin) if present.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LC=$ROOT/hack/local-cluster.sh
KUBECONFIG_FILE=$ROOT/.local/kubeconfig
NS=default
NAME=${DEMO_NAME:-demo}
SIZE_MIB=256
RATE=${DEMO_RESYNC_RATE:-8388608}
KEEP=${KEEP:-0}
MiB=$((1024 * 1024))

case ${1:-} in
-h | --help | help)
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
  ;;
"") ;;
*)
  echo "demo.sh: no arguments expected (see --help)" >&2
  exit 2
  ;;
esac

# ---------------------------------------------------------------- helpers

if [ -t 1 ]; then B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' N=$'\e[0m'; else B='' G='' R='' N=''; fi
START=$SECONDS
STEP=0
step() {
  STEP=$((STEP + 1))
  printf '\n%s==> [%d] %s%s   (t+%ds)\n' "$B" "$STEP" "$*" "$N" "$((SECONDS - START))"
}
say() { printf '    %s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

k() { "$ROOT/bin/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }
jp() { k -n "$NS" get volumepair "$NAME" -o "jsonpath=$1" 2>/dev/null || true; }
show() { k -n "$NS" get volumepair "$NAME" -o wide | sed 's/^/    /'; }

dump() {
  echo
  echo "----- kubectl get volumepair $NAME -o yaml"
  k -n "$NS" get volumepair "$NAME" -o yaml 2>&1 || true
  echo "----- events"
  k -n "$NS" get events --sort-by=.metadata.creationTimestamp 2>&1 | tail -n 25 || true
  for f in manager agent-node-a agent-node-b; do
    [ -f "$ROOT/.local/logs/$f.log" ] || continue
    echo "----- last lines of .local/logs/$f.log"
    tail -n 15 "$ROOT/.local/logs/$f.log" 2>/dev/null || true
  done
  # Real nodes: the containers' logs.
  for f in "$ROOT"/.local/logs/nodes/*/pods/tandem-system_*/*/*.log; do
    [ -f "$f" ] || continue
    echo "----- last lines of ${f#"$ROOT"/}"
    tail -n 15 "$f" 2>/dev/null || true
  done
  "$LC" status 2>&1 || true
}

fail() {
  printf '\n%sdemo failed: %s%s\n' "$R" "$*" "$N" >&2
  dump >&2
  exit 1
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$KEEP" = 1 ]; then
    echo
    echo "KEEP=1: the cluster keeps running. Explore with:"
    echo "  bin/kubectl --kubeconfig .local/kubeconfig get vp -o wide"
    echo "  hack/local-cluster.sh status | kill-node NODE | restore-node NODE | down"
  elif [ -f "$ROOT/.local/network" ]; then
    echo
    echo "Tearing the cluster down (KEEP=1 keeps it; logs stay in .local/logs/)"
    "$LC" down || true
  fi
  exit $rc
}

# snap reads the VolumePair's status once into PHASE, ACTIVE, EPOCH, OOS,
# ENDPOINT, READY, SYNCED, LFO (lastFailoverTime) and C_* (status.copy), and
# prints a compact line whenever phase, writer, epoch, endpoint or
# out-of-sync change.
LAST_ROW=
snap() {
  local line
  line=$(jp '{.status.phase}|{.status.activePrimary}|{.status.epoch}|{.status.outOfSyncBytes}|{.status.endpoint}|{.status.conditions[?(@.type=="Ready")].status}|{.status.conditions[?(@.type=="Synchronized")].status}|{.status.lastFailoverTime}|{.status.copy.target}|{.status.copy.totalBytes}|{.status.copy.doneBytes}|{.status.copy.bytesPerSecond}|{.status.copy.etaSeconds}|')
  IFS='|' read -r PHASE ACTIVE EPOCH OOS ENDPOINT READY SYNCED LFO C_TARGET C_TOTAL C_DONE C_RATE C_ETA _ <<<"$line" || true
  local r="${PHASE:-?} active=${ACTIVE:--} epoch=${EPOCH:--} out-of-sync=${OOS:-0} endpoint=${ENDPOINT:-(none)}"
  if [ "$r" != "$LAST_ROW" ]; then
    printf '    %s  %s\n' "$(date +%H:%M:%S)" "$r"
    LAST_ROW=$r
  fi
}

# wait_until SECONDS WHAT FUNC: poll FUNC (printing status changes) until it
# succeeds; fail with diagnostics after SECONDS.
wait_until() {
  local t=$1 what=$2 fn=$3 deadline=$((SECONDS + $1))
  while :; do
    snap
    $fn && return 0
    ((SECONDS < deadline)) || fail "timed out after ${t}s waiting for $what"
    sleep 0.5
  done
}

# synced: the writer serves and the peer holds every write (on the last snap).
synced() { [ "$READY" = True ] && [ "$SYNCED" = True ] && [ -z "$C_TOTAL" ] && [ "${OOS:-0}" = 0 ]; }

# qemu-io against an nbd:// URI; prints qemu-io's summary line.
nbd_io() { # URI CMD...
  local uri=$1
  shift
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  timeout 30 qemu-io -f raw "${args[@]}" "$uri"
}

agent_status() { # NODE → JSON of the replica on that node's agent
  curl -fsS --max-time 3 -H "Authorization: Bearer $(cat "$ROOT/.local/agent-token")" \
    "http://$(ip_of "$1"):7400/v1/volumes/$NS/$NAME"
}
# agent_synced NODE: that agent, as writer, has shipped every write and its
# peer acknowledged it (read live from the control API, not from status).
agent_synced() {
  local st
  st=$(agent_status "$1") || return 1
  [[ $st == *'"peerConnected":true'* ]] && [[ $st == *'"outOfSyncRegions":0,'* ]] && [[ $st == *'"writable":true'* ]]
}
json_num() { sed -n "s/.*\"$1\":\([-0-9.eE+]*\).*/\1/p" | head -n1; }

ip_of() {
  case $1 in
  node-a) echo "$TANDEM_A_IP" ;; node-b) echo "$TANDEM_B_IP" ;; node-c) echo "$TANDEM_C_IP" ;;
  esac
}

# ---------------------------------------------------------------- prerequisites

for c in qemu-io curl awk sha256sum timeout; do
  command -v $c >/dev/null || fail "$c is required (Debian: apt-get install qemu-utils curl coreutils gawk)"
done
HAVE_NBDINFO=0 HAVE_NBDCOPY=0
command -v nbdinfo >/dev/null && HAVE_NBDINFO=1
command -v nbdcopy >/dev/null && HAVE_NBDCOPY=1

trap finish EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the story

if [ "${TANDEM_NODES:-kubelet}" = kubelet ]; then
  step "Bringing up the local cluster: control plane, 3 nodes (containerd + kubelet), Tandem installed from config/default"
else
  step "Bringing up the local cluster: etcd, kube-apiserver, manager, 3 nodes with agents (process nodes)"
fi
"$LC" up || {
  trap - EXIT
  echo "demo: hack/local-cluster.sh up failed (see above)" >&2
  exit 1
}
eval "$("$LC" env | grep '^TANDEM_')"
k get nodes | sed 's/^/    /'
[ "$TANDEM_NODES" != kubelet ] || k -n tandem-system get pods -o wide | sed 's/^/    /'

step "Creating an Async VolumePair: ${SIZE_MIB}Mi, primary node-a, backup node-b, failback Automatic"
say "failover settings are the defaults (probe every 2s, 3 failed probes, 6s authority lease);"
say "the resync is capped at $(mib "$RATE")/s so that COPY stays on screen for a few seconds"
k apply -f - <<EOF | sed 's/^/    /'
apiVersion: storage.tandem.dev/v1alpha1
kind: VolumePair
metadata:
  name: $NAME
  namespace: $NS
spec:
  size: ${SIZE_MIB}Mi
  mode: Async
  primary: {node: node-a}
  backup: {node: node-b}
  failback: {policy: Automatic}
  resync: {maxBytesPerSecond: $RATE}
EOF
has_endpoint() { [ "$PHASE" = PAIR ] && [ -n "$ENDPOINT" ] && synced; }
wait_until 60 "PAIR with an endpoint" has_endpoint
show
EP_A=$ENDPOINT
[[ $EP_A == *"$TANDEM_A_IP"* ]] || fail "expected the endpoint on node-a ($TANDEM_A_IP), got $EP_A"
if [ $HAVE_NBDINFO = 1 ]; then
  say "nbdinfo $EP_A:"
  nbdinfo "$EP_A" | grep -E 'export=|description|export-size' | sed 's/^/      /'
fi

step "Writing 32 MiB through $EP_A with qemu-io"
nbd_io "$EP_A" "write -P 0xa1 0 32M" | sed 's/^/    /' || fail "qemu-io write to $EP_A failed"
wait_until 60 "the backup to hold every write (Synchronized, out-of-sync 0)" synced
a_synced() { agent_synced node-a; }
wait_until 30 "node-a's agent to report every write acknowledged by node-b" a_synced
say "node-b holds all of it (Synchronized=True, out-of-sync 0)"

if [ "$TANDEM_NODES" = kubelet ]; then
  step "Killing node-a: its kubelet, containerd and every container on it (the agent, maybe a manager) are SIGKILLed, its link is cut"
else
  step "Killing node-a: its agent is SIGKILLed, its heartbeats stop$([ "$TANDEM_NETWORK" = netns ] && echo " and its link is cut")"
fi
T0=$(now)
"$LC" kill-node node-a 2>&1 | sed 's/^/    /'
say "timing until node-b accepts writes, first on its export directly, then through status.endpoint"
T_DIRECT='' T_EP=''
deadline=$((SECONDS + 90))
EP=
while :; do
  snap
  if [ -z "$T_DIRECT" ] && nbd_io "nbd://$TANDEM_B_IP:10809/$NS/$NAME" "write -P 0xb1 64M 1M" >/dev/null 2>&1; then
    T_DIRECT=$(since "$T0")
    say "node-b's export accepted a write after ${T_DIRECT}s"
  fi
  EP=$ENDPOINT
  if [[ $EP == *"$TANDEM_B_IP"* ]] && nbd_io "$EP" "write -P 0xb1 64M 1M" >/dev/null 2>&1; then
    T_EP=$(since "$T0")
    [ -n "$T_DIRECT" ] || T_DIRECT=$T_EP
    break
  fi
  ((SECONDS < deadline)) || fail "no write through a node-b endpoint succeeded within 90s of killing node-a"
  sleep 0.2
done
T_PROMOTED='?'
# lastFailoverTime has a 1 s resolution: promotion happened in [t, t+1).
[ -n "$LFO" ] && T_PROMOTED=$(awk -v a="$T0" -v b="$(date -d "$LFO" +%s)" 'BEGIN {d = b - a; if (d < 0) d = 0; printf "%.1f-%.1f", d, b + 1 - a}')
printf '    %sFailover: %ss from killing node-a to a write accepted through status.endpoint %s%s\n' "$G" "$T_EP" "$EP" "$N"
is_swap() { [ "$PHASE" = SWAP ] && [ "$ACTIVE" = node-b ]; }
wait_until 30 "phase SWAP with node-b active" is_swap
show

step "SWAP: node-b serves alone and records what it writes; writing 16 MiB more"
nbd_io "$EP" "write -P 0xb2 96M 8M" "write -P 0xb3 160M 8M" | sed 's/^/    /' || fail "writes in SWAP failed"
nbd_io "$EP" "read -P 0xa1 0 32M" >/dev/null || fail "the 32 MiB written before the failover are not on node-b"
say "the 32 MiB written before the failover read back intact from node-b"
SECOND_DIFF=$(agent_status node-b | json_num outOfSyncBytes)
say "node-b's bitmap (second diff): $(mib "${SECOND_DIFF:-0}") of ${SIZE_MIB} MiB"

step "Restoring node-a (same data dir): COPY of only what changed, NORMAL, automatic failback"
"$LC" restore-node node-a 2>&1 | sed 's/^/    /'
MAX_TOTAL=0 SAW_COPY=0 COPY_START='' COPY_END=''
deadline=$((SECONDS + 180))
LASTP=
while :; do
  snap
  if [ -n "$C_TOTAL" ]; then
    SAW_COPY=1
    [ -n "$COPY_START" ] || COPY_START=$(now)
    [ "$C_TOTAL" -gt "$MAX_TOTAL" ] && MAX_TOTAL=$C_TOTAL
    p="COPY → $C_TARGET: $(mib "${C_DONE:-0}") / $(mib "$C_TOTAL") copied ($(mib "${C_RATE:-0}")/s, ETA ${C_ETA:-0}s)"
    [ "$p" = "$LASTP" ] || say "$p"
    LASTP=$p
  elif [ -n "$COPY_START" ] && [ -z "$COPY_END" ]; then
    COPY_END=$(now)
  fi
  [ "$PHASE" = PAIR ] && [ "$ACTIVE" = node-a ] && [ "${EPOCH:-0}" -ge 3 ] && break
  ((SECONDS < deadline)) || fail "the pair did not get back to PAIR with node-a active within 180s"
  sleep 0.5
done
show
wait_until 60 "both members in sync after the failback" synced

step "Back in PAIR on node-a: one more write, then checks"
snap
EP=$ENDPOINT
[[ $EP == *"$TANDEM_A_IP"* ]] || fail "expected the endpoint back on node-a, got $EP"
nbd_io "$EP" "write -P 0xc1 250M 1M" | sed 's/^/    /' || fail "write after failback failed"
wait_until 60 "the last write to reach node-b" a_synced
wait_until 60 "both members in sync" synced
for chk in "0xa1 0 32M" "0xb1 64M 1M" "0xb2 96M 8M" "0xb3 160M 8M" "0xc1 250M 1M"; do
  # shellcheck disable=SC2086 # split "pattern offset length" into $1 $2 $3
  set -- $chk
  nbd_io "$EP" "read -P $1 $2 $3" >/dev/null || fail "pattern $1 at $2 (+$3) is wrong through $EP"
done
say "every region written before, during and after the failover reads back through $EP"
PA=$("$LC" replica-path node-a "$NS/$NAME") || fail "no replica file on node-a"
PB=$("$LC" replica-path node-b "$NS/$NAME") || fail "no replica file on node-b"
SA=$(sha256sum "$PA" | cut -d' ' -f1)
SB=$(sha256sum "$PB" | cut -d' ' -f1)
say "sha256 node-a ${PA#"$ROOT"/}: $SA"
say "sha256 node-b ${PB#"$ROOT"/}: $SB"
for _ in 1 2 3 4 5; do
  [ "$SA" = "$SB" ] && break
  sleep 1 # a write may still be applying on the backup
  SA=$(sha256sum "$PA" | cut -d' ' -f1)
  SB=$(sha256sum "$PB" | cut -d' ' -f1)
done
[ "$SA" = "$SB" ] || fail "the replicas differ"
if [ $HAVE_NBDCOPY = 1 ]; then
  SC=$(nbdcopy "$EP" - | sha256sum | cut -d' ' -f1)
  say "sha256 of the volume read with nbdcopy:  $SC"
  [ "$SC" = "$SA" ] || fail "what the client reads differs from the replica files"
fi

# Agents report their totals on the control API; node-b ran the resync and
# held the writes at failback. Read now: the Pod chapter below may kill
# node-b, and its agent's totals start again with it.
B_STATUS=$(agent_status node-b) || fail "cannot read node-b's agent status"

# ---------------------------------------------------------------- replacing a member
step "Replacing node-b by node-c without deleting the pair (a node retired for good)"
say "kubectl patch volumepair $NAME --type=merge -p '{\"spec\":{\"backup\":{\"node\":\"node-c\"},\"resync\":{\"maxBytesPerSecond\":0}}}'"
say "(the resync cap lifted: node-c gets a full copy; zeros travel as Zero frames)"
T2=$(now)
k -n "$NS" patch volumepair "$NAME" --type=merge -p '{"spec":{"backup":{"node":"node-c"},"resync":{"maxBytesPerSecond":0}}}' | sed 's/^/    /'
replaced() {
  [ "$(jp '{.status.members[?(@.node=="node-c")].dataState}')" = UpToDate ] && synced &&
    [ -z "$(jp '{.status.removedMembers}')" ] && [ -z "$(jp '{.status.members[?(@.node=="node-b")].node}')" ]
}
wait_until 120 "node-c to hold the data and node-b's replica to be deleted" replaced
printf '    %sMember replaced: node-c in sync %ss after the patch; node-b'"'"'s replica deleted%s\n' "$G" "$(since "$T2")" "$N"
T_REPLACE=$(since "$T2")
show
k -n "$NS" get events --field-selector "involvedObject.name=$NAME" -o custom-columns=REASON:.reason,MESSAGE:.message 2>/dev/null |
  grep -E '^(REASON|MemberReplaced|MemberRemoved)' | sed 's/^/    /' || true
for chk in "0xa1 0 32M" "0xc1 250M 1M"; do
  # shellcheck disable=SC2086 # split "pattern offset length" into $1 $2 $3
  set -- $chk
  nbd_io "$ENDPOINT" "read -P $1 $2 $3" >/dev/null || fail "pattern $1 at $2 (+$3) is wrong after the replacement"
done
say "the data reads back as before through $ENDPOINT"

if [ "$TANDEM_NODES" = kubelet ]; then
  # ------------------------------------------------------------ a Pod on a Tandem volume
  # The node for the Pod: not the one whose manager leads (losing that one
  # is story 14 of the e2e suite; here the failover is the volume's).
  LEADER_POD=$(k -n tandem-system get lease tandem-manager.storage.tandem.dev -o jsonpath='{.spec.holderIdentity}' | cut -d_ -f1)
  LEADER_NODE=$(k -n tandem-system get pod "$LEADER_POD" -o jsonpath='{.spec.nodeName}' 2>/dev/null || true)
  POD_NODE=node-c
  [ "$LEADER_NODE" != node-c ] || POD_NODE=node-b
  step "A Pod on a Tandem volume: StatefulSet recorder, a 64Mi claim of StorageClass tandem, the Pod preferring $POD_NODE"
  say "the recorder appends numbered 4 KiB records, fdatasyncs each, then logs \"RECORDER ack N\""
  sed -e "s/namespace: NAMESPACE/namespace: $NS/; s/\[NODE\]/[$POD_NODE]/; s/storageClassName: STORAGE_CLASS/storageClassName: tandem/" "$ROOT/hack/recorder/statefulset.yaml" |
    k apply -f - | sed 's/^/    /'
  # The recorder's log, read from the node's disk (also once the node is
  # gone): rec_log NODE UID, rec_last NODE UID → the last acknowledged record.
  rec_uid() { k -n "$NS" get pod recorder-0 -o jsonpath='{.metadata.uid}' 2>/dev/null || true; }
  rec_node() { k -n "$NS" get pod recorder-0 -o jsonpath='{.spec.nodeName}' 2>/dev/null || true; }
  rec_log() { cat "$ROOT/.local/logs/nodes/$1/pods/${NS}_recorder-0_$2"/recorder/*.log 2>/dev/null || true; }
  rec_last() { rec_log "$1" "$2" | sed -n 's/.* RECORDER ack \([0-9]*\)$/\1/p' | tail -n1; }
  acking() {
    U=$(rec_uid) RN=$(rec_node)
    [ -n "$U" ] && [ -n "$RN" ] && [ "$(rec_last "$RN" "$U")" -ge 40 ] 2>/dev/null
  }
  wait_until 180 "recorder-0 to run and acknowledge 40 records" acking
  REC_UID=$U REC_NODE=$RN
  VOL=$(k -n "$NS" get pv "$(k -n "$NS" get pvc data-recorder-0 -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}')
  say "recorder-0 runs on $REC_NODE; its claim is VolumePair tandem-system/$VOL:"
  k -n tandem-system get vp "$VOL" -o wide | sed 's/^/    /'

  step "Killing $REC_NODE, where the Pod and its volume's writer run"
  T1=$(now)
  "$LC" kill-node "$REC_NODE" 2>&1 | sed 's/^/    /'
  ACKED=$(rec_last "$REC_NODE" "$REC_UID")
  say "records acknowledged before the kill: 0..$ACKED"
  moved() {
    local u n
    u=$(rec_uid) n=$(rec_node)
    [ -n "$u" ] && [ "$u" != "$REC_UID" ] && [ -n "$n" ] && [ -n "$(rec_last "$n" "$u")" ] && NEW_UID=$u NEW_NODE=$n
  }
  deadline=$((SECONDS + 120))
  until moved; do
    ((SECONDS < deadline)) || fail "recorder-0 did not write again within 120s of killing $REC_NODE"
    sleep 0.25
  done
  T_POD=$(since "$T1")
  VERIFIED=$(rec_log "$NEW_NODE" "$NEW_UID" | sed -n 's/.* RECORDER verified \([0-9]*\)$/\1/p' | head -n1)
  printf '    %sPod failover: %ss from killing %s to recorder-0 acknowledging records on %s%s\n' "$G" "$T_POD" "$REC_NODE" "$NEW_NODE" "$N"
  say "it found $VERIFIED records intact; $((ACKED + 1)) had been acknowledged"
  [ "${VERIFIED:-0}" -ge $((ACKED + 1)) ] || fail "acknowledged records are missing after the Pod moved"
  k get events -A --field-selector reason=PodFailover -o custom-columns=REASON:.reason,MESSAGE:.message 2>/dev/null | sed 's/^/    /' || true
  "$LC" restore-node "$REC_NODE" 2>&1 | sed 's/^/    /'
  k -n "$NS" delete statefulset recorder --wait=false >/dev/null 2>&1 || true
fi

step "What happened (events)"
k -n "$NS" get events --field-selector "involvedObject.name=$NAME" --sort-by=.metadata.creationTimestamp \
  -o custom-columns=TIME:.metadata.creationTimestamp,REASON:.reason,MESSAGE:.message 2>/dev/null | sed 's/^/    /' ||
  k -n "$NS" get events --sort-by=.metadata.creationTimestamp | sed 's/^/    /'

COPIED=$(json_num copiedBytesTotal <<<"$B_STATUS")
HOLD=$(json_num lastHoldSeconds <<<"$B_STATUS")
FIRST_DIFF=$((MAX_TOTAL - ${SECOND_DIFF:-0}))
((FIRST_DIFF < 0)) && FIRST_DIFF=0
COPY_SECS='?'
[ -n "$COPY_START" ] && [ -n "$COPY_END" ] && COPY_SECS=$(awk -v a="$COPY_START" -v b="$COPY_END" 'BEGIN {printf "%.1f", b - a}')

cat <<EOF

${B}Summary${N}  (Async VolumePair ${NS}/${NAME}, ${SIZE_MIB} MiB, default failover settings; total $((SECONDS - START))s)
  failover            ${T_EP}s  node-a killed → write accepted through status.endpoint on node-b
                      (authority moved to node-b ${T_PROMOTED}s after the kill, per status.lastFailoverTime;
                       node-b's export accepted writes after ${T_DIRECT}s)
  resync (COPY)       $(mib "${COPIED:-0}") copied of ${SIZE_MIB} MiB ($(awk -v c="${COPIED:-0}" -v s=$((SIZE_MIB * MiB)) 'BEGIN {printf "%.1f", 100 * c / s}')% of the volume)
                      = node-b's second diff $(mib "${SECOND_DIFF:-0}") ∪ node-a's own diff ~$(mib "$FIRST_DIFF")
                      (write-intent extents recovered after its crash); ~${COPY_SECS}s at a $(mib "$RATE")/s cap
  failback write hold $(awk -v h="${HOLD:-0}" 'BEGIN {printf "%.3f", h}')s  (lastHoldSeconds on node-b's agent)
  replicas            identical: sha256 $SA on node-a and node-b
EOF
echo "  member replaced     ${T_REPLACE}s  node-b → node-c: full copy, in sync, node-b's replica deleted"
[ -z "${T_POD:-}" ] || echo "  pod failover        ${T_POD}s  $REC_NODE killed → recorder-0 writing on $NEW_NODE; ${VERIFIED} records intact of $((ACKED + 1)) acknowledged"
[ "$SAW_COPY" = 1 ] || say "(note: the COPY finished between two polls; raise DEMO_RESYNC_RATE's cap to see it)"

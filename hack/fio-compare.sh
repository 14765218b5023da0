#!/usr/bin/env bash
# Measures fio (ioengine=nbd) through nbdkit's file plugin (the peer, no
# replication) and through Tandem's export as a standalone member, an Async
# pair and a Sync pair, on this machine in one run, alternating the targets.
#
#   hack/fio-compare.sh [runtime-seconds] [rounds]
#
# Needs fio, nbdkit and curl (Debian: fio nbdkit curl). Prints a table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runtime=${1:-8}
rounds=${2:-1}
size=$((1024 * 1024 * 1024))
work=$(mktemp -d /tmp/tandem-fio.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

for c in fio nbdkit curl python3; do command -v $c >/dev/null || { echo "fio-compare: $c is missing" >&2; exit 2; }; done
(cd "$root" && go build -o "$work/agent" ./cmd/agent)
echo tok > "$work/token"

start_agent() { # node ctrl repl nbd
  mkdir -p "$work/$1"
  "$work/agent" --node "$1" --data-dir "$work/$1" --control-address "127.0.0.1:$2" --replication-address "127.0.0.1:$3" \
    --nbd-address "127.0.0.1:$4" --token-file "$work/token" ${PPROF:+--pprof-address 127.0.0.1:$(( $2 + 60 ))} >"$work/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$2/healthz" >/dev/null && return; sleep 0.1; done
  echo "agent $1 did not start" >&2; exit 1
}
put() { # ctrl name json-spec
  curl -fsS -X PUT -H 'Authorization: Bearer tok' -d "{\"size\":$size,\"regionSize\":65536,\"spec\":$3}" \
    "http://127.0.0.1:$1/v1/volumes/bench/$2" >/dev/null
}
start_agent node-a 17400 17401 17409
start_agent node-b 17500 17501 17509
put 17400 solo '{"role":"Primary","epoch":1,"mode":"Async"}'
for m in async sync; do
  M=$([ $m = sync ] && echo Sync || echo Async)
  put 17500 $m "{\"role\":\"Backup\",\"epoch\":1,\"mode\":\"$M\",\"peerNode\":\"node-a\"}"
  put 17400 $m "{\"role\":\"Primary\",\"epoch\":1,\"mode\":\"$M\",\"peerNode\":\"node-b\",\"peerAddress\":\"127.0.0.1:17501\"}"
done
truncate -s $size "$work/nbdkit.img"
nbdkit --foreground --exit-with-parent -p 17609 -i 127.0.0.1 file "$work/nbdkit.img" >"$work/nbdkit.log" 2>&1 &
pids+=($!)
sleep 1

declare -A url=(
  [nbdkit]="nbd://127.0.0.1:17609/"
  [standalone]="nbd://127.0.0.1:17409/bench/solo"
  [async]="nbd://127.0.0.1:17409/bench/async"
  [sync]="nbd://127.0.0.1:17409/bench/sync"
)
run() { # target rw bs qd -> prints "iops mibs p50us p99us"
  fio --name=t --ioengine=nbd --uri="${url[$1]}" --rw="$2" --bs="$3" --iodepth="$4" --size=$size \
    --time_based --runtime="$runtime" --ramp_time=1 --output-format=json --output="$work/fio.json" >/dev/null 2>&1
  python3 -c '
import json,sys
j=json.load(open(sys.argv[1]))["jobs"][0]["write"]
p=j["clat_ns"]["percentile"]
print("%.0f %.1f %.0f %.0f" % (j["iops"], j["bw_bytes"]/1048576, p["50.000000"]/1000, p["99.000000"]/1000))' "$work/fio.json"
}
printf "%-12s %-22s %10s %10s %9s %9s %8s\n" target workload IOPS MiB/s p50us p99us ratio
for wl in "randwrite 4k 32" "write 1M 8"; do
  # shellcheck disable=SC2086 # split "rw bs iodepth" into $1 $2 $3
  set -- $wl
  declare -A base=()
  for r in $(seq "$rounds"); do
    for tgt in ${TARGETS:-nbdkit standalone async sync}; do
      read -r iops mibs p50 p99 < <(run $tgt "$1" "$2" "$3")
      [ "$tgt" = nbdkit ] && base[$r]=$iops
      ratio=$(python3 -c "print('%.2f' % ($iops/${base[$r]}))")
      printf "%-12s %-22s %10s %10s %9s %9s %8s\n" "$tgt" "$1 bs=$2 qd=$3" "$iops" "$mibs" "$p50" "$p99" "$ratio"
    done
  done
done

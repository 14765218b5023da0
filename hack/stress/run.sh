#!/usr/bin/env bash
# make stress: the reliability suites of issue #8 with many trials, bounded
# fuzzing of every fuzz target in the repository, and docs/reliability.md
# generated from what the tests logged.
#
# The short versions of the same suites run in `make test` (plain go test):
# every test reads TANDEM_STRESS_TRIALS (default 1) and logs one line
#
#   RELIABILITY suite=<suite> case=<test> trials=N faults=F violations=V
#
# which hack/stress/report collects. The cluster-level suites (crash matrix,
# partitions: test/e2e, tag e2e) need the local three-node cluster
# (hack/local-cluster.sh, as root for network namespaces); their short
# versions run in `make test-e2e`. Each of their steps brings a cluster up and
# down itself, holding the shared lock /tmp/tandem-cluster.lock meanwhile.
#
# Knobs (environment):
#   TANDEM_STRESS_TRIALS  trials per test case            (default 20)
#   TANDEM_STRESS_SEED    seed for the randomised choices (default: time)
#   TANDEM_CLUSTER_TRIALS trials per cell of the crash matrix (default 30.
#                         Measured: 5-15 s per crash trial: about 45 min for
#                         the 8 cells)
#   TANDEM_PARTITION_TRIALS trials per partition case (default 10; 7-10 s per
#                         trial, 25 s flapping: about 10 min for the 5 cases)
#   CLUSTER_LOCK          lock file shared by everything using the local
#                         cluster                   (default /tmp/tandem-cluster.lock)
#   TANDEM_LOAD_DURATION  fio time of the load suite (test/e2e TestLoad: 16
#                         pairs, concurrent fio, a node killed in the middle;
#                         default 10m here, 45s in `make test-e2e`)
#   STRESS_COUNT          go test -count for the suites   (default 1)
#   STRESS_FLAGS          extra go test flags             (default -race)
#   FUZZTIME              time per fuzz target            (default 30s)
#   FUZZ_PARALLEL         fuzzing workers per target      (default 2)
#   STRESS_OUT            logs directory                  (default $TMPDIR/tandem-stress)
#   STRESS_REPORT         report to write                 (default docs/reliability.md)
#   STRESS_ONLY           run only the steps whose name matches this regexp,
#                         keeping the other steps' results in STRESS_OUT
#                         (re-run a step, then regenerate the report)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD

export TANDEM_STRESS_TRIALS=${TANDEM_STRESS_TRIALS:-20}
export TANDEM_STRESS_SEED=${TANDEM_STRESS_SEED:-$(date +%s)}
export KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS:-$ROOT/bin}
COUNT=${STRESS_COUNT:-1}
FLAGS=${STRESS_FLAGS--race}
FUZZTIME=${FUZZTIME:-30s}
FUZZ_PARALLEL=${FUZZ_PARALLEL:-2}
OUT=${STRESS_OUT:-${TMPDIR:-/tmp}/tandem-stress}
REPORT=${STRESS_REPORT:-$ROOT/docs/reliability.md}
ONLY=${STRESS_ONLY:-.}
CLUSTER_TRIALS=${TANDEM_CLUSTER_TRIALS:-30}
PARTITION_TRIALS=${TANDEM_PARTITION_TRIALS:-10}
CLUSTER_LOCK=${CLUSTER_LOCK:-/tmp/tandem-cluster.lock}

if [ "$ONLY" = . ] || [ ! -f "$OUT/steps.tsv" ]; then
  rm -rf "$OUT"
  mkdir -p "$OUT"
  printf 'kind\tname\tpackage\tseconds\texit\tlog\n' >"$OUT/steps.tsv"
  : >"$OUT/meta.env"
fi
steps=$OUT/steps.tsv
if [ "$ONLY" != . ] && [ -s "$OUT/meta.env" ]; then
  echo "rerun=$(date -u +%Y-%m-%dT%H:%M:%SZ) steps matching '$ONLY' (commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty))" >>"$OUT/meta.env"
else {
  echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo +dirty)"
  echo "go=$(go env GOVERSION)"
  echo "trials=$TANDEM_STRESS_TRIALS"
  echo "clustertrials=$CLUSTER_TRIALS"
  echo "partitiontrials=$PARTITION_TRIALS"
  echo "seed=$TANDEM_STRESS_SEED"
  echo "count=$COUNT"
  echo "flags=$FLAGS"
  echo "fuzztime=$FUZZTIME"
  echo "fuzzparallel=$FUZZ_PARALLEL"
  echo "cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo ?)"
} >"$OUT/meta.env"
fi

failed=0
# step KIND NAME PACKAGE -- go test args...  (WRAP: a command prefix, e.g. flock)
step() {
  local kind=$1 name=$2 pkg=$3
  shift 4
  [[ $name =~ $ONLY ]] || return 0
  local log=$OUT/$kind-$name.log start rc
  echo "stress: $kind $name ($pkg)" >&2
  # A re-run replaces the step's earlier result.
  grep -v -P "^\Q$kind\E\t\Q$name\E\t" "$steps" >"$steps.tmp"
  mv "$steps.tmp" "$steps"
  start=$(date +%s)
  # shellcheck disable=SC2086 # WRAP is a word list
  ${WRAP:-} go test "$@" "$pkg" >"$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$name" "$pkg" "$(($(date +%s) - start))" "$rc" "$(basename "$log")" >>"$steps"
  if [ "$rc" -ne 0 ]; then
    echo "stress: $kind $name FAILED (exit $rc); see $log" >&2
    [ "$kind" = known-bug ] || failed=1
  fi
}

# shellcheck disable=SC2086 # FLAGS is a word list
{
  step suite disk-faults ./dataplane/volume/ -- $FLAGS -count="$COUNT" -v -timeout 2h \
    -run '^(TestDiskFault|TestStaleEpochRefused$|TestNoPromotionOfInconsistent$|TestResyncWithLiveWrites$|TestPromotedBackupIgnoresBufferedFrames$|TestWipedBackupGetsFullCopy$)'
  step suite bad-input ./dataplane/agent/ -- $FLAGS -count="$COUNT" -v -timeout 1h \
    -run '^(TestBadReplicationInput|TestNBDAbuse|FuzzControlAPI|TestControlAPIAuth)$'
  step suite admission ./test/envtest/ -- -count=1 -v -timeout 10m -run '^TestInvalidRejectedByAPI$'
  step suite split-brain ./controllers/ -- $FLAGS -count="$COUNT" -v -timeout 3h \
    -run '^(TestSplitBrain|TestOneWriterCheckerCatchesOverlap|TestAuthorityClockSkew|TestCollidingPairsStayIndependent|TestStoryWipedMember|TestStoryFailbackUnderLoad)$'
  # The load suite on the local cluster (about TANDEM_LOAD_DURATION + 4 min).
  WRAP="flock -o $CLUSTER_LOCK" TANDEM_LOAD_DURATION=${TANDEM_LOAD_DURATION:-10m} step suite load ./test/e2e/ -- \
    -tags e2e -count=1 -v -timeout 1h -run '^TestLoad$'
  # The cluster-level crash matrix and partitions (test/e2e; TestMain brings
  # a cluster up and down), TANDEM_CLUSTER_TRIALS / TANDEM_PARTITION_TRIALS
  # trials per cell. flock -o: the cluster's processes must not inherit the
  # lock. No -race:
  # the processes under test are the real binaries.
  WRAP="flock -o $CLUSTER_LOCK" TANDEM_STRESS_TRIALS=$CLUSTER_TRIALS step suite crash-matrix ./test/e2e/ -- \
    -tags e2e -count=1 -v -timeout 3h -run '^TestCrashMatrix$'
  WRAP="flock -o $CLUSTER_LOCK" TANDEM_STRESS_TRIALS=$PARTITION_TRIALS step suite partitions ./test/e2e/ -- \
    -tags e2e -count=1 -v -timeout 3h -run '^TestPartition$'
}

# Every fuzz target in the repository, found in the test files.
while IFS=: read -r file name; do
  pkg=./$(dirname "$file")
  step fuzz "$name" "$pkg" -- -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" -parallel "$FUZZ_PARALLEL"
done < <(git ls-files -co --exclude-standard '*_test.go' | xargs grep -Ho '^func Fuzz[A-Za-z0-9_]*' | sed 's/:func /:/' | sort -u)

echo "finished=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$OUT/meta.env"
go run ./hack/stress/report -in "$OUT" -findings hack/stress/findings.md -out "$REPORT" || failed=1
echo "stress: report written to $REPORT (logs in $OUT)" >&2
exit "$failed"

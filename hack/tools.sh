#!/usr/bin/env bash
# Builds the project's tools from their Go modules into bin/, offline from any
# binary download (setup-envtest, release tarballs and kind do not work here).
#
# Each tool family is pinned by its own module under hack/tools/<family>/
# (go.mod + go.sum, with Go 1.24+ `tool` directives). A binary is rebuilt only
# when the sha256 of its module files changes; the stamp lives next to it in
# bin/.stamps/.
#
#   hack/tools.sh            build every tool that is missing or stale
#   hack/tools.sh etcd helm  build only these families
#
# Families and the binaries they produce:
#   kubernetes      kube-apiserver, kubectl        (k8s.io/kubernetes v1.37.x)
#   etcd            etcd                           (go.etcd.io/etcd/server/v3 v3.6.x)
#   helm            helm                           (helm.sh/helm/v3)
#   controller-gen  controller-gen                 (sigs.k8s.io/controller-tools)
#   staticcheck     staticcheck                    (honnef.co/go/tools 2026.2, v0.8.x)
#
# Cold build of all six binaries on 2 cores: 15-21 minutes (kube-apiserver
# dominates); warm: under a second.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/bin"
stamps="$bin/.stamps"
mkdir -p "$bin" "$stamps"

# family -> "binary=package ..."
declare -A tools=(
  [kubernetes]="kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl"
  [etcd]="etcd=go.etcd.io/etcd/server/v3"
  [helm]="helm=helm.sh/helm/v3/cmd/helm"
  [controller-gen]="controller-gen=sigs.k8s.io/controller-tools/cmd/controller-gen"
  [staticcheck]="staticcheck=honnef.co/go/tools/cmd/staticcheck"
)

families=("$@")
[ ${#families[@]} -gt 0 ] || families=(controller-gen staticcheck etcd kubernetes helm)

for fam in "${families[@]}"; do
  [ -n "${tools[$fam]:-}" ] || { echo "tools.sh: unknown tool family '$fam' (known: ${!tools[*]})" >&2; exit 2; }
  dir="$root/hack/tools/$fam"
  want=$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -d' ' -f1)
  for spec in ${tools[$fam]}; do
    name=${spec%%=*}; pkg=${spec#*=}
    if [ -x "$bin/$name" ] && [ "$(cat "$stamps/$name" 2>/dev/null)" = "$want" ]; then
      continue
    fi
    echo "tools.sh: building $name from $pkg (pinned in hack/tools/$fam)" >&2
    start=$(date +%s)
    # -trimpath and no VCS stamping keep the build reproducible; CGO off gives static binaries.
    (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -buildvcs=false -ldflags='-s -w' -o "$bin/$name.tmp" "$pkg")
    mv -f "$bin/$name.tmp" "$bin/$name"
    echo "$want" > "$stamps/$name"
    echo "tools.sh: built $name in $(( $(date +%s) - start ))s" >&2
  done
done

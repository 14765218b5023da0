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
#   kubernetes-node kubelet, kube-scheduler,       (the same module; only the
#                   kube-controller-manager         local cluster's nodes need them)
#   etcd            etcd                           (go.etcd.io/etcd/server/v3 v3.6.x)
#   helm            helm                           (helm.sh/helm/v3)
#   controller-gen  controller-gen                 (sigs.k8s.io/controller-tools)
#   staticcheck     staticcheck                    (honnef.co/go/tools 2026.2, v0.8.x)
#   promtool        promtool                       (github.com/prometheus/prometheus v0.316.x;
#                                                   make lint-rules checks the chart's alerts)
#   krew            krew                           (sigs.k8s.io/krew v0.4.x; make release-check
#                                                   installs the plugin's archive with it)
#
# The default set leaves kubernetes-node, promtool and krew out: `make test` does not
# need them.
# Cold build of the default set's six binaries on 2 cores: 15-21 minutes (kube-apiserver
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
  [promtool]="promtool=github.com/prometheus/prometheus/cmd/promtool"
  [krew]="krew=sigs.k8s.io/krew/cmd/krew"
  [kubernetes-node]="kubelet=k8s.io/kubernetes/cmd/kubelet kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager"
)
# family -> the module under hack/tools/ that pins it (default: its own name)
declare -A module=([kubernetes-node]=kubernetes)

# Kubernetes binaries report the version they were built as (a Node's
# kubeletVersion, `kubectl version`); without these they say v0.0.0.
k8s_version() {
  local v
  v=$(sed -n 's/^\(require \)\{0,1\}[[:space:]]*k8s.io\/kubernetes \(v[0-9.]*\).*/\2/p' "$root/hack/tools/kubernetes/go.mod" | head -1)
  local major=${v#v} minor
  minor=${major#*.}; minor=${minor%%.*}; major=${major%%.*}
  local x
  for x in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- ' -X %s.gitVersion=%s -X %s.gitMajor=%s -X %s.gitMinor=%s -X %s.gitTreeState=clean' "$x" "$v" "$x" "$major" "$x" "$minor" "$x"
  done
}

# helm template and helm lint check a chart's kubeVersion against the
# Kubernetes version compiled into helm (its release builds set it like this);
# unset, it is v1.20, older than charts/tandem's kubeVersion allows.
helm_k8s_version() {
  local v major minor x
  v=$(sed -n 's/^\(require \)\{0,1\}[[:space:]]*k8s.io\/kubernetes v\([0-9.]*\).*/\2/p' "$root/hack/tools/kubernetes/go.mod" | head -1)
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  for x in chartutil lint/rules; do
    printf -- ' -X helm.sh/helm/v3/pkg/%s.k8sVersionMajor=%s -X helm.sh/helm/v3/pkg/%s.k8sVersionMinor=%s' "$x" "$major" "$x" "$minor"
  done
}

families=("$@")
[ ${#families[@]} -gt 0 ] || families=(controller-gen staticcheck etcd kubernetes helm)

for fam in "${families[@]}"; do
  [ -n "${tools[$fam]:-}" ] || { echo "tools.sh: unknown tool family '$fam' (known: ${!tools[*]})" >&2; exit 2; }
  dir="$root/hack/tools/${module[$fam]:-$fam}"
  ldflags='-s -w'
  case $fam in
  kubernetes*) ldflags+=$(k8s_version) ;;
  helm) ldflags+=$(helm_k8s_version) ;;
  esac
  want=$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -d' ' -f1)
  for spec in ${tools[$fam]}; do
    name=${spec%%=*}; pkg=${spec#*=}
    if [ -x "$bin/$name" ] && [ "$(cat "$stamps/$name" 2>/dev/null)" = "$want" ]; then
      continue
    fi
    echo "tools.sh: building $name from $pkg (pinned in hack/tools/${module[$fam]:-$fam})" >&2
    start=$(date +%s)
    # -trimpath and no VCS stamping keep the build reproducible; CGO off gives static binaries.
    (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -buildvcs=false -ldflags="$ldflags" -o "$bin/$name.tmp" "$pkg")
    mv -f "$bin/$name.tmp" "$bin/$name"
    echo "$want" > "$stamps/$name"
    echo "tools.sh: built $name in $(( $(date +%s) - start ))s" >&2
  done
done

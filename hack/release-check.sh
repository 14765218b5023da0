#!/usr/bin/env bash
# Installs the plugin from the archive `make release` built for this machine,
# with krew (built from its Go module into bin/ by hack/tools.sh) into a
# temporary KREW_ROOT, as a user would:
#
#   kubectl krew install --manifest=dist/tandem.yaml --archive=dist/kubectl-tandem_<v>_<os>_<arch>.tar.gz
#
# then runs `kubectl tandem version --client` through kubectl's plugin lookup
# and checks that it reports the release's version.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/bin"
dist="$root/dist"
[ -f "$dist/tandem.yaml" ] || { echo "release-check: no dist/tandem.yaml; run make release first" >&2; exit 1; }
version=$(sed -n 's/^  version: "\(.*\)"$/\1/p' "$dist/tandem.yaml")
os=$(go env GOOS) arch=$(go env GOARCH)
archive="$dist/kubectl-tandem_${version}_${os}_${arch}.tar.gz"
[ -f "$archive" ] || { echo "release-check: no $archive" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# krew is invoked the way kubectl runs it: as the plugin kubectl-krew.
mkdir -p "$tmp/path"
ln -s "$bin/krew" "$tmp/path/kubectl-krew"
export KREW_ROOT="$tmp/krew" HOME="$tmp/home"
export PATH="$KREW_ROOT/bin:$tmp/path:/usr/bin:/bin"
# The sha256 in the manifest must match the archive: krew refuses it otherwise.
"$bin/kubectl" krew install --manifest="$dist/tandem.yaml" --archive="$archive" </dev/null
# (krew list needs the plugin index, which is fetched with git: not here.)
[ -f "$KREW_ROOT/receipts/tandem.yaml" ] || { echo "release-check: krew wrote no receipt for tandem" >&2; exit 1; }
got=$("$bin/kubectl" tandem version --client)
echo "$got"
grep -q "^Plugin: $version " <<<"$got" || { echo "release-check: kubectl tandem version does not report $version" >&2; exit 1; }
[ -f "$KREW_ROOT/store/tandem/$version/LICENSE" ] || { echo "release-check: LICENSE not installed" >&2; ls -R "$KREW_ROOT/store" >&2; exit 1; }
echo "release-check: kubectl krew installed tandem $version from $(basename "$archive"); kubectl tandem version works"

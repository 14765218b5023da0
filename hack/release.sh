#!/usr/bin/env bash
# Builds the kubectl plugin's release into dist/: one archive per platform
# (linux and darwin, amd64 and arm64), each a .tar.gz holding kubectl-tandem
# and LICENSE; SHA256SUMS; and tandem.yaml, the Krew manifest of
# deploy/krew/tandem.yaml with the version and each archive's sha256 filled in.
#
#   hack/release.sh VERSION COMMIT
#
# VERSION must be a semantic version with a leading v (Krew requires one).
# The archives are reproducible: -trimpath, no VCS stamping, and tar entries
# with fixed owner, mode and time (the commit's).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
version=${1:?usage: hack/release.sh VERSION COMMIT}
commit=${2:-}
[[ $version =~ ^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$ ]] ||
  { echo "release.sh: version '$version' is not a semantic version vMAJOR.MINOR.PATCH[-pre]" >&2; exit 2; }
dist="$root/dist"
pkg=github.com/tandem-storage/tandem/internal/version
mtime=$(git -C "$root" log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)
platforms=(linux/amd64 linux/arm64 darwin/amd64 darwin/arm64)

rm -rf "$dist"
mkdir -p "$dist"
manifest=$(sed -e "/^#/d" -e "s/@VERSION@/$version/g" "$root/deploy/krew/tandem.yaml")
for p in "${platforms[@]}"; do
  os=${p%/*} arch=${p#*/}
  stage=$(mktemp -d)
  echo "release.sh: building kubectl-tandem $version for $os/$arch" >&2
  (cd "$root" && CGO_ENABLED=0 GOOS=$os GOARCH=$arch go build -trimpath -buildvcs=false \
    -ldflags="-s -w -X $pkg.Version=$version -X $pkg.Commit=$commit" -o "$stage/kubectl-tandem" ./cmd/kubectl-tandem)
  cp "$root/LICENSE" "$stage/LICENSE"
  chmod 0755 "$stage/kubectl-tandem"
  chmod 0644 "$stage/LICENSE"
  archive="kubectl-tandem_${version}_${os}_${arch}.tar.gz"
  tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner --mtime="$mtime" \
    -cf - kubectl-tandem LICENSE | gzip -9n >"$dist/$archive"
  rm -rf "$stage"
  sum=$(sha256sum "$dist/$archive" | cut -d' ' -f1)
  manifest=${manifest//@SHA256_${os}_${arch}@/$sum}
done
if grep -n '@[A-Za-z0-9_]*@' <<<"$manifest" >&2; then
  echo "release.sh: placeholders left in the manifest (a platform of deploy/krew/tandem.yaml not built?)" >&2
  exit 1
fi
printf '%s\n' "$manifest" >"$dist/tandem.yaml"
(cd "$dist" && sha256sum ./*.tar.gz | sed 's# \./# #' >SHA256SUMS)
(cd "$root" && echo "release.sh: wrote" dist/*) >&2

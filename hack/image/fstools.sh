#!/usr/bin/env bash
# The filesystem tools the CSI node plugin runs (mkfs.ext4, mkfs.xfs, and
# resize2fs, xfs_growfs to grow a mounted filesystem), with
# the shared libraries they load and mke2fs's configuration, as the lines
# IMAGE_PATH=SOURCE_PATH that `make image` turns into --file flags. They come
# from the machine that builds the image (Debian's e2fsprogs and xfsprogs):
# Tandem's own binaries are static, these are not, so the image carries the
# exact libraries they were linked against. The Dockerfile's fstools stage
# runs this script on Debian with --copy DIR to lay out the same files.
#
#   hack/image/fstools.sh            print IMAGE_PATH=SOURCE lines
#   hack/image/fstools.sh --copy DIR copy them into DIR/IMAGE_PATH
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
declare -A files=()
# tool:package — mkfs.ext4 is mke2fs under another name (it picks ext4 from it).
for tool_pkg in mkfs.ext4:e2fsprogs resize2fs:e2fsprogs mkfs.xfs:xfsprogs xfs_growfs:xfsprogs; do
  tool=${tool_pkg%%:*}
  src=$(command -v "$tool" || true)
  if [ -z "$src" ]; then
    echo "fstools: $tool not found; install Debian's ${tool_pkg#*:} (apt-get install ${tool_pkg#*:})" >&2
    exit 1
  fi
  files[/usr/sbin/$tool]=$(readlink -f "$src")
  # ldd: "libx.so.1 => /lib/.../libx.so.1 (0x...)" and the loader's own line.
  while read -r lib; do
    files[$lib]=$(readlink -f "$lib")
  done < <(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
done
[ -f /etc/mke2fs.conf ] && files[/etc/mke2fs.conf]=/etc/mke2fs.conf
if [ "${1:-}" = --copy ]; then
  dir=${2:?--copy needs a directory}
  for dst in "${!files[@]}"; do
    install -D -m "$(stat -c %a "${files[$dst]}")" "${files[$dst]}" "$dir$dst"
  done
  exit 0
fi
for dst in "${!files[@]}"; do
  echo "$dst=${files[$dst]}"
done | sort

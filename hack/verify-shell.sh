#!/usr/bin/env bash
# Runs shellcheck on every shell script of the repository: the *.sh files and
# every other file whose first line is a sh/bash shebang (.ci/run). Tracked
# and new (untracked, not ignored) files both count, so a script is checked
# before its first commit. Files that are only sourced (hack/lib/) have no
# shebang: they name their shell with a `# shellcheck shell=bash` line, and
# the script sourcing them names each with a `# shellcheck source=` line, so
# its check sees their definitions. shellcheck comes from the distribution and
# is installed when missing, as .ci/run installs the test dependencies.
#
# A finding that is deliberate gets a directive on the line before it, with
# the reason:  # shellcheck disable=SC2086 # split "a b c" into $1 $2 $3
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v shellcheck >/dev/null 2>&1; then
  echo "verify-shell: installing shellcheck" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq shellcheck
fi

scripts=()
while IFS= read -r -d '' f; do
  if [ ! -f "$f" ] || [ -L "$f" ]; then continue; fi # deleted, or a link (bin/)
  if [[ $f == *.sh ]] || head -n1 -- "$f" | grep -qE '^#!.*[/ ](ba)?sh([[:space:]]|$)'; then
    scripts+=("$f")
  fi
done < <(git ls-files -z --cached --others --exclude-standard)
[ ${#scripts[@]} -gt 0 ] || { echo "verify-shell: no shell scripts found" >&2; exit 1; }
echo "shellcheck ${scripts[*]}"
shellcheck -- "${scripts[@]}"

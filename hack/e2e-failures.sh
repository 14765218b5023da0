#!/usr/bin/env bash
# Prints what the failing end-to-end tests said, from the full go test -v log
# (.e2e.log). make test-e2e shows only the tests' figures while they run; when
# one fails this puts its messages (t.Errorf/t.Fatalf and the lines logged
# just before them) at the end of the output, where CI excerpts look.
set -euo pipefail
log=${1:-.e2e.log}
[ -f "$log" ] || { echo "e2e-failures: no $log" >&2; exit 0; }
awk -v max=40 '
  # go test -v: "=== RUN   Name", "--- FAIL: Name (…)"; sub-tests are
  # indented. The e2e tests run one after the other, so a test'"'"'s output
  # lies between its RUN line and the next RUN or its result line.
  /^=== (RUN|CONT) / { cur = $3; next }
  /^(FAIL|PASS|ok)([ \t]|$)/ { cur = ""; next }
  /^ *--- FAIL: / {
    name = $3
    failed[++nf] = name
    next
  }
  cur != "" {
    n = ++cnt[cur]
    buf[cur, n] = $0
  }
  END {
    if (nf == 0) exit
    print ""
    print "=== e2e failures (the whole log: " FILENAME ") ==="
    for (i = 1; i <= nf; i++) {
      name = failed[i]
      if (!(name in cnt)) continue
      printed = 0
      # The test'"'"'s own messages first (t.Logf/t.Fatalf: "file_test.go:N: …",
      # not the log dumps of its cleanup, which start with "----"), then
      # VIOLATION and error lines of the dumps, then the last lines.
      # A message of several lines (t.Fatalf("…\n%s", out)) continues on
      # lines indented deeper, up to the next message or dump header.
      for (j = 1; j <= cnt[name] && printed < max; j++) {
        if (buf[name, j] !~ /^ +[A-Za-z0-9_]+_test\.go:[0-9]+: / || buf[name, j] ~ /_test\.go:[0-9]+: ----/) continue
        print "[" name "] " buf[name, j]; printed++; mine[j] = 1
        for (k = j + 1; k <= cnt[name] && k <= j + 20 && buf[name, k] ~ /^        / && buf[name, k] !~ /^ +[A-Za-z0-9_]+_test\.go:[0-9]+: /; k++) {
          print "[" name "] " buf[name, k]; mine[k] = 1
        }
      }
      for (j = 1; j <= cnt[name] && printed < 2 * max; j++)
        if (!(j in mine) && buf[name, j] ~ /VIOLATION|[Ee]rror|FAIL|panic/) { print "[" name "] " buf[name, j]; printed++ }
      delete mine
      print "--- last lines of " name ":"
      from = cnt[name] - 15; if (from < 1) from = 1
      for (j = from; j <= cnt[name]; j++) print "[" name "] " buf[name, j]
    }
  }
' "$log" | cut -c1-1500

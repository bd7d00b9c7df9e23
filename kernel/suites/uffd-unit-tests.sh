# The kernel's own userfaultfd selftests (tools/testing/selftests/mm/uffd-unit-tests), built
# from the same tree as the running kernel. Prints one JSON object: each test's outcome
# ("pass", "skip", "fail"; a test cut short by the binary's exit is "fail"), the reasons of
# skips and failures, each test's seconds, and the binary's exit code. kernel/run checks there
# is no failure and that stock and patched agree on every test both have
# (uffd-unit-tests.compare.jq).
# timeout: 480
# The binary gets less time than the suite, so a hang still yields a report; each output line
# is stamped with the guest's uptime (stderr, for the console log on failure).
{ timeout 420 uffd-unit-tests 2>&1; echo "exit-code $?"; } | awk '{
  getline up < "/proc/uptime"; close("/proc/uptime"); split(up, u, " ")
  print u[1], $0; fflush() }' >/tmp/uut.log
rc=$(sed -n 's/^[0-9.]* exit-code //p' /tmp/uut.log)
cat /tmp/uut.log >&2
awk -v rc="$rc" '
function esc(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); gsub(/\t/, " ", s); return s }
function record(outcome, reason) {
  if (cur == "") return
  tests = tests sep "\"" esc(cur) "\": \"" outcome "\""
  if (reason != "") reasons = reasons rsep "\"" esc(cur) "\": \"" esc(reason) "\""
  if (reason != "") rsep = ", "
  secs = secs sep "\"" esc(cur) "\": " sprintf("%.2f", stamp - last)
  sep = ", "; n[outcome]++; cur = ""; last = stamp
}
function outcome(s,   r) {
  if (s ~ /^done/) { record("pass", ""); return }
  if (match(s, /^(skipped|failed) \[reason: /)) {
    r = substr(s, RLENGTH + 1); sub(/\]$/, "", r)
    record(s ~ /^skipped/ ? "skip" : "fail", r)
  }
}
{ stamp = $1; sub(/^[0-9.]+ /, "") }
NR == 1 { last = stamp }
/^Testing / {
  record("fail", "no outcome printed")
  i = index($0, "... ")
  if (i == 0) next
  cur = substr($0, 9, i - 9)
  outcome(substr($0, i + 4))
  next
}
cur != "" { outcome($0) }
/^Userfaults unit tests:/ { summary = $0 }
END {
  record("fail", "exited (rc " rc ") before an outcome")
  printf "{\"rc\": %d, \"pass\": %d, \"skip\": %d, \"fail\": %d, \"summary\": \"%s\", ", rc, n["pass"], n["skip"], n["fail"], esc(summary)
  printf "\"tests\": {%s}, \"reasons\": {%s}, \"secs\": {%s}}\n", tests, reasons, secs
}' /tmp/uut.log
exit "${rc:-1}"

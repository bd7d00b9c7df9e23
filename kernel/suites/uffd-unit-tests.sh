# The kernel's own userfaultfd selftests (tools/testing/selftests/mm/uffd-unit-tests), built
# from the same tree as the running kernel, with an 8 MiB test area instead of upstream's
# 32 MiB (kernel/run, build_tcg_selftests: under TCG the 4 KiB tests fault once a page, and
# the suite took 360-410 s a boot, now 85-102 s; every test keeps its layout). Prints one JSON object: each test's outcome
# ("pass", "skip", "fail"; a test cut short by the binary's exit is "fail"), the reasons of
# skips and failures, each test's seconds, and the exit code of every run. kernel/run checks
# there is no failure and that stock and patched agree on every test both have
# (uffd-unit-tests.compare.jq).
#
# One retry, never hidden: the selftests flake now and then under TCG (a fixed-address mmap
# colliding, a child exiting 1 mid-test; seen once in a few dozen full runs, on either
# kernel). A test that failed, and every test the binary never reached because it exited
# early, is run once more with `-f NAME`. A test that fails and then passes ends "pass" and is
# listed under "flaky" with the first run's reason and the output that led to it, so the
# JSON keeps the evidence; one that fails twice stays "fail".
# timeout: 900
# Each run gets less time than the suite, so a hang still yields a report; each output line
# is stamped with the guest's uptime (stderr, for the console log on failure).
# A test cut short leaves "Testing NAME... " unterminated on stdout (flushed at exit, after its
# stderr): the exit code goes on a line of its own.
run() {
  { timeout "$1" uffd-unit-tests ${2:+-f "$2"} 2>&1; rc=$?; echo; echo "exit-code $rc"; } | awk '{
    getline up < "/proc/uptime"; close("/proc/uptime"); split(up, u, " ")
    print u[1], $0; fflush() }' >>/tmp/uut.log
}

: >/tmp/uut.log
run 420 ""
# Base names (as -f takes them) of the tests that failed or never ran: "NAME on MEM" -> NAME.
uffd-unit-tests -l >/tmp/uut.names
retry=$(awk '
  NR == FNR { if ($0 != "") names[++n] = $0; next }
  { sub(/^[0-9.]+ /, "") }
  /^Testing / {
    if (open) bad[base] = 1
    i = index($0, " on "); open = 0; if (i == 0) next
    base = substr($0, 9, i - 9); seen[base] = 1; open = 1; $0 = substr($0, index($0, "... ") + 4)
  }
  open && /^(done|skipped)/ { open = 0 }
  open && /^failed/ { bad[base] = 1; open = 0 }
  open && /^exit-code / { bad[base] = 1; open = 0 }
  END {
    for (k = 1; k <= n; k++)
      if (bad[names[k]]) print "bad " names[k]; else if (!seen[names[k]]) print "unseen " names[k]
  }
' /tmp/uut.names /tmp/uut.log)
# -f matches substrings ("events" runs "events-wp" too): a base an earlier retry covered is
# not run again. More than three failed test names is no flake: no retry then (the tests a
# failure kept from running are run all the same).
if [ "$(echo "$retry" | grep -c '^bad ')" -le 3 ]; then
  covered=""
  for base in $(echo "$retry" | cut -d' ' -f2); do
    case " $covered " in *" $base "*) continue ;; esac
    echo "retrying: $base" >&2
    run 150 "$base"
    covered="$covered $(grep -F -- "$base" /tmp/uut.names | xargs)"
  done
fi
cat /tmp/uut.log >&2
prog=$(cat <<'EOF'
function esc(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); gsub(/\t/, " ", s); return s }
function tail_text(   k, s) {
  for (k = (nl > 12 ? nl - 11 : 1); k <= nl; k++) s = s (s == "" ? "" : "\n") ring[k % 12]
  return s
}
function record(result, reason) {
  if (cur == "") return
  if (!(cur in outcome)) order[++n] = cur
  else if (outcome[cur] == "fail" && result == "pass") { flaky[cur] = why[cur]; flog[cur] = flog_of[cur] }
  if (result == "fail") flog_of[cur] = tail_text()
  outcome[cur] = result; why[cur] = reason; secs[cur] = stamp - last
  cur = ""; last = stamp
}
function outcome_of(s,   r) {
  if (s ~ /^done/) { record("pass", ""); return }
  if (match(s, /^(skipped|failed) \[reason: /)) {
    r = substr(s, RLENGTH + 1); sub(/\]$/, "", r)
    record(s ~ /^skipped/ ? "skip" : "fail", r)
  }
}
NR == FNR { if ($0 != "") listed[++nlisted] = $0; next }
{ stamp = $1; sub(/^[0-9.]+ /, ""); ring[++nl % 12] = $0 }
FNR == 1 { last = stamp }
/^exit-code / {
  rc = $2 + 0; rcs = rcs (rcs == "" ? "" : ", ") rc
  record("fail", "exited (rc " rc ") before an outcome"); nl = 0; next
}
/^Testing / {
  record("fail", "no outcome printed")
  i = index($0, "... ")
  if (i == 0) next
  cur = substr($0, 9, i - 9)
  outcome_of(substr($0, i + 4))
  next
}
cur != "" { outcome_of($0) }
END {
  record("fail", "the log ended before an outcome")
  for (k = 1; k <= n; k++) { t = order[k]; i = index(t, " on "); if (i) seen[substr(t, 1, i - 1)] = 1 }
  for (k = 1; k <= nlisted; k++) if (!(listed[k] in seen)) {
    missing = missing msep "\"" esc(listed[k]) "\""; msep = ", "; nmissing++
  }
  for (k = 1; k <= n; k++) {
    t = order[k]; c[outcome[t]]++
    tests = tests sep "\"" esc(t) "\": \"" outcome[t] "\""
    times = times sep "\"" esc(t) "\": " sprintf("%.2f", secs[t])
    if (why[t] != "") { reasons = reasons rsep "\"" esc(t) "\": \"" esc(why[t]) "\""; rsep = ", " }
    if (t in flaky) {
      fl = fl fsep "\"" esc(t) "\": {\"first_reason\": \"" esc(flaky[t]) "\", \"first_output\": \"" esc(flog[t]) "\"}"
      fsep = ", "; nf++
    }
    sep = ", "
  }
  summary = sprintf("Userfaults unit tests: pass=%d, skip=%d, fail=%d (total=%d)", c["pass"], c["skip"], c["fail"], n)
  failed = (c["fail"] > 0 || nmissing > 0) ? 1 : 0
  if (nf) summary = summary sprintf(", %d passed only on the retry", nf)
  gsub(/\n/, "\\n", fl)
  printf "{\"rc\": %d, \"runs_rc\": [%s], \"pass\": %d, \"skip\": %d, \"fail\": %d, \"summary\": \"%s\", ", failed, rcs, c["pass"], c["skip"], c["fail"], summary
  printf "\"tests\": {%s}, \"reasons\": {%s}, \"flaky\": {%s}, \"missing\": [%s], \"secs\": {%s}}\n", tests, reasons, fl, missing, times
  exit failed
}
EOF
)
awk "$prog" /tmp/uut.names /tmp/uut.log

# The project's kernel-facing test binaries (kernel/run builds them statically into
# /opt/uffd-wp/tests), run under UFFD_WP_REQUIRE_KERNEL=1 and UFFD_WP_REQUIRE_TEST_KERNEL=1: a
# test that needs a kernel feature, or the test kernels' fault injection, fails instead of
# skipping. Prints {"binaries": {NAME: {rc, passed, failed, ignored,
# failures}}, "failed": N}.
# timeout: 300
export UFFD_WP_REQUIRE_KERNEL=1
# These are the test kernels: what only they have (fault injection) is required too.
export UFFD_WP_REQUIRE_TEST_KERNEL=1
first=1
printf '{"binaries": {'
total=0
for t in /opt/uffd-wp/tests/*; do
  name=$(basename "$t")
  timeout 240 "$t" >"/tmp/rt-$name.log" 2>&1
  rc=$?
  cat "/tmp/rt-$name.log" >&2
  [ $first = 1 ] || printf ', '
  first=0
  awk -v name="$name" -v rc="$rc" '
    / \.\.\. ok$/ { p++ }
    / \.\.\. FAILED$/ { f++; sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); fl = fl (fl == "" ? "" : ", ") "\"" $0 "\"" }
    / \.\.\. ignored/ { i++ }
    END { printf "\"%s\": {\"rc\": %d, \"passed\": %d, \"failed\": %d, \"ignored\": %d, \"failures\": [%s]}", name, rc, p, f, i, fl }
  ' "/tmp/rt-$name.log"
  [ "$rc" = 0 ] || total=$((total + 1))
done
printf '}, "failed": %d}\n' "$total"
[ "$total" = 0 ]

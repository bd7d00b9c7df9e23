# Input: {kernel, patched, rc, result}. Everything 6.12 offers with kernel/config.fragment is
# there; features beyond 6.12's 17 (the series' new bits, once the library names them) are
# listed in `why`.
["pagefault_flag_wp", "event_fork", "event_remap", "event_remove", "missing_hugetlbfs",
 "missing_shmem", "event_unmap", "sigbus", "thread_id", "minor_hugetlbfs", "minor_shmem",
 "exact_address", "wp_hugetlbfs_shmem", "wp_unpopulated", "poison", "wp_async", "move"] as $stock
| .result as $p
| [ (if $p == null then "no JSON result (rc \(.rc))" else empty end),
    ($p | select(. != null) | (
      (if .uffd.syscall != true or .uffd.dev != true then "userfaultfd syscall/dev: \(.uffd)" else empty end),
      ($stock[] as $f | select($p.features[$f] != true) | "feature \($f) missing"),
      (if .pagemap_scan != true then "no PAGEMAP_SCAN" else empty end),
      (if .pagemap_wp_bit != true then "no pagemap WP bit" else empty end),
      (if .soft_dirty != true then "no soft-dirty (CONFIG_MEM_SOFT_DIRTY)" else empty end),
      (if .io_uring != true then "no io_uring" else empty end))) ] as $bad
| if ($bad | length) > 0 then {ok: false, why: ($bad | join("; "))}
  else {ok: true, why: "\($p.kernel): the 6.12 features; beyond them: \([$p.features | to_entries[] | select(.value and (.key | IN($stock[]) | not)) | .key] | join(", ") | if . == "" then "none" else . end); ioctls \($p.ioctls | join(" "))"} end

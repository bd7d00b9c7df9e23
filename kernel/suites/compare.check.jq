# Input: {kernel, patched, rc, result}. 5,000 cases, at least 2,000 with page-table allocation
# failures injected and at least 100 injected failures the kernel answered with ENOMEM, no
# mismatch; the patched kernel compared through the report call against `proposed`, stock
# through the old call against `linux`.
if .result == null then {ok: false, why: "no JSON result (rc \(.rc))"}
else
  .result as $r
  | [ (if $r.cases != 5000 then "\($r.cases) cases run, expected 5000" else empty end),
      (if ($r.fail_alloc_cases // 0) < 2000 then "\($r.fail_alloc_cases) cases with allocation failures injected, expected at least 2000" else empty end),
      (if ($r.injected_enomem // 0) < 100 then "only \($r.injected_enomem) of \($r.injected) armed write-protects failed with ENOMEM on the kernel" else empty end),
      (if $r.mismatches != 0 then "\($r.mismatches) mismatches, first: \($r.first_mismatch | tostring | .[0:600])" else empty end),
      (if .patched and ($r.report != true or $r.semantics != "proposed") then "patched kernel compared without the report call (\($r.semantics))" else empty end),
      (if (.patched | not) and $r.semantics != "linux" then "stock kernel compared against \($r.semantics)" else empty end),
      (if .rc != 0 then "exit code \(.rc)" else empty end)
    ] as $bad
  | if ($bad | length) > 0 then {ok: false, why: ($bad | join("; "))}
    else {ok: true, why: "\($r.cases) cases (\($r.fail_alloc_cases) with allocation failures injected: \($r.injected) armed write-protects, \($r.injected_enomem) ENOMEM), \($r.ops) operations, 0 mismatches against the model's \($r.semantics) semantics\(if $r.report then " (every protect through UFFDIO_WRITEPROTECT_REPORT)" else "" end)"} end
end

# Input: {kernel, patched, rc, result}. 2,000 cases, no mismatch; the patched kernel compared
# through the report call against `proposed`, stock through the old call against `linux`.
if .result == null then {ok: false, why: "no JSON result (rc \(.rc))"}
else
  .result as $r
  | [ (if $r.cases != 2000 then "\($r.cases) cases run, expected 2000" else empty end),
      (if $r.mismatches != 0 then "\($r.mismatches) mismatches, first: \($r.first_mismatch | tostring | .[0:600])" else empty end),
      (if .patched and ($r.report != true or $r.semantics != "proposed") then "patched kernel compared without the report call (\($r.semantics))" else empty end),
      (if (.patched | not) and $r.semantics != "linux" then "stock kernel compared against \($r.semantics)" else empty end),
      (if .rc != 0 then "exit code \(.rc)" else empty end)
    ] as $bad
  | if ($bad | length) > 0 then {ok: false, why: ($bad | join("; "))}
    else {ok: true, why: "\($r.cases) cases, \($r.ops) operations, 0 mismatches against the model's \($r.semantics) semantics\(if $r.report then " (every protect through UFFDIO_WRITEPROTECT_REPORT)" else "" end)"} end
end

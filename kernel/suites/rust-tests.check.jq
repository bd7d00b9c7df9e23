# Input: {kernel, patched, rc, result}. Every binary exited 0 with at least one test passed.
if .result == null then {ok: false, why: "no JSON result (rc \(.rc))"}
else
  [.result.binaries | to_entries[] | select(.value.rc != 0 or .value.failed > 0 or .value.passed == 0)
   | "\(.key): rc \(.value.rc), \(.value.failed) failed \(.value.failures)"] as $bad
  | if ($bad | length) > 0 then {ok: false, why: ($bad | join("; "))}
    else {ok: true, why: ([.result.binaries | to_entries[] | "\(.key): \(.value.passed) passed, \(.value.ignored) ignored"] | join("; "))} end
end

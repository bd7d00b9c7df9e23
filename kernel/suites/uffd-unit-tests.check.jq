# Input: {kernel, patched, rc, result}. Every test ran to an outcome, none failed, some passed.
.result as $r
| if $r == null then {ok: false, why: "no JSON result (rc \(.rc))"}
  elif $r.fail > 0 then
    {ok: false, why: "\($r.fail) failed: \([$r.tests | to_entries[] | select(.value == "fail")
      | "\(.key) (\($r.reasons[.key]))"] | join("; "))"}
  elif $r.pass == 0 then {ok: false, why: "no test passed: \($r.summary)"}
  else {ok: true, why: $r.summary} end

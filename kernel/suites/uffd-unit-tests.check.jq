# Input: {kernel, patched, rc, result}. Every test the binary lists (-l) ran to an outcome on
# some memory type, none failed, some passed.
.result as $r
| if $r == null then {ok: false, why: "no JSON result (rc \(.rc))"}
  elif ($r.missing // []) | length > 0 then
    {ok: false, why: "tests the binary lists gave no result: \($r.missing | join(", "))"}
  elif $r.fail > 0 then
    {ok: false, why: "\($r.fail) failed: \([$r.tests | to_entries[] | select(.value == "fail")
      | "\(.key) (\($r.reasons[.key]))"] | join("; "))"}
  elif $r.pass == 0 then {ok: false, why: "no test passed: \($r.summary)"}
  else {ok: true, why: $r.summary} end

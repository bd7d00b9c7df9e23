# Input: {kernel, patched, rc, result}. The raw call's outcome is the kernel's: on stock 0 with
# a hole inside the first GiB (the second GiB protected), on a patched kernel ENOMEM with only
# a prefix protected, through UFFDIO_WRITEPROTECT_REPORT, whose done/stop equal the page tables. On both, the exact engine stops with NoMemory at the end of a protected
# prefix, then protects everything once the limit is lifted; every step verified.
def step($n): first(.result.results[] | select(.step == $n));
def gib: 1073741824;
def mib: . / 1048576 | floor | tostring + " MiB";
def prefix: (.report.protected | length == 0)
  or (.report.protected | length == 1 and .[0][0] == 0 and .[0][1] < gib);
if .result == null then {ok: false, why: "no JSON result (rc \(.rc))"}
else
  step("raw-ioctl") as $raw | step("exact-engine") as $eng | step("exact-engine-resume") as $res
  | [ (if .patched then
         (if $raw.kernel_errno != "ENOMEM" then "raw call: \($raw.kernel_errno // "success"), expected ENOMEM"
          elif ($raw | prefix | not) then "raw call: protected \($raw.report.protected), expected a prefix of the first GiB"
          elif $raw.detail.kernel_returned.call != "UFFDIO_WRITEPROTECT_REPORT" then "raw call: \($raw.detail.kernel_returned.call), expected the report call"
          elif $raw.detail.kernel_returned.bytes_not_protected != $raw.report.bytes_not_protected then "raw call: the kernel says \($raw.detail.kernel_returned.bytes_not_protected) bytes not protected, the page tables \($raw.report.bytes_not_protected)"
          else empty end)
       else
         (if $raw.kernel_errno != null then "raw call: \($raw.kernel_errno), expected success with a hole"
          elif ($raw.report.not_protected | length == 0) then "raw call: no hole (every page protected)"
          elif ([$raw.report.not_protected[] | select(.[1] > gib)] | length > 0) then "raw call: hole outside the first GiB: \($raw.report.not_protected)"
          elif ([$raw.report.protected[] | select(.[0] <= gib and .[1] == 2 * gib)] | length == 0) then "raw call: second GiB not fully protected"
          else empty end)
       end),
      (if $eng.kernel_errno != "ENOMEM" or $eng.report.error.kind != "NoMemory" then "exact engine: \($eng.kernel_errno // "success") / \($eng.report.error.kind // "no error"), expected ENOMEM / NoMemory" else empty end),
      (if ($eng | prefix | not) then "exact engine: protected \($eng.report.protected), expected a prefix" else empty end),
      (if $res.report.bytes_not_protected != 0 or $res.report.error != null then "resume: \($res.report.bytes_not_protected) bytes not protected" else empty end),
      (.result.results[] | select(.verified != true) | "step \(.step) not verified"),
      (if .rc != 0 then "exit code \(.rc)" else empty end)
    ] as $bad
  | if ($bad | length) > 0 then {ok: false, why: ($bad | join("; "))}
    elif .patched then {ok: true, why: "raw ENOMEM, \($raw.report.bytes_not_protected | mib) not protected from offset \($raw.report.not_protected[0][0] | mib); the kernel's report: done \($raw.detail.kernel_returned.done | mib), stop at offset \($raw.detail.kernel_returned.stop_offset | mib), exact against the page tables"}
    else {ok: true, why: "raw success with a hole of \($raw.report.bytes_not_protected | mib) at \($raw.report.not_protected | map(map(mib) | join("-")) | join(", "))"}
    end
end

# Input: {kernel, patched, rc, result}. Both layouts and both page kinds measured, the engine's
# raw calls and read-back as the kernel allows: with the PUD boundary in the middle, stock
# splits the clean call (2) and patched does not (1), both read back the second half after the
# failure; with the range PUD-aligned, stock reads the failed call back from its start (all of
# it), patched only what follows the kernel's `done` (half).
def mib: . / 1048576 | floor;
def r3: . * 1000 | round / 1000;
if .result == null then {ok: false, why: "no JSON result (rc \(.rc))"}
else
  .result as $r | .patched as $p | ($r.mid.size // 0) as $size
  | [ ("mid", "aligned") as $layout | ("4k", "thp") as $k
      | $r[$layout][$k] as $f | ($layout == "mid") as $mid
      | ({calls: (if $mid and ($p | not) then 2 else 1 end),
          read_back: (if $mid or $p then $size / 2 else $size end)}) as $want
      | if $f == null then "\($layout) \($k): not measured"
        elif $f.raw_calls != $want.calls or $f.partial_read_back_bytes != $want.read_back then
          "\($layout) \($k): \($f.raw_calls) raw calls, \($f.partial_read_back_bytes | mib) MiB read back; expected \($want.calls) and \($want.read_back | mib) MiB"
        else empty end ] as $bad
  | if $size == 0 then {ok: false, why: "no size in the result"}
    elif ($bad | length) > 0 then {ok: false, why: ($bad | join("; "))}
    else {ok: true, why: "exact/raw clean \($r.mid["4k"].ratio | r3) (4k, PUD in the middle), failing half-way \($r.aligned["4k"].partial_ratio | r3) (4k, PUD-aligned: \($r.aligned["4k"].partial_read_back_bytes | mib) MiB read back)"} end
end

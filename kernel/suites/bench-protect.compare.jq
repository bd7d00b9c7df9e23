# Input: {stock: result, patched: result}. The exact engine's cost over the raw ioctl on both
# kernels, same run: where the patched kernel's report spares the PUD split and the read-back.
def r3: . * 1000 | round / 1000;
def fig: {ratio: (.ratio | r3), partial_ratio: (.partial_ratio | r3), raw_calls,
          read_back_mib: (.partial_read_back_bytes / 1048576)};
if .stock == null or .patched == null then {ok: false, why: "a kernel has no bench result"}
else
  . as $in
  | {ok: true,
     figures: [("mid", "aligned") as $l | ("4k", "thp") as $k
       | {layout: $l, kind: $k, stock: ($in.stock[$l][$k] | fig), patched: ($in.patched[$l][$k] | fig)}],
     why: "exact/raw 4k, stock | patched: clean with a PUD in the middle \($in.stock.mid["4k"].ratio | r3) | \($in.patched.mid["4k"].ratio | r3); failing inside one call \($in.stock.aligned["4k"].partial_ratio | r3) | \($in.patched.aligned["4k"].partial_ratio | r3)"}
end

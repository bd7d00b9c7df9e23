# Input: {stock: result, patched: result}. The tests both trees have end the same way on both
# kernels; tests only the patched tree has (the series' new ones) are listed.
(.stock.tests // {}) as $s | (.patched.tests // {}) as $p
| [$s | keys[] | select($p[.] != null and $p[.] != $s[.])
   | "\(.): stock \($s[.]), patched \($p[.])"] as $differ
| {ok: (($differ | length) == 0 and ($s | length) > 0),
   differ: $differ,
   only_patched: [$p | keys[] | select($s[.] == null)],
   only_stock: [$s | keys[] | select($p[.] == null)],
   why: (if ($differ | length) > 0 then "outcomes differ: \($differ | join("; "))"
         else "\($s | length) common tests end the same way on both kernels" end)}

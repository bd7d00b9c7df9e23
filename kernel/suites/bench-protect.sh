# `uffd-wp bench protect` in the guest: the exact engine against the raw UFFDIO_WRITEPROTECT,
# clean and failing half-way (256 MiB, 4 KiB pages and THP), twice:
# - "mid": a PUD boundary in the middle of the range, where the half-way failure falls. On
#   stock the engine splits the clean call at the boundary (2 raw calls); on the patched
#   kernel it makes one UFFDIO_WRITEPROTECT_REPORT call. Either way it reads back the
#   uncertain second half after the failure (128 MiB).
# - "aligned": the range starts on a PUD boundary, so the failure falls inside one raw call.
#   On stock the engine reads that call back from its start (256 MiB); on the patched kernel
#   it takes the kernel's `done` and reads back only what follows it (128 MiB).
# kernel/run prints both kernels' ratios side by side (bench-protect.compare.jq). Timings under
# TCG are emulated: the ratios, measured in the same run, are what compares.
# timeout: 300
mid=$(uffd-wp bench protect --size 256M --runs 5 --json) || exit 1
aligned=$(uffd-wp bench protect --size 256M --runs 5 --pud-offset 0 --json) || exit 1
printf '{"mid": %s, "aligned": %s}\n' "$mid" "$aligned"

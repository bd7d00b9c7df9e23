# `uffd-wp compare`: 2,000 random operation sequences on this kernel (in a worker process) and on
# the model. On stock the old UFFDIO_WRITEPROTECT against the model's `linux` semantics; on the
# patched kernel every write-protect goes through UFFDIO_WRITEPROTECT_REPORT (errno, done,
# pinned compared) against the model's `proposed` semantics (compare.check.jq).
# timeout: 600
uffd-wp compare --cases 2000 --seed 1 --json

# `uffd-wp compare`: 5,000 random operation sequences on this kernel (in a worker process) and on
# the model; about half inject page-table allocation failures (the guest kernels have fault
# injection: fail-nth fails the Nth allocation of a write-protect on the kernel, the model's
# allocator the same one), in an arena with no page tables of its own at the start. On stock the old UFFDIO_WRITEPROTECT against the model's `linux` semantics; on the
# patched kernel every write-protect goes through UFFDIO_WRITEPROTECT_REPORT (errno, done,
# pinned compared) against the model's `proposed` semantics (compare.check.jq).
# The cases' regular files must not be shmem, as on a host's disk (a private mapping of a tmpfs
# file can be registered for WP, of a regular file not): they go on ramfs.
# timeout: 600
mkdir -p /tmp/ramfs && mount -t ramfs ramfs /tmp/ramfs || exit 1
TMPDIR=/tmp/ramfs uffd-wp compare --cases 5000 --seed 1 --json

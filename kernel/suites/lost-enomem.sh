# `uffd-wp scenario lost-enomem`: a 2 GiB range write-protected while page-table allocation 257
# fails (fault injection on the test kernels, else a 1 MiB memory cgroup v1 limit;
# shared/kernel-notes.md). Stock 6.12 returns 0 with a hole in the first GiB; the
# patched kernel returns ENOMEM with a protected prefix (lost-enomem.check.jq).
# timeout: 300
uffd-wp scenario lost-enomem --json

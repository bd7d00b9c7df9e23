# `uffd-wp probe`: what the guest kernel offers (userfaultfd features, PAGEMAP_SCAN, pagemap WP
# bit, soft-dirty, io_uring, THP). The new-API bits appear here once the library knows them.
# timeout: 60
uffd-wp probe --json

//! A reference model of the kernel side of userfaultfd write-protection.
//!
//! Deterministic and single-threaded: an address space with VMAs (private anonymous, shmem /
//! memfd, regular file, hugetlb), 4-level page tables whose PUD, PMD and PTE tables are allocated
//! on demand and counted, THP PMD mappings that split when a protection covers part of them,
//! `PTE_MARKER_UFFD_WP` markers, swap entries (`MADV_PAGEOUT`), `MADV_DONTNEED`, `munmap`, pin
//! counts (`FOLL_PIN`, `FOLL_LONGTERM`), CPU reads and writes (a write to a write-protected page
//! in sync mode queues a fault message and waits until it is resolved; in async mode the kernel
//! clears the bit), DMA and kernel writes through a pin (no fault, the bit stays), uffd contexts
//! (features, registration modes, `UFFDIO_WRITEPROTECT`, `mmap_changing` -> EAGAIN, the message
//! queue), pagemap bits and `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`, `max_pages` and
//! `walk_end`; and a page-table allocator that fails on demand ([`FailPolicy`]: the Nth
//! allocation, past a budget, seeded random).
//!
//! Two [`Semantics`]: `linux` is what Linux 6.18 does, read from mm/userfaultfd.c,
//! mm/mprotect.c, fs/userfaultfd.c and fs/proc/task_mmu.c (function names are cited where the
//! behaviour is modelled), including the lost ENOMEM: change_pmd_range() turns a `pte_alloc()`
//! failure into `-ENOMEM` for one PUD, which change_pud_range() *adds* to the entries changed in
//! the other PUDs, so UFFDIO_WRITEPROTECT can return 0 with a hole (see [`mprotect`]).
//! `proposed` is the seed thread's proposal as kernel/README.md specifies it for the patch
//! series: failures are always reported, and `UFFDIO_WRITEPROTECT_REPORT`
//! ([`ModelMm::writeprotect_report_raw`], advertised by `UFFD_FEATURE_WP_REPORT` and
//! `WP_SKIP_PINNED`) returns the errno and how far the protection got (`done`, a prefix;
//! `pinned`), optionally skipping pinned pages.
//!
//! [`Model`] is the process (mmap, madvise, accesses, pins, page state); [`ModelMm`] is one uffd on
//! it and implements [`uffd_wp::Mm`], so the exact engine and every scenario run on it
//! unchanged ([`lab`]).
//!
//! # What the real kernel cannot confirm
//! A differential test can drive the same operations on both (this API mirrors the syscalls
//! one to one), but some of the model's behaviour is out of its reach:
//! - **page-table allocation failures**: the real kernel cannot be made to fail a page-table
//!   allocation on demand (a memory cgroup OOM-kills or hangs the caller). The model's ENOMEM
//!   paths, the lost ENOMEM and its odd errnos (a sum in (-12, 0) returned as EAGAIN..EPERM, two
//!   failures as EMFILE) come from reading the source only; the single shape reproduced on the
//!   real kernel is the one in shared/kernel-notes.md (success, 0.5 GiB hole), which the model
//!   reproduces ([`lab`], `lost-enomem`);
//! - **the proposed semantics** and `UFFDIO_WRITEPROTECT_REPORT` / skip-pinned: no released
//!   kernel has them (the patch series in kernel/ is to be checked against them in QEMU);
//! - **exact allocation counts** (`VmPTE` moves with them, but nothing reports a per-call
//!   count), PT reclaim of emptied PTE tables after `MADV_DONTNEED` (CONFIG_PT_RECLAIM), and
//!   which table a failure hits;
//! - **pin counts per page** (`VmPin` is only a total);
//! - PFNs (pagemap PFN bits are 0 in the model), soft-dirty (these kernels lack it), and
//!   timing: the model never runs two things at once.
//!
//! Checked by hand on this project's machine (Linux 6.18.44, x86_64) and pinned in unit tests:
//! pagemap bits after protect, read and un-protect of populated pages, markers and zero pages;
//! shmem `MADV_PAGEOUT` without swap leaving markers; THP and huge-zero-page bits; the
//! register ioctl masks, register over a gap, ENOENT/EINVAL on gaps; cross-uffd write-protect
//! (allowed) and unregister (EINVAL); unregister not waking a blocked WP fault while
//! `UFFDIO_WAKE` does; stale uffd-wp bits surviving re-registration without WP and close;
//! `PAGEMAP_SCAN` reporting unpopulated PTEs and holes as written on every path (this
//! kernel's stable fixes) and arming them with `PM_SCAN_WP_MATCHING`; VMA merging
//! (adjacent maps with the same flags become one VMA a THP can back, different `anon_vma`s
//! never merge).
//!
//! Checked against the kernel by the differential test (`uffd-wp compare`, crate
//! uffd-wp-compare, 0 mismatches in CI and in the 20,000+-case runs of docs/benchmarks.md):
//! anonymous, memfd and regular-file (private and shared) mappings, THP and their splits,
//! `MADV_DONTNEED`, anonymous `MADV_PAGEOUT` with and without swap, register / unregister,
//! protect / un-protect, sync WP faults with a handler and async WP, io_uring fixed-buffer pins
//! and `READ_FIXED` through them, `PAGEMAP_SCAN` with and without `PM_SCAN_WP_MATCHING`.
//! Taken from reading only: hugetlb details, shmem `MADV_PAGEOUT` with swap, events (`REMOVE`,
//! `UNMAP`) and `mmap_changing`, which no compare operation raises.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod alloc;
mod api;
mod fault;
mod invariants;
mod kernel;
pub mod lab;
pub mod mprotect;
mod pagemap;
mod pt;

pub use alloc::{AllocStats, Attempt, FailPolicy, Level, TableCounts};
pub use api::{
    AccessId, Advice, MapKind, Model, ModelMm, ObjectId, PinFlags, PinId, Progress, UffdConfig,
    Who, range,
};
pub use kernel::{
    Backing, Completion, MMAP_MIN_ADDR, ModelConfig, OFFERED_FEATURES, PROPOSED_FEATURES,
    Semantics, TASK_SIZE, Thp, ThpSysfs, Vma, VmaUffd,
};
pub use pagemap::RawScan;
#[cfg(test)]
mod tests;

//! uffd-wp's measuring code: each benchmark times an engine against the alternative measured
//! in the same run (raw ioctl, mprotect + SIGSEGV, fork(), gcore, memcpy), and the built-in
//! workload (writer threads with a consistency oracle) that snapshots and tracking run against.
//!
//! Used by `uffd-wp bench`, `uffd-wp snapshot`/`track` (the workload) and the criterion
//! benches. The library crate keeps no benchmark code and no unsafe that only a baseline needs:
//! the baselines' raw calls (`fork`, a process-wide SIGSEGV handler) are in [`sys`] here.

#![warn(missing_docs)]

pub mod dump;
pub mod protect;
pub mod snapshot;
pub mod sys;
pub mod track;
pub mod workload;
pub mod zoo;

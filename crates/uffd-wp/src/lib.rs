//! uffd-wp: exact, pin-aware userfaultfd write-protection.
//!
//! `UFFDIO_WRITEPROTECT` does not say how far it got when it fails, and on Linux 6.18 it can
//! even return success with a hole. [`engine::protect::write_protect`] always knows which pages
//! are protected, skipped (pinned) and not protected, verified, with a retry/stop/rollback
//! policy.
//!
//! The modules are the layers, bottom to top (see DESIGN.md); each imports only from the
//! layers below it, which `tests/layers.rs` checks:
//! 1. [`range`]: page-aligned `Range` and `RangeSet`, plain values;
//! 2. [`sys`]: the raw kernel interface, one call per kernel operation, the only `unsafe`;
//! 3. [`features`]: the kernel's userfaultfd features and the probe;
//! 4. [`seam`]: the traits every backend implements (`Uffd`, `PageTables`, `Pins`, `Memory`,
//!    together `Mm`; `Quiesce`; `Lab`) and the plain data they exchange;
//! 5. [`backend`]: the real kernel ([`backend::linux`]), error injection
//!    ([`backend::inject`]), pin sources ([`backend::pins`]), `/proc` parsing
//!    ([`backend::procfs`]); the reference model is a backend in the `uffd-wp-model` crate;
//! 6. [`engine`]: exact write-protection, live snapshots, dirty tracking, written against the
//!    seam only;
//! 7. [`dump`]: whole-process dumps of another process (the remote backend and the snapshot
//!    engine composed for one job);
//! 8. [`scenario`]: reproducible situations run on any backend through a lab.

#![warn(missing_docs)]

pub mod backend;
pub mod dump;
pub mod engine;
pub mod features;
pub mod helper;
pub mod range;
pub mod scenario;
pub mod seam;
pub mod sys;
#[cfg(feature = "testing")]
pub mod testing;

pub use engine::protect::{OnError, WpError, WpOptions, WpReport, unprotect, write_protect};
pub use range::{PAGE_SIZE, Range, RangeSet};
pub use seam::Mm;

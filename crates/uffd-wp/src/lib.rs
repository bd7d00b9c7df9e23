//! uffd-wp: exact, pin-aware userfaultfd write-protection.
//!
//! `UFFDIO_WRITEPROTECT` does not say how far it got when it fails, and on Linux 6.18 it can
//! even return success with a hole. [`protect::write_protect`] always knows which pages are
//! protected, skipped (pinned) and not protected, verified, with a retry/stop/rollback policy.
//!
//! Layers, top to bottom (see DESIGN.md):
//! - engines: [`protect`];
//! - the [`mm::Mm`] trait, the seam every engine is written against;
//! - backends: [`linux`] (the real kernel), [`inject`] (error injection over any backend);
//!   the reference model lives in the `uffd-wp-model` crate;
//! - [`sys`]: the raw kernel interface, the only module with `unsafe`.

pub mod bench;
pub mod features;
pub mod inject;
pub mod linux;
pub mod mm;
pub mod pins;
pub mod protect;
pub mod range;
pub mod scenario;
pub mod snapshot;
pub mod sys;
pub mod track;
pub mod workload;

pub use mm::Mm;
pub use protect::{OnError, WpError, WpOptions, WpReport, unprotect, write_protect};
pub use range::{PAGE_SIZE, Range, RangeSet};

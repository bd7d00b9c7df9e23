//! Engines: what a monitor does, written against the [`crate::seam`] traits only, so that each
//! runs unchanged on the real kernel, the model and the injector.
//!
//! - [`protect`]: exact write-protection (`write_protect`, `unprotect`, `WpReport`);
//! - [`snapshot`]: live copy-on-write snapshots;
//! - [`track`]: dirty-tracking epochs.

pub mod protect;
pub mod snapshot;
pub mod track;

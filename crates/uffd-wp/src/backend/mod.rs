//! Backends: what implements the [`crate::seam`] traits.
//!
//! - [`linux`]: the real kernel, through a userfaultfd of this process or of another one;
//! - [`inject`]: errors on demand over any backend (a wrapper that overrides one raw call);
//! - [`pins`]: the Linux backend's pin sources (declared pins, io_uring buffers in `/proc`);
//! - [`procfs`]: reading and parsing `/proc/PID`, for the remote backend and pin discovery.
//!
//! The reference model is a backend too; it lives in the `uffd-wp-model` crate.
//! Backends import only the seam, `features`, `sys` and `range`: never an engine or a scenario.

pub mod inject;
pub mod linux;
pub mod pins;
pub mod procfs;

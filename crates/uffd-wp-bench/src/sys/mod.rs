//! The raw calls only a benchmark baseline needs: the only `unsafe` of this crate, each block
//! with its `// SAFETY:` comment, every function here safe to call.
//!
//! - [`fork`]: `fork(2)` (the snapshot benchmark's baseline); children only `_exit` or `pause`.
//! - [`sigsegv`]: the mprotect/SIGSEGV dirty tracker (the tracking benchmark's baseline), a
//!   process-wide SIGSEGV handler.
#![allow(unsafe_code)]

pub mod fork;
pub mod sigsegv;

pub use rustix::io::Errno;

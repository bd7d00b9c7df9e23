//! The raw calls only a benchmark baseline needs: the only `unsafe` of this crate, each block
//! with its `// SAFETY:` comment, every function here safe to call.
//!
//! - [`fork`]: `fork(2)` (the snapshot benchmark's baseline); children only `_exit` or `pause`.
//! - [`sigsegv`]: the mprotect/SIGSEGV dirty tracker (the tracking benchmark's baseline), a
//!   process-wide SIGSEGV handler.
//! - [`spin`]: threads whose callee-saved registers hold chosen values at every instant (inline
//!   assembly; the dump tests' register oracle, run by the zoo).
#![allow(unsafe_code)]

pub mod fork;
pub mod sigsegv;
pub mod spin;

pub use rustix::io::Errno;

//! Shared helpers of the kernel tests: the library's `testing` fixtures.
#![allow(unused_imports)]

pub use uffd_wp::testing::{bit57, lab, need, require_kernel, thp};

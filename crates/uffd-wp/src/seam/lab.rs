//! Labs: a backend plus the set-up operations scenarios need (map, punch a hole, touch pages,
//! pin a buffer, inject a failure) and a read-back of the uffd-wp bit independent of the
//! engines'. The Linux backend and the model each implement [`Lab`].

use crate::range::{Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, WpMode};
use crate::sys::errno_name;

/// What backs a lab mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Private anonymous memory, THP off (4 KiB pages).
    Anon,
    /// Private anonymous memory with `MADV_HUGEPAGE`.
    AnonThp,
    /// A shared memfd (shmem).
    Memfd,
}

/// How to open a lab's uffd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabConfig {
    /// Negotiate `WP_UNPOPULATED` (markers for unpopulated pages).
    pub wp_unpopulated: bool,
    /// Negotiate `WP_ASYNC` too (dirty tracking): the kernel resolves WP faults itself.
    pub async_wp: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            wp_unpopulated: true,
            async_wp: false,
        }
    }
}

/// Why a lab could not do what a scenario asked. Serializable (errnos as numbers), so a helper
/// process can send it whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum LabError {
    /// The backend cannot do it (missing kernel feature, not root, ...).
    #[error("scenario {scenario} cannot run on {backend}: {why}")]
    Unavailable {
        /// Scenario.
        scenario: String,
        /// Backend.
        backend: String,
        /// The reason, naming what is missing.
        why: String,
    },
    /// A set-up operation failed.
    #[error("scenario set-up: {what}: {}", errno_name(*errno))]
    Setup {
        /// What was being done.
        what: String,
        /// The errno.
        #[serde(with = "crate::sys::errno_serde")]
        errno: Errno,
    },
}

impl LabError {
    /// A set-up error.
    pub fn setup(what: impl Into<String>) -> impl FnOnce(Errno) -> LabError {
        let what = what.into();
        move |errno| LabError::Setup { what, errno }
    }
}

/// Which raw call a rule fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The Nth write-protect call (1-based) of the matching mode, counted from the rule's
    /// creation.
    Nth(u64),
    /// Every call of the matching mode whose range contains this address.
    Covers(u64),
}

/// One injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Which call.
    pub trigger: Trigger,
    /// Only calls that set protection (true) or only calls that clear it (false).
    pub protect: bool,
    /// The errno returned.
    pub errno: Errno,
    /// Bytes of the call's range, from its start (or, with `Covers`, up to the covered address
    /// when `None`) that the real kernel protects before the failure is returned.
    pub real_prefix: Option<u64>,
    /// How many times the rule fires before it retires (for retry tests); 0 means forever.
    pub times: u32,
}

impl Rule {
    /// Fails the `n`th protect call with `errno` after really protecting its first
    /// `real_prefix` bytes.
    pub fn nth(n: u64, errno: Errno, real_prefix: u64) -> Rule {
        Rule {
            trigger: Trigger::Nth(n),
            protect: true,
            errno,
            real_prefix: Some(real_prefix),
            times: 1,
        }
    }

    /// Fails every protect call covering `addr` with `errno`, after really protecting the
    /// call's range up to `addr` (as the kernel does when it meets a failing VMA at `addr`).
    pub fn covering(addr: u64, errno: Errno) -> Rule {
        Rule {
            trigger: Trigger::Covers(addr),
            protect: true,
            errno,
            real_prefix: None,
            times: 0,
        }
    }

    /// The same rule, firing `times` times (0: forever).
    pub fn times(self, times: u32) -> Rule {
        Rule { times, ..self }
    }
}

/// A backend plus set-up operations, for scenarios. Its [`Mm`] is wrapped in an injector
/// so that scenarios can inject failures and see every raw call.
pub trait Lab {
    /// The backend, behind the injection wrapper.
    fn mm(&self) -> &dyn Mm;
    /// The same backend as a shared handle, for engines that keep it (the dirty tracker's
    /// handler thread).
    fn mm_arc(&self) -> std::sync::Arc<dyn Mm>;
    /// Adds an injection rule.
    fn inject(&self, rule: Rule);
    /// Removes all injection rules and forgets the call log.
    fn reset_injection(&self);
    /// The raw write-protect calls since the last reset: (errno or None, injected).
    fn raw_results(&self) -> Vec<(Option<Errno>, bool)>;
    /// Maps `len` bytes aligned to `align`.
    fn map(&mut self, len: u64, align: u64, kind: MapKind) -> Result<Range, LabError>;
    /// Unmaps part of a mapping, leaving a hole.
    fn punch(&mut self, r: Range) -> Result<(), LabError>;
    /// Writes every page of `r` (populates it).
    fn touch(&mut self, r: Range) -> Result<(), LabError>;
    /// The uffd-wp pages of `r`, read by a path independent of the engine's read-back
    /// (on Linux: `/proc/self/pagemap` bit 57, even where the engine uses `PAGEMAP_SCAN`).
    fn verify_wp(&self, r: Range) -> Result<RangeSet, LabError>;

    /// Pins `r` (inside one lab mapping) the way an application's io_uring fixed buffer is:
    /// a long-term, writable pin (`FOLL_WRITE | FOLL_LONGTERM`, on Linux
    /// `IORING_REGISTER_BUFFERS`), held until the lab is dropped. The backend's
    /// [`Mm::pinned`] must find it by itself (on Linux: in `/proc/self/fdinfo`), as it would
    /// an application's.
    fn pin_fixed_buffer(&mut self, r: Range) -> Result<(), LabError> {
        let _ = r;
        Err(self.no_pins())
    }

    /// Writes `data` at `addr`, inside a buffer pinned with [`Lab::pin_fixed_buffer`], through
    /// the pin the way the kernel or a device does (on Linux: `IORING_OP_READ_FIXED` from a
    /// file), never through the page tables; serves any uffd-wp fault it raises.
    fn write_through_pin(&mut self, addr: u64, data: &[u8]) -> Result<PinWrite, LabError> {
        let _ = (addr, data);
        Err(self.no_pins())
    }

    /// One raw write-protect call of `r` as this lab's kernel offers it: the ioctl
    /// ([`RawReturn::Linux`]), or under the model's proposed semantics the proposed call, which
    /// returns the bytes it did not protect and leaves pinned pages writable when
    /// `skip_pinned` ([`RawReturn::Proposed`]).
    fn raw_protect(&self, r: Range, skip_pinned: bool) -> RawReturn {
        let _ = skip_pinned;
        RawReturn::Linux(self.mm().writeprotect(r, WpMode::Protect))
    }

    /// Limits page-table allocations for the next raw write-protect call only, and lifts the
    /// limit right after it returns: that call runs as if memory for page tables ran out.
    /// Returns what the limit is, for notes (Linux: a memory cgroup of 1 MiB, in a lab its
    /// factory opened inside a limited helper process; the model: a budget of page tables).
    fn limit_next_writeprotect(&mut self) -> Result<String, LabError> {
        Err(LabError::Unavailable {
            scenario: "(page-table limit)".into(),
            backend: self.mm().backend().into(),
            why: "this lab cannot limit page-table allocations".into(),
        })
    }

    /// The error of a lab without pins.
    fn no_pins(&self) -> LabError {
        LabError::Unavailable {
            scenario: "pinned-io-uring".into(),
            backend: self.mm().backend().into(),
            why: "this lab cannot pin memory (Lab::pin_fixed_buffer)".into(),
        }
    }
}

/// What a raw write-protect call returned ([`Lab::raw_protect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawReturn {
    /// The Linux ioctl: success or an errno.
    Linux(Result<(), Errno>),
    /// The proposed call: bytes not protected, or an errno.
    Proposed(Result<u64, Errno>),
}

impl RawReturn {
    /// The errno, if the call failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            RawReturn::Linux(r) => r.err(),
            RawReturn::Proposed(r) => r.err(),
        }
    }
}

/// What a write through a pin did ([`Lab::write_through_pin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinWrite {
    /// Bytes the I/O reported written into memory.
    pub bytes: u64,
    /// Whether memory now holds the data written.
    pub landed: bool,
    /// uffd-wp faults raised by the write (each was served so the write could finish).
    pub wp_faults: u32,
}

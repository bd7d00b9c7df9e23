//! Labs: a backend plus the set-up operations scenarios need (map, punch a hole, touch pages,
//! write serving faults, advise, pin a buffer, inject a failure) and a read-back of the
//! uffd-wp bit independent of the engines'. The Linux backend and the model each implement
//! [`Lab`].

use crate::features::Features;
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, Event, KernelReport, WpMode};
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
    /// A new regular file (unlinked), mapped shared or private. uffd-wp registers it only with
    /// `WP_ASYNC`.
    File {
        /// `MAP_SHARED` (else `MAP_PRIVATE`).
        shared: bool,
    },
}

/// `madvise(2)` advice a lab gives ([`Lab::advise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drops the pages (private pages read as zero again).
    DontNeed,
    /// `MADV_PAGEOUT`: reclaims the pages now (anonymous ones to swap, when a swap area is
    /// active).
    PageOut,
}

/// A uffd-wp fault a lab served while it accessed memory itself ([`Lab::write`],
/// [`Lab::pin_fixed_buffer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpFault {
    /// The faulting page.
    pub page: u64,
    /// `UFFD_PAGEFAULT_FLAG_*` of the fault message.
    pub flags: u64,
}

/// Serves the page faults pending on `uffd` (at most 16, without waiting): un-protects each
/// faulting page, which wakes its writer, and appends the fault to `faults`. The one fault
/// handler of both labs, for their own accesses.
pub fn serve_wp_faults<U: Uffd + ?Sized>(uffd: &U, faults: &mut Vec<WpFault>) -> Result<(), Errno> {
    for ev in uffd.read_events(16)? {
        if let Event::PageFault { flags, address, .. } = ev {
            let page = address & !(PAGE_SIZE - 1);
            faults.push(WpFault { page, flags });
            uffd.writeprotect(
                Range::from_bounds(page, page + PAGE_SIZE),
                WpMode::Unprotect { dontwake: false },
            )?;
        }
    }
    Ok(())
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
    /// The errno behind the error: the failed set-up call's, EOPNOTSUPP when the lab cannot do
    /// it at all.
    pub fn errno(&self) -> Errno {
        match self {
            LabError::Setup { errno, .. } => *errno,
            LabError::Unavailable { .. } => Errno::OPNOTSUPP,
        }
    }

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
    /// Maps exactly `r` (fixed placement; on Linux `MAP_FIXED_NOREPLACE`): EEXIST when
    /// anything is mapped there already.
    fn map_at(&mut self, r: Range, kind: MapKind) -> Result<(), LabError>;
    /// Unmaps `r`, leaving holes in the lab mappings it crosses (several mappings and the gaps
    /// between them are fine).
    fn punch(&mut self, r: Range) -> Result<(), LabError>;
    /// Writes every page of `r` (populates it).
    fn touch(&mut self, r: Range) -> Result<(), LabError>;
    /// A CPU write of `data` at `addr`, in lab mappings, through the page tables; every
    /// uffd-wp fault it raises is served by un-protecting the faulting page
    /// ([`serve_wp_faults`]). Returns those faults, in order. ETIMEDOUT when the write still
    /// waits after serving for a while (on Linux 5 s; `addr`'s pages are then unregistered and
    /// the writer woken).
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<Vec<WpFault>, LabError>;
    /// `madvise(2)` of `r`, which lab mappings cover (on Linux: one call per mapping it
    /// crosses).
    fn advise(&mut self, r: Range, advice: Advice) -> Result<(), LabError>;
    /// The uffd-wp pages of `r`, read by a path independent of the engine's read-back
    /// (on Linux: `/proc/self/pagemap` bit 57, even where the engine uses `PAGEMAP_SCAN`).
    fn verify_wp(&self, r: Range) -> Result<RangeSet, LabError>;

    /// Pins `r` (inside one lab mapping) the way an application's io_uring fixed buffer is:
    /// a long-term, writable pin (`FOLL_WRITE | FOLL_LONGTERM`, on Linux
    /// `IORING_REGISTER_BUFFERS`), held until [`Lab::unpin_fixed_buffer`] or until the lab is
    /// dropped. The backend's [`Mm::pinned`] must find it by itself (on Linux: in
    /// `/proc/self/fdinfo`), as it would an application's. Pinning faults the pages in for
    /// write: the uffd-wp faults that raises are served as [`Lab::write`] serves them, and
    /// returned.
    fn pin_fixed_buffer(&mut self, r: Range) -> Result<Vec<WpFault>, LabError> {
        let _ = r;
        Err(self.no_pins())
    }

    /// Releases the pin [`Lab::pin_fixed_buffer`] took over exactly `r` (on Linux
    /// `IORING_UNREGISTER_BUFFERS`, the ring closed and its mapping back in the lab).
    fn unpin_fixed_buffer(&mut self, r: Range) -> Result<(), LabError> {
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

    /// One raw write-protect call of `r` as this lab's kernel offers it: where the uffd has
    /// [`Features::WP_REPORT`] (a patched kernel, the model's proposed semantics),
    /// `UFFDIO_WRITEPROTECT_REPORT`, which says how far it got and, with `skip_pinned` (where
    /// [`Features::WP_SKIP_PINNED`] is offered), leaves pinned pages writable
    /// ([`RawReturn::Report`]); elsewhere the ioctl ([`RawReturn::Linux`]).
    fn raw_protect(&self, r: Range, skip_pinned: bool) -> RawReturn {
        let mm = self.mm();
        let f = mm.features();
        if f.contains(Features::WP_REPORT) {
            let skip = skip_pinned && f.contains(Features::WP_SKIP_PINNED);
            RawReturn::Report(mm.writeprotect_report(r, WpMode::Protect, skip))
        } else {
            RawReturn::Linux(mm.writeprotect(r, WpMode::Protect))
        }
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

    /// Fails exactly the `nth` (1-based) page-table allocation of the next raw write-protect
    /// call, and only it: allocations before and after it succeed. Returns what was armed,
    /// for notes (Linux: the kernel's fault injection, `fail-nth`, which only the test kernels
    /// of kernel/run have; the model: its allocator's `FailPolicy::Nth`).
    fn fail_next_writeprotect_alloc(&mut self, nth: u64) -> Result<String, LabError> {
        let _ = nth;
        Err(LabError::Unavailable {
            scenario: "(page-table allocation failure)".into(),
            backend: self.mm().backend().into(),
            why: "this lab cannot fail one page-table allocation on demand".into(),
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
    /// `UFFDIO_WRITEPROTECT`: success or an errno.
    Linux(Result<(), Errno>),
    /// `UFFDIO_WRITEPROTECT_REPORT` (kernel/README.md): the errno and how far it got.
    Report(KernelReport),
}

impl RawReturn {
    /// The errno, if the call failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            RawReturn::Linux(r) => r.err(),
            RawReturn::Report(k) => k.errno(),
        }
    }

    /// The ioctl's name.
    pub fn call(&self) -> &'static str {
        match self {
            RawReturn::Linux(_) => "UFFDIO_WRITEPROTECT",
            RawReturn::Report(_) => "UFFDIO_WRITEPROTECT_REPORT",
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

//! The `Mm` trait: what a monitor needs from a memory manager.
//!
//! The seam between the engines (exact write-protect, snapshot, dirty tracking) and a kernel.
//! Engines never issue ioctls themselves: they call an [`Mm`], so every engine runs unchanged on
//! the real kernel ([`crate::linux::LinuxMm`]), on the reference model (crate `uffd-wp-model`),
//! and behind the error-injecting wrapper ([`crate::inject::InjectMm`]).
//!
//! The trait is deliberately small: each method is one thing both backends can honour, and the
//! raw calls report exactly the errno the kernel would give, with no interpretation. All methods
//! take `&self`: a uffd is shared by the thread that protects and the thread that serves faults.

use serde::Serialize;

use crate::features::Features;
use crate::range::{Range, RangeSet};
pub use crate::sys::Errno;
use crate::sys::mem::Mapping;
pub use crate::sys::pagemap::{Region, ScanRequest, ScanResult};
pub use crate::sys::uffd::Msg as Event;

/// `UFFDIO_REGISTER_MODE_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegisterMode(pub u64);

impl RegisterMode {
    /// `UFFDIO_REGISTER_MODE_MISSING`.
    pub const MISSING: RegisterMode = RegisterMode(1);
    /// `UFFDIO_REGISTER_MODE_WP`.
    pub const WP: RegisterMode = RegisterMode(2);
    /// `UFFDIO_REGISTER_MODE_MINOR`.
    pub const MINOR: RegisterMode = RegisterMode(4);
    /// Whether WP is among the modes.
    pub fn has_wp(self) -> bool {
        self.0 & Self::WP.0 != 0
    }
}

/// The mode of one `UFFDIO_WRITEPROTECT` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum WpMode {
    /// Set the uffd-wp bit (`MODE_WP`).
    Protect,
    /// Clear it, waking threads blocked on the range unless `dontwake`.
    Unprotect {
        /// `MODE_DONTWAKE`.
        dontwake: bool,
    },
}

impl WpMode {
    /// The `uffdio_writeprotect.mode` value.
    pub fn bits(self) -> u64 {
        use crate::sys::uffd::{WP_MODE_DONTWAKE, WP_MODE_WP};
        match self {
            WpMode::Protect => WP_MODE_WP,
            WpMode::Unprotect { dontwake: false } => 0,
            WpMode::Unprotect { dontwake: true } => WP_MODE_DONTWAKE,
        }
    }
    /// Whether this call sets protection.
    pub fn is_protect(self) -> bool {
        matches!(self, WpMode::Protect)
    }
}

/// What the page tables say about one page (the pagemap bits a monitor cares about).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PageState {
    /// Mapped to a page frame (bit 63).
    pub present: bool,
    /// A swap entry or a PTE marker (bit 62).
    pub swapped: bool,
    /// The uffd-wp bit (bit 57): set on a present pte, a swap pte or a marker.
    pub uffd_wp: bool,
    /// File-backed or shared anonymous (bit 61).
    pub file: bool,
    /// Soft-dirty (bit 55).
    pub soft_dirty: bool,
}

impl PageState {
    /// Decodes a `/proc/PID/pagemap` entry.
    pub fn from_pagemap(e: u64) -> PageState {
        use crate::sys::pagemap::bits;
        PageState {
            present: e & bits::PRESENT != 0,
            swapped: e & bits::SWAPPED != 0,
            uffd_wp: e & bits::UFFD_WP != 0,
            file: e & bits::FILE != 0,
            soft_dirty: e & bits::SOFT_DIRTY != 0,
        }
    }
}

/// The pages of `r` whose state satisfies `pred`, from per-page states starting at `r.start()`.
pub fn pages_where(r: Range, states: &[PageState], pred: impl Fn(&PageState) -> bool) -> RangeSet {
    let mut set = RangeSet::new();
    for (i, s) in states.iter().enumerate() {
        if pred(s) {
            let a = r.start() + i as u64 * crate::range::PAGE_SIZE;
            set.insert(Range::from_bounds(a, a + crate::range::PAGE_SIZE));
        }
    }
    set
}

/// What a monitor needs from a memory manager (the real kernel, or the model).
pub trait Mm: Send + Sync {
    /// A short name for reports: `"linux"`, `"model"`.
    fn backend(&self) -> &'static str;

    /// The features enabled on this uffd by its `UFFDIO_API` handshake.
    fn features(&self) -> Features;

    /// `UFFDIO_REGISTER`: returns the mask of ioctls available on the range.
    fn register(&self, r: Range, mode: RegisterMode) -> Result<u64, Errno>;

    /// `UFFDIO_UNREGISTER`.
    fn unregister(&self, r: Range) -> Result<(), Errno>;

    /// One raw `UFFDIO_WRITEPROTECT` call: exactly the kernel's errno, no retry, no read-back.
    fn writeprotect(&self, r: Range, mode: WpMode) -> Result<(), Errno>;

    /// `UFFDIO_WAKE`.
    fn wake(&self, r: Range) -> Result<(), Errno>;

    /// Per-page state of `r` read back from the page tables, one entry per page.
    fn page_states(&self, r: Range) -> Result<Vec<PageState>, Errno>;

    /// The pages of `r` whose uffd-wp bit is set. Backends override this with something faster
    /// than [`Mm::page_states`] when they have it (`PAGEMAP_SCAN`).
    fn wp_pages(&self, r: Range) -> Result<RangeSet, Errno> {
        Ok(pages_where(r, &self.page_states(r)?, |s| s.uffd_wp))
    }

    /// `PAGEMAP_SCAN` over a range (all of it, continuing from `walk_end` internally unless
    /// `max_pages` stops it), including `PM_SCAN_WP_MATCHING`.
    fn scan(&self, req: &ScanRequest) -> Result<ScanResult, Errno>;

    /// Whether every byte of `r` is covered by some mapping (no gap between VMAs).
    fn fully_mapped(&self, r: Range) -> Result<bool, Errno>;

    /// Pages of `r` known to be pinned (declared by the application, discovered, or, in the
    /// model, the true pin counts). Pinned pages can be written without a WP fault.
    fn pinned(&self, r: Range) -> Result<RangeSet, Errno>;

    /// Long-term pinned bytes of the monitored process that no known source explains (a pin
    /// the backend cannot place, so any page might be under it), as of the last
    /// [`Mm::pinned`]. Reports that depend on pins carry it. 0 when every pin is known (the
    /// model knows them all).
    fn unexplained_pinned_bytes(&self) -> u64 {
        0
    }

    /// Pending uffd events, at most `max`, without blocking.
    fn read_events(&self, max: usize) -> Result<Vec<Event>, Errno>;

    /// Waits up to `timeout_ms` (-1: forever) for an event; returns whether one is pending.
    fn wait_event(&self, timeout_ms: i32) -> Result<bool, Errno>;

    /// Reads memory of the monitored address space.
    fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;

    /// Reads `len` bytes at `addr` of the monitored address space into `[dst_addr, dst_addr +
    /// len)` of `dst`, a mapping of this process (a snapshot image). This default goes
    /// through a buffer; a backend that can copy straight into `dst` overrides it.
    fn read_memory_into(
        &self,
        addr: u64,
        dst: &Mapping,
        dst_addr: u64,
        len: u64,
    ) -> Result<(), Errno> {
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Errno::NOMEM)?];
        self.read_memory(addr, &mut buf)?;
        dst.write(dst_addr, &buf)
    }

    /// Clears the soft-dirty bit of every page of the address space (`clear_refs` 4: the whole
    /// process, not a range), so that [`PageState::soft_dirty`] marks the pages written since.
    /// Backends without soft-dirty tracking (kernels built without `CONFIG_MEM_SOFT_DIRTY`)
    /// return `EOPNOTSUPP`, the default.
    fn clear_soft_dirty(&self) -> Result<(), Errno> {
        Err(Errno::OPNOTSUPP)
    }
}

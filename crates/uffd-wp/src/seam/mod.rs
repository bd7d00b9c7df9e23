//! The seam: every trait a backend implements, and the plain data they exchange.
//!
//! Engines never issue ioctls themselves: they ask a backend for what they need, through four
//! small capability traits, so every engine runs unchanged on the real kernel
//! ([`crate::backend::linux::LinuxMm`]), on the reference model (crate `uffd-wp-model`), and
//! behind the error-injecting wrapper ([`crate::backend::inject::InjectMm`]):
//!
//! | trait | what it is | Linux | model |
//! |---|---|---|---|
//! | [`Uffd`] | the userfaultfd: features, register, write-protect, wake, events | ioctls | its uffd context |
//! | [`PageTables`] | per-page state read back, `PAGEMAP_SCAN` | `/proc/PID/pagemap` | its page tables |
//! | [`Pins`] | which pages may be written behind a protection | declared + `/proc` pins | true pin counts |
//! | [`Memory`] | the monitored memory's contents | `process_vm_readv`, a pointer | its frames |
//!
//! [`Mm`] is all four (every backend is one). Each raw method is one thing both backends can
//! honour and reports exactly the errno the kernel would give, with no interpretation; loops
//! over raw calls ([`scan_all`]) live here once. All methods take `&self`: a uffd is shared by
//! the thread that protects and the thread that serves faults.
//!
//! A wrapper that changes one raw call ([`Wrap`]) implements that call alone.
//! [`Quiesce`] stops the writers for a snapshot; [`lab::Lab`] is the set-up a scenario needs.

pub mod lab;
mod quiesce;
mod types;

pub use quiesce::{FnQuiesce, Quiesce};
pub use types::{
    Errno, Event, KernelReport, Mapping, PageState, Region, RegisterMode, SCAN_CHECK_WPASYNC,
    SCAN_WP_MATCHING, ScanRequest, ScanResult, VEC_MAX, WpMode, bits, category, errno_name,
    pages_where, scan_all,
};

use crate::features::Features;
use crate::range::{Range, RangeSet};

/// The userfaultfd: its features, registration, write-protection and events.
pub trait Uffd: Send + Sync {
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

    /// One raw `UFFDIO_WRITEPROTECT_REPORT` call (kernel/README.md): the errno as
    /// [`Uffd::writeprotect`] returns it, plus how far the range got (`done`, a prefix) and the
    /// pinned bytes left writable in it (with `skip_pinned`: `MODE_SKIP_PINNED`). Only kernels
    /// that offer [`Features::WP_REPORT`] (and, for `skip_pinned`,
    /// [`Features::WP_SKIP_PINNED`]) have it; this default answers as the others do
    /// ([`KernelReport::unsupported`]: EINVAL, nothing written).
    fn writeprotect_report(&self, r: Range, mode: WpMode, skip_pinned: bool) -> KernelReport {
        let _ = (r, mode, skip_pinned);
        KernelReport::unsupported()
    }

    /// `UFFDIO_WAKE`.
    fn wake(&self, r: Range) -> Result<(), Errno>;

    /// Pending uffd events, at most `max`, without blocking.
    fn read_events(&self, max: usize) -> Result<Vec<Event>, Errno>;

    /// Waits up to `timeout_ms` (-1: forever) for an event; returns whether one is pending.
    fn wait_event(&self, timeout_ms: i32) -> Result<bool, Errno>;

    /// Whether a non-cooperative event (remap, remove, unmap, fork) is in flight: raised by
    /// the kernel before the process changes its mappings and lowered once the monitor has
    /// read the event; meanwhile `UFFDIO_WRITEPROTECT` fails with EAGAIN. False on a backend
    /// without such events.
    fn events_in_flight(&self) -> Result<bool, Errno> {
        Ok(false)
    }

    /// Closes the uffd a `UFFD_EVENT_FORK` put in this process for the child
    /// ([`Event::Fork`]`{ufd}`): the child's registrations and write protection go with it,
    /// and its threads waiting on a fault there go on. Whoever reads a fork event owns that
    /// descriptor and must call this once. A backend without fork events has nothing to close.
    fn close_forked(&self, ufd: u32) -> Result<(), Errno> {
        let _ = ufd;
        Ok(())
    }
}

/// The page tables of the monitored address space, read back.
pub trait PageTables: Send + Sync {
    /// Per-page state of `r` read back from the page tables, one entry per page.
    fn page_states(&self, r: Range) -> Result<Vec<PageState>, Errno>;

    /// The pages of `r` whose uffd-wp bit is set. Backends override this with something faster
    /// than [`PageTables::page_states`] when they have it (`PAGEMAP_SCAN`).
    fn wp_pages(&self, r: Range) -> Result<RangeSet, Errno> {
        Ok(pages_where(r, &self.page_states(r)?, |s| s.uffd_wp))
    }

    /// One raw `PAGEMAP_SCAN` call (`PM_SCAN_WP_MATCHING` included) with room for `vec_len`
    /// regions: like the kernel, it stops early with `walk_end` short of the end when the
    /// vector fills or `max_pages` is reached. [`PageTables::scan_all`] covers the request.
    fn scan(&self, req: &ScanRequest, vec_len: usize) -> Result<ScanResult, Errno>;

    /// `PAGEMAP_SCAN` over the whole request ([`scan_all`] over [`PageTables::scan`]).
    fn scan_all(&self, req: &ScanRequest) -> Result<ScanResult, Errno> {
        scan_all(req, |r, n| self.scan(r, n))
    }

    /// Whether every byte of `r` is covered by some mapping (no gap between VMAs).
    fn fully_mapped(&self, r: Range) -> Result<bool, Errno>;

    /// The pages of `r` that hold only a PTE marker (nothing mapped: a reader sees zeros),
    /// where the backend can tell them from swapped-out pages, which `PAGEMAP_SCAN` cannot.
    /// None by default: every non-present page may hold data.
    fn markers(&self, r: Range) -> Result<RangeSet, Errno> {
        let _ = r;
        Ok(RangeSet::new())
    }

    /// Clears the soft-dirty bit of every page of the address space (`clear_refs` 4: the whole
    /// process, not a range), so that [`PageState::soft_dirty`] marks the pages written since.
    /// Backends without soft-dirty tracking (kernels built without `CONFIG_MEM_SOFT_DIRTY`)
    /// return `EOPNOTSUPP`, the default.
    fn clear_soft_dirty(&self) -> Result<(), Errno> {
        Err(Errno::OPNOTSUPP)
    }
}

/// Pinned memory: pages a device or the kernel can write without a write fault.
pub trait Pins: Send + Sync {
    /// Pages of `r` known to be pinned (declared by the application, discovered, or, in the
    /// model, the true pin counts). Pinned pages can be written without a WP fault.
    fn pinned(&self, r: Range) -> Result<RangeSet, Errno>;

    /// Long-term pinned bytes of the monitored process that no known source explains (a pin
    /// the backend cannot place, so any page might be under it), as of the last
    /// [`Pins::pinned`]. Reports that depend on pins carry it. 0 when every pin is known (the
    /// model knows them all).
    fn unexplained_pinned_bytes(&self) -> u64 {
        0
    }

    /// The part of [`Pins::pinned`] the application declared itself, as of the last
    /// [`Pins::pinned`] (reports say which source named a skipped page). None by default.
    fn declared_pinned(&self, r: Range) -> RangeSet {
        let _ = r;
        RangeSet::new()
    }
}

/// The contents of the monitored memory.
pub trait Memory: Send + Sync {
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
}

/// A whole backend: all four capabilities. Implemented for every type that has them.
pub trait Mm: Uffd + PageTables + Pins + Memory {}

impl<T: Uffd + PageTables + Pins + Memory + ?Sized> Mm for T {}

/// A backend that wraps another and forwards every call to it but the raw write-protect,
/// which it may change ([`crate::backend::inject::InjectMm`] fails chosen calls; a scenario
/// watches them). Implementing [`Wrap`] makes the wrapper an [`Mm`].
pub trait Wrap: Send + Sync {
    /// The wrapped backend.
    type Inner: Mm + ?Sized;

    /// The wrapped backend.
    fn inner(&self) -> &Self::Inner;

    /// The wrapper's `UFFDIO_WRITEPROTECT` ([`Uffd::writeprotect`] of the wrapper); forwards
    /// by default.
    fn on_writeprotect(&self, r: Range, mode: WpMode) -> Result<(), Errno> {
        self.inner().writeprotect(r, mode)
    }

    /// The wrapper's `UFFDIO_WRITEPROTECT_REPORT` ([`Uffd::writeprotect_report`] of the
    /// wrapper); forwards by default.
    fn on_writeprotect_report(&self, r: Range, mode: WpMode, skip_pinned: bool) -> KernelReport {
        self.inner().writeprotect_report(r, mode, skip_pinned)
    }
}

impl<W: Wrap> Uffd for W {
    fn backend(&self) -> &'static str {
        self.inner().backend()
    }
    fn features(&self) -> Features {
        self.inner().features()
    }
    fn register(&self, r: Range, mode: RegisterMode) -> Result<u64, Errno> {
        self.inner().register(r, mode)
    }
    fn unregister(&self, r: Range) -> Result<(), Errno> {
        self.inner().unregister(r)
    }
    fn writeprotect(&self, r: Range, mode: WpMode) -> Result<(), Errno> {
        self.on_writeprotect(r, mode)
    }
    fn writeprotect_report(&self, r: Range, mode: WpMode, skip_pinned: bool) -> KernelReport {
        self.on_writeprotect_report(r, mode, skip_pinned)
    }
    fn wake(&self, r: Range) -> Result<(), Errno> {
        self.inner().wake(r)
    }
    fn read_events(&self, max: usize) -> Result<Vec<Event>, Errno> {
        self.inner().read_events(max)
    }
    fn wait_event(&self, timeout_ms: i32) -> Result<bool, Errno> {
        self.inner().wait_event(timeout_ms)
    }
    fn events_in_flight(&self) -> Result<bool, Errno> {
        self.inner().events_in_flight()
    }
    fn close_forked(&self, ufd: u32) -> Result<(), Errno> {
        self.inner().close_forked(ufd)
    }
}

impl<W: Wrap> PageTables for W {
    fn page_states(&self, r: Range) -> Result<Vec<PageState>, Errno> {
        self.inner().page_states(r)
    }
    fn wp_pages(&self, r: Range) -> Result<RangeSet, Errno> {
        self.inner().wp_pages(r)
    }
    fn scan(&self, req: &ScanRequest, vec_len: usize) -> Result<ScanResult, Errno> {
        self.inner().scan(req, vec_len)
    }
    fn scan_all(&self, req: &ScanRequest) -> Result<ScanResult, Errno> {
        self.inner().scan_all(req)
    }
    fn fully_mapped(&self, r: Range) -> Result<bool, Errno> {
        self.inner().fully_mapped(r)
    }
    fn markers(&self, r: Range) -> Result<RangeSet, Errno> {
        self.inner().markers(r)
    }
    fn clear_soft_dirty(&self) -> Result<(), Errno> {
        self.inner().clear_soft_dirty()
    }
}

impl<W: Wrap> Pins for W {
    fn pinned(&self, r: Range) -> Result<RangeSet, Errno> {
        self.inner().pinned(r)
    }
    fn unexplained_pinned_bytes(&self) -> u64 {
        self.inner().unexplained_pinned_bytes()
    }
    fn declared_pinned(&self, r: Range) -> RangeSet {
        self.inner().declared_pinned(r)
    }
}

impl<W: Wrap> Memory for W {
    fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.inner().read_memory(addr, buf)
    }
    fn read_memory_into(
        &self,
        addr: u64,
        dst: &Mapping,
        dst_addr: u64,
        len: u64,
    ) -> Result<(), Errno> {
        self.inner().read_memory_into(addr, dst, dst_addr, len)
    }
}

/// The four capability traits and [`Mm`], for code that calls them on a concrete backend
/// (`use uffd_wp::seam::prelude::*;`).
pub mod prelude {
    pub use super::{Memory, Mm, PageTables, Pins, Uffd};
}

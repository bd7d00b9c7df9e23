//! The public face of the model: [`Model`] (the process: mappings, accesses, pins, page state)
//! and [`ModelMm`] (one userfaultfd on it, implementing [`uffd_wp::Mm`]).
//!
//! The operations mirror what a program does on the real kernel, one call each, so that a
//! differential driver can run the same sequence on both: `mmap` of anonymous memory or a memfd,
//! populate, `MADV_DONTNEED`, `MADV_PAGEOUT`, `munmap`, `UFFDIO_REGISTER`, `UFFDIO_WRITEPROTECT`,
//! CPU writes (blocking on a sync WP fault), `PAGEMAP_SCAN`, pins and writes through them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use uffd_wp::features::Features;
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::seam::category;
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{
    Errno, Event, KernelReport, PageState, RegisterMode, ScanRequest, ScanResult, WpMode, scan_all,
};

use crate::alloc::{AllocStats, Attempt, FailPolicy, TableCounts};
use crate::fault::Run;
use crate::kernel::{Backing, Completion, Kernel, ModelConfig, PendingOp, Semantics, Thp, Vma};
use crate::pagemap::RawScan;

/// Identifies an access (write, read, populate, pin, madvise, munmap) that is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccessId(pub u64);

/// Identifies a pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinId(pub u64);

/// An object (memfd or file) that mappings can share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(pub u64);

/// The outcome of a call that may have to wait for the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress<T> {
    /// It completed.
    Done(T),
    /// It waits (a fault message or an event is queued); see [`Model::completion`].
    Blocked(AccessId),
}

impl<T> Progress<T> {
    /// The value, if it completed.
    pub fn done(self) -> Option<T> {
        match self {
            Progress::Done(t) => Some(t),
            Progress::Blocked(_) => None,
        }
    }
    /// Whether it waits.
    pub fn is_blocked(&self) -> bool {
        matches!(self, Progress::Blocked(_))
    }
}

/// Who makes an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who {
    /// The thread id reported with `UFFD_FEATURE_THREAD_ID`.
    pub tid: u32,
    /// A kernel-mode access (a syscall writing user memory, GUP): fails with EFAULT instead of
    /// waiting when the uffd has `UFFD_USER_MODE_ONLY`.
    pub kernel: bool,
}

impl Default for Who {
    fn default() -> Self {
        Who {
            tid: 1,
            kernel: false,
        }
    }
}

/// What a new mapping is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Private anonymous memory with THP advice.
    Anon(Thp),
    /// A new memfd of the mapping's size, mapped shared.
    Memfd,
    /// An existing object mapped shared (shmem) from a page offset.
    Object(ObjectId, u64),
    /// A new regular file of the mapping's size (zeros), mapped shared or private.
    File {
        /// `MAP_SHARED`.
        shared: bool,
    },
    /// Private anonymous hugetlb memory (2 MiB pages).
    Hugetlb,
}

/// `madvise(2)` advice the model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`.
    DontNeed,
    /// `MADV_PAGEOUT`.
    PageOut,
    /// `MADV_HUGEPAGE`.
    HugePage,
    /// `MADV_NOHUGEPAGE`.
    NoHugePage,
}

/// Flags of a pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinFlags {
    /// `FOLL_WRITE`: the device may write (the pages are faulted in for write first).
    pub write: bool,
    /// `FOLL_LONGTERM` (io_uring fixed buffers, RDMA, vfio); counted in VmPin.
    pub longterm: bool,
}

impl PinFlags {
    /// What io_uring buffer registration takes.
    pub const IO_URING: PinFlags = PinFlags {
        write: true,
        longterm: true,
    };
    /// What an O_DIRECT read into the buffer takes.
    pub const O_DIRECT_READ: PinFlags = PinFlags {
        write: true,
        longterm: false,
    };
}

/// How to open a uffd on the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdConfig {
    /// Features to ask for in `UFFDIO_API`.
    pub features: Features,
    /// `UFFD_USER_MODE_ONLY`.
    pub user_mode_only: bool,
}

impl Default for UffdConfig {
    /// What `uffd_wp::backend::linux::Config::default()` negotiates: WP fault flags, markers for
    /// unpopulated pages, thread ids, WP on hugetlbfs/shmem.
    fn default() -> Self {
        UffdConfig {
            features: Features::PAGEFAULT_FLAG_WP
                .with(Features::WP_UNPOPULATED)
                .with(Features::THREAD_ID)
                .with(Features::WP_HUGETLBFS_SHMEM),
            user_mode_only: false,
        }
    }
}

impl UffdConfig {
    /// The default without `WP_UNPOPULATED`.
    pub fn without_unpopulated() -> Self {
        let d = Self::default();
        UffdConfig {
            features: d.features.without(Features::WP_UNPOPULATED),
            ..d
        }
    }
    /// These features plus the write-protect report and its skip-pinned mode where `offered`
    /// has them (as the Linux backend's default asks for them where the kernel offers them).
    pub fn with_report_if(self, offered: Features) -> Self {
        let report = Features::WP_REPORT.with(Features::WP_SKIP_PINNED);
        UffdConfig {
            features: self.features.with(Features(report.0 & offered.0)),
            ..self
        }
    }
    /// The default plus `WP_ASYNC`.
    pub fn async_wp() -> Self {
        let d = Self::default();
        UffdConfig {
            features: d.features.with(Features::WP_ASYNC),
            ..d
        }
    }
}

/// The modelled process: its address space, page tables, frames and uffd contexts. Cloning a
/// `Model` shares it; [`Model::duplicate`] copies it.
#[derive(Debug, Clone)]
pub struct Model {
    k: Arc<Mutex<Kernel>>,
}

fn progress<T>(
    r: Run,
    f: impl FnOnce(Completion) -> Result<T, Errno>,
) -> Result<Progress<T>, Errno> {
    match r {
        Run::Done(Completion::Failed(e)) => Err(e),
        Run::Done(c) => f(c).map(Progress::Done),
        Run::Blocked(id) => Ok(Progress::Blocked(AccessId(id))),
    }
}

fn page_range(addr: u64, len: u64) -> Result<Range, Errno> {
    Range::new(addr, len).map_err(|_| Errno::INVAL)
}

impl Model {
    /// A new, empty process.
    pub fn new(cfg: ModelConfig) -> Model {
        Model {
            k: Arc::new(Mutex::new(Kernel::new(cfg))),
        }
    }

    pub(crate) fn k(&self) -> MutexGuard<'_, Kernel> {
        self.k.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An independent deep copy of the whole state (uffd contexts included: attach to them
    /// with [`ModelMm::duplicate`]).
    pub fn duplicate(&self) -> Model {
        Model {
            k: Arc::new(Mutex::new(self.k().clone())),
        }
    }

    /// The configuration.
    pub fn config(&self) -> ModelConfig {
        self.k().cfg
    }

    /// The semantics.
    pub fn semantics(&self) -> Semantics {
        self.k().cfg.semantics
    }

    // ---------------------------------------------------------------------------- mappings

    /// `mmap(2)` of `len` bytes at a free `align`-aligned address.
    pub fn map(&self, len: u64, align: u64, kind: MapKind) -> Result<Range, Errno> {
        self.map_at(None, len, align, kind)
    }

    /// `mmap(2)` at a fixed address (`MAP_FIXED`: replaces what was mapped there) or, with
    /// `None`, at a free `align`-aligned address.
    pub fn map_at(
        &self,
        addr: Option<u64>,
        len: u64,
        align: u64,
        kind: MapKind,
    ) -> Result<Range, Errno> {
        let mut k = self.k();
        let (backing, thp) = match kind {
            MapKind::Anon(t) => (Backing::Anon, t),
            MapKind::Memfd => {
                let obj = k.new_object(len);
                (Backing::Shmem { obj, pgoff: 0 }, Thp::Default)
            }
            MapKind::Object(o, pgoff) => (Backing::Shmem { obj: o.0, pgoff }, Thp::Default),
            MapKind::File { shared } => {
                let obj = k.new_object(len);
                (
                    Backing::File {
                        obj,
                        pgoff: 0,
                        shared,
                    },
                    Thp::Default,
                )
            }
            MapKind::Hugetlb => (Backing::Hugetlb, Thp::Default),
        };
        k.mmap(addr, len, align, backing, thp)
    }

    /// `memfd_create()` + `ftruncate(size)`: an object to map with [`MapKind::Object`].
    pub fn memfd_create(&self, size: u64) -> ObjectId {
        ObjectId(self.k().new_object(size))
    }

    /// The object backing `addr`, if a shmem or file VMA maps it.
    pub fn object_at(&self, addr: u64) -> Option<(ObjectId, u64)> {
        let k = self.k();
        k.vma_at(addr)
            .and_then(|v| v.object_page(addr))
            .map(|(o, pg)| (ObjectId(o), pg))
    }

    /// `munmap(2)`. Blocks while a uffd with `UFFD_FEATURE_EVENT_UNMAP` has its event unread
    /// (the unmap itself is already done).
    pub fn munmap(&self, r: Range) -> Result<Progress<()>, Errno> {
        let mut k = self.k();
        let ctxs = k.munmap(r.start(), r.len())?;
        if ctxs.is_empty() {
            return Ok(Progress::Done(()));
        }
        let id = k.next_access;
        k.next_access += 1;
        k.pending.insert(
            id,
            crate::kernel::Pending {
                op: PendingOp::Unmap {
                    events_left: ctxs.len() as u32,
                },
                tid: 1,
                kernel: false,
                blocked: None,
            },
        );
        for c in ctxs {
            k.queue_event(
                c,
                Event::Unmap {
                    start: r.start(),
                    end: r.end(),
                },
                id,
            );
        }
        Ok(Progress::Blocked(AccessId(id)))
    }

    /// `madvise(2)`. `MADV_DONTNEED` blocks while a uffd with `UFFD_FEATURE_EVENT_REMOVE` has its
    /// event unread (and zaps after it is read).
    pub fn madvise(&self, r: Range, advice: Advice) -> Result<Progress<()>, Errno> {
        let mut k = self.k();
        match advice {
            Advice::DontNeed => {
                let (end, gap) = k.dontneed_check(r.start(), r.len())?;
                let run = k.start_access(
                    PendingOp::Dontneed {
                        next: r.start(),
                        end,
                        gap,
                    },
                    1,
                    false,
                );
                progress(run, |_| Ok(()))
            }
            Advice::PageOut => k.pageout(r.start(), r.len()).map(Progress::Done),
            Advice::HugePage => k.set_thp(r.start(), r.len(), Thp::Huge).map(Progress::Done),
            Advice::NoHugePage => k
                .set_thp(r.start(), r.len(), Thp::NoHuge)
                .map(Progress::Done),
        }
    }

    /// The VMAs, in address order.
    pub fn vmas(&self) -> Vec<Vma> {
        self.k().vmas.values().copied().collect()
    }

    // ---------------------------------------------------------------------------- accesses

    /// A user-mode CPU write by thread 1.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Progress<()>, Errno> {
        self.write_as(addr, data, Who::default())
    }

    /// A write of `data` at `addr`: faults each page in for write. In sync WP mode a write to a
    /// write-protected page queues a fault message and waits; in async mode the kernel clears
    /// the page's uffd-wp bit (it reads as written) and the write goes on.
    pub fn write_as(&self, addr: u64, data: &[u8], who: Who) -> Result<Progress<()>, Errno> {
        if data.is_empty() {
            return Ok(Progress::Done(()));
        }
        let run = self.k().start_access(
            PendingOp::Write {
                addr,
                data: data.to_vec(),
                done: 0,
            },
            who.tid,
            who.kernel,
        );
        progress(run, |_| Ok(()))
    }

    /// A user-mode CPU read (faults pages in: the zero page for untouched anonymous memory).
    pub fn read(&self, addr: u64, len: usize) -> Result<Progress<Vec<u8>>, Errno> {
        self.read_as(addr, len, Who::default())
    }

    /// A read of `len` bytes at `addr`.
    pub fn read_as(&self, addr: u64, len: usize, who: Who) -> Result<Progress<Vec<u8>>, Errno> {
        let run = self.k().start_access(
            PendingOp::Read {
                addr,
                buf: vec![0; len],
                done: 0,
            },
            who.tid,
            who.kernel,
        );
        progress(run, |c| match c {
            Completion::Read(b) => Ok(b),
            _ => Ok(Vec::new()),
        })
    }

    /// Faults every page of `r` in, for write or read, without changing contents
    /// (`MADV_POPULATE_WRITE` / `MADV_POPULATE_READ`; a kernel-mode access).
    pub fn populate(&self, r: Range, write: bool) -> Result<Progress<()>, Errno> {
        let run = self.k().start_access(
            PendingOp::Touch {
                next: r.start(),
                end: r.end(),
                write,
            },
            1,
            true,
        );
        progress(run, |_| Ok(()))
    }

    /// `pin_user_pages()` on `r` (faulting each page in for write with `flags.write`).
    pub fn pin(&self, r: Range, flags: PinFlags) -> Result<Progress<PinId>, Errno> {
        let run = self.k().start_access(
            PendingOp::Pin {
                start: r.start(),
                end: r.end(),
                next: r.start(),
                write: flags.write,
                longterm: flags.longterm,
                frames: Vec::new(),
            },
            1,
            true,
        );
        progress(run, |c| match c {
            Completion::Pinned(p) => Ok(PinId(p)),
            _ => Err(Errno::FAULT),
        })
    }

    /// `unpin_user_pages()`.
    pub fn unpin(&self, pin: PinId) -> Result<(), Errno> {
        self.k().unpin(pin.0)
    }

    /// A device (or the kernel, e.g. io_uring `READ_FIXED`) writes `data` at `offset` of a
    /// write pin: the pages change, with no fault and no page-table change (the uffd-wp bit
    /// stays, the page does not read as written).
    pub fn dma_write(&self, pin: PinId, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.k().dma_write(pin.0, offset, data)
    }

    /// The first address of a pin.
    pub fn pin_start(&self, pin: PinId) -> Option<u64> {
        self.k().pin_start(pin.0)
    }

    /// How a waiting access ended, once it has (taken: returns `Some` once).
    pub fn completion(&self, id: AccessId) -> Option<Completion> {
        self.k().completed.remove(&id.0)
    }

    /// Whether an access still waits.
    pub fn is_waiting(&self, id: AccessId) -> bool {
        self.k().pending.contains_key(&id.0)
    }

    /// Every waiting access.
    pub fn waiting(&self) -> Vec<AccessId> {
        self.k().pending.keys().map(|k| AccessId(*k)).collect()
    }

    /// The process exits: its mm goes; uffd calls then fail with ESRCH (write-protect) or
    /// ENOMEM (register).
    pub fn exit(&self) {
        self.k().exit();
    }

    // ---------------------------------------------------------------------------- state

    /// The `/proc/PID/pagemap` entries of `r`, one per page (PFN bits 0).
    pub fn pagemap(&self, r: Range) -> Vec<u64> {
        let k = self.k();
        r.page_iter().map(|p| k.pagemap_entry(p.start())).collect()
    }

    /// The page states of `r` (decoded pagemap entries).
    pub fn page_states(&self, r: Range) -> Vec<PageState> {
        self.pagemap(r)
            .into_iter()
            .map(PageState::from_pagemap)
            .collect()
    }

    /// The pages of `r` whose uffd-wp bit is set (a page-table walk; the same pages as pagemap
    /// bit 57).
    pub fn wp_set(&self, r: Range) -> RangeSet {
        self.k().wp_ranges(r.start(), r.end())
    }

    /// The bytes of `r` not write-protected, pinned pages counting as protected when
    /// `pinned_count` (the figure the proposed call returns).
    pub fn bytes_not_protected(&self, r: Range, pinned_count: bool) -> u64 {
        self.k()
            .bytes_not_in_state(r.start(), r.end(), true, pinned_count)
    }

    /// One raw `PAGEMAP_SCAN` ioctl with a user vector of `vec_len` regions.
    pub fn pagemap_scan(&self, req: &ScanRequest, vec_len: usize) -> RawScan {
        self.k().pagemap_scan(req, vec_len)
    }

    /// `PAGEMAP_SCAN` over the whole request (see [`Mm::scan`]).
    pub fn scan(&self, req: &ScanRequest) -> Result<ScanResult, Errno> {
        scan_all(req, |q, n| self.scan_once(q, n))
    }

    /// One raw `PAGEMAP_SCAN` call with room for `vec_len` regions (see
    /// [`PageTables::scan`]).
    pub fn scan_once(&self, req: &ScanRequest, vec_len: usize) -> Result<ScanResult, Errno> {
        let r = self.pagemap_scan(req, vec_len);
        r.result?;
        Ok(ScanResult {
            regions: r.regions,
            walk_end: r.walk_end,
        })
    }

    /// The pages of `r` whose folio may be DMA-pinned (the model knows the true pin counts).
    pub fn pinned_pages(&self, r: Range) -> RangeSet {
        self.k().pinned_ranges(r.start(), r.end())
    }

    /// Long-term pinned pages (`VmPin` in /proc/PID/status, in pages).
    pub fn vm_pin_pages(&self) -> u64 {
        let k = self.k();
        k.pins
            .values()
            .filter(|p| p.longterm)
            .map(|p| p.frames.len() as u64)
            .sum()
    }

    /// The contents of `len` bytes at `addr` without faulting anything in (a debugger's view;
    /// unmapped or unpopulated bytes read as zero).
    pub fn peek(&self, addr: u64, len: usize) -> Vec<u8> {
        let k = self.k();
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let a = addr + done as u64;
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(len - done);
            if let Some(f) = k.mapped_frame(a) {
                k.frames.read(f, off, &mut out[done..done + n]);
            } else if let Some(v) = k.vma_at(a)
                && let Some((o, pg)) = v.object_page(a)
                && let Some(f) = k.objects.get(&o).and_then(|ob| ob.pages.get(&pg))
            {
                k.frames.read(*f, off, &mut out[done..done + n]);
            }
            done += n;
        }
        out
    }

    // ---------------------------------------------------------------------------- allocator

    /// Sets the page-table allocation failure policy (its attempt count restarts).
    pub fn set_alloc_policy(&self, p: FailPolicy) {
        self.k().alloc.set_policy(p);
    }

    /// The page-table allocation failure policy.
    pub fn alloc_policy(&self) -> FailPolicy {
        self.k().alloc.policy()
    }

    /// Allocation statistics.
    pub fn alloc_stats(&self) -> AllocStats {
        self.k().alloc.stats()
    }

    /// Page tables allocated now.
    pub fn table_counts(&self) -> TableCounts {
        self.k().alloc.stats().live
    }

    /// Starts or stops recording allocation attempts.
    pub fn record_allocations(&self, on: bool) {
        self.k().alloc.record(on);
    }

    /// The attempts recorded.
    pub fn allocation_log(&self) -> Vec<Attempt> {
        self.k().alloc.attempts_log().to_vec()
    }

    /// Checks the model's internal invariants (page-table counts, mapcounts, entries only inside
    /// VMAs, message queues); a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        crate::invariants::check(&self.k())
    }

    // ---------------------------------------------------------------------------- uffd

    /// What `UFFDIO_API` answers this kernel offers: 6.18's features, plus `WP_REPORT` and
    /// `WP_SKIP_PINNED` under the proposed semantics.
    pub fn offered_features(&self) -> Features {
        Features(self.k().offered_features())
    }

    /// `userfaultfd()` + `UFFDIO_API`: a uffd on this process. EINVAL for a feature the kernel
    /// does not know (asking for `WP_ASYNC` also enables `WP_UNPOPULATED`).
    pub fn open_uffd(&self, cfg: UffdConfig) -> Result<ModelMm, Errno> {
        let ctx = self.k().open_ctx(cfg.features.0, cfg.user_mode_only)?;
        let features = self.k().ctxs[&ctx].features;
        Ok(ModelMm {
            model: self.clone(),
            ctx,
            features,
            owner: true,
            pins_hidden: AtomicBool::new(false),
        })
    }
}

/// One userfaultfd on a [`Model`]: the [`Mm`] of the model backend. Dropping it closes the uffd
/// (userfaultfd_release(): its registrations and their protection go, blocked faults wake).
#[derive(Debug)]
pub struct ModelMm {
    model: Model,
    ctx: u64,
    features: Features,
    owner: bool,
    /// [`ModelMm::hide_pins`].
    pins_hidden: AtomicBool,
}

impl Drop for ModelMm {
    fn drop(&mut self) {
        if self.owner {
            self.model.k().release(self.ctx);
        }
    }
}

impl ModelMm {
    /// A new process with `cfg` and a uffd negotiated with `uffd`.
    pub fn open(cfg: ModelConfig, uffd: UffdConfig) -> Result<ModelMm, Errno> {
        Model::new(cfg).open_uffd(uffd)
    }

    /// The process.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The context's id in the model.
    pub fn ctx_id(&self) -> u64 {
        self.ctx
    }

    /// A deep copy of the whole process with a handle on the same context in the copy.
    pub fn duplicate(&self) -> ModelMm {
        ModelMm {
            model: self.model.duplicate(),
            ctx: self.ctx,
            features: self.features,
            owner: true,
            pins_hidden: AtomicBool::new(self.pins_hidden.load(Ordering::Relaxed)),
        }
    }

    /// `UFFDIO_WRITEPROTECT` with raw arguments (`mode`: `UFFDIO_WRITEPROTECT_MODE_*` bits).
    pub fn writeprotect_raw(&self, start: u64, len: u64, mode: u64) -> Result<(), Errno> {
        self.model.k().writeprotect(self.ctx, start, len, mode)
    }

    /// `UFFDIO_REGISTER` with raw arguments.
    pub fn register_raw(&self, start: u64, len: u64, mode: u64) -> Result<u64, Errno> {
        self.model.k().register(self.ctx, start, len, mode)
    }

    /// `UFFDIO_UNREGISTER` with raw arguments.
    pub fn unregister_raw(&self, start: u64, len: u64) -> Result<(), Errno> {
        self.model.k().unregister(self.ctx, start, len)
    }

    /// `UFFDIO_WAKE` with raw arguments.
    pub fn wake_raw(&self, start: u64, len: u64) -> Result<(), Errno> {
        crate::kernel::validate_range(start, len)?;
        self.model.k().wake(self.ctx, start, len);
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT_REPORT` with raw arguments (`mode`: `UFFDIO_WRITEPROTECT_MODE_*`
    /// bits, `MODE_SKIP_PINNED` = 4 included): the ioctl's result, `done` and `pinned`
    /// (kernel/README.md). Only the `proposed` semantics has it: under `linux` it answers as
    /// Linux does to an unknown command (EINVAL, nothing written).
    pub fn writeprotect_report_raw(&self, start: u64, len: u64, mode: u64) -> KernelReport {
        self.model
            .k()
            .writeprotect_report(self.ctx, start, len, mode)
    }

    /// Hides (or shows again) every pin from [`Pins::pinned`], as a monitor on Linux cannot
    /// see a transient `O_DIRECT` pin or a device's: only the kernel (`MODE_SKIP_PINNED`) then
    /// knows where they are.
    pub fn hide_pins(&self, hidden: bool) {
        self.pins_hidden.store(hidden, Ordering::Relaxed);
    }

    /// Whether `mmap_changing` is raised (a non-cooperative event is unread).
    pub fn mmap_changing(&self) -> bool {
        self.model
            .k()
            .ctxs
            .get(&self.ctx)
            .is_some_and(|c| c.mmap_changing > 0)
    }
}

impl Uffd for ModelMm {
    fn backend(&self) -> &'static str {
        "model"
    }

    fn features(&self) -> Features {
        self.features
    }

    fn register(&self, r: Range, mode: RegisterMode) -> Result<u64, Errno> {
        self.register_raw(r.start(), r.len(), mode.0)
    }

    fn unregister(&self, r: Range) -> Result<(), Errno> {
        self.unregister_raw(r.start(), r.len())
    }

    fn writeprotect(&self, r: Range, mode: WpMode) -> Result<(), Errno> {
        self.writeprotect_raw(r.start(), r.len(), mode.bits())
    }

    fn writeprotect_report(&self, r: Range, mode: WpMode, skip_pinned: bool) -> KernelReport {
        self.writeprotect_report_raw(r.start(), r.len(), mode.report_bits(skip_pinned))
    }

    fn wake(&self, r: Range) -> Result<(), Errno> {
        self.wake_raw(r.start(), r.len())
    }

    fn read_events(&self, max: usize) -> Result<Vec<Event>, Errno> {
        Ok(self.model.k().read_events(self.ctx, max))
    }

    /// Never sleeps: the model is single-threaded, so nothing can arrive while waiting.
    fn wait_event(&self, _timeout_ms: i32) -> Result<bool, Errno> {
        Ok(self.model.k().has_events(self.ctx))
    }
}

impl PageTables for ModelMm {
    /// `clear_refs` 4, with `ModelConfig::soft_dirty`; EOPNOTSUPP without (as on this project's
    /// kernels).
    fn clear_soft_dirty(&self) -> Result<(), Errno> {
        self.model.k().clear_soft_dirty()
    }

    fn page_states(&self, r: Range) -> Result<Vec<PageState>, Errno> {
        Ok(self.model.page_states(r))
    }

    /// Through `PAGEMAP_SCAN`, as the Linux backend does: a page is protected when it is present
    /// or swapped (markers included) and not written.
    fn wp_pages(&self, r: Range) -> Result<RangeSet, Errno> {
        let req = ScanRequest {
            start: r.start(),
            end: r.end(),
            category_anyof_mask: category::PRESENT | category::SWAPPED,
            return_mask: category::WRITTEN,
            ..Default::default()
        };
        let res = self.model.scan(&req)?;
        Ok(res
            .regions
            .iter()
            .filter(|g| g.categories & category::WRITTEN == 0)
            .map(|g| Range::from_bounds(g.start, g.end))
            .collect())
    }

    fn scan(&self, req: &ScanRequest, vec_len: usize) -> Result<ScanResult, Errno> {
        self.model.scan_once(req, vec_len)
    }

    fn fully_mapped(&self, r: Range) -> Result<bool, Errno> {
        let k = self.model.k();
        let covered: u64 = k
            .vmas_in(r.start(), r.end())
            .iter()
            .map(|v| v.end.min(r.end()) - v.start.max(r.start()))
            .sum();
        Ok(covered == r.len())
    }
}

impl Pins for ModelMm {
    /// The true pin counts, unless [`ModelMm::hide_pins`].
    fn pinned(&self, r: Range) -> Result<RangeSet, Errno> {
        if self.pins_hidden.load(Ordering::Relaxed) {
            return Ok(RangeSet::new());
        }
        Ok(self.model.pinned_pages(r))
    }
}

impl Memory for ModelMm {
    /// As `/proc/PID/mem` does: a kernel-mode read that faults pages in (the zero page for
    /// untouched anonymous memory). EIO on an unmapped byte; EFAULT where the read would wait
    /// for the monitor (a MISSING fault), which the model refuses instead of blocking.
    fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut k = self.model.k();
        let end = addr.checked_add(buf.len() as u64).ok_or(Errno::IO)?;
        let first = addr & !(PAGE_SIZE - 1);
        let covered: u64 = k
            .vmas_in(first, end)
            .iter()
            .map(|v| v.end.min(end) - v.start.max(first))
            .sum();
        if covered < end - first {
            return Err(Errno::IO);
        }
        let run = k.start_access(
            PendingOp::Read {
                addr,
                buf: vec![0; buf.len()],
                done: 0,
            },
            0,
            true,
        );
        match run {
            Run::Done(Completion::Read(b)) => {
                buf.copy_from_slice(&b);
                Ok(())
            }
            Run::Done(Completion::Failed(e)) => Err(e),
            Run::Done(_) => Err(Errno::IO),
            Run::Blocked(id) => {
                // Withdraw the read and its message.
                if let Some(p) = k.pending.remove(&id)
                    && let Some(b) = p.blocked
                    && let Some(c) = k.ctxs.get_mut(&b.ctx)
                {
                    c.faults.retain(|x| *x != id);
                }
                Err(Errno::FAULT)
            }
        }
    }
}

/// A page-aligned range from raw arguments (EINVAL otherwise).
pub fn range(addr: u64, len: u64) -> Result<Range, Errno> {
    page_range(addr, len)
}

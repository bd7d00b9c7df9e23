//! Live copy-on-write snapshots, generic over [`Mm`].
//!
//! 1. Register the ranges for WP and populate the image buffer (before the pause).
//! 2. **Pause**: freeze the writers (a [`Quiesce`] callback), exact-write-protect everything
//!    (split over threads where that shortens the pause), copy at once whatever could not be
//!    protected (or report it, per [`Unprotected`]), resume.
//! 3. **Copy**: walk the pages in address order. A writer that touches a page not yet copied
//!    takes a WP fault; the fault is served first: copy the old page, un-protect it, wake the
//!    writer. The copier un-protects each chunk right after copying it, so a page faults at
//!    most once and the writers run free behind the copier.
//! 4. Pinned pages (which a device or io_uring can write without any fault) are never trusted:
//!    they are left unprotected, copied last, and counted as possibly torn.
//!
//! Each page moves PENDING -> COPYING -> DONE exactly once (an atomic per page), whoever gets
//! there first, copier or fault handler; only a DONE page is ever un-protected (a pinned page
//! waits in LAST, which neither copies, until everything else is copied). Any failure or
//! early return un-protects and unregisters everything and resumes the writers (a drop guard).

mod image;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use image::{Image, ImageError};

use crate::engine::protect::{OnError, WpError, WpOptions, WpReport, write_protect};
use crate::range::{PAGE_SIZE, PMD_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, Event, Quiesce, RegisterMode, WpMode};
use crate::sys::errno_name;
use crate::sys::mem::Mapping;

/// Where page contents are read from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A mapping of this process: copied with memcpy.
    Mapping(&'a Mapping),
    /// Through [`Mm::read_memory`] (the model, or another process).
    Mm,
}

/// How WP faults are served during the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HandlerMode {
    /// The copier itself polls the uffd (non-blocking) between chunks of `chunk_pages` pages:
    /// no cross-CPU wake-up of a sleeping handler, at the cost of up to one chunk's copy time.
    Inline {
        /// Pages copied between two polls.
        chunk_pages: u32,
    },
    /// A dedicated thread sleeps in poll(2) on the uffd and serves each fault.
    Thread,
    /// Both: a handler thread sleeps in poll(2), and the copier also reads the uffd
    /// (non-blocking) between chunks of `chunk_pages` pages; whichever runs first serves the
    /// fault. A writer on an idle CPU wakes the thread there; a writer sharing the copier's CPU
    /// is served by the copier without waiting for the thread to be scheduled.
    Hybrid {
        /// Pages copied between two polls by the copier.
        chunk_pages: u32,
    },
}

impl HandlerMode {
    /// The copier's chunk between two polls, if the copier polls.
    fn inline_chunk(self) -> Option<u64> {
        match self {
            HandlerMode::Inline { chunk_pages } | HandlerMode::Hybrid { chunk_pages } => {
                Some(u64::from(chunk_pages.max(1)))
            }
            HandlerMode::Thread => None,
        }
    }

    /// Whether a handler thread serves faults.
    fn has_thread(self) -> bool {
        !matches!(self, HandlerMode::Inline { .. })
    }
}

/// What to do with pages that could not be write-protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unprotected {
    /// Copy them while the writers are still frozen (consistent; the pause grows).
    CopyInFreeze,
    /// Leave them out and list them in `not_captured`.
    Report,
    /// Give up: clean up and return the error.
    Abort,
}

/// Options of [`take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Threads that write-protect in parallel during the pause (1: the caller alone).
    pub protect_threads: usize,
    /// How faults are served.
    pub handler: HandlerMode,
    /// Pages that could not be protected.
    pub unprotected: Unprotected,
    /// Failure policy of the write-protect.
    pub on_error: OnError,
    /// Write-protect everything *before* the pause while the writers run (a handler thread
    /// un-protects and records each page they write meanwhile), then, frozen, re-protect only
    /// those pages. Shortens the pause when protecting the whole range costs more than the
    /// pages written during it (4 KiB pages); pointless with THP, where protecting is cheap.
    pub prearm: bool,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            protect_threads: 1,
            // Measured (docs/benchmarks.md, Snapshots): with nothing pinned to a CPU, a sleeping
            // handler thread is woken on the faulting writer's idle CPU, while the busy inline
            // copier needs a cross-CPU wake-up (p50 30-34 us against 40-50 for inline; the
            // thread alone 28-32); the copier's own polls serve the faults the thread is too
            // slow for (p99 with the handler on the copier's CPU 0.2-0.6 ms against 2.1-3.1 ms
            // for the thread alone). Five runs, session 3.
            handler: HandlerMode::Hybrid { chunk_pages: 32 },
            unprotected: Unprotected::CopyInFreeze,
            on_error: OnError::Retry {
                attempts: 3,
                backoff: Duration::from_micros(100),
            },
            prearm: true,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of a sample in nanoseconds (empty: all zero).
    pub fn of_ns(mut ns: Vec<u64>) -> Percentiles {
        if ns.is_empty() {
            return Percentiles::default();
        }
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Percentiles {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// What a snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// Set by the caller's oracle, if it has one.
    pub consistent: Option<bool>,
    /// Writers frozen, in microseconds.
    pub pause_us: f64,
    /// Of which stopping the writers (the [`Quiesce::freeze`] callback).
    pub freeze_us: f64,
    /// Of which write-protecting.
    pub protect_us: f64,
    /// Pages written between the pre-arming write-protect and the pause (re-protected in
    /// the pause); 0 without `prearm`.
    pub prearm_dirty_pages: u64,
    /// Pages captured.
    pub pages: u64,
    /// Bytes captured.
    pub bytes: u64,
    /// WP faults served first (copy before the write).
    pub faults_served: u64,
    /// Fault service time in the engine (message read to wake), microseconds.
    pub fault_service_us: Percentiles,
    /// Pinned pages: left unprotected, copied last, possibly torn.
    pub pinned_pages: u64,
    /// Long-term pinned bytes of the process that no known source explains: non-zero means
    /// a page the image holds as consistent may have been written by a device after the
    /// snapshot point ([`Mm::unexplained_pinned_bytes`]).
    pub unexplained_pinned_bytes: u64,
    /// Pages copied during the freeze because they could not be protected.
    pub copied_in_freeze_pages: u64,
    /// Pages not captured (offsets are absolute addresses), with why.
    pub not_captured: Vec<NotCaptured>,
    /// Copy phase duration in milliseconds.
    pub copy_ms: f64,
    /// Copy throughput, MB/s (10^6 bytes).
    pub copy_mb_s: f64,
    /// Raw write-protect calls during the pause.
    pub protect_raw_calls: u32,
    /// The first write-protect failure, if any.
    pub protect_error: Option<String>,
    /// How faults were served.
    pub handler: HandlerMode,
}

/// A range left out of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotCaptured {
    /// [start, end) addresses.
    pub range: [u64; 2],
    /// Why.
    pub why: String,
}

/// Why a snapshot failed. Whatever happened, nothing is left protected or registered and the
/// writers run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The ranges are empty or overlap nothing.
    #[error("nothing to snapshot")]
    Empty,
    /// Allocating the image failed.
    #[error("allocating a {bytes}-byte image: {}", errno_name(*errno))]
    Image {
        /// Size.
        bytes: u64,
        /// errno.
        errno: Errno,
    },
    /// Registering a range for WP failed.
    #[error("UFFDIO_REGISTER(WP) of {range}: {}", errno_name(*errno))]
    Register {
        /// The range.
        range: Range,
        /// errno.
        errno: Errno,
    },
    /// Write-protecting failed and the policy is `Abort` (or nothing could be protected).
    #[error("write-protecting the snapshot: {0}")]
    Protect(#[from] WpError),
    /// Copying a page failed.
    #[error("copying {len} bytes at {addr:#x}: {}", errno_name(*errno))]
    Copy {
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
        /// errno.
        errno: Errno,
    },
    /// Serving a fault or un-protecting failed.
    #[error("{op} at {addr:#x}: {}", errno_name(*errno))]
    Uffd {
        /// What.
        op: &'static str,
        /// Address.
        addr: u64,
        /// errno.
        errno: Errno,
    },
}

impl SnapshotError {
    /// The errno behind the failure (EINVAL for an empty snapshot).
    pub fn errno(&self) -> Errno {
        match self {
            SnapshotError::Empty => Errno::INVAL,
            SnapshotError::Protect(e) => e.errno(),
            SnapshotError::Image { errno, .. }
            | SnapshotError::Register { errno, .. }
            | SnapshotError::Copy { errno, .. }
            | SnapshotError::Uffd { errno, .. } => *errno,
        }
    }

    /// The address the failure is about, when there is one.
    pub fn addr(&self) -> Option<u64> {
        match self {
            SnapshotError::Empty | SnapshotError::Image { .. } => None,
            SnapshotError::Protect(e) => Some(e.addr()),
            SnapshotError::Register { range, .. } => Some(range.start()),
            SnapshotError::Copy { addr, .. } | SnapshotError::Uffd { addr, .. } => Some(*addr),
        }
    }
}

/// Bytes un-protected at once by the copier (one TLB flush each).
pub const RELEASE_BATCH: u64 = 2 << 20;

const PENDING: u8 = 0;
const COPYING: u8 = 1;
const DONE: u8 = 2;
/// A pinned page, never write-protected: neither the copier nor the handler copies it; it is
/// copied after everything else.
const LAST: u8 = 3;

/// The state the copier and the fault handler share.
struct Shared<'a, M: Mm + ?Sized> {
    mm: &'a M,
    source: Source<'a>,
    image: &'a Image,
    ranges: Vec<Range>,
    first_page: Vec<u64>,
    state: Vec<AtomicU8>,
    /// Some of the ranges were mapped by huge pages when the snapshot began: a fault then
    /// serves the whole huge page around it (see [`Shared::serve`]).
    huge: bool,
    faults: AtomicU64,
    service_ns: std::sync::Mutex<Vec<u64>>,
}

impl<M: Mm + ?Sized> Shared<'_, M> {
    fn index(&self, addr: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.end() <= addr);
        let r = self.ranges.get(i).filter(|r| r.contains(addr))?;
        Some((self.first_page[i] + (addr - r.start()) / PAGE_SIZE) as usize)
    }

    fn copy(&self, addr: u64, len: u64) -> Result<(), SnapshotError> {
        let err = |errno| SnapshotError::Copy { addr, len, errno };
        match self.source {
            Source::Mapping(m) => self.image.copy_from_mapping(m, addr, len).map_err(err),
            Source::Mm => self.image.copy_from_mm(self.mm, addr, len).map_err(err),
        }
    }

    /// Claims the page at `addr` and copies it unless someone else did; waits while another
    /// thread is copying it. Returns whether this call copied it.
    fn claim_and_copy(&self, addr: u64) -> Result<bool, SnapshotError> {
        let Some(i) = self.index(addr) else {
            return Ok(false);
        };
        loop {
            match self.state[i].compare_exchange(
                PENDING,
                COPYING,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let res = self.copy(addr, PAGE_SIZE);
                    self.state[i].store(DONE, Ordering::Release);
                    return res.map(|()| true);
                }
                Err(DONE | LAST) => return Ok(false),
                Err(_) => std::hint::spin_loop(),
            }
        }
    }

    fn unprotect(&self, r: Range) -> Result<(), SnapshotError> {
        self.mm
            .writeprotect(r, WpMode::Unprotect { dontwake: false })
            .map_err(|errno| SnapshotError::Uffd {
                op: "UFFDIO_WRITEPROTECT(unprotect)",
                addr: r.start(),
                errno,
            })
    }

    /// Serves one event: a WP fault gets its page copied (if not yet), un-protected, woken.
    /// A fault inside a huge page gets the whole huge page copied and un-protected: a 4 KiB
    /// un-protect would split the PMD, and the random writes of a live workload would then
    /// fault once per 4 KiB page instead of once per huge page (measured: 9-18 k faults per
    /// live copy of 1 GiB of THP in session 2, 505 now: at most one per huge page and writer).
    fn serve(&self, ev: Event) -> Result<(), SnapshotError> {
        let Event::PageFault { address, .. } = ev else {
            return Ok(());
        };
        let t = Instant::now();
        let page = address & !(PAGE_SIZE - 1);
        let block = if self.huge {
            unprotect_block(self.mm, &self.ranges, page)
        } else {
            Range::from_bounds(page, page + PAGE_SIZE)
        };
        if block.pages() == 1 {
            self.claim_and_copy(page)?;
            self.unprotect(block)?;
        } else {
            self.copy_unclaimed(block)?;
            self.release(block)?;
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.service_ns
            .lock()
            .expect("latency lock")
            .push(t.elapsed().as_nanos() as u64);
        Ok(())
    }

    /// Serves every pending event without blocking, until a read finds none. That last read
    /// is not wasted: measured (docs/benchmarks.md), stopping after a batch that was not full
    /// made the inline copier's faults on the writer's CPU 3x slower (9.5 -> 26-28 us p50),
    /// since the extra syscall is where the woken writer gets the CPU back from the copier.
    fn serve_pending(&self) -> Result<(), SnapshotError> {
        loop {
            let evs = self
                .mm
                .read_events(16)
                .map_err(|errno| SnapshotError::Uffd {
                    op: "read(uffd)",
                    addr: 0,
                    errno,
                })?;
            if evs.is_empty() {
                return Ok(());
            }
            for ev in evs {
                self.serve(ev)?;
            }
        }
    }

    /// Copies the pages of `r` nobody has claimed yet, in runs.
    fn copy_unclaimed(&self, r: Range) -> Result<(), SnapshotError> {
        let i0 = self.index(r.start()).expect("chunk inside the snapshot");
        let n = r.pages() as usize;
        // Claim the longest runs of PENDING pages and copy each run with one copy.
        let mut k = 0;
        while k < n {
            if self.state[i0 + k]
                .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                k += 1;
                continue;
            }
            let start = k;
            k += 1;
            while k < n
                && self.state[i0 + k]
                    .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                k += 1;
            }
            let a = r.start() + start as u64 * PAGE_SIZE;
            let res = self.copy(a, (k - start) as u64 * PAGE_SIZE);
            for s in &self.state[i0 + start..i0 + k] {
                s.store(DONE, Ordering::Release);
            }
            res?;
        }
        Ok(())
    }

    /// Un-protects `r` once every page of it is copied (waiting for pages the handler is
    /// copying right now).
    fn release(&self, r: Range) -> Result<(), SnapshotError> {
        let i0 = self.index(r.start()).expect("range inside the snapshot");
        for s in &self.state[i0..i0 + r.pages() as usize] {
            while s.load(Ordering::Acquire) == COPYING {
                std::hint::spin_loop();
            }
        }
        self.unprotect(r)
    }
}

/// Undoes everything on drop unless disarmed: resumes the writers, un-protects and unregisters.
struct Cleanup<'a, M: Mm + ?Sized> {
    mm: &'a M,
    ranges: Vec<Range>,
    quiesce: &'a dyn Quiesce,
    frozen: bool,
    /// Un-protect on drop (false once the copier has un-protected everything).
    protected: bool,
}

impl<M: Mm + ?Sized> Drop for Cleanup<'_, M> {
    fn drop(&mut self) {
        if self.frozen {
            self.quiesce.resume();
        }
        for r in &self.ranges {
            if self.protected {
                for part in r.split_at_multiples(crate::range::PUD_SIZE) {
                    let _ = self
                        .mm
                        .writeprotect(part, WpMode::Unprotect { dontwake: false });
                }
            }
            let _ = self.mm.unregister(*r);
        }
    }
}

/// Splits `set` into at most `n` pieces of about equal bytes.
fn split_even(set: &RangeSet, n: usize) -> Vec<RangeSet> {
    let per = set.bytes().div_ceil(n as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut out = vec![RangeSet::new()];
    let mut room = per;
    for r in set.iter() {
        let mut cur = r.start();
        while cur < r.end() {
            if room == 0 {
                out.push(RangeSet::new());
                room = per;
            }
            let take = (r.end() - cur).min(room);
            out.last_mut()
                .expect("non-empty")
                .insert(Range::from_bounds(cur, cur + take));
            cur += take;
            room -= take;
        }
    }
    out
}

/// Write-protects `set`, split over `threads` threads (one group of ranges each); the result
/// of every `write_protect` call with the range it covered.
fn protect_all<M: Mm + ?Sized>(
    mm: &M,
    set: &RangeSet,
    threads: usize,
    opts: &WpOptions,
) -> Vec<(Range, Result<WpReport, WpError>)> {
    let run = |g: &RangeSet| {
        g.iter()
            .map(|r| (*r, write_protect(mm, *r, opts)))
            .collect::<Vec<_>>()
    };
    if threads <= 1 {
        return run(set);
    }
    let groups = split_even(set, threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = groups.iter().map(|g| s.spawn(move || run(g))).collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("protect thread"))
            .collect()
    })
}

/// The pre-arm handler's state, shared with the thread taking the snapshot.
#[derive(Default)]
struct Prearm {
    /// Set (inside the pause) to end the handler: it reads no event after seeing it.
    stop: AtomicBool,
    /// What the handler un-protected, recorded *before* each un-protect (and its wake-up of
    /// the writer), and the handler's error if it failed. Held while the handler reads and
    /// serves events, so whoever holds it after setting `stop` sees the final record.
    record: std::sync::Mutex<(RangeSet, Option<SnapshotError>)>,
}

/// Before the pause: un-protects what a writer faults on and records it, until `stop`. A page
/// inside a huge page gets its whole huge page un-protected (within the snapshot's range): a
/// 4 KiB un-protect would split the PMD, making the pause's re-protect and every later fault
/// cost 4 KiB page tables.
fn prearm_handler<M: Mm + ?Sized>(mm: &M, ranges: &RangeSet, st: &Prearm) {
    // Waits in poll(2) for 1 ms at most between rounds: a fault wakes it at once, and
    // whoever stops it never waits for the wait (see `Prearm::record`).
    let uffd_err = |op, addr| move |errno| SnapshotError::Uffd { op, addr, errno };
    let serve = |dirty: &mut RangeSet| -> Result<bool, SnapshotError> {
        let evs = mm.read_events(64).map_err(uffd_err("read(uffd)", 0))?;
        for ev in &evs {
            if let Event::PageFault { address, .. } = *ev {
                let start = address & !(PAGE_SIZE - 1);
                let block = unprotect_block(mm, ranges.iter(), start);
                dirty.insert(block);
                mm.writeprotect(block, WpMode::Unprotect { dontwake: false })
                    .map_err(uffd_err("UFFDIO_WRITEPROTECT(unprotect)", start))?;
            }
        }
        Ok(!evs.is_empty())
    };
    // A writer may be waiting in a fault this handler can no longer serve, and the freeze
    // would wait for it: un-protect (and wake) everything; the snapshot fails on the recorded
    // error once the writers are frozen.
    let fail = |err: &mut Option<SnapshotError>, e: SnapshotError| {
        for r in ranges.iter() {
            let _ = mm.writeprotect(*r, WpMode::Unprotect { dontwake: false });
        }
        *err = Some(e);
    };
    loop {
        {
            let mut rec = st.record.lock().expect("pre-arm record");
            if st.stop.load(Ordering::Acquire) {
                return;
            }
            let (dirty, err) = &mut *rec;
            match serve(dirty) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => return fail(err, e),
            }
        }
        if let Err(errno) = mm.wait_event(1) {
            let mut rec = st.record.lock().expect("pre-arm record");
            return fail(&mut rec.1, uffd_err("poll(uffd)", 0)(errno));
        }
    }
}

/// What a fault on the page at `page` frees (in the pre-arm handler and in the copy): the
/// whole huge page holding it, clipped to the snapshot range holding it, or else (also when
/// the scan that tells fails: one page is always right) the page.
fn unprotect_block<'r, M: Mm + ?Sized>(
    mm: &M,
    ranges: impl IntoIterator<Item = &'r Range>,
    page: u64,
) -> Range {
    let one = Range::from_bounds(page, page + PAGE_SIZE);
    let huge = mm.scan_all(&crate::seam::ScanRequest {
        start: page,
        end: page + PAGE_SIZE,
        category_mask: crate::sys::pagemap::category::HUGE,
        return_mask: crate::sys::pagemap::category::HUGE,
        ..Default::default()
    });
    if !huge.is_ok_and(|h| !h.regions.is_empty()) {
        return one;
    }
    let pmd = page & !(PMD_SIZE - 1);
    let within = ranges
        .into_iter()
        .find(|r| r.contains(page))
        .copied()
        .unwrap_or(one);
    Range::from_bounds(pmd.max(within.start()), (pmd + PMD_SIZE).min(within.end()))
}

/// Whether any of `r` is mapped by a huge page (one `PAGEMAP_SCAN` that stops at the first).
fn any_huge<M: Mm + ?Sized>(mm: &M, r: Range) -> bool {
    mm.scan_all(&crate::seam::ScanRequest {
        start: r.start(),
        end: r.end(),
        max_pages: 1,
        category_mask: crate::sys::pagemap::category::HUGE,
        return_mask: crate::sys::pagemap::category::HUGE,
        ..Default::default()
    })
    .is_ok_and(|h| !h.regions.is_empty())
}

/// Takes a live snapshot of `ranges`. See the module docs.
pub fn take<M: Mm + ?Sized>(
    mm: &M,
    ranges: &RangeSet,
    source: Source<'_>,
    quiesce: &dyn Quiesce,
    opts: &SnapshotOptions,
    progress: impl FnMut(u64, u64),
) -> Result<(Image, SnapshotReport), SnapshotError> {
    // The scope outlives the pause, so the pre-arm handler is joined after it.
    let prearm = Prearm::default();
    std::thread::scope(|s| take_in(s, &prearm, mm, ranges, source, quiesce, opts, progress))
}

/// Sets the pre-arm handler's `stop` when dropped, on every path out of [`take_in`] (the
/// scope joins the handler after it).
struct StopPrearm<'a>(&'a Prearm);

impl Drop for StopPrearm<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
    }
}

#[allow(clippy::too_many_arguments)]
fn take_in<'scope, 'env, M: Mm + ?Sized>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    st: &'env Prearm,
    mm: &'env M,
    ranges: &'env RangeSet,
    source: Source<'_>,
    quiesce: &dyn Quiesce,
    opts: &SnapshotOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<(Image, SnapshotReport), SnapshotError> {
    if ranges.is_empty() {
        return Err(SnapshotError::Empty);
    }
    let image = Image::new(ranges).map_err(|errno| SnapshotError::Image {
        bytes: ranges.bytes(),
        errno,
    })?;
    let mut guard = Cleanup {
        mm,
        ranges: Vec::new(),
        quiesce,
        frozen: false,
        protected: true,
    };
    for r in ranges.iter() {
        mm.register(*r, RegisterMode::WP)
            .map_err(|errno| SnapshotError::Register { range: *r, errno })?;
        guard.ranges.push(*r);
    }
    let mut first_page = Vec::new();
    let mut total_pages = 0;
    for r in ranges.iter() {
        first_page.push(total_pages);
        total_pages += r.pages();
    }
    let sh = Shared {
        mm,
        source,
        image: &image,
        ranges: ranges.iter().copied().collect(),
        first_page,
        state: (0..total_pages).map(|_| AtomicU8::new(PENDING)).collect(),
        huge: ranges.iter().any(|r| any_huge(mm, *r)),
        faults: AtomicU64::new(0),
        service_ns: std::sync::Mutex::new(Vec::new()),
    };

    // Pins are looked up once, before the pause (a lookup reads /proc: tens of microseconds,
    // too much to pay per re-protected range inside it); the write-protects then leave them
    // out themselves. A pin taken between here and the resume is not seen.
    let mut pinned = RangeSet::new();
    for r in ranges.iter() {
        pinned.extend(&mm.pinned(*r).map_err(|errno| SnapshotError::Uffd {
            op: "looking up pinned pages",
            addr: r.start(),
            errno,
        })?);
    }
    let to_protect = ranges.difference(&pinned);
    let wp_opts = WpOptions {
        skip_pinned: false,
        on_error: opts.on_error,
    };

    // --- The pause ---
    let prearm_dirty_pages;
    let (t_pause, protect_us, results, freeze_us) = if opts.prearm {
        // Protect everything while the writers run; pages they write meanwhile are
        // un-protected by a handler and recorded, and only those are re-protected in the pause.
        //
        // The handler is not joined inside the pause (it may be napping): once the writers
        // are frozen no fault is pending (a writer in a fault cannot park), so taking its
        // record after setting `stop` is enough, and it reads no event after that. It is
        // joined after the pause, before the copy's own handling of faults starts.
        let stopper = StopPrearm(st);
        scope.spawn(move || prearm_handler(mm, ranges, st));
        let mut results = protect_all(mm, &to_protect, opts.protect_threads, &wp_opts);
        let t_pause = Instant::now();
        quiesce.freeze();
        guard.frozen = true;
        let freeze_us = t_pause.elapsed().as_secs_f64() * 1e6;
        drop(stopper);
        let (dirty, err) = std::mem::take(&mut *st.record.lock().expect("pre-arm record"));
        if let Some(e) = err {
            return Err(e);
        }
        prearm_dirty_pages = dirty.pages();
        let t_protect = Instant::now();
        // Phase-1 reports still count: what they could not protect is handled below.
        results.extend(protect_all(mm, &dirty.difference(&pinned), 1, &wp_opts));
        (
            t_pause,
            t_protect.elapsed().as_secs_f64() * 1e6,
            results,
            freeze_us,
        )
    } else {
        prearm_dirty_pages = 0;
        let t_pause = Instant::now();
        quiesce.freeze();
        let freeze_us = t_pause.elapsed().as_secs_f64() * 1e6;
        guard.frozen = true;
        let t_protect = Instant::now();
        let results = protect_all(mm, &to_protect, opts.protect_threads, &wp_opts);
        (
            t_pause,
            t_protect.elapsed().as_secs_f64() * 1e6,
            results,
            freeze_us,
        )
    };
    let skipped = pinned;
    let mut unprotected = RangeSet::new();
    let mut raw_calls = 0;
    let mut first_error: Option<WpError> = None;
    for (r, res) in results {
        match res {
            Ok(rep) => {
                raw_calls += rep.raw_calls;
                unprotected.extend(&rep.not_protected);
                if first_error.is_none() {
                    first_error = rep.error;
                }
            }
            Err(e) => {
                unprotected.insert(r);
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
    }
    let mut not_captured = Vec::new();
    let mut copied_in_freeze = 0;
    if !unprotected.is_empty() {
        match opts.unprotected {
            Unprotected::Abort => {
                return Err(SnapshotError::Protect(first_error.unwrap_or(
                    WpError::Kernel {
                        op: crate::engine::protect::WpOp::Protect,
                        kind: crate::engine::protect::FailureKind::Other,
                        errno: Errno::FAULT,
                        addr: unprotected.first_addr().unwrap_or(0),
                    },
                )));
            }
            Unprotected::CopyInFreeze => {
                for r in unprotected.iter() {
                    for p in r.page_iter() {
                        sh.claim_and_copy(p.start())?;
                    }
                    copied_in_freeze += r.pages();
                }
            }
            Unprotected::Report => {
                let why = first_error
                    .as_ref()
                    .map_or("not write-protected".to_string(), |e| e.to_string());
                for r in unprotected.iter() {
                    for p in r.page_iter() {
                        if let Some(i) = sh.index(p.start()) {
                            sh.state[i].store(DONE, Ordering::Release);
                        }
                    }
                    not_captured.push(NotCaptured {
                        range: [r.start(), r.end()],
                        why: why.clone(),
                    });
                }
            }
        }
    }
    // Pinned pages are copied last: keep the copier and the handler off them for now.
    for r in skipped.iter() {
        for p in r.page_iter() {
            if let Some(i) = sh.index(p.start()) {
                sh.state[i].store(LAST, Ordering::Release);
            }
        }
    }
    quiesce.resume();
    guard.frozen = false;
    let pause_us = t_pause.elapsed().as_secs_f64() * 1e6;

    // --- The copy ---
    let t_copy = Instant::now();
    let stop = AtomicBool::new(false);
    let polls = opts.handler.inline_chunk();
    let chunk_pages = polls.unwrap_or(64);
    let mut copier = |sh: &Shared<'_, M>| -> Result<(), SnapshotError> {
        let mut done = 0;
        for r in sh.ranges.iter() {
            // Un-protecting flushes TLBs on every CPU running the writers: do it per 2 MiB,
            // while faults are polled for every `chunk_pages`.
            for batch in r.split_at_multiples(RELEASE_BATCH) {
                for chunk in batch.split_at_multiples(chunk_pages * PAGE_SIZE) {
                    if polls.is_some() {
                        sh.serve_pending()?;
                    }
                    sh.copy_unclaimed(chunk)?;
                    done += chunk.pages();
                    progress(done, total_pages);
                }
                sh.release(batch)?;
            }
        }
        Ok(())
    };
    let copy_result = if !opts.handler.has_thread() {
        copier(&sh)
    } else {
        std::thread::scope(|s| {
            let handler = s.spawn(|| -> Result<(), SnapshotError> {
                while !stop.load(Ordering::Acquire) {
                    if mm.wait_event(20).unwrap_or(false) {
                        sh.serve_pending()?;
                    }
                }
                sh.serve_pending()
            });
            let r = copier(&sh);
            stop.store(true, Ordering::Release);
            let h = handler.join().expect("fault handler thread");
            r.and(h)
        })
    };
    copy_result?;
    // Pinned pages last (the pinning I/O may still write them: flagged).
    for r in skipped.iter() {
        sh.copy(r.start(), r.len())?;
    }
    sh.serve_pending()?;
    let copy_s = t_copy.elapsed().as_secs_f64();
    guard.protected = false; // the copier un-protected every chunk
    drop(guard); // unregister

    let captured = ranges.bytes()
        - not_captured
            .iter()
            .map(|n| n.range[1] - n.range[0])
            .sum::<u64>();
    let faults = sh.faults.load(Ordering::Relaxed);
    let service = std::mem::take(&mut *sh.service_ns.lock().expect("latency lock"));
    drop(sh);
    let report = SnapshotReport {
        consistent: None,
        pause_us,
        freeze_us,
        protect_us,
        prearm_dirty_pages,
        pages: captured / PAGE_SIZE,
        bytes: captured,
        faults_served: faults,
        fault_service_us: Percentiles::of_ns(service),
        pinned_pages: skipped.pages(),
        unexplained_pinned_bytes: mm.unexplained_pinned_bytes(),
        copied_in_freeze_pages: copied_in_freeze,
        not_captured,
        copy_ms: copy_s * 1e3,
        copy_mb_s: captured as f64 / copy_s.max(1e-9) / 1e6,
        protect_raw_calls: raw_calls,
        protect_error: first_error.map(|e| e.to_string()),
        handler: opts.handler,
    };
    Ok((image, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::linux::LinuxMm;
    use crate::sys::mem::{Backing, Thp};
    use crate::sys::pagemap::category;

    fn need<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) if std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1") => {
                panic!("kernel feature {what} required (UFFD_WP_REQUIRE_KERNEL=1): {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: needs kernel feature {what}: {e}");
                None
            }
        }
    }

    /// The pre-arm handler frees a whole huge page (clipped to the snapshot's range) for a
    /// fault inside one, so the huge page is not split, and a single 4 KiB page otherwise.
    #[test]
    fn prearm_unprotects_the_huge_page_around_a_fault() {
        let Some(mm) = need("userfaultfd", LinuxMm::open()) else {
            return;
        };
        for thp in [true, false] {
            let hint = if thp { Thp::Huge } else { Thp::NoHuge };
            let m = Mapping::new(8 << 20, PMD_SIZE, Backing::Anon, hint).unwrap();
            m.populate().unwrap();
            let r = m.range();
            let huge: u64 = mm
                .scan_all(&crate::seam::ScanRequest {
                    start: r.start(),
                    end: r.end(),
                    category_mask: category::HUGE,
                    return_mask: category::HUGE,
                    ..Default::default()
                })
                .unwrap()
                .regions
                .iter()
                .map(|g| g.end - g.start)
                .sum();
            let expect_huge = if thp { r.len() } else { 0 };
            let Some(()) = need(
                "transparent huge pages (madvise)",
                if huge == expect_huge {
                    Ok(())
                } else {
                    Err(format!("{huge:#x} of {:#x} bytes in huge pages", r.len()))
                },
            ) else {
                return;
            };
            let pmd = r.start() + 2 * PMD_SIZE;
            let page = pmd + 5 * PAGE_SIZE;
            let one = Range::from_bounds(page, page + PAGE_SIZE);
            let whole = RangeSet::single(r);
            let block = unprotect_block(&mm, &whole, page);
            assert_eq!(
                block,
                if thp {
                    Range::from_bounds(pmd, pmd + PMD_SIZE)
                } else {
                    one
                },
                "thp {thp}"
            );
            // A snapshot range starting inside the huge page: the block is clipped to it.
            let part = RangeSet::single(Range::from_bounds(pmd + 4 * PAGE_SIZE, r.end()));
            let clipped = unprotect_block(&mm, &part, page);
            assert_eq!(
                clipped,
                if thp {
                    Range::from_bounds(pmd + 4 * PAGE_SIZE, pmd + PMD_SIZE)
                } else {
                    one
                },
                "thp {thp}"
            );
        }
    }
}

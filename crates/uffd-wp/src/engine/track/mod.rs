//! Dirty tracking: epochs of the pages written in a range, on any [`Mm`].
//!
//! A [`Tracker`] arms a range, then each call to [`Tracker::epoch`] returns the pages written
//! since the previous call (the first epoch: since arming) as a [`RangeSet`], and re-arms them.
//! Three methods, chosen by the feature probe ([`Selection`]) and reported in every epoch:
//!
//! - [`Method::AsyncWp`] (6.7+): the range is registered for WP on a uffd with
//!   `UFFD_FEATURE_WP_ASYNC` and write-protected exactly ([`crate::engine::protect::write_protect`]);
//!   the kernel resolves write faults itself by clearing the page's uffd-wp bit. An epoch is one
//!   `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category and return
//!   mask `PAGE_IS_WRITTEN`: it returns the written pages and write-protects them again in the
//!   same page-table walk, atomically per page table (a write racing with the scan is either
//!   returned now or faults after being re-protected and is returned next time: nothing is
//!   lost). When the output vector fills the kernel stops and says where in `walk_end`; the scan
//!   resumes there ([`crate::sys::pagemap::Pagemap::scan`]). Pages the kernel did not return
//!   are not re-protected (fs/proc/task_mmu.c re-protects only what it output), so resuming
//!   loses nothing. `CHECK_WPASYNC` turns a VMA that is not WP-async (unregistered behind the
//!   tracker's back) into EPERM instead of a silent skip.
//! - [`Method::SyncWp`]: a uffd without `WP_ASYNC`. A handler thread reads each WP fault,
//!   records the page, un-protects it and wakes the writer. An epoch takes the recorded pages
//!   and write-protects exactly them again. The handler and the epoch share one lock held from
//!   recording to un-protecting and from taking to re-protecting, so a page is writable only
//!   while it is in the current epoch's set; pending fault messages are drained into the
//!   closing epoch before it is taken.
//! - [`Method::SoftDirty`]: `clear_refs` 4 then pagemap bit 55. Not atomic: a write between
//!   reading the bits and clearing them is lost, so epochs are exact only with the writers
//!   paused at the boundary; and `clear_refs` clears the whole process. The last resort, for
//!   kernels without userfaultfd WP. (This project's test kernel is built without
//!   `CONFIG_MEM_SOFT_DIRTY`: the probe says so and this path is only tested on a test double.)
//!
//! Pinned pages ([`Mm::pinned`]) can be written through the pin without any fault, so each
//! epoch reports the pages pinned at its boundary in [`Epoch::pinned`], dirty whatever the page
//! tables say; they are left writable when arming.
//!
//! On any error, and when dropped, the tracker un-protects and unregisters everything it armed:
//! nothing is left write-protected. [`Tracker::close`] does the same and reports failures.

mod select;
mod types;

pub use select::{Method, Selection};
pub use types::{Epoch, Phase, TrackError, TrackOptions};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::engine::protect::{WpOptions, unprotect, write_protect};
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, Event, RegisterMode, ScanRequest, WpMode};
use crate::sys::pagemap::{SCAN_CHECK_WPASYNC, SCAN_WP_MATCHING, category};

/// `UFFD_PAGEFAULT_FLAG_WP`.
const FAULT_FLAG_WP: u64 = linux_raw_sys::general::UFFD_PAGEFAULT_FLAG_WP as u64;

/// What the sync handler thread and the epochs share.
#[derive(Debug, Default)]
struct SyncShared {
    /// Pages un-protected by the handler since the last boundary. Held from recording a page
    /// to un-protecting it, and from taking the set to re-protecting it.
    pages: Mutex<Vec<u64>>,
    stop: AtomicBool,
    faults: AtomicU64,
    error: Mutex<Option<TrackError>>,
}

#[derive(Debug)]
struct SyncHandler {
    shared: Arc<SyncShared>,
    thread: Option<JoinHandle<()>>,
}

/// Serves every pending uffd event: a WP fault in `range` is recorded, then its page is
/// un-protected (which wakes the writer); any other fault is woken. Returns the first failure
/// after trying every event (a failed un-protect is still woken so the writer retries).
fn drain_faults<M: Mm + ?Sized>(
    mm: &M,
    range: Range,
    pages: &mut Vec<u64>,
    faults: &AtomicU64,
) -> Result<(), TrackError> {
    loop {
        let events = mm
            .read_events(64)
            .map_err(|errno| TrackError::Events { errno })?;
        if events.is_empty() {
            return Ok(());
        }
        let mut first = None;
        for ev in events {
            let Event::PageFault { flags, address, .. } = ev else {
                continue;
            };
            let start = address & !(PAGE_SIZE - 1);
            let page = Range::from_bounds(start, start + PAGE_SIZE);
            let res = if flags & FAULT_FLAG_WP != 0 {
                if range.contains(start) {
                    pages.push(start);
                }
                faults.fetch_add(1, Ordering::Relaxed);
                mm.writeprotect(page, WpMode::Unprotect { dontwake: false })
            } else {
                mm.wake(page)
            };
            if let Err(errno) = res {
                let _ = mm.wake(page);
                first.get_or_insert(TrackError::Fault { addr: start, errno });
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
    }
}

fn handler_loop<M: Mm + ?Sized>(mm: Arc<M>, range: Range, sh: Arc<SyncShared>, poll_ms: i32) {
    while !sh.stop.load(Ordering::Acquire) {
        match mm.wait_event(poll_ms) {
            Ok(true) => {}
            Ok(false) | Err(Errno::INTR) => continue,
            Err(errno) => {
                sh.error
                    .lock()
                    .expect("handler error lock")
                    .get_or_insert(TrackError::Events { errno });
                return;
            }
        }
        let mut pages = sh.pages.lock().expect("dirty pages lock");
        if let Err(e) = drain_faults(&*mm, range, &mut pages, &sh.faults) {
            sh.error
                .lock()
                .expect("handler error lock")
                .get_or_insert(e);
        }
    }
}

/// A dirty tracker over one range of an [`Mm`]. See the module docs.
#[derive(Debug)]
pub struct Tracker<M: Mm + ?Sized + 'static> {
    mm: Arc<M>,
    range: Range,
    method: Method,
    opts: TrackOptions,
    next_epoch: u64,
    registered: bool,
    protected: bool,
    disarmed: bool,
    /// Sync WP: pinned pages left writable.
    skipped: RangeSet,
    sync: Option<SyncHandler>,
}

impl<M: Mm + ?Sized + 'static> Tracker<M> {
    /// Arms `range` with the best method the uffd's features allow
    /// ([`Method::for_features`]).
    pub fn start_auto(mm: Arc<M>, range: Range, opts: TrackOptions) -> Result<Self, TrackError> {
        let method = Method::for_features(mm.features());
        Self::start(mm, range, method, opts)
    }

    /// Arms `range` for `method`: the first epoch counts writes from now on.
    ///
    /// WP methods: registers the range for WP and write-protects all of it exactly, pinned
    /// pages excepted (every page, populated or not: the uffd needs `WP_UNPOPULATED`, which
    /// `WP_ASYNC` implies; without it an unpopulated page cannot be protected and arming fails
    /// with [`TrackError::Protect`]). Soft-dirty: clears the soft-dirty bits.
    pub fn start(
        mm: Arc<M>,
        range: Range,
        method: Method,
        opts: TrackOptions,
    ) -> Result<Self, TrackError> {
        let (need, forbid) = method.needs();
        let f = mm.features();
        if !f.contains(need) {
            return Err(TrackError::Unsupported {
                method,
                what: if method == Method::AsyncWp {
                    "a uffd with UFFD_FEATURE_WP_ASYNC"
                } else {
                    "a uffd with UFFD_FEATURE_PAGEFAULT_FLAG_WP"
                },
            });
        }
        if f.0 & forbid.0 != 0 {
            return Err(TrackError::Unsupported {
                method,
                what: "a uffd without UFFD_FEATURE_WP_ASYNC (async WP resolves faults itself)",
            });
        }
        let mut t = Tracker {
            mm,
            range,
            method,
            opts,
            next_epoch: 0,
            registered: false,
            protected: false,
            disarmed: false,
            skipped: RangeSet::new(),
            sync: None,
        };
        if let Err(e) = t.arm() {
            return Err(t.fail(e));
        }
        Ok(t)
    }

    fn arm(&mut self) -> Result<(), TrackError> {
        let range = self.range;
        if self.method == Method::SoftDirty {
            return self
                .mm
                .clear_soft_dirty()
                .map_err(|errno| TrackError::SoftDirty {
                    op: "clear_refs",
                    addr: range.start(),
                    errno,
                });
        }
        self.mm
            .register(range, RegisterMode::WP)
            .map_err(|errno| TrackError::Register { range, errno })?;
        self.registered = true;
        self.protected = true;
        let opts = WpOptions {
            skip_pinned: true,
            on_error: self.opts.on_error,
        };
        let rep = write_protect(&*self.mm, range, &opts).map_err(|e| TrackError::Protect {
            phase: Phase::Arm,
            range,
            addr: e.addr(),
            bytes: range.len(),
            source: Some(e),
        })?;
        if !rep.complete() {
            return Err(TrackError::Protect {
                phase: Phase::Arm,
                range,
                addr: rep.not_protected.first_addr().unwrap_or(range.start()),
                bytes: rep.bytes_not_protected(),
                source: rep.error,
            });
        }
        self.skipped = rep.skipped;
        if self.method == Method::SyncWp {
            let shared = Arc::new(SyncShared::default());
            let (mm, sh, poll) = (Arc::clone(&self.mm), Arc::clone(&shared), self.opts.poll_ms);
            let thread = std::thread::Builder::new()
                .name("uffd-wp-track".into())
                .spawn(move || handler_loop(mm, range, sh, poll))
                .map_err(|e| TrackError::Spawn {
                    errno: crate::sys::errno_of(&e),
                })?;
            self.sync = Some(SyncHandler {
                shared,
                thread: Some(thread),
            });
        }
        Ok(())
    }

    /// The tracked range.
    pub fn range(&self) -> Range {
        self.range
    }

    /// The method in use.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The backend.
    pub fn mm(&self) -> &Arc<M> {
        &self.mm
    }

    /// Whether an error or [`Tracker::close`] disarmed the tracker.
    pub fn is_disarmed(&self) -> bool {
        self.disarmed
    }

    /// Ends the current epoch: returns the pages written since the previous boundary (or since
    /// arming) and re-arms them. On error the tracker disarms itself (nothing stays protected)
    /// and every later call fails with [`TrackError::Disarmed`].
    pub fn epoch(&mut self) -> Result<Epoch, TrackError> {
        if self.disarmed {
            return Err(TrackError::Disarmed { range: self.range });
        }
        let t0 = Instant::now();
        let res = match self.method {
            Method::AsyncWp => self.epoch_async(),
            Method::SyncWp => self.epoch_sync(),
            Method::SoftDirty => self.epoch_soft_dirty(),
        };
        match res {
            Ok((dirty, pinned, faults)) => {
                let index = self.next_epoch;
                self.next_epoch += 1;
                Ok(Epoch {
                    index,
                    method: self.method,
                    range: self.range,
                    dirty,
                    pinned,
                    unexplained_pinned_bytes: self.mm.unexplained_pinned_bytes(),
                    elapsed: t0.elapsed(),
                    faults,
                })
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn pinned(&self) -> Result<RangeSet, TrackError> {
        let range = self.range;
        self.mm
            .pinned(range)
            .map(|p| p.clip(range))
            .map_err(|errno| TrackError::Pinned { range, errno })
    }

    /// Written pages outside the pins, re-protected by the same walk. A page pinned before and
    /// released since was left writable, so it reads as written and is protected again here.
    fn epoch_async(&mut self) -> Result<(RangeSet, RangeSet, u64), TrackError> {
        let pinned = self.pinned()?;
        let mut dirty = RangeSet::new();
        for r in RangeSet::single(self.range).difference(&pinned).iter() {
            let req = ScanRequest {
                flags: SCAN_WP_MATCHING | SCAN_CHECK_WPASYNC,
                start: r.start(),
                end: r.end(),
                category_mask: category::WRITTEN,
                return_mask: category::WRITTEN,
                ..Default::default()
            };
            let res = self
                .mm
                .scan_all(&req)
                .map_err(|errno| TrackError::Scan { range: *r, errno })?;
            if res.walk_end < r.end() {
                return Err(TrackError::ScanIncomplete {
                    range: *r,
                    walk_end: res.walk_end,
                });
            }
            for g in &res.regions {
                let (a, b) = (g.start.max(r.start()), g.end.min(r.end()));
                if a < b {
                    dirty.insert(Range::from_bounds(a, b));
                }
            }
        }
        Ok((dirty, pinned, 0))
    }

    fn epoch_sync(&mut self) -> Result<(RangeSet, RangeSet, u64), TrackError> {
        let range = self.range;
        let h = self.sync.as_ref().expect("sync tracker has a handler");
        let shared = Arc::clone(&h.shared);
        let mut pages = shared.pages.lock().expect("dirty pages lock");
        if let Some(e) = shared.error.lock().expect("handler error lock").take() {
            return Err(e);
        }
        // Faults already queued belong to the closing epoch.
        drain_faults(&*self.mm, range, &mut pages, &shared.faults)?;
        let faults = shared.faults.swap(0, Ordering::Relaxed);
        let recorded = RangeSet::from_ranges(
            pages
                .drain(..)
                .map(|a| Range::from_bounds(a, a + PAGE_SIZE)),
        );
        let pinned = self.pinned()?;
        let released = self.skipped.difference(&pinned);
        let writable = recorded.union(&released);
        let dirty = writable.difference(&pinned);
        let opts = WpOptions {
            skip_pinned: false,
            on_error: self.opts.on_error,
        };
        for r in dirty.iter() {
            let fail = |addr, bytes, source| TrackError::Protect {
                phase: Phase::Reprotect,
                range: *r,
                addr,
                bytes,
                source,
            };
            let rep = write_protect(&*self.mm, *r, &opts)
                .map_err(|e| fail(e.addr(), r.len(), Some(e.clone())))?;
            if !rep.complete() {
                let addr = rep.not_protected.first_addr().unwrap_or(r.start());
                return Err(fail(addr, rep.bytes_not_protected(), rep.error));
            }
        }
        self.skipped = self.skipped.union(&recorded).intersection(&pinned);
        drop(pages);
        Ok((dirty, pinned, faults))
    }

    fn epoch_soft_dirty(&mut self) -> Result<(RangeSet, RangeSet, u64), TrackError> {
        let range = self.range;
        let sd = |op, errno| TrackError::SoftDirty {
            op,
            addr: range.start(),
            errno,
        };
        let states = self
            .mm
            .page_states(range)
            .map_err(|e| sd("pagemap read", e))?;
        self.mm
            .clear_soft_dirty()
            .map_err(|e| sd("clear_refs", e))?;
        let pinned = self.pinned()?;
        let dirty = crate::seam::pages_where(range, &states, |s| s.soft_dirty).difference(&pinned);
        Ok((dirty, pinned, 0))
    }

    /// Disarms after `first` and returns what to report.
    fn fail(&mut self, first: TrackError) -> TrackError {
        match self.disarm() {
            Ok(()) => first,
            Err(cleanup) => TrackError::Cleanup {
                first: Box::new(first),
                cleanup: Box::new(cleanup),
            },
        }
    }

    /// Un-protects and unregisters what was armed and stops the handler. Idempotent.
    fn disarm(&mut self) -> Result<(), TrackError> {
        if self.disarmed {
            return Ok(());
        }
        self.disarmed = true;
        let range = self.range;
        let mut first = None;
        if let Some(h) = &self.sync {
            h.shared.stop.store(true, Ordering::Release);
        }
        if self.protected {
            // Un-protecting also wakes any writer blocked on a WP fault.
            let res = unprotect(&*self.mm, range, self.opts.on_error);
            let err = match res {
                Ok(rep) if rep.protected.is_empty() => None,
                Ok(rep) => Some(TrackError::Protect {
                    phase: Phase::Disarm,
                    range,
                    addr: rep.protected.first_addr().unwrap_or(range.start()),
                    bytes: rep.protected.bytes(),
                    source: rep.error,
                }),
                Err(e) => Some(TrackError::Protect {
                    phase: Phase::Disarm,
                    range,
                    addr: e.addr(),
                    bytes: range.len(),
                    source: Some(e),
                }),
            };
            first = first.or(err);
            self.protected = false;
        }
        if self.registered {
            if let Err(errno) = self.mm.unregister(range) {
                first.get_or_insert(TrackError::Unregister { range, errno });
            }
            self.registered = false;
        }
        if let Some(mut h) = self.sync.take() {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Disarms: un-protects and unregisters the range and stops the handler, reporting any
    /// failure. Dropping the tracker does the same and ignores failures.
    pub fn close(mut self) -> Result<(), TrackError> {
        self.disarm()
    }
}

impl<M: Mm + ?Sized + 'static> Drop for Tracker<M> {
    fn drop(&mut self) {
        let _ = self.disarm();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::Features;
    use crate::seam::{PageState, ScanResult};

    /// A test double with soft-dirty bits and nothing else: the soft-dirty tracker's logic,
    /// which this project's kernel (no CONFIG_MEM_SOFT_DIRTY) cannot run.
    #[derive(Debug)]
    struct SoftDirtyMm {
        range: Range,
        bits: Mutex<Vec<bool>>,
        pins: RangeSet,
        fail_clear: AtomicBool,
    }

    impl SoftDirtyMm {
        fn write(&self, page: u64) {
            self.bits.lock().unwrap()[page as usize] = true;
        }
    }

    impl Uffd for SoftDirtyMm {
        fn backend(&self) -> &'static str {
            "soft-dirty-double"
        }
        fn features(&self) -> Features {
            Features::empty()
        }
        fn register(&self, _: Range, _: RegisterMode) -> Result<u64, Errno> {
            Err(Errno::NOSYS)
        }
        fn unregister(&self, _: Range) -> Result<(), Errno> {
            Err(Errno::NOSYS)
        }
        fn writeprotect(&self, _: Range, _: WpMode) -> Result<(), Errno> {
            Err(Errno::NOSYS)
        }
        fn wake(&self, _: Range) -> Result<(), Errno> {
            Err(Errno::NOSYS)
        }
        fn read_events(&self, _: usize) -> Result<Vec<Event>, Errno> {
            Ok(vec![])
        }
        fn wait_event(&self, _: i32) -> Result<bool, Errno> {
            Ok(false)
        }
    }

    impl PageTables for SoftDirtyMm {
        fn page_states(&self, r: Range) -> Result<Vec<PageState>, Errno> {
            let bits = self.bits.lock().unwrap();
            let first = (r.start() - self.range.start()) / PAGE_SIZE;
            Ok((first..first + r.pages())
                .map(|i| PageState {
                    present: true,
                    soft_dirty: bits[i as usize],
                    ..Default::default()
                })
                .collect())
        }
        fn scan(&self, _: &ScanRequest, _: usize) -> Result<ScanResult, Errno> {
            Err(Errno::NOTTY)
        }
        fn fully_mapped(&self, _: Range) -> Result<bool, Errno> {
            Ok(true)
        }
        /// Like the kernel (clear_soft_dirty_pte skips pinned pages): pinned pages stay dirty.
        fn clear_soft_dirty(&self) -> Result<(), Errno> {
            if self.fail_clear.load(Ordering::Relaxed) {
                return Err(Errno::NOMEM);
            }
            let mut bits = self.bits.lock().unwrap();
            for (i, b) in bits.iter_mut().enumerate() {
                let a = self.range.start() + i as u64 * PAGE_SIZE;
                if !self.pins.contains(a) {
                    *b = false;
                }
            }
            Ok(())
        }
    }

    impl Pins for SoftDirtyMm {
        fn pinned(&self, r: Range) -> Result<RangeSet, Errno> {
            Ok(self.pins.clip(r))
        }
    }

    impl Memory for SoftDirtyMm {
        fn read_memory(&self, _: u64, _: &mut [u8]) -> Result<(), Errno> {
            Err(Errno::NOSYS)
        }
    }

    #[test]
    fn soft_dirty_epochs_on_a_double() {
        let range = Range::new(1 << 20, 64 * PAGE_SIZE).unwrap();
        let page = |i: u64| {
            Range::from_bounds(
                range.start() + i * PAGE_SIZE,
                range.start() + (i + 1) * PAGE_SIZE,
            )
        };
        let pins = RangeSet::single(Range::from_bounds(page(40).start(), page(44).start()));
        let mm = Arc::new(SoftDirtyMm {
            range,
            bits: Mutex::new(vec![true; 64]),
            pins: pins.clone(),
            fail_clear: AtomicBool::new(false),
        });
        let mut t = Tracker::start_auto(Arc::clone(&mm), range, TrackOptions::default()).unwrap();
        assert_eq!(t.method(), Method::SoftDirty);
        for i in [3, 4, 9, 41] {
            mm.write(i);
        }
        let e = t.epoch().unwrap();
        assert_eq!(e.dirty, [3, 4, 9].into_iter().map(page).collect());
        assert_eq!(e.pinned, pins);
        let e = t.epoch().unwrap();
        assert_eq!((e.index, e.dirty.clone()), (1, RangeSet::new()));
        assert_eq!(e.pinned, pins);
        mm.write(63);
        mm.fail_clear.store(true, Ordering::Relaxed);
        let err = t.epoch().unwrap_err();
        assert!(matches!(
            err,
            TrackError::SoftDirty {
                op: "clear_refs",
                errno: Errno::NOMEM,
                ..
            }
        ));
        assert!(matches!(t.epoch(), Err(TrackError::Disarmed { .. })));
        t.close().unwrap();
    }
}

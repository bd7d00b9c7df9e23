//! [`Method::SyncWp`](super::Method::SyncWp): a uffd without `WP_ASYNC` and a fault-handler
//! thread.
//!
//! The handler ([`handler_loop`]) reads each WP fault, records the page, un-protects it and
//! wakes the writer; an epoch ([`Tracker::epoch_sync`]) takes the recorded pages and
//! write-protects exactly them again. Both hold [`SyncShared::pages`] from recording to
//! un-protecting and from taking to re-protecting, so a page is writable only while it is in the
//! current epoch's set; fault messages still queued at the boundary are drained into the
//! closing epoch first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{Phase, TrackError, Tracker};
use crate::engine::protect::{WpOptions, write_protect};
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, Event, WpMode};

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

/// The running handler thread of a sync-WP tracker.
#[derive(Debug)]
pub(super) struct SyncHandler {
    shared: Arc<SyncShared>,
    thread: JoinHandle<()>,
}

impl SyncHandler {
    /// Asks the handler thread to stop (it checks between polls of `poll_ms`).
    pub(super) fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
    }

    /// Waits for the handler thread to end.
    pub(super) fn join(self) {
        let _ = self.thread.join();
    }
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

impl<M: Mm + ?Sized + 'static> Tracker<M> {
    /// Starts the fault-handler thread (after arming has write-protected the range).
    pub(super) fn start_handler(&mut self) -> Result<(), TrackError> {
        let range = self.range;
        let shared = Arc::new(SyncShared::default());
        let (mm, sh, poll) = (Arc::clone(&self.mm), Arc::clone(&shared), self.opts.poll_ms);
        let thread = std::thread::Builder::new()
            .name("uffd-wp-track".into())
            .spawn(move || handler_loop(mm, range, sh, poll))
            .map_err(|e| TrackError::Spawn {
                errno: crate::sys::errno_of(&e),
            })?;
        self.sync = Some(SyncHandler { shared, thread });
        Ok(())
    }

    /// The pages the handler recorded (and pinned pages released since arming), re-protected.
    pub(super) fn epoch_sync(&mut self) -> Result<(RangeSet, RangeSet, u64), TrackError> {
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
}

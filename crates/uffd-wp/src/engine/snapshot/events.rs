//! What the process does to its own mappings while the snapshot is copied, seen through the
//! uffd's non-cooperative events (`UFFD_FEATURE_EVENT_REMOVE`, `_UNMAP`, `_REMAP`, when the
//! backend enabled them: the dump's does).
//!
//! The kernel raises the uffd's `mmap_changing` before such a change and lowers it once the
//! event is *read* (fs/userfaultfd.c: userfaultfd_ctx_read() completes the event as it copies
//! it out, and the waiting thread goes on); meanwhile every `UFFDIO_WRITEPROTECT` fails with
//! EAGAIN ([`Mm::events_in_flight`]). No event lets the monitor copy first:
//! - `munmap` (UNMAP) and `mremap` (REMAP) change the page tables *before* the event is queued
//!   (userfaultfd_unmap_complete() and mremap_userfaultfd_complete() run after the mmap lock is
//!   dropped): what was not copied is gone, or moved, before anyone can read the event;
//! - `MADV_DONTNEED`/`MADV_REMOVE` (REMOVE) wait in userfaultfd_remove() until the event is
//!   read, then zap while the monitor handles it.
//!
//! What the events do give: which pages are gone (reported in `not_captured`, never copied
//! from whatever is mapped there afterwards) and where moved pages went (copied from there).
//! A copy counts only if no change touched its source while it ran: `mmap_changing` low before
//! and after it (a munmap or mremap lies inside the raised window), and no REMOVE, UNMAP or
//! REMAP read meanwhile that overlaps it (a sequence number, odd while a thread reads the uffd
//! and records what it read: a zap follows the read of its REMOVE). Otherwise the events are
//! read and the pages copied again from where they are now, or reported lost.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::shared::{COPYING, DONE, LAST, PENDING, Shared};
use super::{NotCaptured, SnapshotError};
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, Event};

/// How long a change may stay in flight (raised, its event not yet queued) before the copy
/// gives up: a munmap or mremap of the target's, which takes microseconds to milliseconds.
const IN_FLIGHT_PATIENCE: Duration = Duration::from_secs(10);

/// The non-cooperative events read during the copy, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventCounts {
    /// `MADV_DONTNEED`/`MADV_REMOVE` of registered memory.
    pub remove: u64,
    /// `munmap` of registered memory.
    pub unmap: u64,
    /// `mremap` that moved registered memory.
    pub remap: u64,
    /// Forks during the copy (`UFFD_EVENT_FORK`, when the backend enabled it: the dump's
    /// does): each time, the snapshot's shared ranges ([`super::take_sharing`]) were copied
    /// before the child's uffd was closed, so nothing the child writes there can reach the
    /// snapshot.
    pub fork: u64,
    /// Forks before the freeze, read by the pre-arm handler: the child's uffd was closed at
    /// once; such a child writes the shared ranges during the copy unseen, as a process that
    /// mapped them before the dump does.
    pub fork_before_freeze: u64,
    /// Unknown events, ignored.
    pub other: u64,
    /// Copies dropped because a change may have touched their source (copied again).
    pub retried_copies: u64,
    /// `UFFDIO_WRITEPROTECT` calls that met EAGAIN (a change in flight) and were retried.
    pub eagain_retries: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Remove,
    Unmap,
    Remap { to: u64 },
}

/// One change read during the copy, at sequence number `seq` (odd).
#[derive(Debug, Clone, Copy)]
struct Change {
    seq: u64,
    kind: Kind,
    /// Its range, in the addresses of the moment it happened (a remap: the source).
    range: Range,
}

/// The changes read during the copy and what they cost the snapshot.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// The backend delivers REMOVE, UNMAP or REMAP events.
    pub(super) enabled: bool,
    /// What a child forked during the copy shares with the process (its `MAP_SHARED`
    /// ranges, snapshot addresses): copied on a fork event, before the child may write them.
    pub(super) fork_shared: RangeSet,
    /// Odd while a thread reads the uffd and records the changes it read.
    seq: AtomicU64,
    /// Held by the thread reading the uffd (one reader at a time, so `seq` pairs up).
    reading: Mutex<()>,
    log: Mutex<Vec<Change>>,
    moved: AtomicBool,
    /// Faults read while waiting out a change (served next).
    deferred: Mutex<Vec<Event>>,
    /// Child uffds of forks read and not handled yet ([`Shared::next_faults`] handles them:
    /// the reader may hold claimed pages, which handling waits for).
    forks: Mutex<Vec<u32>>,
    /// Pages (snapshot addresses) whose content at the snapshot point is lost, by cause.
    lost: Mutex<Lost>,
    counts: Mutex<EventCounts>,
}

#[derive(Debug, Default)]
struct Lost {
    removed: RangeSet,
    unmapped: RangeSet,
    unreadable: RangeSet,
}

impl Changes {
    pub(super) fn new(enabled: bool, fork_shared: RangeSet) -> Changes {
        Changes {
            enabled,
            fork_shared,
            ..Changes::default()
        }
    }

    /// Counts the forks the pre-arm handler saw (their uffds closed at once).
    pub(super) fn forked_before_freeze(&self, n: u64) {
        self.count(|c| c.fork_before_freeze += n);
    }

    pub(super) fn counts(&self) -> EventCounts {
        *self.counts.lock().expect("event counts")
    }

    fn count(&self, f: impl FnOnce(&mut EventCounts)) {
        f(&mut self.counts.lock().expect("event counts"));
    }

    /// The pages lost during the copy, each run with its cause.
    pub(super) fn not_captured(&self) -> Vec<NotCaptured> {
        let lost = self.lost.lock().expect("lost pages");
        let why = [
            (
                &lost.removed,
                "MADV_DONTNEED/MADV_REMOVE by the target during the copy, before the page was \
                 copied: its content at the snapshot point is lost",
            ),
            (
                &lost.unmapped,
                "unmapped by the target during the copy, before the page was copied (the \
                 kernel reports an unmap after it happened)",
            ),
            (
                &lost.unreadable,
                "unreadable when copied (unmapped or made inaccessible by the target)",
            ),
        ];
        let mut out = Vec::new();
        for (set, why) in why {
            for r in set.iter() {
                out.push(NotCaptured {
                    range: [r.start(), r.end()],
                    why: why.to_string(),
                });
            }
        }
        out.sort_by_key(|n| n.range);
        out
    }

    /// Records a page that could not be read when copied.
    pub(super) fn lost_unreadable(&self, p: Range) {
        self.lost.lock().expect("lost pages").unreadable.insert(p);
    }

    fn lost_any(&self, r: Range) -> RangeSet {
        let l = self.lost.lock().expect("lost pages");
        let only = RangeSet::single(r);
        let mut out = RangeSet::new();
        for set in [&l.removed, &l.unmapped, &l.unreadable] {
            out.extend(&set.intersection(&only));
        }
        out
    }

    /// Where the page that was at `addr` at the snapshot point is now.
    fn now_at(&self, addr: u64) -> u64 {
        if !self.moved.load(Ordering::Acquire) {
            return addr;
        }
        let mut a = addr;
        for c in self.log.lock().expect("change log").iter() {
            if let Kind::Remap { to } = c.kind
                && c.range.contains(a)
            {
                a = to + (a - c.range.start());
            }
        }
        a
    }

    /// Where the page now at `addr` was at the snapshot point; `None` if it arrived there
    /// since (mapped after a change vacated the address).
    fn was_at(&self, addr: u64) -> Option<u64> {
        if !self.moved.load(Ordering::Acquire) {
            return Some(addr);
        }
        let mut a = addr;
        for c in self.log.lock().expect("change log").iter().rev() {
            match c.kind {
                Kind::Remap { to } if (to..to + c.range.len()).contains(&a) => {
                    a = c.range.start() + (a - to);
                }
                // The address was vacated: what is there now came later.
                Kind::Remap { .. } | Kind::Unmap if c.range.contains(a) => return None,
                _ => {}
            }
        }
        Some(a)
    }

    /// Whether a change read after sequence number `s0` and up to `s1` overlaps `src`.
    fn touched(&self, s0: u64, s1: u64, src: Range) -> bool {
        s0 != s1
            && self
                .log
                .lock()
                .expect("change log")
                .iter()
                .filter(|c| c.seq > s0 && c.seq <= s1)
                .any(|c| {
                    let dst = match c.kind {
                        Kind::Remap { to } => Range::from_bounds(to, to + c.range.len()),
                        _ => c.range,
                    };
                    overlaps(c.range, src) || overlaps(dst, src)
                })
    }

    /// The sequence number once no reader is between reading and recording.
    fn settled_seq(&self) -> u64 {
        loop {
            let s = self.seq.load(Ordering::SeqCst);
            if s % 2 == 0 {
                return s;
            }
            std::hint::spin_loop();
        }
    }
}

fn overlaps(a: Range, b: Range) -> bool {
    a.start() < b.end() && b.start() < a.end()
}

impl<M: Mm + ?Sized> Shared<'_, M> {
    /// The next page faults to serve: those deferred while waiting out a change, else what one
    /// read of the uffd gives (the changes it holds are recorded on the way).
    pub(super) fn next_faults(&self, max: usize) -> Result<Vec<Event>, SnapshotError> {
        self.handle_forks()?;
        let deferred = std::mem::take(&mut *self.changes.deferred.lock().expect("deferred"));
        if !deferred.is_empty() {
            return Ok(deferred);
        }
        self.read_uffd(max)
    }

    /// Reads the uffd once (non-blocking), records every change it holds (see the module docs)
    /// and returns the page faults.
    fn read_uffd(&self, max: usize) -> Result<Vec<Event>, SnapshotError> {
        let ch = &self.changes;
        let mut faults = Vec::new();
        let read = {
            let _one = ch.reading.lock().expect("uffd reader");
            ch.seq.fetch_add(1, Ordering::SeqCst);
            let read = self.mm.read_events(max);
            for ev in read.as_deref().unwrap_or_default() {
                match *ev {
                    Event::PageFault { .. } => faults.push(*ev),
                    Event::Remove { start, end } => self.record(Kind::Remove, start, end),
                    Event::Unmap { start, end } => self.record(Kind::Unmap, start, end),
                    Event::Remap { from, to, len } => {
                        self.record(Kind::Remap { to }, from, from + len)
                    }
                    Event::Fork { ufd } => ch.forks.lock().expect("forks").push(ufd),
                    Event::Unknown(_) => ch.count(|c| c.other += 1),
                }
            }
            ch.seq.fetch_add(1, Ordering::SeqCst);
            read
        };
        read.map(|_| faults).map_err(|errno| SnapshotError::Uffd {
            op: "read(uffd)",
            addr: 0,
            errno,
        })
    }

    /// Handles the forks read so far ([`Shared::on_fork`]); called holding no claimed page.
    pub(super) fn handle_forks(&self) -> Result<(), SnapshotError> {
        let forks = std::mem::take(&mut *self.changes.forks.lock().expect("forks"));
        forks.into_iter().try_for_each(|ufd| self.on_fork(ufd))
    }

    /// A fork during the copy: the child's page tables hold the process's uffd-wp bits and
    /// markers on its uffd, so its first write to any page waits there. Every shared page not
    /// copied yet is copied first (and those another thread is copying, waited for); then the
    /// child's uffd is closed, which lets its writes go on. A child's private pages are its
    /// own copies: nothing to do for them. Called holding no claimed page.
    fn on_fork(&self, ufd: u32) -> Result<(), SnapshotError> {
        self.changes.count(|c| c.fork += 1);
        let mut copied = Ok(());
        for r in self.ranges.iter() {
            for part in self.changes.fork_shared.clip(*r).iter() {
                copied = copied.and_then(|()| self.copy_unclaimed(*part));
                self.wait_copied(*part);
            }
        }
        let closed = self
            .mm
            .close_forked(ufd)
            .map_err(|errno| SnapshotError::Uffd {
                op: "close(forked uffd)",
                addr: 0,
                errno,
            });
        copied.and(closed)
    }

    /// Records one change (while reading: `seq` is odd). Pages of a removed or unmapped range
    /// not copied yet are lost: none is copied after this (a pending page is marked done, one
    /// being copied is dropped by its copier, which sees the change).
    fn record(&self, kind: Kind, start: u64, end: u64) {
        let ch = &self.changes;
        let (s, e) = (start & !(PAGE_SIZE - 1), end.next_multiple_of(PAGE_SIZE));
        if e <= s {
            return;
        }
        let range = Range::from_bounds(s, e);
        if let Kind::Remove | Kind::Unmap = kind {
            let mut lost = RangeSet::new();
            for p in range.page_iter() {
                let Some(orig) = ch.was_at(p.start()) else {
                    continue;
                };
                let Some(i) = self.index(orig) else { continue };
                let st = &self.state[i];
                let gone = st
                    .compare_exchange(PENDING, DONE, Ordering::AcqRel, Ordering::Acquire)
                    .map_or_else(|now| now == COPYING || now == LAST, |_| true);
                if gone {
                    lost.insert(Range::from_bounds(orig, orig + PAGE_SIZE));
                }
            }
            let mut l = ch.lost.lock().expect("lost pages");
            match kind {
                Kind::Remove => l.removed.extend(&lost),
                _ => l.unmapped.extend(&lost),
            }
        }
        let seq = ch.seq.load(Ordering::SeqCst);
        ch.log
            .lock()
            .expect("change log")
            .push(Change { seq, kind, range });
        if let Kind::Remap { .. } = kind {
            ch.moved.store(true, Ordering::Release);
        }
        ch.count(|c| match kind {
            Kind::Remove => c.remove += 1,
            Kind::Unmap => c.unmap += 1,
            Kind::Remap { .. } => c.remap += 1,
        });
    }

    /// Reads the uffd until no change is in flight, keeping the faults for later.
    pub(super) fn wait_out_changes(&self) -> Result<(), SnapshotError> {
        let t0 = Instant::now();
        loop {
            let faults = self.read_uffd(64)?;
            let got = !faults.is_empty();
            self.changes
                .deferred
                .lock()
                .expect("deferred")
                .extend(faults);
            if got {
                continue;
            }
            if !self.in_flight()? {
                return Ok(());
            }
            if t0.elapsed() > IN_FLIGHT_PATIENCE {
                return Err(SnapshotError::Uffd {
                    op: "waiting for the event of a mapping change in flight",
                    addr: 0,
                    errno: Errno::AGAIN,
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn in_flight(&self) -> Result<bool, SnapshotError> {
        self.mm
            .events_in_flight()
            .map_err(|errno| SnapshotError::Uffd {
                op: "UFFDIO_WRITEPROTECT(probe)",
                addr: 0,
                errno,
            })
    }

    /// A `UFFDIO_WRITEPROTECT` that met EAGAIN: waits the change out, to be retried.
    pub(super) fn after_eagain(&self) -> Result<(), SnapshotError> {
        self.changes.count(|c| c.eagain_retries += 1);
        self.wait_out_changes()
    }

    /// The page that was at `addr` at the snapshot point, for a fault at `addr` now.
    pub(super) fn snapshot_addr(&self, addr: u64) -> Option<u64> {
        self.changes.was_at(addr)
    }

    /// Whether pages were moved during the copy.
    pub(super) fn moved(&self) -> bool {
        self.changes.moved.load(Ordering::Acquire)
    }

    /// Copies `[addr, addr+len)` of the snapshot (claimed by the caller) from where it is now,
    /// valid only if no change touched it meanwhile (module docs); a page lost meanwhile is
    /// left zero and reported.
    pub(super) fn copy_checked(&self, addr: u64, len: u64) -> Result<(), SnapshotError> {
        let ch = &self.changes;
        let t0 = Instant::now();
        loop {
            let s0 = ch.settled_seq();
            if self.in_flight()? {
                self.wait_out_changes()?;
                continue;
            }
            let src = ch.now_at(addr);
            if len > PAGE_SIZE && ch.now_at(addr + len - PAGE_SIZE) != src + len - PAGE_SIZE {
                // Moved apart: page by page.
                for p in Range::from_bounds(addr, addr + len).page_iter() {
                    self.copy_checked(p.start(), PAGE_SIZE)?;
                }
                return Ok(());
            }
            let res = if src == addr {
                self.copy_raw(addr, len)
            } else {
                self.image.copy_moved_from_mm(self.mm, src, addr, len)
            };
            let busy = self.in_flight()?;
            let s1 = ch.settled_seq();
            if !busy && !ch.touched(s0, s1, Range::from_bounds(src, src + len)) {
                return self.settle_copy(addr, len, res);
            }
            ch.count(|c| c.retried_copies += 1);
            if t0.elapsed() > IN_FLIGHT_PATIENCE {
                return Err(SnapshotError::Copy {
                    addr,
                    len,
                    errno: Errno::AGAIN,
                });
            }
            self.wait_out_changes()?;
        }
    }

    /// Sparse memory: marks the pages of `r` that hold only a PTE marker as copied, leaving
    /// them zero in the image. A marker on such memory means nothing was mapped at the
    /// snapshot point, or a fault would have copied the page before its first write; a page
    /// that was populated becomes a marker only by a zap after its REMOVE event was read.
    /// So the markers count only if, as for [`Shared::copy_checked`], no change was in
    /// flight or read while they were read; else (and after a move) the pages are copied.
    pub(super) fn skip_markers(&self, r: Range) -> Result<(), SnapshotError> {
        let ch = &self.changes;
        if self.moved() {
            return Ok(());
        }
        let s0 = ch.settled_seq();
        if ch.enabled && self.in_flight()? {
            return Ok(());
        }
        let Ok(markers) = self.mm.markers(r) else {
            return Ok(());
        };
        if markers.is_empty()
            || (ch.enabled && (self.in_flight()? || ch.touched(s0, ch.settled_seq(), r)))
        {
            return Ok(());
        }
        let mut n = 0;
        for p in markers.iter().flat_map(|m| m.page_iter()) {
            let Some(i) = self.index(p.start()) else {
                continue;
            };
            if self.state[i]
                .compare_exchange(PENDING, DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                n += 1;
            }
        }
        self.markers_skipped.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// A valid copy's result: lost pages zeroed, a failed copy retried page by page (a page
    /// that stays unreadable is lost).
    fn settle_copy(
        &self,
        addr: u64,
        len: u64,
        res: Result<(), Errno>,
    ) -> Result<(), SnapshotError> {
        match res {
            Ok(()) => {
                for r in self
                    .changes
                    .lost_any(Range::from_bounds(addr, addr + len))
                    .iter()
                {
                    let _ = self.image.store(r.start(), &vec![0u8; r.len() as usize]);
                }
                Ok(())
            }
            Err(_) if len > PAGE_SIZE => {
                for p in Range::from_bounds(addr, addr + len).page_iter() {
                    self.copy_checked(p.start(), PAGE_SIZE)?;
                }
                Ok(())
            }
            Err(_) if self.tolerate => {
                let p = Range::from_bounds(addr, addr + PAGE_SIZE);
                let _ = self.image.store(addr, &[0u8; PAGE_SIZE as usize]);
                self.changes.lost_unreadable(p);
                Ok(())
            }
            Err(errno) => Err(SnapshotError::Copy { addr, len, errno }),
        }
    }

    /// After the copy: pages moved during it are un-protected where they are now (the copier
    /// un-protected their old addresses, no longer registered).
    pub(super) fn unprotect_moved(&self) {
        for c in self.changes.log.lock().expect("change log").iter() {
            if let Kind::Remap { to } = c.kind {
                let r = Range::from_bounds(to, to + c.range.len());
                let un = crate::seam::WpMode::Unprotect { dontwake: false };
                if self.mm.writeprotect(r, un).is_err() {
                    for p in r.page_iter() {
                        let _ = self.mm.writeprotect(p, un);
                    }
                }
            }
        }
    }
}

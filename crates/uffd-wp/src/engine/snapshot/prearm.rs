//! The pre-arm handler: before the pause, un-protects (and records) what the writers fault on
//! while everything is being write-protected, so that the pause only re-protects those pages.

use std::sync::atomic::{AtomicBool, Ordering};

use super::SnapshotError;
use super::shared::unprotect_block;
use crate::range::{PAGE_SIZE, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Event, WpMode};

/// The pre-arm handler's state, shared with the thread taking the snapshot.
#[derive(Default)]
pub(super) struct Prearm {
    /// Set (inside the pause) to end the handler: it reads no event after seeing it.
    pub(super) stop: AtomicBool,
    /// What the handler un-protected, recorded *before* each un-protect (and its wake-up of
    /// the writer), and the handler's error if it failed. Held while the handler reads and
    /// serves events, so whoever holds it after setting `stop` sees the final record.
    pub(super) record: std::sync::Mutex<(RangeSet, Option<SnapshotError>)>,
    /// What the process unmapped or moved away meanwhile (UNMAP and REMAP events, when the
    /// backend delivers them): not part of the snapshot point.
    pub(super) gone: std::sync::Mutex<RangeSet>,
    /// Forks read meanwhile (`UFFD_EVENT_FORK`): each child's uffd closed at once (its writes
    /// before the snapshot point are no concern; those after it, to shared memory, go unseen).
    pub(super) forks: std::sync::atomic::AtomicU64,
}

/// Before the pause: un-protects what a writer faults on and records it, until `stop`. A page
/// inside a huge page gets its whole huge page un-protected (within the snapshot's range): a
/// 4 KiB un-protect would split the PMD, making the pause's re-protect and every later fault
/// cost 4 KiB page tables.
pub(super) fn prearm_handler<M: Mm + ?Sized>(mm: &M, ranges: &RangeSet, st: &Prearm) {
    // Waits in poll(2) for 1 ms at most between rounds: a fault wakes it at once, and
    // whoever stops it never waits for the wait (see `Prearm::record`).
    let uffd_err = |op, addr| move |errno| SnapshotError::Uffd { op, addr, errno };
    let read = |queue: &mut Vec<Event>| -> Result<bool, SnapshotError> {
        let evs = mm.read_events(64).map_err(uffd_err("read(uffd)", 0))?;
        let any = !evs.is_empty();
        for ev in evs {
            match ev {
                Event::PageFault { .. } => queue.push(ev),
                Event::Unmap { start, end } => gone_range(st, start, end),
                Event::Remap { from, len, .. } => gone_range(st, from, from + len),
                Event::Fork { ufd } => {
                    st.forks.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    mm.close_forked(ufd)
                        .map_err(uffd_err("close(forked uffd)", 0))?;
                }
                _ => {}
            }
        }
        Ok(any)
    };
    let serve = |dirty: &mut RangeSet| -> Result<bool, SnapshotError> {
        let mut queue = Vec::new();
        let any = read(&mut queue)?;
        while let Some(Event::PageFault { address, .. }) = queue.pop() {
            let start = address & !(PAGE_SIZE - 1);
            let block = unprotect_block(mm, ranges.iter(), start);
            dirty.insert(block);
            let un = WpMode::Unprotect { dontwake: false };
            let t0 = std::time::Instant::now();
            loop {
                match mm.writeprotect(block, un) {
                    // A mapping change in flight: reading its event lowers the flag.
                    Err(crate::seam::Errno::AGAIN) if t0.elapsed().as_secs() < 10 => {
                        if !read(&mut queue)? {
                            std::thread::sleep(std::time::Duration::from_micros(20));
                        }
                    }
                    r => break r.map_err(uffd_err("UFFDIO_WRITEPROTECT(unprotect)", start))?,
                }
            }
        }
        Ok(any)
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

/// Pre-arm passes at most: the first protects everything, each later one re-protects (with the
/// writers running) what they wrote during the one before.
pub(super) const MAX_PASSES: u32 = 4;

/// A pass ends the pre-arming when it leaves at most this many pages written: re-protecting
/// them inside the pause costs less than another pass's bookkeeping.
const SETTLED_PAGES: u64 = 64;

impl Prearm {
    /// What the writers wrote since the last take, taken for another pass (the handler
    /// records later writes afresh), or `None` when the pre-arming has converged: few pages
    /// left, or no fewer than `previous` (the writers dirty pages as fast as a pass protects
    /// them). A handler failure is returned at once.
    pub(super) fn take_for_pass(&self, previous: u64) -> Result<Option<RangeSet>, SnapshotError> {
        let mut rec = self.record.lock().expect("pre-arm record");
        if let Some(e) = rec.1.take() {
            return Err(e);
        }
        let pages = rec.0.pages();
        if pages <= SETTLED_PAGES || pages * 2 > previous {
            return Ok(None);
        }
        Ok(Some(std::mem::take(&mut rec.0)))
    }
}

/// Records `[start, end)` (page-rounded) as gone before the snapshot point.
fn gone_range(st: &Prearm, start: u64, end: u64) {
    let (s, e) = (start & !(PAGE_SIZE - 1), end.next_multiple_of(PAGE_SIZE));
    if s < e {
        st.gone
            .lock()
            .expect("pre-arm gone")
            .insert(crate::range::Range::from_bounds(s, e));
    }
}

/// Sets the pre-arm handler's `stop` when dropped, on every path out of [`take_in`] (the
/// scope joins the handler after it).
pub(super) struct StopPrearm<'a>(pub(super) &'a Prearm);

impl Drop for StopPrearm<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::Range;

    fn with_written(pages: u64) -> Prearm {
        let st = Prearm::default();
        st.record
            .lock()
            .unwrap()
            .0
            .insert(Range::from_bounds(0, pages * PAGE_SIZE));
        st
    }

    #[test]
    fn another_pass_only_while_the_written_set_halves_and_is_not_small() {
        // Shrinking fast and large: taken, and the record starts afresh.
        let st = with_written(1000);
        let taken = st.take_for_pass(262_144).unwrap().expect("another pass");
        assert_eq!(taken.pages(), 1000);
        assert!(st.record.lock().unwrap().0.is_empty());
        // Not halving: the writers keep up with the passes.
        assert!(with_written(600).take_for_pass(1000).unwrap().is_none());
        // Small enough for the pause: left in the record for it.
        let st = with_written(SETTLED_PAGES);
        assert!(st.take_for_pass(1 << 20).unwrap().is_none());
        assert_eq!(st.record.lock().unwrap().0.pages(), SETTLED_PAGES);
    }

    #[test]
    fn a_handler_failure_ends_the_pre_arming_with_its_error() {
        let st = with_written(1000);
        let e = SnapshotError::Uffd {
            op: "read(uffd)",
            addr: 0,
            errno: crate::seam::Errno::BADF,
        };
        st.record.lock().unwrap().1 = Some(e.clone());
        assert_eq!(st.take_for_pass(1 << 20).unwrap_err(), e);
    }
}

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

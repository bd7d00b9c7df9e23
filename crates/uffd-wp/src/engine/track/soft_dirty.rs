//! [`Method::SoftDirty`](super::Method::SoftDirty): `clear_refs` 4 to arm; at each epoch,
//! pagemap bit 55, then `clear_refs` 4 again. Not atomic (a write between the read and the
//! clear is lost) and process-wide: the last resort for kernels without userfaultfd WP. The
//! tests run it on a test double (this project's kernel has no `CONFIG_MEM_SOFT_DIRTY`).

use super::{TrackError, Tracker};
use crate::range::RangeSet;
use crate::seam::prelude::*;

impl<M: Mm + ?Sized + 'static> Tracker<M> {
    /// Arms: clears the soft-dirty bits.
    pub(super) fn arm_soft_dirty(&mut self) -> Result<(), TrackError> {
        let range = self.range;
        self.mm
            .clear_soft_dirty()
            .map_err(|errno| TrackError::SoftDirty {
                op: "clear_refs",
                addr: range.start(),
                errno,
            })
    }

    /// The pages whose soft-dirty bit is set, pinned pages excepted; clears the bits.
    pub(super) fn epoch_soft_dirty(&mut self) -> Result<(RangeSet, RangeSet, u64), TrackError> {
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
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::engine::track::{Method, TrackOptions};
    use crate::features::Features;
    use crate::range::{PAGE_SIZE, Range};
    use crate::seam::{Errno, Event, PageState, RegisterMode, ScanRequest, ScanResult, WpMode};

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

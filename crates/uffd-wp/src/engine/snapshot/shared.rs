//! The page states the copier and the fault handler share, and the block a fault frees.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use super::events::Changes;
use super::{Image, SnapshotError, Source};
use crate::range::{PAGE_SIZE, PMD_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Event, WpMode};

pub(super) const PENDING: u8 = 0;
pub(super) const COPYING: u8 = 1;
pub(super) const DONE: u8 = 2;
/// A pinned page, never write-protected: neither the copier nor the handler copies it; it is
/// copied after everything else.
pub(super) const LAST: u8 = 3;

/// Waiting for a page another thread is copying: a copy takes microseconds, so spin first;
/// then yield the CPU, which the copier may need (a background copier runs at nice 19 and
/// can be preempted while it holds a page).
#[derive(Default)]
struct Wait(u32);

impl Wait {
    const SPINS: u32 = 256;

    fn pause(&mut self) {
        if self.0 < Self::SPINS {
            self.0 += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// The state the copier and the fault handler share.
pub(super) struct Shared<'a, M: Mm + ?Sized> {
    pub(super) mm: &'a M,
    pub(super) source: Source<'a>,
    pub(super) image: &'a Image,
    pub(super) ranges: Vec<Range>,
    pub(super) first_page: Vec<u64>,
    pub(super) state: Vec<AtomicU8>,
    /// Some of the ranges were mapped by huge pages when the snapshot began: a fault then
    /// serves the whole huge page around it (see [`Shared::serve`]).
    pub(super) huge: bool,
    pub(super) faults: AtomicU64,
    /// Pages of sparse memory the copier found holding only a marker (zero, not copied).
    pub(super) markers_skipped: AtomicU64,
    pub(super) service_ns: std::sync::Mutex<Vec<u64>>,
    /// [`super::SnapshotOptions::tolerate_vanishing`].
    pub(super) tolerate: bool,
    /// What the target unmapped before the snapshot point (at registration, or seen by the
    /// pre-arm handler): not copied, reported.
    pub(super) vanished: std::sync::Mutex<RangeSet>,
    /// The target's own mapping changes during the copy ([`super::events`]).
    pub(super) changes: Changes,
}

impl<M: Mm + ?Sized> Shared<'_, M> {
    pub(super) fn index(&self, addr: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.end() <= addr);
        let r = self.ranges.get(i).filter(|r| r.contains(addr))?;
        Some((self.first_page[i] + (addr - r.start()) / PAGE_SIZE) as usize)
    }

    pub(super) fn copy(&self, addr: u64, len: u64) -> Result<(), SnapshotError> {
        if self.changes.enabled {
            return self.copy_checked(addr, len);
        }
        match self.copy_raw(addr, len) {
            Err(errno) if self.tolerate => {
                // Part of it is gone: copy what is left page by page, record the rest.
                let _ = errno;
                for p in Range::from_bounds(addr, addr + len).page_iter() {
                    if self.copy_raw(p.start(), PAGE_SIZE).is_err() {
                        self.changes.lost_unreadable(p);
                    }
                }
                Ok(())
            }
            r => r.map_err(|errno| SnapshotError::Copy { addr, len, errno }),
        }
    }

    pub(super) fn copy_raw(&self, addr: u64, len: u64) -> Result<(), crate::seam::Errno> {
        match self.source {
            Source::Mapping(m) => self.image.copy_from_mapping(m, addr, len),
            Source::Mm => self.image.copy_from_mm(self.mm, addr, len),
        }
    }

    /// Claims the page at `addr` and copies it unless someone else did; waits while another
    /// thread is copying it. Returns whether this call copied it.
    pub(super) fn claim_and_copy(&self, addr: u64) -> Result<bool, SnapshotError> {
        let Some(i) = self.index(addr) else {
            return Ok(false);
        };
        let mut wait = Wait::default();
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
                Err(_) => wait.pause(),
            }
        }
    }

    pub(super) fn unprotect(&self, r: Range) -> Result<(), SnapshotError> {
        let un = WpMode::Unprotect { dontwake: false };
        let mut res = self.mm.writeprotect(r, un);
        while res == Err(crate::seam::Errno::AGAIN) && self.changes.enabled {
            // A mapping change is in flight: its event, once read, lowers the flag.
            self.after_eagain()?;
            res = self.mm.writeprotect(r, un);
        }
        match res {
            // Part of it is gone (ENOENT: no longer registered): un-protect what is left.
            Err(_) if self.tolerate => {
                for p in r.page_iter() {
                    let _ = self.mm.writeprotect(p, un);
                }
                Ok(())
            }
            res => res.map_err(|errno| SnapshotError::Uffd {
                op: "UFFDIO_WRITEPROTECT(unprotect)",
                addr: r.start(),
                errno,
            }),
        }
    }

    /// Serves one event: a WP fault gets its page copied (if not yet), un-protected, woken.
    /// A fault inside a huge page gets the whole huge page copied and un-protected: a 4 KiB
    /// un-protect would split the PMD, and the random writes of a live workload would then
    /// fault once per 4 KiB page instead of once per huge page (measured: 9-18 k faults per
    /// live copy of 1 GiB of THP in session 2, 505 now: at most one per huge page and writer).
    pub(super) fn serve(&self, ev: Event) -> Result<(), SnapshotError> {
        let Event::PageFault { address, .. } = ev else {
            return Ok(());
        };
        let t = Instant::now();
        let page = address & !(PAGE_SIZE - 1);
        let block = if self.huge && !self.moved() {
            unprotect_block(self.mm, &self.ranges, page)
        } else {
            Range::from_bounds(page, page + PAGE_SIZE)
        };
        if block.pages() == 1 {
            // Where the page was at the snapshot point, if it moved since (none: it came
            // later, nothing to copy).
            if let Some(orig) = self.snapshot_addr(page) {
                self.claim_and_copy(orig)?;
            }
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
    pub(super) fn serve_pending(&self) -> Result<(), SnapshotError> {
        loop {
            let evs = self.next_faults(16)?;
            if evs.is_empty() {
                // A fork read by this last read is handled now, not at the next event.
                return self.handle_forks();
            }
            for ev in evs {
                self.serve(ev)?;
            }
        }
    }

    /// Copies the pages of `r` nobody has claimed yet, in runs.
    pub(super) fn copy_unclaimed(&self, r: Range) -> Result<(), SnapshotError> {
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
    pub(super) fn release(&self, r: Range) -> Result<(), SnapshotError> {
        self.wait_copied(r);
        self.unprotect(r)
    }

    /// Waits until no page of `r` is being copied (by another thread: the caller holds none).
    pub(super) fn wait_copied(&self, r: Range) {
        let i0 = self.index(r.start()).expect("range inside the snapshot");
        for s in &self.state[i0..i0 + r.pages() as usize] {
            let mut wait = Wait::default();
            while s.load(Ordering::Acquire) == COPYING {
                wait.pause();
            }
        }
    }
}

/// What a fault on the page at `page` frees (in the pre-arm handler and in the copy): the
/// whole huge page holding it, clipped to the snapshot range holding it, or else (also when
/// the scan that tells fails: one page is always right) the page.
pub(super) fn unprotect_block<'r, M: Mm + ?Sized>(
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
pub(super) fn any_huge<M: Mm + ?Sized>(mm: &M, r: Range) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::linux::LinuxMm;
    use crate::range::RangeSet;
    use crate::sys::mem::Mapping;
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

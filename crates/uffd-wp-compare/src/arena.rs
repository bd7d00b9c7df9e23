//! Where cases run: the three arenas and their surroundings, made by the same code on both
//! sides.

use uffd_wp::range::{PAGE_SIZE, PUD_SIZE, Range};
use uffd_wp::seam::lab::{Lab, LabError, MapKind};

use crate::{
    ARENA_PAGES, BELOW_PUD, CaseConfig, THP_ARENA_BELOW_PUD, THP_ARENA_PAGES, guard_pages,
};

/// The three arenas of a side: the small one across a PUD boundary, the THP one, and the fresh
/// one, the small one's shape in a hole of 2 GiB, for cases that inject page-table allocation
/// failures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arenas {
    small: u64,
    thp: u64,
    fresh: u64,
}

impl Arenas {
    /// The first address of the arena a case runs in.
    pub(crate) fn base(self, c: CaseConfig) -> u64 {
        if c.fail_alloc {
            self.fresh
        } else if c.thp {
            self.thp
        } else {
            self.small
        }
    }

    /// The hole of 2 GiB (two whole PUDs) the fresh arena straddles the middle of.
    pub(crate) fn hole(self) -> Range {
        let boundary = self.fresh + BELOW_PUD * PAGE_SIZE;
        Range::from_bounds(boundary - PUD_SIZE, boundary + PUD_SIZE)
    }
}

/// Reserves 7 GiB aligned to 1 GiB and leaves the arenas unmapped inside it, so nothing else
/// lands next to them.
///
/// - The small and THP arenas, around the first GiB boundary: one written page in each of
///   the two PMDs the small arena spans, outside it, so their page tables exist as long as
///   the reservation does (free_pgtables() keeps tables a neighbouring VMA still uses) and
///   every case starts from the same page-table state.
/// - The fresh arena, across the third GiB boundary, in a hole of two whole PUDs: nothing
///   else is mapped there, so its PMD and PTE tables exist only while a case's mappings need
///   them, munmap frees them (free_pgtables() between the hole's edges), and a write-protect
///   has tables to allocate, and to fail to. A written page on each side of the hole keeps
///   the PUD tables above it, as the small arena's guards do.
/// - A decoy: 1 GiB left empty above the hole, below the reservation's last GiB. mmap(2)
///   without an address takes the highest gap that fits, and while a case runs the hole is
///   one: whatever the worker maps meanwhile (glibc caches a new thread's stack, a new
///   malloc arena stays for good) would land there, keep page tables in it for every later
///   case, and refill it. The decoy is higher, so it goes there instead (seen on the patched
///   guest: the hole could not be refilled, EEXIST, after about half the cases).
///
/// The kernel worker makes this once, in a lab of its own that lives as long as the worker
/// (and fills the hole between cases, [`crate::kernel`]); the model makes it for each case.
pub(crate) fn surroundings(lab: &mut dyn Lab) -> Result<Arenas, LabError> {
    let r = lab.map(7 * PUD_SIZE, PUD_SIZE, MapKind::Anon)?;
    let boundary = r.start() + PUD_SIZE;
    let fresh_boundary = r.start() + 3 * PUD_SIZE;
    let arenas = Arenas {
        small: boundary - BELOW_PUD * PAGE_SIZE,
        thp: boundary - THP_ARENA_BELOW_PUD,
        fresh: fresh_boundary - BELOW_PUD * PAGE_SIZE,
    };
    let hole = arenas.hole();
    let mut guards = guard_pages(boundary).to_vec();
    guards.extend([hole.start() - PAGE_SIZE, hole.end()]);
    for page in guards {
        lab.touch(Range::from_bounds(page, page + PAGE_SIZE))?;
    }
    for (base, pages) in [(arenas.small, ARENA_PAGES), (arenas.thp, THP_ARENA_PAGES)] {
        lab.punch(Range::from_bounds(base, base + pages * PAGE_SIZE))?;
    }
    lab.punch(hole)?;
    lab.punch(Range::new(r.start() + 5 * PUD_SIZE, PUD_SIZE).expect("inside the reservation"))?;
    Ok(arenas)
}

//! Where cases run: the two arenas and their surroundings, made by the same code on both
//! sides.

use uffd_wp::range::{PAGE_SIZE, PUD_SIZE, Range};
use uffd_wp::seam::lab::{Lab, LabError, MapKind};

use crate::{ARENA_PAGES, BELOW_PUD, THP_ARENA_BELOW_PUD, THP_ARENA_PAGES, guard_pages};

/// The two arenas of a side: the small one across a PUD boundary, the THP one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arenas {
    small: u64,
    thp: u64,
}

impl Arenas {
    /// The first address of the arena a case runs in.
    pub(crate) fn base(self, thp: bool) -> u64 {
        if thp { self.thp } else { self.small }
    }
}

/// Reserves 2 GiB aligned to 1 GiB and leaves both arenas unmapped inside it, so nothing else
/// lands next to them, with one written page in each of the two PMDs the small arena spans,
/// outside it: their page tables then exist as long as the reservation does (free_pgtables()
/// keeps tables a neighbouring VMA still uses), so every case starts from the same page-table
/// state. The kernel worker makes it once, in a lab of its own that lives as long as the
/// worker; the model makes it for each case.
pub(crate) fn surroundings(lab: &mut dyn Lab) -> Result<Arenas, LabError> {
    let r = lab.map(2 * PUD_SIZE, PUD_SIZE, MapKind::Anon)?;
    let boundary = r.start() + PUD_SIZE;
    for page in guard_pages(boundary) {
        lab.touch(Range::from_bounds(page, page + PAGE_SIZE))?;
    }
    let arenas = Arenas {
        small: boundary - BELOW_PUD * PAGE_SIZE,
        thp: boundary - THP_ARENA_BELOW_PUD,
    };
    for (base, pages) in [(arenas.small, ARENA_PAGES), (arenas.thp, THP_ARENA_PAGES)] {
        lab.punch(Range::from_bounds(base, base + pages * PAGE_SIZE))?;
    }
    Ok(arenas)
}

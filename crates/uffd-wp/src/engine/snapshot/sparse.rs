//! Sparse private anonymous memory: reserved far beyond what is used (thread stacks, allocator
//! arenas, `MAP_NORESERVE` reservations). A page of such memory with nothing mapped at the
//! snapshot point is zero, so only the 2 MiB blocks holding a populated page are
//! write-protected and copied; the others are never touched.
//!
//! Protecting the whole range would harm the target: with `UFFD_FEATURE_WP_UNPOPULATED` the
//! kernel allocates page tables down to every unpopulated page to hold its marker
//! (mm/mprotect.c: `pgtable_populate_needed()`), 2 MiB of page tables per GiB, left behind
//! after the snapshot, and all of it inside the pause. It would also cost this process an
//! image page per page.
//!
//! Why the blocks are exact, though found by scans at two different moments:
//! - before the pause, one `PAGEMAP_SCAN` finds the blocks with a present or swapped page
//!   ([`populated_blocks`]); they are protected like any other range (pre-armed);
//! - inside the pause, with the process frozen, the rest is scanned again: what was
//!   populated meanwhile adds its blocks, protected there;
//! - every other page of the range had nothing mapped at the snapshot point: it is zero in
//!   the image and needs no protection, since a later write cannot change what the image
//!   holds.
//!
//! Only private anonymous memory: a shared page can exist in the page cache with nothing
//! mapped in this process.

use crate::range::{PMD_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, ScanRequest};
use crate::sys::pagemap::category;

/// The 2 MiB blocks of `within` (inside the ranges of `sparse`) that hold a present or
/// swapped page, each clipped to the range of `sparse` holding it.
pub(super) fn populated_blocks<M: Mm + ?Sized>(
    mm: &M,
    within: &RangeSet,
    sparse: &RangeSet,
) -> Result<RangeSet, Errno> {
    let mut blocks = RangeSet::new();
    for r in within.iter() {
        let found = mm.scan_all(&ScanRequest {
            start: r.start(),
            end: r.end(),
            category_anyof_mask: category::PRESENT | category::SWAPPED,
            return_mask: category::PRESENT | category::SWAPPED,
            ..Default::default()
        })?;
        for g in found.regions {
            let block =
                Range::from_bounds(g.start & !(PMD_SIZE - 1), g.end.next_multiple_of(PMD_SIZE));
            blocks.extend(&sparse.clip(block));
        }
    }
    Ok(blocks)
}

/// The sparse part of a snapshot: its ranges and the blocks of them protected and copied.
#[derive(Debug, Default)]
pub(super) struct Sparse {
    /// The sparse ranges.
    pub(super) ranges: RangeSet,
    /// Their blocks with a populated page, found so far.
    pub(super) blocks: RangeSet,
}

impl Sparse {
    /// `ranges` with what was populated before the pause. Where the scan fails (a kernel
    /// without `PAGEMAP_SCAN`), all of it counts as populated: protected and copied whole.
    pub(super) fn scan<M: Mm + ?Sized>(mm: &M, ranges: RangeSet) -> Sparse {
        let blocks = populated_blocks(mm, &ranges, &ranges).unwrap_or_else(|_| ranges.clone());
        Sparse { ranges, blocks }
    }

    /// What is neither protected nor copied (as of now): the sparse ranges but their blocks.
    pub(super) fn untouched(&self) -> RangeSet {
        self.ranges.difference(&self.blocks)
    }

    /// Inside the pause: the blocks populated since [`Sparse::scan`], now added.
    pub(super) fn rescan<M: Mm + ?Sized>(&mut self, mm: &M) -> Result<RangeSet, Errno> {
        let new = populated_blocks(mm, &self.untouched(), &self.ranges)?.difference(&self.blocks);
        self.blocks.extend(&new);
        Ok(new)
    }

    /// Whether `r` lies in a sparse range.
    pub(super) fn holds(&self, r: Range) -> bool {
        self.ranges.covers(&r)
    }
}

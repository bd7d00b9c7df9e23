//! [`Method::AsyncWp`](super::Method::AsyncWp): the kernel resolves write faults itself
//! (`UFFD_FEATURE_WP_ASYNC`); an epoch is one `PAGEMAP_SCAN` with
//! `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` that returns the written pages and
//! re-protects them in the same page-table walk (see the [module docs](super)).

use super::{TrackError, Tracker};
use crate::range::{Range, RangeSet};
use crate::seam::ScanRequest;
use crate::seam::prelude::*;
use crate::sys::pagemap::{SCAN_CHECK_WPASYNC, SCAN_WP_MATCHING, category};

impl<M: Mm + ?Sized + 'static> Tracker<M> {
    /// Written pages outside the pins, re-protected by the same walk. A page pinned before and
    /// released since was left writable, so it reads as written and is protected again here.
    pub(super) fn epoch_async(&mut self) -> Result<(RangeSet, RangeSet, u64), TrackError> {
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
}

//! Written private file memory copied before the freeze ([`Method::PreCopiedTracked`]): a
//! JVM's CDS archive maps 12 MB `rw-p`, 10 MB of it copy-on-write pages the JVM wrote, and
//! the kernel refuses sync write-protection of private file memory, so it was copied inside
//! the freeze. Async write-protection accepts any memory (`UFFD_FEATURE_WP_ASYNC`: the kernel
//! resolves the fault itself and `PAGEMAP_SCAN` reports the page written), so a second
//! userfaultfd in that mode, injected like the first, tracks the process's writes while the
//! mapping is copied before the freeze. Inside the freeze only these are copied again:
//! - the pages written since it was armed (the tracker's epoch: `PAGE_IS_WRITTEN`), and the
//!   pinned ones, which it leaves writable;
//! - the pages that were the process's own around the copy (copy-on-write: present or
//!   swapped, not the file's) and are not mapped as such now: `MADV_DONTNEED` drops such a
//!   page back to the file's content without any write (leaving a marker, which
//!   `PAGEMAP_SCAN` cannot tell from a page swapped out: those are copied again too);
//! - all of it if the mapping changed (`/proc/PID/maps`) or the file did (its size and
//!   times, as for [`super::precopy`]).
//!
//! Left to chance: a page written and dropped back to the file's while it is read, between
//! the two scans of the process's own pages around the copy (write, then `MADV_DONTNEED`,
//! within microseconds); and writes to the file by other processes through their own shared
//! mappings, which change no time.
//!
//! [`Method::PreCopiedTracked`]: super::plan::Method::PreCopiedTracked

use std::sync::Arc;

use crate::backend::linux::remote::read_remote;
use crate::backend::linux::{LinuxMm, scan_once};
use crate::backend::procfs::MapEntry;
use crate::engine::track::{Method, TrackOptions, Tracker};
use crate::range::{Range, RangeSet};
use crate::seam::{Errno, ScanRequest, scan_all};
use crate::sys::pagemap::{Pagemap, category};

use super::precopy::{Stamp, stamp};

/// A mapping copied before the freeze with its writes tracked.
#[derive(Debug)]
pub struct Tracked {
    /// The mapping as planned.
    pub map: MapEntry,
    /// Its bytes, patched inside the freeze.
    pub bytes: Vec<u8>,
    stamp: Stamp,
    tracker: Tracker<LinuxMm>,
    /// Pages that were the process's own around the copy.
    own: RangeSet,
}

impl Tracked {
    /// Its range.
    pub fn range(&self) -> Range {
        Range::from_bounds(self.map.start, self.map.end)
    }

    /// Inside the freeze: the pages to copy again (see the module docs), `None` for all of
    /// it.
    pub fn to_recopy(&mut self, pid: i32, maps: &[MapEntry], pm: &Pagemap) -> Option<RangeSet> {
        if !maps.contains(&self.map) || stamp(pid, &self.map) != Some(self.stamp) {
            return None;
        }
        let epoch = self.tracker.epoch().ok()?;
        // Mapped now: a dropped page holds a marker (a swap entry), as does a page swapped
        // out, which is copied again for nothing.
        let mapped_own = own_pages(pm, self.range(), category::PRESENT).ok()?;
        Some(
            epoch
                .dirty
                .union(&epoch.pinned)
                .union(&self.own.difference(&mapped_own)),
        )
    }
}

/// Arms a tracker on each of `maps` of process `pid` with `mm` (an async-WP uffd of the
/// process's) and copies them while the process runs. Returns the copies, and the mappings
/// that could not be tracked or copied (to copy inside the freeze).
pub fn pre_copy(pid: i32, mm: &Arc<LinuxMm>, maps: &[MapEntry]) -> (Vec<Tracked>, Vec<MapEntry>) {
    let pm = Pagemap::open_pid(pid as u32).ok();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for m in maps {
        match pm.as_ref().and_then(|pm| copy_one(pid, mm, pm, m)) {
            Some(t) => done.push(t),
            None => failed.push(m.clone()),
        }
    }
    (done, failed)
}

/// The file's identity, the tracker armed, the process's own pages, the copy, its own pages
/// again (module docs); `None` if any of it failed.
fn copy_one(pid: i32, mm: &Arc<LinuxMm>, pm: &Pagemap, m: &MapEntry) -> Option<Tracked> {
    let range = Range::from_bounds(m.start, m.end);
    let stamp = stamp(pid, m)?;
    let tracker = Tracker::start(
        Arc::clone(mm),
        range,
        Method::AsyncWp,
        TrackOptions::default(),
    )
    .ok()?;
    let own = category::PRESENT | category::SWAPPED;
    let before = own_pages(pm, range, own).ok()?;
    let mut bytes = vec![0u8; range.len() as usize];
    read_remote(pid, m.start, &mut bytes).ok()?;
    let after = own_pages(pm, range, own).ok()?;
    Some(Tracked {
        map: m.clone(),
        bytes,
        stamp,
        tracker,
        own: before.union(&after),
    })
}

/// The pages of `r` that are the process's own, not the file's: `any` of present or swapped,
/// and not a file page. A PTE marker counts as swapped (a swap entry that is no file page):
/// over-counting before the copy only copies a page again.
fn own_pages(pm: &Pagemap, r: Range, any: u64) -> Result<RangeSet, Errno> {
    let req = ScanRequest {
        start: r.start(),
        end: r.end(),
        category_inverted: category::FILE,
        category_mask: category::FILE,
        category_anyof_mask: any,
        return_mask: category::FILE,
        ..Default::default()
    };
    Ok(scan_all(&req, |q, n| scan_once(pm, q, n))?
        .regions
        .iter()
        .map(|g| Range::from_bounds(g.start, g.end))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::linux::Config;
    use crate::backend::procfs;
    use crate::range::PAGE_SIZE;
    use crate::sys::mem::{Backing, Mapping, Thp};

    const P: u64 = PAGE_SIZE;

    fn page(r: Range, i: u64) -> Range {
        Range::from_bounds(r.start() + i * P, r.start() + (i + 1) * P)
    }

    /// This process's own private file mapping of 4 pages, pages 0 and 1 written (its own),
    /// copied with its writes tracked. Then page 1 is dropped back to the file's (no write),
    /// page 3 (the file's) dropped, and page 2 written: exactly pages 1 and 2 are copied again;
    /// a changed file or mapping has all of it copied again.
    #[test]
    fn the_freeze_copies_again_what_was_written_or_dropped_since() {
        let mm = match LinuxMm::open_with(Config::async_wp()) {
            Ok(mm) => Arc::new(mm),
            Err(e) if std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1") => {
                panic!("kernel feature UFFD_FEATURE_WP_ASYNC required: {e}")
            }
            Err(e) => return eprintln!("SKIPPED: needs UFFD_FEATURE_WP_ASYNC: {e}"),
        };
        let mut m = Mapping::new(4 * P, P, Backing::File { shared: false }, Thp::NoHuge).unwrap();
        let r = m.range();
        rustix::io::pwrite(m.file().unwrap(), &vec![0x11; r.len() as usize], 0).unwrap();
        let mut buf = vec![0u8; r.len() as usize];
        m.read(r.start(), &mut buf).unwrap();
        m.write(r.start(), &[1; 8]).unwrap();
        m.write(r.start() + P, &[2; 8]).unwrap();
        let me = std::process::id() as i32;
        let entry = || {
            procfs::read_maps(me)
                .unwrap()
                .into_iter()
                .find(|e| e.start == r.start())
                .unwrap()
        };
        let (mut done, failed) = pre_copy(me, &mm, &[entry()]);
        assert!(failed.is_empty());
        let t = &mut done[0];
        assert_eq!(&t.bytes[..8], &[1; 8]);
        assert_eq!(&t.bytes[P as usize..P as usize + 8], &[2; 8]);
        // Page 1 dropped back to the file's; page 3, the file's all along, dropped too: it
        // holds what the copy holds.
        for i in [1, 3] {
            m.madvise(page(r, i), rustix::mm::Advice::LinuxDontNeed)
                .unwrap();
        }
        m.write(r.start() + 2 * P, &[3; 8]).unwrap();
        let pm = Pagemap::open_self().unwrap();
        let maps = procfs::read_maps(me).unwrap();
        let again = t
            .to_recopy(me, &maps, &pm)
            .expect("the mapping and file unchanged");
        assert_eq!(again, [page(r, 1), page(r, 2)].into_iter().collect());
        // The file written: all of it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        rustix::io::pwrite(m.file().unwrap(), &[0x22; 8], 3 * P).unwrap();
        assert_eq!(t.to_recopy(me, &maps, &pm), None);
        // The mapping changed (made read-only): all of it.
        let (mut done, _) = pre_copy(me, &mm, &[entry()]);
        m.make_read_only().unwrap();
        let maps = procfs::read_maps(me).unwrap();
        assert_eq!(done[0].to_recopy(me, &maps, &pm), None);
    }
}

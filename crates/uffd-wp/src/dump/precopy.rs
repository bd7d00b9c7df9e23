//! Read-only file memory copied before the freeze ([`Method::PreCopied`]): a JVM asks for its
//! file mappings in its cores (`coredump_filter`), 169 MB of them, and copying those inside the
//! freeze paused it for 0.57 s. Nothing in the process can write such memory without first
//! changing the mapping (an `mprotect`, which leaves a page of its own in a private mapping),
//! and a write to the file changes its times. So it is copied before the freeze, and inside
//! the freeze each copy is checked to still be what the mapping holds:
//! - the mapping is still there with the same bounds, permissions, offset and file
//!   (`/proc/PID/maps`);
//! - the file's size, modification and change times are those read before the copy
//!   (`/proc/PID/map_files/START-END`);
//! - a private mapping has no page of its own (`PAGEMAP_SCAN`: no present or swapped page
//!   that is not a file page).
//!
//! A copy that fails a check is redone inside the freeze. Left to chance: a file written
//! twice within one tick of its coarse timestamps, once before the first check and once
//! after the copy; a process that, between the copy and the freeze, makes a page of its own
//! (`mprotect` to writable, a write, `mprotect` back) and drops it again (`MADV_DONTNEED`);
//! and writes to the file by other processes through their own shared mappings, which do
//! not touch its times (the kernel's core and gcore do not stop those processes either).
//! Writable file mappings are not pre-copied this way: the same drop makes a private page the
//! file's again unseen, and a shared one is written with no trace at all. Written private
//! ones of 1 MiB or more are pre-copied with their writes tracked ([`super::tracked`]).
//!
//! [`Method::PreCopied`]: super::plan::Method::PreCopied

use std::os::unix::fs::MetadataExt;

use crate::backend::linux::remote::read_remote;
use crate::backend::linux::scan_once;
use crate::backend::procfs::{self, MapEntry};
use crate::range::Range;
use crate::seam::ScanRequest;
use crate::sys::pagemap::{Pagemap, category};

/// What identifies the content of a mapped file: device, inode, size, mtime and ctime (seconds
/// and nanoseconds).
pub(super) type Stamp = (u64, u64, u64, (i64, i64), (i64, i64));

/// A mapping copied before the freeze.
#[derive(Debug)]
pub struct PreCopy {
    /// The mapping as planned.
    pub map: MapEntry,
    /// Its bytes, or `None` when they could not be read (copied inside the freeze instead).
    pub bytes: Option<Vec<u8>>,
    stamp: Option<Stamp>,
}

impl PreCopy {
    /// Its range.
    pub fn range(&self) -> Range {
        Range::from_bounds(self.map.start, self.map.end)
    }
}

/// The file mapped at `m` in process `pid`, identified.
pub(super) fn stamp(pid: i32, m: &MapEntry) -> Option<Stamp> {
    let link = procfs::path(pid, &format!("map_files/{:x}-{:x}", m.start, m.end));
    let md = std::fs::metadata(link).ok()?;
    Some((
        md.dev(),
        md.ino(),
        md.size(),
        (md.mtime(), md.mtime_nsec()),
        (md.ctime(), md.ctime_nsec()),
    ))
}

/// Copies each of `maps` of process `pid` (the target runs on meanwhile).
pub fn pre_copy(pid: i32, maps: &[MapEntry]) -> Vec<PreCopy> {
    maps.iter()
        .map(|m| {
            // Read the file's identity first: a write after it shows in the check.
            let stamp = stamp(pid, m);
            let mut buf = vec![0u8; (m.end - m.start) as usize];
            let bytes =
                (stamp.is_some() && read_remote(pid, m.start, &mut buf).is_ok()).then_some(buf);
            PreCopy {
                map: m.clone(),
                bytes,
                stamp,
            }
        })
        .collect()
}

/// What the copies made before the freeze are checked against inside it, read once for all
/// of them (those of [`super::tracked`] too).
#[derive(Debug)]
pub struct Now {
    /// The process's mappings.
    pub maps: Vec<MapEntry>,
    /// Its pagemap (`None` if it cannot be opened: no copy is then trusted).
    pub pagemap: Option<Pagemap>,
}

impl Now {
    /// Reads process `pid`'s mappings and opens its pagemap.
    pub fn read(pid: i32) -> Now {
        Now {
            maps: procfs::read_maps(pid).unwrap_or_default(),
            pagemap: Pagemap::open_pid(pid as u32).ok(),
        }
    }
}

/// Inside the freeze: whether each copy still holds what its mapping holds (`now`).
pub fn still_valid(pid: i32, pre: &[PreCopy], now: &Now) -> Vec<bool> {
    pre.iter()
        .map(|p| {
            p.bytes.is_some()
                && now.maps.contains(&p.map)
                && p.stamp.is_some()
                && stamp(pid, &p.map) == p.stamp
                && (p.map.perms.ends_with('s')
                    || now
                        .pagemap
                        .as_ref()
                        .is_some_and(|pm| !has_own_pages(pm, p.range())))
        })
        .collect()
}

/// Whether `r` holds a page that is not the file's (a private mapping's copy-on-write page),
/// present or swapped; a page not mapped at all reads from the file. An error counts as yes.
/// With `max_pages` 1 the walk stops early only when it found one.
fn has_own_pages(pm: &Pagemap, r: Range) -> bool {
    let req = ScanRequest {
        flags: 0,
        start: r.start(),
        end: r.end(),
        max_pages: 1,
        category_inverted: category::FILE,
        category_mask: category::FILE,
        category_anyof_mask: category::PRESENT | category::SWAPPED,
        return_mask: category::FILE,
    };
    scan_once(pm, &req, 1).map_or(true, |s| !s.regions.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::PAGE_SIZE;
    use crate::sys::mem::{Backing, Mapping, Thp};

    /// 4 pages of a new file holding 0x11, mapped private in this process, read once (its
    /// pages mapped), and its line in /proc/self/maps.
    fn map_file() -> (Mapping, MapEntry) {
        let m = Mapping::new(
            4 * PAGE_SIZE,
            PAGE_SIZE,
            Backing::File { shared: false },
            Thp::NoHuge,
        )
        .unwrap();
        let r = m.range();
        rustix::io::pwrite(m.file().unwrap(), &vec![0x11; r.len() as usize], 0).unwrap();
        let mut buf = vec![0u8; r.len() as usize];
        m.read(r.start(), &mut buf).unwrap();
        let me = std::process::id() as i32;
        let e = procfs::read_maps(me)
            .unwrap()
            .into_iter()
            .find(|e| e.start == r.start());
        (m, e.unwrap())
    }

    /// [`map_file`] copied with [`pre_copy`], the copy checked valid.
    fn copied_file() -> (Mapping, MapEntry, Vec<PreCopy>) {
        let (m, e) = map_file();
        let me = std::process::id() as i32;
        let pre = pre_copy(me, std::slice::from_ref(&e));
        assert_eq!(
            pre[0].bytes.as_deref(),
            Some(&[0x11; 4 * PAGE_SIZE as usize][..])
        );
        assert_eq!(still_valid(me, &pre, &Now::read(me)), [true]);
        (m, e, pre)
    }

    #[test]
    fn a_copy_stays_valid_until_the_file_is_written() {
        let me = std::process::id() as i32;
        let (m, e, pre) = copied_file();
        // A page dropped (mapped no more) reads from the file again: still valid.
        let p = Range::new(e.start, PAGE_SIZE).unwrap();
        m.madvise(p, rustix::mm::Advice::LinuxDontNeed).unwrap();
        assert_eq!(
            still_valid(me, &pre, &Now::read(me)),
            [true],
            "a clean page dropped"
        );
        // A tick later (coarse timestamps), a write to the file changes its times.
        std::thread::sleep(std::time::Duration::from_millis(20));
        rustix::io::pwrite(m.file().unwrap(), &[0x22], 0).unwrap();
        assert_eq!(
            still_valid(me, &pre, &Now::read(me)),
            [false],
            "the file was written"
        );
    }

    #[test]
    fn a_page_of_its_own_in_a_private_mapping_fails_the_check() {
        let me = std::process::id() as i32;
        let (m, e, pre) = copied_file();
        m.write(e.start + PAGE_SIZE, &[0x33]).unwrap();
        assert_eq!(
            still_valid(me, &pre, &Now::read(me)),
            [false],
            "a copy-on-write page"
        );
    }

    #[test]
    fn a_mapping_gone_fails_the_check() {
        let me = std::process::id() as i32;
        let (m, _, pre) = copied_file();
        drop(m);
        assert_eq!(still_valid(me, &pre, &Now::read(me)), [false], "unmapped");
    }
}

//! `/proc/PID/pagemap`: per-page entries and the `PAGEMAP_SCAN` ioctl.
//!
//! See the kernel's [pagemap documentation](https://docs.kernel.org/admin-guide/mm/pagemap.html).

use std::fs::File;
use std::os::unix::fs::FileExt;

use linux_raw_sys::general as g;

use super::{Errno, errno_of, ioctl_with};

/// Pagemap entry bits (one `u64` per page).
pub mod bits {
    /// Bit 55: soft-dirty.
    pub const SOFT_DIRTY: u64 = 1 << 55;
    /// Bit 56: page exclusively mapped.
    pub const EXCLUSIVE: u64 = 1 << 56;
    /// Bit 57: uffd-wp (present pte, swap pte or PTE marker; 5.13+).
    pub const UFFD_WP: u64 = 1 << 57;
    /// Bit 58: guard region (6.15+).
    pub const GUARD: u64 = 1 << 58;
    /// Bit 61: file page or shared anonymous.
    pub const FILE: u64 = 1 << 61;
    /// Bit 62: swapped.
    pub const SWAPPED: u64 = 1 << 62;
    /// Bit 63: present.
    pub const PRESENT: u64 = 1 << 63;
}

/// `PAGE_IS_*` categories of `PAGEMAP_SCAN`.
pub mod category {
    use linux_raw_sys::general as g;
    /// The VMA is registered for async uffd-wp with markers.
    pub const WPALLOWED: u64 = g::PAGE_IS_WPALLOWED as u64;
    /// Present or swapped and not uffd-wp protected.
    pub const WRITTEN: u64 = g::PAGE_IS_WRITTEN as u64;
    /// File-backed page.
    pub const FILE: u64 = g::PAGE_IS_FILE as u64;
    /// Present.
    pub const PRESENT: u64 = g::PAGE_IS_PRESENT as u64;
    /// Swap entry or PTE marker.
    pub const SWAPPED: u64 = g::PAGE_IS_SWAPPED as u64;
    /// Zero page.
    pub const PFNZERO: u64 = g::PAGE_IS_PFNZERO as u64;
    /// PMD-mapped THP or hugetlb.
    pub const HUGE: u64 = g::PAGE_IS_HUGE as u64;
    /// Soft-dirty (6.8+).
    pub const SOFT_DIRTY: u64 = g::PAGE_IS_SOFT_DIRTY as u64;
    /// Guard region.
    pub const GUARD: u64 = g::PAGE_IS_GUARD as u64;
}

/// `PM_SCAN_WP_MATCHING`: write-protect the matching pages atomically with the scan.
pub const SCAN_WP_MATCHING: u64 = g::PM_SCAN_WP_MATCHING as u64;
/// `PM_SCAN_CHECK_WPASYNC`: fail with EPERM on a VMA not registered for async WP.
pub const SCAN_CHECK_WPASYNC: u64 = g::PM_SCAN_CHECK_WPASYNC as u64;

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u32 = rustix::ioctl::opcode::read_write::<g::pm_scan_arg>(b'f', 16);

/// A region reported by `PAGEMAP_SCAN` (`struct page_region`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// `PAGE_IS_*` bits, masked by the request's `return_mask`.
    pub categories: u64,
}

/// What to ask `PAGEMAP_SCAN` (see `struct pm_scan_arg`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanRequest {
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Start address (page aligned).
    pub start: u64,
    /// End address (page aligned).
    pub end: u64,
    /// Stop after this many matching pages (0: no limit).
    pub max_pages: u64,
    /// Categories whose sense is inverted before matching.
    pub category_inverted: u64,
    /// A page matches only if it has all of these.
    pub category_mask: u64,
    /// A page matches only if it has at least one of these (0: no constraint).
    pub category_anyof_mask: u64,
    /// Categories reported in each region.
    pub return_mask: u64,
}

/// One `PAGEMAP_SCAN` call's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    /// Matching regions, ascending.
    pub regions: Vec<Region>,
    /// Where the walk stopped: equal to the request's end when it is complete.
    pub walk_end: u64,
}

/// An open `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open_self() -> Result<Pagemap, Errno> {
        Self::open_path("/proc/self/pagemap")
    }

    /// Opens `/proc/PID/pagemap` (needs ptrace read access to the process).
    pub fn open_pid(pid: u32) -> Result<Pagemap, Errno> {
        Self::open_path(&format!("/proc/{pid}/pagemap"))
    }

    fn open_path(path: &str) -> Result<Pagemap, Errno> {
        let file = File::open(path).map_err(|e| errno_of(&e))?;
        Ok(Pagemap { file })
    }

    /// The entries of `pages` pages starting at page-aligned `start` (one `u64` per page).
    pub fn entries(&self, start: u64, pages: u64) -> Result<Vec<u64>, Errno> {
        let mut buf = vec![0u8; usize::try_from(pages * 8).map_err(|_| Errno::NOMEM)?];
        self.file
            .read_exact_at(&mut buf, (start / 4096) * 8)
            .map_err(|e| errno_of(&e))?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// One `PAGEMAP_SCAN` call with room for `vec_len` regions. The kernel stops early (returning
    /// normally, with `walk_end` short of `end`) when the vector fills or `max_pages` is reached.
    pub fn scan_once(&self, req: &ScanRequest, vec_len: usize) -> Result<ScanResult, Errno> {
        let mut vec = vec![
            g::page_region {
                start: 0,
                end: 0,
                categories: 0,
            };
            vec_len.max(1)
        ];
        let mut arg = g::pm_scan_arg {
            size: std::mem::size_of::<g::pm_scan_arg>() as u64,
            flags: req.flags,
            start: req.start,
            end: req.end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: req.max_pages,
            category_inverted: req.category_inverted,
            category_mask: req.category_mask,
            category_anyof_mask: req.category_anyof_mask,
            return_mask: req.return_mask,
        };
        // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` (size set to its size). `vec` points
        // to `vec_len` writable `page_region`s that live until after the call returns.
        let n = unsafe { ioctl_with(&self.file, PAGEMAP_SCAN, &mut arg) }?;
        let n = usize::try_from(n).unwrap_or(0).min(vec.len());
        Ok(ScanResult {
            regions: vec[..n]
                .iter()
                .map(|r| Region {
                    start: r.start,
                    end: r.end,
                    categories: r.categories,
                })
                .collect(),
            walk_end: arg.walk_end,
        })
    }

    /// `PAGEMAP_SCAN` over the whole request, continuing from `walk_end` while the vector fills.
    /// With `max_pages`, stops once that many pages matched (over all calls).
    ///
    /// The first call gets room for a few regions (most read-backs find one or none) and the
    /// room grows while calls fill it, so a scan does not pay for zeroing a large vector it does
    /// not need. A `PM_SCAN_WP_MATCHING` scan (a dirty-tracking epoch) starts with the largest.
    pub fn scan(&self, req: &ScanRequest) -> Result<ScanResult, Errno> {
        const VEC_FIRST: usize = 64;
        const VEC_MAX: usize = 4096;
        // A WP_MATCHING scan is a dirty-tracking epoch: many regions are the rule, and every
        // extra call costs a page-table walk set-up and a TLB flush (~50 us over 1 GiB here),
        // more than zeroing the largest vector.
        let mut vec_len = if req.flags & SCAN_WP_MATCHING != 0 {
            VEC_MAX
        } else {
            VEC_FIRST
        };
        let mut regions: Vec<Region> = Vec::new();
        let mut cur = *req;
        let mut found = 0u64;
        loop {
            let r = self.scan_once(&cur, vec_len)?;
            if r.regions.len() >= vec_len {
                vec_len = (vec_len * 8).min(VEC_MAX);
            }
            for reg in r.regions {
                found += (reg.end - reg.start) / 4096;
                match regions.last_mut() {
                    Some(last) if last.end == reg.start && last.categories == reg.categories => {
                        last.end = reg.end
                    }
                    _ => regions.push(reg),
                }
            }
            let limit_hit = req.max_pages != 0 && found >= req.max_pages;
            if r.walk_end >= req.end || limit_hit || r.walk_end <= cur.start {
                return Ok(ScanResult {
                    regions,
                    walk_end: r.walk_end,
                });
            }
            cur.start = r.walk_end;
            if req.max_pages != 0 {
                cur.max_pages = req.max_pages - found;
            }
        }
    }
}

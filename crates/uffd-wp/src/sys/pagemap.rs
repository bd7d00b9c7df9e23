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
    /// Bits 0-4 of a swapped entry: the swap type. The kernel fills bits 0-54 only for a
    /// reader with `CAP_SYS_ADMIN` (`pm->show_pfn`, decided at open); for others they are 0.
    pub const SWAP_TYPE: u64 = 0x1f;
    /// The swap type of a PTE marker (`SWP_PTE_MARKER`: the last of the 32 types, whatever
    /// the configuration, include/linux/swap.h). Real swap entries have offset 1 or more
    /// (offset 0 is the swap header), so their bits 0-54 are never 0 for such a reader.
    pub const PTE_MARKER_TYPE: u64 = 0x1f;
}

/// Whether a `/proc/PID/pagemap` entry is a PTE marker (a uffd-wp marker on a page with nothing
/// mapped, or a guard region's); `false` when the reader may not see swap types.
pub fn is_pte_marker(entry: u64) -> bool {
    entry & bits::PRESENT == 0
        && entry & bits::SWAPPED != 0
        && entry & bits::SWAP_TYPE == bits::PTE_MARKER_TYPE
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

/// `struct page_region`, one region `PAGEMAP_SCAN` writes back.
pub use linux_raw_sys::general::page_region as PageRegion;
/// `struct pm_scan_arg`, the argument of `PAGEMAP_SCAN`.
pub use linux_raw_sys::general::pm_scan_arg as ScanArg;

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

    /// Opens the pagemap file at `path` (`/proc/PID/task/TID/pagemap` for a process whose
    /// leader exited).
    pub fn open_path(path: &str) -> Result<Pagemap, Errno> {
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

    /// One `PAGEMAP_SCAN` call: `arg`'s `vec` and `vec_len` are set from `vec` (its `size`
    /// too), every other field is the caller's. Returns the number of regions written; the
    /// kernel writes back `arg.walk_end` (where it stopped: the end when complete).
    pub fn scan_once(&self, arg: &mut ScanArg, vec: &mut [PageRegion]) -> Result<usize, Errno> {
        arg.size = std::mem::size_of::<ScanArg>() as u64;
        arg.vec = vec.as_mut_ptr() as u64;
        arg.vec_len = vec.len() as u64;
        // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` (size set to its size). `vec` points
        // to `vec_len` writable `page_region`s borrowed mutably for the duration of the call.
        let n = unsafe { ioctl_with(&self.file, PAGEMAP_SCAN, arg) }?;
        Ok(usize::try_from(n).unwrap_or(0).min(vec.len()))
    }
}

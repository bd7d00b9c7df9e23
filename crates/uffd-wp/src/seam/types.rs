//! The plain data the seam's traits exchange: modes, per-page states, `PAGEMAP_SCAN` requests
//! and results, uffd events. Backends convert their own representation to these (the Linux
//! backend from `sys`' raw structs, the model from its page tables).

use linux_raw_sys::general as g;
use serde::Serialize;

use crate::range::{Range, RangeSet};
/// The image a snapshot copies into: an anonymous or file mapping of this process.
pub use crate::sys::mem::Mapping;
/// Kernel ABI values of `/proc/PID/pagemap` and `PAGEMAP_SCAN` (`PAGE_IS_*`, `PM_SCAN_*`).
pub use crate::sys::pagemap::{SCAN_CHECK_WPASYNC, SCAN_WP_MATCHING, bits, category};
use crate::sys::uffd::RawMsg;
pub use crate::sys::{Errno, errno_name};

/// `UFFDIO_REGISTER_MODE_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegisterMode(pub u64);

impl RegisterMode {
    /// `UFFDIO_REGISTER_MODE_MISSING`.
    pub const MISSING: RegisterMode = RegisterMode(1);
    /// `UFFDIO_REGISTER_MODE_WP`.
    pub const WP: RegisterMode = RegisterMode(2);
    /// `UFFDIO_REGISTER_MODE_MINOR`.
    pub const MINOR: RegisterMode = RegisterMode(4);
    /// Whether WP is among the modes.
    pub fn has_wp(self) -> bool {
        self.0 & Self::WP.0 != 0
    }
}

/// The mode of one `UFFDIO_WRITEPROTECT` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum WpMode {
    /// Set the uffd-wp bit (`MODE_WP`).
    Protect,
    /// Clear it, waking threads blocked on the range unless `dontwake`.
    Unprotect {
        /// `MODE_DONTWAKE`.
        dontwake: bool,
    },
}

impl WpMode {
    /// The `uffdio_writeprotect_report.mode` value: [`WpMode::bits`], plus `MODE_SKIP_PINNED`
    /// when `skip_pinned` (the kernel accepts it only with `MODE_WP`).
    pub fn report_bits(self, skip_pinned: bool) -> u64 {
        let skip = if skip_pinned {
            crate::sys::uffd::WP_MODE_SKIP_PINNED
        } else {
            0
        };
        self.bits() | skip
    }

    /// The `uffdio_writeprotect.mode` value.
    pub fn bits(self) -> u64 {
        use crate::sys::uffd::{WP_MODE_DONTWAKE, WP_MODE_WP};
        match self {
            WpMode::Protect => WP_MODE_WP,
            WpMode::Unprotect { dontwake: false } => 0,
            WpMode::Unprotect { dontwake: true } => WP_MODE_DONTWAKE,
        }
    }
    /// Whether this call sets protection.
    pub fn is_protect(self) -> bool {
        matches!(self, WpMode::Protect)
    }
}

/// What one raw `UFFDIO_WRITEPROTECT_REPORT` call answered ([`crate::seam::Uffd::writeprotect_report`],
/// kernel/README.md): the ioctl's result, and the two fields the kernel writes even on failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelReport {
    /// 0 or the errno, as `UFFDIO_WRITEPROTECT` returns them.
    pub result: Result<(), Errno>,
    /// Bytes from the range's start in the requested state: always a prefix. On success the
    /// whole length; checks before anything is touched (EINVAL, EAGAIN) leave 0.
    pub done: u64,
    /// Bytes inside the prefix left writable because their folio may be DMA-pinned
    /// (`MODE_SKIP_PINNED`), counted in `done`.
    pub pinned: u64,
}

impl KernelReport {
    /// What a kernel without the command answers: EINVAL (fs/userfaultfd.c, the default case
    /// of userfaultfd_ioctl()), nothing written.
    pub const fn unsupported() -> KernelReport {
        KernelReport {
            result: Err(Errno::INVAL),
            done: 0,
            pinned: 0,
        }
    }

    /// The errno, if the call failed.
    pub fn errno(&self) -> Option<Errno> {
        self.result.err()
    }

    /// Where the protection stopped for a call over `r`: `r.start() + done`, within `r` (and
    /// rounded down to a page, should a kernel ever answer otherwise).
    pub fn stop(&self, r: Range) -> u64 {
        let done = self.done.min(r.len()) & !(crate::range::PAGE_SIZE - 1);
        r.start() + done
    }

    /// The prefix in the requested state, if any.
    pub fn prefix(&self, r: Range) -> Option<Range> {
        let stop = self.stop(r);
        (stop > r.start()).then(|| Range::from_bounds(r.start(), stop))
    }

    /// The part of `r` past the prefix, if any.
    pub fn rest(&self, r: Range) -> Option<Range> {
        let stop = self.stop(r);
        (stop < r.end()).then(|| Range::from_bounds(stop, r.end()))
    }

    /// The JSON a report or scenario prints: `{"call", "errno", "done", "pinned"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "call": "UFFDIO_WRITEPROTECT_REPORT",
            "errno": self.errno().map(errno_name),
            "done": self.done,
            "pinned": self.pinned,
        })
    }
}

impl From<crate::sys::uffd::ReportAnswer> for KernelReport {
    fn from(a: crate::sys::uffd::ReportAnswer) -> Self {
        KernelReport {
            result: a.result,
            done: a.done,
            pinned: a.pinned,
        }
    }
}

/// What the page tables say about one page (the pagemap bits a monitor cares about).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PageState {
    /// Mapped to a page frame (bit 63).
    pub present: bool,
    /// A swap entry or a PTE marker (bit 62).
    pub swapped: bool,
    /// The uffd-wp bit (bit 57): set on a present pte, a swap pte or a marker.
    pub uffd_wp: bool,
    /// File-backed or shared anonymous (bit 61).
    pub file: bool,
    /// Soft-dirty (bit 55).
    pub soft_dirty: bool,
}

impl PageState {
    /// Decodes a `/proc/PID/pagemap` entry.
    pub fn from_pagemap(e: u64) -> PageState {
        use crate::sys::pagemap::bits;
        PageState {
            present: e & bits::PRESENT != 0,
            swapped: e & bits::SWAPPED != 0,
            uffd_wp: e & bits::UFFD_WP != 0,
            file: e & bits::FILE != 0,
            soft_dirty: e & bits::SOFT_DIRTY != 0,
        }
    }
}

/// The pages of `r` whose state satisfies `pred`, from per-page states starting at `r.start()`.
pub fn pages_where(r: Range, states: &[PageState], pred: impl Fn(&PageState) -> bool) -> RangeSet {
    let mut set = RangeSet::new();
    for (i, s) in states.iter().enumerate() {
        if pred(s) {
            let a = r.start() + i as u64 * crate::range::PAGE_SIZE;
            set.insert(Range::from_bounds(a, a + crate::range::PAGE_SIZE));
        }
    }
    set
}

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

/// Room for regions in the first raw call of [`scan_all`]: most read-backs find one or none.
const VEC_FIRST: usize = 64;
/// The largest vector [`scan_all`] passes.
pub const VEC_MAX: usize = 4096;

/// `PAGEMAP_SCAN` over the whole request through raw calls of `scan`, continuing from
/// `walk_end` while the vector fills, adjacent regions of equal categories merged. With
/// `max_pages`, stops once that many pages matched (over all calls).
///
/// The first call gets room for a few regions and the room grows while calls fill it, so a scan
/// does not pay for zeroing a vector it does not need. A `PM_SCAN_WP_MATCHING` scan (a
/// dirty-tracking epoch) starts with the largest: many regions are the rule there, and every
/// extra call costs a page-table walk set-up and a TLB flush (~50 us over 1 GiB here).
pub fn scan_all(
    req: &ScanRequest,
    mut scan: impl FnMut(&ScanRequest, usize) -> Result<ScanResult, Errno>,
) -> Result<ScanResult, Errno> {
    let mut vec_len = if req.flags & SCAN_WP_MATCHING != 0 {
        VEC_MAX
    } else {
        VEC_FIRST
    };
    let mut regions: Vec<Region> = Vec::new();
    let mut cur = *req;
    let mut found = 0u64;
    loop {
        let r = scan(&cur, vec_len)?;
        if r.regions.len() >= vec_len {
            vec_len = (vec_len * 8).min(VEC_MAX);
        }
        for reg in r.regions {
            found += (reg.end - reg.start) / crate::range::PAGE_SIZE;
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

/// One event read from a userfaultfd (`struct uffd_msg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A page fault: `flags` are `UFFD_PAGEFAULT_FLAG_*`, `tid` is set with `THREAD_ID`.
    PageFault {
        /// `UFFD_PAGEFAULT_FLAG_WRITE` (1), `_WP` (2), `_MINOR` (4).
        flags: u64,
        /// Faulting address (page aligned unless `EXACT_ADDRESS`).
        address: u64,
        /// Faulting thread id, when `UFFD_FEATURE_THREAD_ID` is enabled.
        tid: u32,
    },
    /// The process forked; `ufd` is a new userfaultfd for the child.
    Fork {
        /// The child's userfaultfd, installed in this process's fd table.
        ufd: u32,
    },
    /// `mremap` moved a registered range.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `MADV_DONTNEED`/`MADV_REMOVE` dropped a range.
    Remove {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `munmap` removed a range.
    Unmap {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// An event this code does not know.
    Unknown(u8),
}

impl Event {
    /// Decodes one `struct uffd_msg` from its 32 bytes (native endian, packed layout).
    pub fn decode(b: &RawMsg) -> Event {
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        match u32::from(b[0]) {
            g::UFFD_EVENT_PAGEFAULT => Event::PageFault {
                flags: u64_at(8),
                address: u64_at(16),
                tid: u32_at(24),
            },
            g::UFFD_EVENT_FORK => Event::Fork { ufd: u32_at(8) },
            g::UFFD_EVENT_REMAP => Event::Remap {
                from: u64_at(8),
                to: u64_at(16),
                len: u64_at(24),
            },
            g::UFFD_EVENT_REMOVE => Event::Remove {
                start: u64_at(8),
                end: u64_at(16),
            },
            g::UFFD_EVENT_UNMAP => Event::Unmap {
                start: u64_at(8),
                end: u64_at(16),
            },
            other => Event::Unknown(other as u8),
        }
    }
}

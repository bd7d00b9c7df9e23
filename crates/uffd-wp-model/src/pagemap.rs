//! `/proc/PID/pagemap` entries and the `PAGEMAP_SCAN` ioctl (fs/proc/task_mmu.c, 6.18).
//!
//! The scan follows do_pagemap_scan() step by step: a bounce buffer of at most 512 regions
//! flushed after each walk, walks restarted from `walk_end` while the buffer fills
//! (pagemap_scan_output() / pagemap_scan_push_range()), `max_pages` truncating a region,
//! pagemap_scan_test_walk() (EPERM with `PM_SCAN_CHECK_WPASYNC`, VMAs without async WP skipped
//! with `PM_SCAN_WP_MATCHING`), the three PTE loops of pagemap_scan_pmd_entry() (the exclusive-WP
//! and written-only fast paths treat a none PTE as written and give it a marker; the general
//! loop agrees since the stable fix below), THP and hugetlb entries, and holes (missing tables), which
//! `PM_SCAN_WP_MATCHING` write-protects with uffd_wp_range(), page-table allocations and lost
//! ENOMEM included.
//!
//! Unpopulated pages read as `PAGE_IS_WRITTEN` as on this project's 6.18.44 kernel, which
//! carries the stable fixes for the written state of unpopulated PTEs and holes: a none PTE in
//! an existing page table reads as written in every VMA; a range without page tables (a hole)
//! only on a uffd-wp VMA, outside hugetlb (both confirmed by `uffd-wp compare`).

use uffd_wp::seam::{
    Errno, Region, SCAN_CHECK_WPASYNC, SCAN_WP_MATCHING, ScanRequest, bits, category as cat,
};

use crate::kernel::{Kernel, Semantics, TASK_SIZE, Vma};
use crate::pt::{
    PAGE, PGDIR, PMD, PUD, Pmd, Pte, ZERO_FRAME, addr_end, is_zero_frame, pgd_index, pte_index,
    pud_index,
};

/// `PM_SCAN_CATEGORIES` (6.18: up to `PAGE_IS_GUARD`).
const SCAN_CATEGORIES: u64 = 0x1ff;
const ENOSPC: i64 = -28;
/// `PAGEMAP_WALK_SIZE >> PAGE_SHIFT`: the bounce buffer's size.
const BOUNCE: usize = 512;

/// What one `PAGEMAP_SCAN` ioctl did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawScan {
    /// The ioctl's result: the number of regions written, or the errno. On an error the regions
    /// written before it are still in `regions` (the user's vector holds them).
    pub result: Result<u64, Errno>,
    /// The regions written to the user's vector, in order (not merged across bounce-buffer
    /// flushes, as the kernel writes them).
    pub regions: Vec<Region>,
    /// `walk_end` as written back.
    pub walk_end: u64,
}

/// The private state of one scan (`struct pagemap_scan_private`).
struct Scan {
    flags: u64,
    max_pages: u64,
    inverted: u64,
    mask: u64,
    anyof: u64,
    ret_mask: u64,
    interest: u64,
    has_buf: bool,
    vec_len: u64,
    buf: Vec<Region>,
    buf_len: usize,
    idx: usize,
    found: u64,
    walk_end: u64,
    out: Vec<Region>,
    vma_cat: u64,
}

const EMPTY: Region = Region {
    start: 0,
    end: 0,
    categories: 0,
};

impl Scan {
    fn wp(&self) -> bool {
        self.flags & SCAN_WP_MATCHING != 0
    }

    /// pagemap_scan_is_interesting_page().
    fn interesting(&self, c: u64) -> bool {
        let c = c ^ self.inverted;
        (c & self.mask) == self.mask && (self.anyof == 0 || c & self.anyof != 0)
    }

    /// pagemap_scan_is_interesting_vma().
    fn interesting_vma(&self, c: u64) -> bool {
        let required = self.mask & cat::WPALLOWED;
        ((c ^ self.inverted) & required) == required
    }

    /// pagemap_scan_push_range().
    fn push(&mut self, c: u64, addr: u64, end: u64) -> bool {
        let cur = &mut self.buf[self.idx];
        if addr == cur.end && c == cur.categories {
            cur.end = end;
            return true;
        }
        if cur.end != 0 {
            if self.idx >= self.buf_len - 1 {
                return false;
            }
            self.idx += 1;
        }
        self.buf[self.idx] = Region {
            start: addr,
            end,
            categories: c,
        };
        true
    }

    /// pagemap_scan_output(): 0 or -ENOSPC; may shorten `end`.
    fn output(&mut self, c: u64, addr: u64, end: &mut u64) -> i64 {
        if !self.has_buf {
            return 0;
        }
        let c = c & self.ret_mask;
        let mut n = (*end - addr) / PAGE;
        let mut ret = 0;
        match self.found.checked_add(n) {
            Some(total) if total <= self.max_pages => {}
            total => {
                let total = total.unwrap_or(u64::MAX);
                let too_much = total - self.max_pages;
                *end -= too_much * PAGE;
                n -= too_much;
                ret = ENOSPC;
            }
        }
        if !self.push(c, addr, *end) {
            *end = addr;
            n = 0;
            ret = ENOSPC;
        }
        self.found += n;
        if ret != 0 {
            self.walk_end = *end;
        }
        ret
    }

    /// pagemap_scan_backout_range().
    fn backout(&mut self, addr: u64, end: u64) {
        let cur = &mut self.buf[self.idx];
        if cur.start != addr {
            cur.end = addr;
        } else {
            cur.start = 0;
            cur.end = 0;
        }
        self.found -= (end - addr) / PAGE;
    }

    /// pagemap_scan_flush_buffer().
    fn flush(&mut self) -> u64 {
        if !self.has_buf {
            return 0;
        }
        let mut n = self.idx;
        if self.buf[n].end != self.buf[n].start {
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        self.out.extend_from_slice(&self.buf[..n]);
        self.vec_len -= n as u64;
        self.idx = 0;
        self.buf_len = self.buf_len.min(self.vec_len as usize);
        self.buf[0].start = 0;
        self.buf[0].end = 0;
        n as u64
    }
}

/// pagemap_page_category() for a PTE.
fn pte_category(s: &Scan, k: &Kernel, e: Pte) -> u64 {
    match e {
        Pte::Present { frame, wp } => {
            let mut c = cat::PRESENT;
            if !wp {
                c |= cat::WRITTEN;
            }
            if s.interest & cat::FILE != 0
                && !is_zero_frame(frame)
                && k.frames.map.get(&frame).is_some_and(|f| !f.anon)
            {
                c |= cat::FILE;
            }
            if frame == ZERO_FRAME {
                c |= cat::PFNZERO;
            }
            c
        }
        Pte::Swap { wp, .. } => cat::SWAPPED | if wp { 0 } else { cat::WRITTEN },
        Pte::Marker => cat::SWAPPED,
        // An unpopulated PTE reads as written (stable fix "fs/proc/task_mmu: fix PAGEMAP_SCAN
        // written state for unpopulated ptes", in this project's 6.18.44 kernel, where it holds
        // for every VMA, registered or not, as measured).
        Pte::None => cat::WRITTEN,
    }
}

/// make_uffd_wp_pte(): sets the uffd-wp bit of `e`, a marker for a none PTE.
fn make_uffd_wp_pte(e: &mut Pte) {
    *e = match *e {
        Pte::Present { frame, .. } => Pte::Present { frame, wp: true },
        Pte::Swap { slot, .. } => Pte::Swap { slot, wp: true },
        Pte::None | Pte::Marker => Pte::Marker,
    };
}

impl Kernel {
    /// One pagemap entry (pte_to_pagemap_entry(), pagemap_pmd_range(),
    /// pagemap_hugetlb_range()). PFN bits are left 0; soft-dirty (bit 55) only with
    /// `ModelConfig::soft_dirty` (this project's kernels lack CONFIG_MEM_SOFT_DIRTY).
    pub(crate) fn pagemap_entry(&self, a: u64) -> u64 {
        let e = self.pagemap_entry_no_sd(a);
        if self.vma_at(a).is_some() && self.soft_dirty_at(a) {
            e | bits::SOFT_DIRTY
        } else {
            e
        }
    }

    fn pagemap_entry_no_sd(&self, a: u64) -> u64 {
        if self.vma_at(a).is_none() {
            return 0;
        }
        let exclusive = |f| self.frames.map.get(&f).is_some_and(|x| x.mapcount == 1);
        let page_bits = |f, wp: bool| {
            let mut e = bits::PRESENT;
            if wp {
                e |= bits::UFFD_WP;
            }
            if !is_zero_frame(f) {
                if self.frames.map.get(&f).is_some_and(|x| !x.anon) {
                    e |= bits::FILE;
                }
                if exclusive(f) {
                    e |= bits::EXCLUSIVE;
                }
            }
            e
        };
        match self.pt.pmd(a) {
            None | Some(Pmd::None) => 0,
            Some(Pmd::Hugetlb(h)) => page_bits(h.base + pte_index(a) as u64, h.wp),
            // A hugetlb marker shows only the uffd-wp bit.
            Some(Pmd::HugetlbMarker) => bits::UFFD_WP,
            Some(Pmd::Thp(h)) => {
                if is_zero_frame(h.base) {
                    // pmd_page() of the huge zero page is not anonymous: PM_FILE.
                    bits::PRESENT | bits::FILE | if h.wp { bits::UFFD_WP } else { 0 }
                } else {
                    page_bits(h.base + pte_index(a) as u64, h.wp)
                }
            }
            Some(Pmd::Table(t)) => match t.e[pte_index(a)] {
                Pte::Present { frame, wp } => page_bits(frame, wp),
                Pte::Swap { wp, .. } => bits::SWAPPED | if wp { bits::UFFD_WP } else { 0 },
                Pte::Marker => bits::SWAPPED | bits::UFFD_WP,
                Pte::None => 0,
            },
        }
    }

    /// One `PAGEMAP_SCAN` ioctl with a user vector of `vec_len` regions (do_pagemap_scan()).
    pub(crate) fn pagemap_scan(&mut self, req: &ScanRequest, vec_len: usize) -> RawScan {
        let fail = |e| RawScan {
            result: Err(e),
            regions: Vec::new(),
            walk_end: req.end,
        };
        // pagemap_scan_get_args()
        if req.flags & !(SCAN_WP_MATCHING | SCAN_CHECK_WPASYNC) != 0
            || (req.category_inverted
                | req.category_mask
                | req.category_anyof_mask
                | req.return_mask)
                & !SCAN_CATEGORIES
                != 0
            || req.start % PAGE != 0
        {
            return fail(Errno::INVAL);
        }
        let size = req.end.wrapping_sub(req.start);
        if size > TASK_SIZE || req.start > TASK_SIZE - size {
            return fail(Errno::FAULT);
        }
        let end = req.end.next_multiple_of(PAGE);
        let mut s = Scan {
            flags: req.flags,
            max_pages: if req.max_pages == 0 {
                u64::MAX
            } else {
                req.max_pages
            },
            inverted: req.category_inverted,
            mask: req.category_mask,
            anyof: req.category_anyof_mask,
            ret_mask: req.return_mask,
            interest: req.category_mask | req.category_anyof_mask | req.return_mask,
            has_buf: vec_len > 0,
            vec_len: vec_len as u64,
            buf: vec![EMPTY; BOUNCE.min(vec_len.max(1))],
            buf_len: BOUNCE.min(vec_len),
            idx: 0,
            found: 0,
            walk_end: 0,
            out: Vec::new(),
            vma_cat: 0,
        };
        let mut n_out = 0u64;
        let mut ret = 0i64;
        let mut walk_start = req.start;
        while walk_start < end {
            ret = self.scan_walk(&mut s, walk_start, end);
            n_out += s.flush();
            if ret != ENOSPC {
                break;
            }
            if s.vec_len == 0 || s.found == s.max_pages {
                break;
            }
            walk_start = s.walk_end;
        }
        let result = if ret == 0 || ret == ENOSPC {
            Ok(n_out)
        } else {
            Err(Errno::from_raw_os_error(
                i32::try_from(-ret).unwrap_or(i32::MAX),
            ))
        };
        RawScan {
            result,
            regions: s.out,
            walk_end: if s.walk_end == 0 { end } else { s.walk_end },
        }
    }

    /// walk_page_range() with pagemap_scan_ops over `[start, end)`.
    fn scan_walk(&mut self, s: &mut Scan, start: u64, end: u64) -> i64 {
        let mut a = start;
        while a < end {
            let Some(v) = self.vmas_in(a, end).first().copied() else {
                break; // the rest is a hole without a VMA: pagemap_scan_pte_hole() skips it
            };
            if v.start > a {
                a = v.start;
                continue;
            }
            let next = v.end.min(end);
            // pagemap_scan_test_walk()
            let wp_allowed = self.vma_wp_async(&v) && self.use_markers(&v);
            if !wp_allowed {
                if s.flags & SCAN_CHECK_WPASYNC != 0 {
                    return -1; // -EPERM
                }
                if s.wp() {
                    a = next;
                    continue;
                }
            }
            let vc = if wp_allowed { cat::WPALLOWED } else { 0 };
            if !s.interesting_vma(vc) {
                a = next;
                continue;
            }
            s.vma_cat = vc;
            let err = if v.is_hugetlb() {
                self.scan_hugetlb(s, &v, a, next)
            } else {
                self.scan_tables(s, &v, a, next)
            };
            if err != 0 {
                return err;
            }
            a = next;
        }
        0
    }

    /// walk_p4d_range() .. walk_pmd_range() for one VMA part.
    fn scan_tables(&mut self, s: &mut Scan, v: &Vma, start: u64, end: u64) -> i64 {
        let mut x = start;
        while x < end {
            let gnext = addr_end(x, end, PGDIR);
            if self.pt.pgd[pgd_index(x)].is_none() {
                let err = self.scan_hole(s, v, x, gnext);
                if err != 0 {
                    return err;
                }
                x = gnext;
                continue;
            }
            let mut y = x;
            while y < gnext {
                let unext = addr_end(y, gnext, PUD);
                let has_pmd_table = self.pt.pgd[pgd_index(y)]
                    .as_ref()
                    .is_some_and(|t| t.e[pud_index(y)].is_some());
                if !has_pmd_table {
                    let err = self.scan_hole(s, v, y, unext);
                    if err != 0 {
                        return err;
                    }
                } else {
                    let mut z = y;
                    while z < unext {
                        let mnext = addr_end(z, unext, PMD);
                        let err = if matches!(self.pt.pmd(z), Some(Pmd::None) | None) {
                            self.scan_hole(s, v, z, mnext)
                        } else {
                            self.scan_pmd_entry(s, z, mnext)
                        };
                        if err != 0 {
                            return err;
                        }
                        z = mnext;
                    }
                }
                y = unext;
            }
            x = gnext;
        }
        0
    }

    /// pagemap_scan_pte_hole(): a range without page tables reads as written, except in
    /// hugetlb (the stable follow-up fix for holes, in this project's 6.18.44 kernel; measured:
    /// registered or not).
    fn scan_hole(&mut self, s: &mut Scan, v: &Vma, addr: u64, end: u64) -> i64 {
        // The stable follow-up fix reads a hole as written only on a uffd-wp VMA
        // (`if (userfaultfd_wp(vma)) categories |= PAGE_IS_WRITTEN;`); confirmed by
        // `uffd-wp compare` on this machine: an unregistered VMA without page tables reports
        // nothing, a registered one reports the hole written.
        let c = if v.is_hugetlb() || !v.uffd_wp() {
            s.vma_cat
        } else {
            s.vma_cat | cat::WRITTEN
        };
        if !s.interesting(c) {
            return 0;
        }
        let mut e = end;
        let mut ret = s.output(c, addr, &mut e);
        if addr == e || !s.wp() {
            return ret;
        }
        let proposed = self.cfg.semantics == Semantics::Proposed;
        match self.uffd_wp_range(v, addr, e, true, proposed, false) {
            Ok(r) if r < 0 => ret = r,
            Ok(_) => {}
            Err(_) => ret = -12,
        }
        ret
    }

    /// pagemap_scan_pmd_entry(): a PMD-mapped THP, else the PTEs of the table.
    fn scan_pmd_entry(&mut self, s: &mut Scan, start: u64, end: u64) -> i64 {
        if let Some(ret) = self.scan_thp_entry(s, start, end) {
            return ret;
        }
        self.scan_pte_range(s, start, end)
    }

    /// pagemap_scan_thp_entry(): None (-ENOENT) when the PMD maps no THP, or when the THP is
    /// split to write-protect a part of it: the PTEs are scanned instead.
    fn scan_thp_entry(&mut self, s: &mut Scan, start: u64, end: u64) -> Option<i64> {
        let Some(Pmd::Thp(h)) = self.pt.pmd(start).cloned() else {
            return None;
        };
        let mut c = s.vma_cat | cat::HUGE | cat::PRESENT;
        if !h.wp {
            c |= cat::WRITTEN;
        }
        if !s.interesting(c) {
            return Some(0);
        }
        let mut e = end;
        let ret = s.output(c, start, &mut e);
        if start == e || !s.wp() || c & cat::WRITTEN == 0 {
            return Some(ret);
        }
        if e != start + PMD {
            // Break the huge page to WP a part of it; report as if there was no THP.
            if let Some(p) = self.pt.pmd_mut(start) {
                Kernel::split_thp(p);
            }
            s.backout(start, e);
            return None;
        }
        // make_uffd_wp_pmd()
        if let Some(Pmd::Thp(h)) = self.pt.pmd_mut(start) {
            h.wp = true;
        }
        Some(ret)
    }

    /// The PTE loops of pagemap_scan_pmd_entry() over `[start, end)` of one PTE table, then
    /// make_uffd_wp_pte() on the pages chosen for write-protection.
    fn scan_pte_range(&mut self, s: &mut Scan, start: u64, end: u64) -> i64 {
        let first = pte_index(start);
        let n = ((end - start) / PAGE) as usize;
        // The table, copied out so that categories can look at frames.
        let Some(Pmd::Table(t)) = self.pt.pmd(start) else {
            return 0;
        };
        let entries: Vec<Pte> = t.e[first..first + n].to_vec();
        let (ret, protect) = if s.wp() && !s.has_buf {
            // Fast path for performing exclusive WP.
            let protect = (0..n).filter(|i| !entries[*i].uffd_wp()).collect();
            (0, protect)
        } else {
            self.scan_pte_output(s, start, &entries)
        };
        if !protect.is_empty()
            && let Some(Pmd::Table(t)) = self.pt.pmd_mut(start)
        {
            for i in protect {
                make_uffd_wp_pte(&mut t.e[first + i]);
            }
        }
        ret
    }

    /// The written-only fast path and the general loop of pagemap_scan_pmd_entry() over the
    /// PTEs `entries` from `start`: outputs the interesting pages and returns the last output's
    /// result with the indices of the pages to write-protect.
    ///
    /// Page by page in the kernel; here by runs of pages with equal categories, which outputs and
    /// truncates identically (pagemap_scan_output() merges a page into the current region when
    /// it continues it with the same categories).
    fn scan_pte_output(&self, s: &mut Scan, start: u64, entries: &[Pte]) -> (i64, Vec<usize>) {
        let fast =
            s.anyof == 0 && s.inverted == 0 && s.mask == cat::WRITTEN && s.ret_mask == cat::WRITTEN;
        let cats: Vec<Option<u64>> = entries
            .iter()
            .map(|e| {
                if fast {
                    (!e.uffd_wp()).then_some(s.vma_cat | cat::WRITTEN)
                } else {
                    let c = s.vma_cat | pte_category(s, self, *e);
                    s.interesting(c).then_some(c)
                }
            })
            .collect();
        let n = entries.len();
        let mut protect = Vec::new();
        let mut ret = 0i64;
        let mut i = 0usize;
        while i < n {
            let Some(c) = cats[i] else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < n && cats[j] == Some(c) {
                j += 1;
            }
            let addr = start + i as u64 * PAGE;
            let mut next = start + j as u64 * PAGE;
            ret = s.output(c, addr, &mut next);
            let done = ((next - addr) / PAGE) as usize;
            if s.wp() && (fast || c & cat::WRITTEN != 0) {
                protect.extend(i..i + done);
            }
            if done < j - i {
                break;
            }
            i = j;
        }
        (ret, protect)
    }

    /// walk_hugetlb_range() with pagemap_scan_hugetlb_entry() / pagemap_scan_pte_hole().
    fn scan_hugetlb(&mut self, s: &mut Scan, v: &Vma, start: u64, end: u64) -> i64 {
        let mut a = start;
        while a < end {
            let next = addr_end(a, end, PMD);
            let err = match self.pt.pmd(a).cloned() {
                None => self.scan_hole(s, v, a, next),
                Some(entry) => {
                    let mut c = s.vma_cat | cat::HUGE;
                    match entry {
                        Pmd::Hugetlb(h) => {
                            c |= cat::PRESENT;
                            if !h.wp {
                                c |= cat::WRITTEN;
                            }
                        }
                        Pmd::HugetlbMarker => c |= cat::SWAPPED,
                        _ => {}
                    }
                    if !s.interesting(c) {
                        0
                    } else if !s.wp() {
                        let mut e = next;
                        s.output(c, a, &mut e)
                    } else {
                        let mut e = next;
                        let ret = s.output(c, a, &mut e);
                        if a == e || c & cat::WRITTEN == 0 {
                            ret
                        } else if e != a + PMD {
                            // Partial HugeTLB page WP isn't possible.
                            s.backout(a, e);
                            s.walk_end = a;
                            0
                        } else {
                            if let Some(p) = self.pt.pmd_mut(a) {
                                *p = match *p {
                                    Pmd::Hugetlb(h) => {
                                        Pmd::Hugetlb(crate::pt::Huge { wp: true, ..h })
                                    }
                                    Pmd::None => Pmd::HugetlbMarker,
                                    ref other => other.clone(),
                                };
                            }
                            ret
                        }
                    }
                }
            };
            if err != 0 {
                return err;
            }
            a = next;
        }
        0
    }
}

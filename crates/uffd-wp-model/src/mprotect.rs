//! Write-protection: the model of `UFFDIO_WRITEPROTECT` under both semantics.
//!
//! # `linux` (6.18), from the source
//! fs/userfaultfd.c userfaultfd_writeprotect() checks `mmap_changing` (EAGAIN), the range
//! (EINVAL), the mode bits (EINVAL, and MODE_WP with MODE_DONTWAKE is EINVAL), that the mm is
//! alive (ESRCH), then calls mm/userfaultfd.c mwriteprotect_range(): EAGAIN again under the lock,
//! then for every VMA of the range in order (gaps skipped silently): ENOENT if the VMA is not
//! registered for WP (any context's registration counts), EINVAL for a hugetlb VMA when the
//! *request's* start or length is not huge-page aligned, else uffd_wp_range() ->
//! change_protection(); a negative result stops the walk and is returned as the errno (earlier
//! VMAs stay changed). ENOENT if no VMA at all.
//!
//! mm/mprotect.c change_protection_range() / change_p4d_range() / change_pud_range() /
//! change_pmd_range() / change_pte_range() return the number of entries changed, and a
//! page-table allocation failure becomes `-ENOMEM` **only at its own level**:
//! - change_pmd_range(): a `pte_alloc()` failure does `pages = -ENOMEM; break;` (the pages
//!   already changed in this PUD are forgotten, the rest of the PUD is skipped);
//! - change_pud_range(): a `pmd_alloc()` failure does `pages = ret; break;` (likewise for the
//!   rest of this PGD entry), but a negative change_pmd_range() result is only **added**:
//!   `pages += change_pmd_range(...)`, and the walk carries on into the next PUD;
//! - change_p4d_range(): a `pud_alloc()` failure returns `-ENOMEM` at once;
//!   change_protection_range() adds that to the other PGD entries' sums.
//!
//! So the call returns whatever the sum is: `-ENOMEM` plus the entries changed in the other
//! PUDs of the same PGD entry (before *and* after the failing one) and in the other PGD entries.
//! A positive or zero sum means "success" (the lost ENOMEM); a sum in `(-12, 0)` is returned as
//! an unrelated errno (-11 EAGAIN ... -1 EPERM), and two failures in one call give `-24`
//! (EMFILE). The model returns exactly that.
//!
//! Entries counted (change_pte_range()): every present PTE (changed or not), a swap PTE whose
//! uffd-wp bit changes, a marker installed on a none PTE (protect, markers in use) or removed
//! (un-protect); a huge PMD counts 512 (change_huge_pmd()); hugetlb counts 512 per huge page
//! changed (hugetlb_change_protection(): `pages << h->order`), markers not counted, and its
//! allocation failure is always reported (`pages = -ENOMEM; break;`).
//!
//! Page tables are allocated only when markers are needed (pgtable_populate_needed(): a WP
//! protect on a VMA using markers). A THP covered partly by the range is split (anonymous THP:
//! the deposited table, no allocation).
//!
//! # `proposed` (the seed thread, as kernel/README.md specifies it)
//! The same walk, except that a page-table allocation failure stops everything at once and is
//! reported (the lost-ENOMEM fix: `UFFDIO_WRITEPROTECT` and `PAGEMAP_SCAN` return ENOMEM).
//! The kernel offers `UFFD_FEATURE_WP_REPORT` and `UFFD_FEATURE_WP_SKIP_PINNED`, and
//! `UFFDIO_WRITEPROTECT_REPORT` ([`Kernel::writeprotect_report`]) returns the ioctl's result
//! *and* `done`, the bytes from the start in the requested state, always a prefix: the walk goes
//! in address order and stops at the first failure, so `start + done` is the address the
//! failing step was at (the unregistered VMA's start for ENOENT, the hugetlb VMA's start for its
//! EINVAL, the first address of the PGD/PUD/PMD entry whose table could not be allocated for
//! ENOMEM); the checks before the walk (EINVAL, EAGAIN, ESRCH) leave `done = 0`, and a range
//! with no VMA at all is ENOENT with `done = 0`. Gaps between VMAs inside the prefix count as
//! done. With `MODE_SKIP_PINNED` (only with `MODE_WP`) a present page whose folio may be
//! DMA-pinned (`folio_maybe_dma_pinned()`; the model knows the true pin counts) is left as it
//! is, counted in `done`, and in `pinned` when it is left without the uffd-wp bit (a pinned
//! page already protected stays protected and is not counted: `pinned` is what this call left
//! writable, which pagemap can then locate; the patch series decided so, kernel/README.md). The seed thread's wording ("return the bytes
//! not write-protected, unless nothing was") is `len - done`, with the errno kept beside it.

use uffd_wp::range::{Range, RangeSet};
use uffd_wp::seam::{Errno, KernelReport};

use crate::alloc::Level;
use crate::kernel::{Kernel, Vma, validate_range};
use crate::pt::{
    HPAGE_NR, PAGE, PGDIR, PMD, PUD, Pmd, PmdTable, Pte, PteTable, PudTable, addr_end, pgd_index,
    pmd_index, pte_index, pud_index,
};

/// The proposed semantics stopped at an allocation failure, at this address (the first one the
/// failed table would have mapped, or the walk's start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stop(pub(crate) u64);

/// `cp_flags` and friends for one change_protection() call.
#[derive(Debug, Clone, Copy)]
struct Cp {
    /// MM_CP_UFFD_WP.
    wp: bool,
    /// MM_CP_UFFD_WP_RESOLVE.
    resolve: bool,
    /// pgtable_populate_needed().
    populate: bool,
    /// userfaultfd_wp_use_markers() (a none PTE gets a marker).
    markers: bool,
    /// The proposed semantics: stop at the first allocation failure.
    proposed: bool,
    /// Proposed skip-pinned mode.
    skip_pinned: bool,
}

const ENOMEM: i64 = -12;
/// `UFFDIO_WRITEPROTECT_MODE_SKIP_PINNED` (kernel/README.md).
const MODE_SKIP_PINNED: u64 = 1 << 2;

fn report(result: Result<(), Errno>, done: u64, pinned: u64) -> KernelReport {
    KernelReport {
        result,
        done,
        pinned,
    }
}

impl Kernel {
    /// uffd_wp_range() (mm/userfaultfd.c) on `[start, end)` of `vma`: change_protection() with
    /// MM_CP_UFFD_WP or MM_CP_UFFD_WP_RESOLVE. Returns the kernel's `long` result; `Err(Stop)`
    /// only under the proposed semantics.
    pub(crate) fn uffd_wp_range(
        &mut self,
        vma: &Vma,
        start: u64,
        end: u64,
        enable: bool,
        proposed: bool,
        skip_pinned: bool,
    ) -> Result<i64, Stop> {
        let markers = self.use_markers(vma);
        let cp = Cp {
            wp: enable,
            resolve: !enable,
            populate: enable && markers,
            markers,
            proposed,
            skip_pinned,
        };
        if vma.is_hugetlb() {
            self.hugetlb_change_protection(cp, start, end)
        } else {
            self.change_protection_range(cp, start, end)
        }
    }

    /// change_protection_range(): sums change_p4d_range() over the PGD entries.
    fn change_protection_range(&mut self, cp: Cp, start: u64, end: u64) -> Result<i64, Stop> {
        let mut pages = 0i64;
        let mut addr = start;
        loop {
            let next = addr_end(addr, end, PGDIR);
            // change_prepare(vma, pgd, p4d): the P4D is folded, p4d_alloc() never allocates;
            // pgd_none_or_clear_bad() is never true with a folded P4D.
            pages += self.change_p4d_range(cp, addr, next)?;
            addr = next;
            if addr == end {
                break;
            }
        }
        Ok(pages)
    }

    /// change_p4d_range() for the single P4D of a PGD entry: allocates the PUD table if needed
    /// (a failure returns -ENOMEM at once).
    fn change_p4d_range(&mut self, cp: Cp, addr: u64, end: u64) -> Result<i64, Stop> {
        let gi = pgd_index(addr);
        if cp.populate && self.pt.pgd[gi].is_none() {
            if !self.alloc.alloc(Level::Pud, addr) {
                return if cp.proposed {
                    Err(Stop(addr))
                } else {
                    Ok(ENOMEM)
                };
            }
            self.pt.pgd[gi] = Some(PudTable::new());
        }
        let Self {
            pt, alloc, frames, ..
        } = self;
        let Some(pud) = pt.pgd[gi].as_mut() else {
            return Ok(0);
        };
        change_pud_range(cp, pud, alloc, frames, addr, end)
    }

    /// hugetlb_change_protection() (mm/hugetlb.c) with 2 MiB pages.
    fn hugetlb_change_protection(&mut self, cp: Cp, start: u64, end: u64) -> Result<i64, Stop> {
        let mut pages = 0i64;
        let mut addr = start;
        while addr < end {
            if self.pt.pmd_table(addr).is_none() {
                if !cp.wp {
                    // address |= last_addr_mask: skip to the end of this PUD.
                    addr = (addr | (PUD - PMD)) + PMD;
                    continue;
                }
                // huge_pte_alloc(): pud_alloc() then pmd_alloc().
                let gi = pgd_index(addr);
                if self.pt.pgd[gi].is_none() {
                    if !self.alloc.alloc(Level::Pud, addr) {
                        if cp.proposed {
                            return Err(Stop(addr));
                        }
                        pages = ENOMEM;
                        break;
                    }
                    self.pt.pgd[gi] = Some(PudTable::new());
                }
                let slot = &mut self.pt.pgd[gi].as_mut().expect("ensured").e[pud_index(addr)];
                if !self.alloc.alloc(Level::Pmd, addr) {
                    if cp.proposed {
                        return Err(Stop(addr));
                    }
                    pages = ENOMEM;
                    break;
                }
                *slot = Some(PmdTable::new());
            }
            let Self { pt, frames, .. } = self;
            let pinned = |f| cp.skip_pinned && frames.pinned(f);
            let e = pt.pmd_mut(addr).expect("table ensured");
            match e {
                Pmd::HugetlbMarker => {
                    if cp.resolve {
                        *e = Pmd::None;
                    }
                }
                Pmd::Hugetlb(h) => {
                    if !pinned(h.base) {
                        if cp.wp {
                            h.wp = true;
                        } else if cp.resolve {
                            h.wp = false;
                        }
                        pages += 1;
                    }
                }
                Pmd::None => {
                    if cp.wp {
                        *e = Pmd::HugetlbMarker;
                    }
                }
                Pmd::Table(_) | Pmd::Thp(_) => {}
            }
            addr += PMD;
        }
        Ok(if pages > 0 { pages << 9 } else { pages })
    }

    /// userfaultfd_writeprotect() + mwriteprotect_range(): the raw ioctl under the configured
    /// semantics (under `proposed`, any failure is reported, even after partial progress).
    pub(crate) fn writeprotect(
        &mut self,
        ctx: u64,
        start: u64,
        len: u64,
        mode: u64,
    ) -> Result<(), Errno> {
        let (wp, dontwake) = self.writeprotect_checks(ctx, start, len, mode, 3)?;
        let proposed = self.cfg.semantics == crate::Semantics::Proposed;
        let (err, _) = self.mwriteprotect_range(ctx, start, len, wp, proposed, false);
        if let Some(e) = err {
            return Err(e);
        }
        if !wp && !dontwake {
            self.wake(ctx, start, len);
        }
        Ok(())
    }

    /// The checks of userfaultfd_writeprotect() before mwriteprotect_range(); `known` is the
    /// mode bits the command accepts.
    fn writeprotect_checks(
        &self,
        ctx: u64,
        start: u64,
        len: u64,
        mode: u64,
        known: u64,
    ) -> Result<(bool, bool), Errno> {
        let c = self.ctxs.get(&ctx).ok_or(Errno::BADF)?;
        if c.mmap_changing > 0 {
            return Err(Errno::AGAIN);
        }
        validate_range(start, len)?;
        if mode & !known != 0 {
            return Err(Errno::INVAL);
        }
        let (wp, dontwake) = (mode & 1 != 0, mode & 2 != 0);
        if wp && dontwake {
            return Err(Errno::INVAL);
        }
        if mode & MODE_SKIP_PINNED != 0 && !wp {
            return Err(Errno::INVAL);
        }
        if !self.alive {
            return Err(Errno::SRCH);
        }
        Ok((wp, dontwake))
    }

    /// mwriteprotect_range(): the errno (None on success) and the address the walk stopped at
    /// (`start + len` on success; see the module docs for each failure).
    fn mwriteprotect_range(
        &mut self,
        ctx: u64,
        start: u64,
        len: u64,
        enable: bool,
        proposed: bool,
        skip_pinned: bool,
    ) -> (Option<Errno>, u64) {
        if self.ctxs.get(&ctx).is_some_and(|c| c.mmap_changing > 0) {
            return (Some(Errno::AGAIN), start);
        }
        let end = start + len;
        let mut err: i64 = -2; // -ENOENT: no VMA at all
        let mut stop = start;
        for v in self.vmas_in(start, end) {
            let (s, e) = (v.start.max(start), v.end.min(end));
            stop = s;
            if !v.uffd_wp() {
                err = -2;
                break;
            }
            if v.is_hugetlb() && ((start | len) & (PMD - 1)) != 0 {
                err = -22;
                break;
            }
            match self.uffd_wp_range(&v, s, e, enable, proposed, skip_pinned) {
                Ok(ret) if ret < 0 => {
                    err = ret;
                    break;
                }
                Ok(_) => err = 0,
                Err(Stop(at)) => {
                    err = ENOMEM;
                    stop = at;
                    break;
                }
            }
        }
        if err < 0 {
            // The `long` result is returned as the ioctl's errno, whatever its value.
            let e = i32::try_from(-err).unwrap_or(i32::MAX);
            (Some(Errno::from_raw_os_error(e)), stop)
        } else {
            (None, end)
        }
    }

    /// `UFFDIO_WRITEPROTECT_REPORT` (kernel/README.md): under the proposed semantics, the
    /// ioctl's result, `done` (bytes from `start` in the requested state: the prefix before the
    /// address the walk stopped at) and `pinned` (bytes of pinned pages the prefix left as they
    /// were, with `MODE_SKIP_PINNED`). The checks before the walk answer `done = 0`. Under
    /// `linux` the command does not exist: EINVAL (userfaultfd_ioctl()'s default), nothing
    /// written. The answer is checked against the page tables (a model bug panics).
    pub(crate) fn writeprotect_report(
        &mut self,
        ctx: u64,
        start: u64,
        len: u64,
        mode: u64,
    ) -> KernelReport {
        if self.cfg.semantics != crate::Semantics::Proposed {
            return KernelReport::unsupported();
        }
        let (wp, dontwake) = match self.writeprotect_checks(ctx, start, len, mode, 7) {
            Ok(m) => m,
            Err(e) => return report(Err(e), 0, 0),
        };
        let skip = mode & MODE_SKIP_PINNED != 0;
        let (err, stop) = self.mwriteprotect_range(ctx, start, len, wp, true, skip);
        // The pinned pages the call left without the bit (one already protected stays so and
        // is not counted: the kernel patch's definition, kernel/README.md).
        let pinned = if skip && wp && stop > start {
            self.pinned_ranges(start, stop)
                .intersection(&self.prefix_violations(start, stop, true, false))
                .bytes()
        } else {
            0
        };
        let off = self.prefix_violations(start, stop, wp, skip);
        assert!(
            off.is_empty(),
            "model: UFFDIO_WRITEPROTECT_REPORT over [{start:#x}, {:#x}) says done {:#x}, but \
             {off:?} of the prefix is not in the requested state",
            start + len,
            stop - start
        );
        if err.is_none() && !wp && !dontwake {
            self.wake(ctx, start, len);
        }
        report(err.map_or(Ok(()), Err), stop - start, pinned)
    }

    /// The pages of `[start, end)` a report call's prefix leaves out of the requested state
    /// although the walk could set it: for a protect, a present page without the uffd-wp bit
    /// (unless pinned and `skip_pinned`), a swap entry without it, a none entry or a missing
    /// table where markers are in use; for an un-protect, any page with the bit. Gaps between
    /// VMAs, and none entries of VMAs without markers (nothing to protect there), are exempt.
    pub(crate) fn prefix_violations(
        &self,
        start: u64,
        end: u64,
        protect: bool,
        skip_pinned: bool,
    ) -> RangeSet {
        if !protect {
            return self.wp_ranges(start, end);
        }
        let mut out = RangeSet::new();
        for v in self.vmas_in(start, end) {
            let markers = self.use_markers(&v);
            let (s, e) = (v.start.max(start), v.end.min(end));
            let mut a = s;
            while a < e {
                let next = addr_end(a, e, PMD);
                self.pmd_violations(a, next, markers, skip_pinned, &mut out);
                a = next;
            }
        }
        out
    }

    /// [`Kernel::prefix_violations`] of a protect over `[a, next)`, inside one PMD entry.
    fn pmd_violations(&self, a: u64, next: u64, markers: bool, skip: bool, out: &mut RangeSet) {
        let pinned = |f| skip && self.frames.pinned(f);
        let whole = Range::from_bounds(a, next);
        match self.pt.pmd(a) {
            None | Some(Pmd::None) if markers => out.insert(whole),
            None | Some(Pmd::None) | Some(Pmd::HugetlbMarker) => {}
            Some(Pmd::Thp(h)) | Some(Pmd::Hugetlb(h)) => {
                if !(h.wp || pinned(h.base)) {
                    out.insert(whole);
                }
            }
            Some(Pmd::Table(t)) => {
                let i0 = pte_index(a);
                let n = ((next - a) / PAGE) as usize;
                for (j, p) in t.e[i0..i0 + n].iter().enumerate() {
                    let ok = match *p {
                        Pte::Present { frame, wp } => wp || pinned(frame),
                        Pte::None => !markers,
                        p => p.uffd_wp(),
                    };
                    if !ok {
                        let at = a + j as u64 * PAGE;
                        out.insert(Range::from_bounds(at, at + PAGE));
                    }
                }
            }
        }
    }

    /// Bytes of `[start, end)` not write-protected (`protect`, pinned pages counting as
    /// protected when `skip_pinned`) or still write-protected (`!protect`).
    pub(crate) fn bytes_not_in_state(
        &self,
        start: u64,
        end: u64,
        protect: bool,
        skip_pinned: bool,
    ) -> u64 {
        let wp = self.wp_pages_in(start, end, skip_pinned);
        if protect {
            (end - start) - wp * PAGE
        } else {
            wp * PAGE
        }
    }

    /// The write-protected pages of `[start, end)` (uffd-wp bit set on a present page, a swap
    /// entry or a marker), by a walk of the page tables.
    pub(crate) fn wp_ranges(&self, start: u64, end: u64) -> RangeSet {
        let mut out = RangeSet::new();
        let mut run: Option<u64> = None;
        let flush = |run: &mut Option<u64>, at: u64, out: &mut RangeSet| {
            if let Some(s) = run.take() {
                out.insert(Range::from_bounds(s, at));
            }
        };
        for v in self.vmas_in(start, end) {
            let (s, e) = (v.start.max(start), v.end.min(end));
            let mut a = s;
            while a < e {
                let next = addr_end(a, e, PMD);
                match self.pt.pmd(a) {
                    None => {
                        let n = addr_end(a, e, PUD);
                        flush(&mut run, a, &mut out);
                        a = n;
                        continue;
                    }
                    Some(Pmd::None) => flush(&mut run, a, &mut out),
                    Some(Pmd::Thp(h)) | Some(Pmd::Hugetlb(h)) => {
                        if h.wp {
                            run.get_or_insert(a);
                        } else {
                            flush(&mut run, a, &mut out);
                        }
                    }
                    Some(Pmd::HugetlbMarker) => {
                        run.get_or_insert(a);
                    }
                    Some(Pmd::Table(t)) => {
                        let i0 = pte_index(a);
                        for (j, p) in t.e[i0..i0 + ((next - a) / PAGE) as usize]
                            .iter()
                            .enumerate()
                        {
                            let at = a + j as u64 * PAGE;
                            if p.uffd_wp() {
                                run.get_or_insert(at);
                            } else {
                                flush(&mut run, at, &mut out);
                            }
                        }
                    }
                }
                a = next;
            }
            flush(&mut run, e, &mut out);
        }
        out
    }

    /// Pages of `[start, end)` that are mapped and write-protected (or pinned, when
    /// `skip_pinned`), counted table by table.
    pub(crate) fn wp_pages_in(&self, start: u64, end: u64, skip_pinned: bool) -> u64 {
        let pinned = |f| skip_pinned && self.frames.pinned(f);
        let mut n = 0u64;
        for v in self.vmas_in(start, end) {
            let (s, e) = (v.start.max(start), v.end.min(end));
            let mut a = s;
            while a < e {
                let next = addr_end(a, e, PMD);
                let cnt = (next - a) / PAGE;
                match self.pt.pmd(a) {
                    None => {
                        a = addr_end(a, e, PUD);
                        continue;
                    }
                    Some(Pmd::None) => {}
                    Some(Pmd::Thp(h)) | Some(Pmd::Hugetlb(h)) => {
                        if h.wp || pinned(h.base) {
                            n += cnt;
                        }
                    }
                    Some(Pmd::HugetlbMarker) => n += cnt,
                    Some(Pmd::Table(t)) => {
                        let i = pte_index(a);
                        n += t.e[i..i + cnt as usize]
                            .iter()
                            .filter(|p| match **p {
                                Pte::Present { frame, wp } => wp || pinned(frame),
                                p => p.uffd_wp(),
                            })
                            .count() as u64;
                    }
                }
                a = next;
            }
        }
        n
    }
}

/// change_pud_range().
fn change_pud_range(
    cp: Cp,
    pud: &mut PudTable,
    alloc: &mut crate::alloc::PtAllocator,
    frames: &crate::pt::Frames,
    mut addr: u64,
    end: u64,
) -> Result<i64, Stop> {
    let mut pages = 0i64;
    loop {
        let next = addr_end(addr, end, PUD);
        let slot = &mut pud.e[pud_index(addr)];
        // change_prepare(vma, pudp, pmd): pmd_alloc() when markers are needed.
        if cp.populate && slot.is_none() {
            if !alloc.alloc(Level::Pmd, addr) {
                if cp.proposed {
                    return Err(Stop(addr));
                }
                pages = ENOMEM;
                break;
            }
            *slot = Some(PmdTable::new());
        }
        if let Some(pmd) = slot.as_mut() {
            // `pages +=`: a negative change_pmd_range() result is added, not returned.
            pages += change_pmd_range(cp, pmd, alloc, frames, addr, next)?;
        }
        addr = next;
        if addr == end {
            break;
        }
    }
    Ok(pages)
}

/// change_pmd_range().
fn change_pmd_range(
    cp: Cp,
    pmdt: &mut PmdTable,
    alloc: &mut crate::alloc::PtAllocator,
    frames: &crate::pt::Frames,
    mut addr: u64,
    end: u64,
) -> Result<i64, Stop> {
    let mut pages = 0i64;
    loop {
        let next = addr_end(addr, end, PMD);
        let e = &mut pmdt.e[pmd_index(addr)];
        // change_pmd_prepare(): pte_alloc() when markers are needed and the PMD is none.
        if cp.populate && matches!(e, Pmd::None) {
            if !alloc.alloc(Level::Pte, addr) {
                if cp.proposed {
                    return Err(Stop(addr));
                }
                pages = ENOMEM;
                break;
            }
            *e = Pmd::Table(PteTable::new());
        }
        if let Pmd::Thp(h) = e {
            if next - addr != PMD {
                // __split_huge_pmd() (anonymous: the deposited table), then the PTE level.
                Kernel::split_thp(e);
            } else {
                // change_huge_pmd(): 512 entries.
                if !(cp.skip_pinned && frames.pinned(h.base)) {
                    if cp.wp {
                        h.wp = true;
                    } else if cp.resolve {
                        h.wp = false;
                    }
                    pages += HPAGE_NR as i64;
                }
            }
        }
        if let Pmd::Table(t) = e {
            pages += change_pte_range(cp, t, frames, addr, next);
        }
        addr = next;
        if addr == end {
            break;
        }
    }
    Ok(pages)
}

/// change_pte_range().
fn change_pte_range(
    cp: Cp,
    t: &mut PteTable,
    frames: &crate::pt::Frames,
    addr: u64,
    end: u64,
) -> i64 {
    let mut pages = 0i64;
    let first = pte_index(addr);
    let n = ((end - addr) / PAGE) as usize;
    for e in &mut t.e[first..first + n] {
        match e {
            Pte::Present { frame, wp } => {
                if cp.skip_pinned && frames.pinned(*frame) {
                    continue;
                }
                if cp.wp {
                    *wp = true;
                } else if cp.resolve {
                    *wp = false;
                }
                pages += 1;
            }
            Pte::Swap { wp, .. } => {
                let new = if cp.wp {
                    true
                } else if cp.resolve {
                    false
                } else {
                    *wp
                };
                if new != *wp {
                    *wp = new;
                    pages += 1;
                }
            }
            Pte::Marker => {
                // Un-protect drops the marker; protect leaves it.
                if cp.resolve {
                    *e = Pte::None;
                    pages += 1;
                }
            }
            Pte::None => {
                if cp.wp && cp.markers {
                    *e = Pte::Marker;
                    pages += 1;
                }
            }
        }
    }
    pages
}

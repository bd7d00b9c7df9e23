//! Page tables (four levels, each table allocated lazily) and the page frames they map.
//!
//! x86_64 with 4-level paging: a PGD entry covers 512 GiB and points to a PUD table, a PUD entry
//! covers 1 GiB and points to a PMD table, a PMD entry covers 2 MiB and points to a PTE table or
//! maps a huge page, a PTE maps 4 KiB. The P4D level is folded into the PGD (as on a kernel built
//! for 5 levels running on a CPU without LA57: `p4d_alloc()` never allocates). Tables exist only
//! where the kernel would have allocated them; nothing is allocated per page for untouched
//! memory.

use std::collections::HashMap;

use crate::alloc::{Level, PtAllocator};

/// Base page size.
pub(crate) const PAGE: u64 = 4096;
/// Bytes mapped by a PMD entry.
pub(crate) const PMD: u64 = 2 << 20;
/// Bytes mapped by a PUD entry.
pub(crate) const PUD: u64 = 1 << 30;
/// Bytes mapped by a PGD entry (with the P4D folded).
pub(crate) const PGDIR: u64 = 1 << 39;
/// Entries per table.
pub(crate) const PTRS: usize = 512;
/// 4 KiB pages per PMD entry.
pub(crate) const HPAGE_NR: u64 = 512;

pub(crate) fn pgd_index(a: u64) -> usize {
    ((a >> 39) & 511) as usize
}
pub(crate) fn pud_index(a: u64) -> usize {
    ((a >> 30) & 511) as usize
}
pub(crate) fn pmd_index(a: u64) -> usize {
    ((a >> 21) & 511) as usize
}
pub(crate) fn pte_index(a: u64) -> usize {
    ((a >> 12) & 511) as usize
}

/// The kernel's `p?d_addr_end()`: the next `size` boundary after `addr`, or `end`.
pub(crate) fn addr_end(addr: u64, end: u64, size: u64) -> u64 {
    let b = (addr & !(size - 1)).wrapping_add(size);
    if b.wrapping_sub(1) < end.wrapping_sub(1) {
        b
    } else {
        end
    }
}

/// Identifies a page frame.
pub(crate) type FrameId = u64;
/// The shared zero page.
pub(crate) const ZERO_FRAME: FrameId = 0;
/// The huge zero page (its 512 subpages are `HUGE_ZERO_FRAME + i`, all reading as zeros and
/// never stored).
pub(crate) const HUGE_ZERO_FRAME: FrameId = 1 << 62;
/// The first ordinary frame id.
pub(crate) const FIRST_FRAME: FrameId = 16;

pub(crate) fn is_zero_frame(f: FrameId) -> bool {
    f == ZERO_FRAME || (HUGE_ZERO_FRAME..HUGE_ZERO_FRAME + HPAGE_NR).contains(&f)
}

/// A page table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pte {
    /// `pte_none`.
    None,
    /// A present page; `wp` is the uffd-wp bit (`_PAGE_UFFD_WP`, which also write-protects).
    Present { frame: FrameId, wp: bool },
    /// A swap entry (anonymous page paged out); `wp` is `_PAGE_SWP_UFFD_WP`.
    Swap { slot: u64, wp: bool },
    /// `PTE_MARKER_UFFD_WP`: a non-present entry that only carries the uffd-wp bit.
    Marker,
}

impl Pte {
    /// Whether a write here would raise a uffd-wp fault (in a VMA registered for WP).
    pub(crate) fn uffd_wp(self) -> bool {
        matches!(
            self,
            Pte::Present { wp: true, .. } | Pte::Swap { wp: true, .. } | Pte::Marker
        )
    }
}

/// A PTE table.
#[derive(Debug, Clone)]
pub(crate) struct PteTable {
    pub e: Box<[Pte]>,
}

impl PteTable {
    pub(crate) fn new() -> Box<PteTable> {
        Box::new(PteTable {
            e: vec![Pte::None; PTRS].into_boxed_slice(),
        })
    }

    pub(crate) fn all_none(&self) -> bool {
        self.e.iter().all(|p| *p == Pte::None)
    }
}

/// A huge page mapped by a PMD entry: frames `base..base + 512`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Huge {
    pub base: FrameId,
    pub wp: bool,
}

/// A PMD entry.
#[derive(Debug, Clone)]
pub(crate) enum Pmd {
    /// `pmd_none`.
    None,
    /// Points to a PTE table.
    Table(Box<PteTable>),
    /// A PMD-mapped anonymous THP (or the huge zero page), with its deposited PTE table.
    Thp(Huge),
    /// A 2 MiB hugetlb page (the huge "pte" lives in the PMD entry).
    Hugetlb(Huge),
    /// A hugetlb `PTE_MARKER_UFFD_WP`.
    HugetlbMarker,
}

/// A PMD table.
#[derive(Debug, Clone)]
pub(crate) struct PmdTable {
    pub e: Box<[Pmd]>,
}

impl PmdTable {
    pub(crate) fn new() -> Box<PmdTable> {
        Box::new(PmdTable {
            e: (0..PTRS).map(|_| Pmd::None).collect(),
        })
    }
}

/// A PUD table.
#[derive(Debug, Clone)]
pub(crate) struct PudTable {
    pub e: Box<[Option<Box<PmdTable>>]>,
}

impl PudTable {
    pub(crate) fn new() -> Box<PudTable> {
        Box::new(PudTable {
            e: (0..PTRS).map(|_| None).collect(),
        })
    }
}

/// The page tables of one address space (the PGD page itself always exists).
#[derive(Debug, Clone)]
pub(crate) struct PageTables {
    pub pgd: Box<[Option<Box<PudTable>>]>,
}

impl Default for PageTables {
    fn default() -> Self {
        PageTables {
            pgd: (0..PTRS).map(|_| None).collect(),
        }
    }
}

impl PageTables {
    /// The PMD table covering `a`, if it exists.
    pub(crate) fn pmd_table(&self, a: u64) -> Option<&PmdTable> {
        self.pgd[pgd_index(a)].as_ref()?.e[pud_index(a)].as_deref()
    }

    /// The PMD entry covering `a`, if its table exists.
    pub(crate) fn pmd(&self, a: u64) -> Option<&Pmd> {
        Some(&self.pmd_table(a)?.e[pmd_index(a)])
    }

    /// The PMD entry covering `a`, mutable, if its table exists.
    pub(crate) fn pmd_mut(&mut self, a: u64) -> Option<&mut Pmd> {
        Some(&mut self.pgd[pgd_index(a)].as_mut()?.e[pud_index(a)].as_mut()?.e[pmd_index(a)])
    }

    /// The PMD entry for `a`, allocating the PUD and PMD tables on the way as the fault path
    /// does (`pud_alloc()`, `pmd_alloc()`): `None` when an allocation fails.
    pub(crate) fn ensure_pmd(&mut self, a: u64, alloc: &mut PtAllocator) -> Option<&mut Pmd> {
        let g = &mut self.pgd[pgd_index(a)];
        if g.is_none() {
            if !alloc.alloc(Level::Pud, a) {
                return None;
            }
            *g = Some(PudTable::new());
        }
        let u = &mut g.as_mut().expect("just ensured").e[pud_index(a)];
        if u.is_none() {
            if !alloc.alloc(Level::Pmd, a) {
                return None;
            }
            *u = Some(PmdTable::new());
        }
        Some(&mut u.as_mut().expect("just ensured").e[pmd_index(a)])
    }

    /// Recounts the tables by walking them: (PUD, PMD, PTE including deposits).
    pub(crate) fn recount(&self) -> (u64, u64, u64) {
        let (mut pud, mut pmd, mut pte) = (0, 0, 0);
        for g in self.pgd.iter().flatten() {
            pud += 1;
            for u in g.e.iter().flatten() {
                pmd += 1;
                for m in u.e.iter() {
                    if matches!(m, Pmd::Table(_) | Pmd::Thp(_)) {
                        pte += 1;
                    }
                }
            }
        }
        (pud, pmd, pte)
    }
}

/// The contents of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PageData {
    /// All zeros (never allocated).
    Zero,
    /// 4096 bytes.
    Bytes(Box<[u8]>),
}

impl PageData {
    /// Whether every byte is zero (`pages_identical()` with the zero page).
    pub(crate) fn is_zero(&self) -> bool {
        match self {
            PageData::Zero => true,
            PageData::Bytes(b) => b.iter().all(|x| *x == 0),
        }
    }

    pub(crate) fn read(&self, off: usize, buf: &mut [u8]) {
        match self {
            PageData::Zero => buf.fill(0),
            PageData::Bytes(b) => buf.copy_from_slice(&b[off..off + buf.len()]),
        }
    }

    pub(crate) fn write(&mut self, off: usize, data: &[u8]) {
        if let PageData::Zero = self {
            if data.iter().all(|b| *b == 0) {
                return;
            }
            *self = PageData::Bytes(vec![0u8; PAGE as usize].into_boxed_slice());
        }
        if let PageData::Bytes(b) = self {
            b[off..off + data.len()].copy_from_slice(data);
        }
    }
}

/// A page frame.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub data: PageData,
    /// An anonymous page (else page cache: shmem or file).
    pub anon: bool,
    /// The head frame of its folio (itself for a small folio). Pins are counted on the head,
    /// as `folio_maybe_dma_pinned()` is per folio.
    pub folio: FrameId,
    /// Page table entries mapping it.
    pub mapcount: u32,
    /// FOLL_PIN references (on the head frame).
    pub pins: u32,
    /// FOLL_LONGTERM pins among them (on the head frame).
    pub longterm: u32,
    /// Held by a page cache (shmem/file object).
    pub cached: bool,
}

/// All frames.
#[derive(Debug, Clone)]
pub(crate) struct Frames {
    pub map: HashMap<FrameId, Frame>,
    next: FrameId,
}

impl Default for Frames {
    fn default() -> Self {
        Frames {
            map: HashMap::new(),
            next: FIRST_FRAME,
        }
    }
}

impl Frames {
    /// A new zero-filled frame (not yet mapped).
    pub(crate) fn new_frame(&mut self, anon: bool) -> FrameId {
        let id = self.next;
        self.next += 1;
        self.map.insert(
            id,
            Frame {
                data: PageData::Zero,
                anon,
                folio: id,
                mapcount: 0,
                pins: 0,
                longterm: 0,
                cached: false,
            },
        );
        id
    }

    /// A new zero-filled 2 MiB folio of 512 frames; returns its head.
    pub(crate) fn new_huge(&mut self, anon: bool) -> FrameId {
        // Align ids so that a huge folio's frames are base..base + 512.
        let base = (self.next + HPAGE_NR - 1) & !(HPAGE_NR - 1);
        for i in 0..HPAGE_NR {
            self.map.insert(
                base + i,
                Frame {
                    data: PageData::Zero,
                    anon,
                    folio: base,
                    mapcount: 0,
                    pins: 0,
                    longterm: 0,
                    cached: false,
                },
            );
        }
        self.next = base + HPAGE_NR;
        base
    }

    /// Whether the folio of `f` may be DMA-pinned (`folio_maybe_dma_pinned()`).
    pub(crate) fn pinned(&self, f: FrameId) -> bool {
        if is_zero_frame(f) {
            return false;
        }
        self.map
            .get(&f)
            .and_then(|fr| self.map.get(&fr.folio))
            .is_some_and(|h| h.pins > 0)
    }

    pub(crate) fn map_one(&mut self, f: FrameId) {
        if let Some(fr) = self.map.get_mut(&f) {
            fr.mapcount += 1;
        }
    }

    /// One mapping of `f` goes away; frees the frame when nothing holds it any more.
    pub(crate) fn unmap_one(&mut self, f: FrameId) {
        if let Some(fr) = self.map.get_mut(&f) {
            fr.mapcount = fr.mapcount.saturating_sub(1);
        }
        self.maybe_free(f);
    }

    /// Frees `f` if no mapping, pin or page cache holds it. A pinned huge folio keeps all its
    /// frames.
    pub(crate) fn maybe_free(&mut self, f: FrameId) {
        let Some(fr) = self.map.get(&f) else { return };
        if fr.mapcount > 0 || fr.cached {
            return;
        }
        let head = fr.folio;
        if self.map.get(&head).is_some_and(|h| h.pins > 0) {
            return;
        }
        if head != f {
            self.map.remove(&f);
            // The head may have been waiting for its last tail.
            self.maybe_free(head);
            return;
        }
        // The head of a huge folio goes last: keep it while a tail is alive (it carries pins).
        let tail_alive =
            (1..HPAGE_NR).any(|i| self.map.get(&(head + i)).is_some_and(|t| t.folio == head));
        if !tail_alive {
            self.map.remove(&f);
        }
    }

    pub(crate) fn read(&self, f: FrameId, off: usize, buf: &mut [u8]) {
        match self.map.get(&f) {
            Some(fr) if !is_zero_frame(f) => fr.data.read(off, buf),
            _ => buf.fill(0),
        }
    }

    pub(crate) fn write(&mut self, f: FrameId, off: usize, data: &[u8]) {
        if let Some(fr) = self.map.get_mut(&f) {
            fr.data.write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_end_matches_the_kernel() {
        assert_eq!(addr_end(0, 3 * PMD, PMD), PMD);
        assert_eq!(addr_end(PMD + PAGE, 3 * PMD, PMD), 2 * PMD);
        assert_eq!(addr_end(PMD + PAGE, PMD + 2 * PAGE, PMD), PMD + 2 * PAGE);
        // the last table of the address space: boundary wraps to 0
        assert_eq!(addr_end(u64::MAX - PAGE + 1, u64::MAX, PMD), u64::MAX);
    }

    #[test]
    fn ensure_pmd_allocates_each_level_once() {
        let mut pt = PageTables::default();
        let mut a = PtAllocator::default();
        assert!(pt.ensure_pmd(5 * PUD, &mut a).is_some());
        assert!(pt.ensure_pmd(5 * PUD + PMD, &mut a).is_some());
        assert!(pt.ensure_pmd(6 * PUD, &mut a).is_some());
        let s = a.stats();
        assert_eq!((s.live.pud, s.live.pmd, s.live.pte), (1, 2, 0));
        assert_eq!(pt.recount(), (1, 2, 0));
    }

    #[test]
    fn huge_folios_free_their_head_last() {
        let mut f = Frames::default();
        let b = f.new_huge(true);
        for i in 0..HPAGE_NR {
            f.map_one(b + i);
        }
        f.unmap_one(b);
        assert!(f.map.contains_key(&b), "head kept while tails live");
        for i in 1..HPAGE_NR {
            f.unmap_one(b + i);
        }
        assert!(f.map.is_empty());
    }
}

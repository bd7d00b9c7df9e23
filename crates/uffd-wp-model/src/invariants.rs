//! Internal consistency checks of the model, for tests and fuzzing.

use std::collections::HashMap;

use crate::kernel::{Backing, Kernel, Vma};
use crate::pt::{
    FrameId, HPAGE_NR, Huge, PAGE, PGDIR, PMD, PUD, Pmd, Pte, PteTable, is_zero_frame,
};

/// How many page table entries map each frame, as found by walking the tables.
type MapCounts = HashMap<FrameId, u32>;

/// The first violated invariant, described.
pub(crate) fn check(k: &Kernel) -> Result<(), String> {
    check_table_counts(k)?;
    check_vmas(k)?;
    let maps = check_entries(k)?;
    check_mapcounts(k, maps)?;
    check_messages(k)
}

/// Page-table counts match the allocator's.
fn check_table_counts(k: &Kernel) -> Result<(), String> {
    let (pud, pmd, pte) = k.pt.recount();
    let live = k.alloc.stats().live;
    if (pud, pmd, pte) != (live.pud, live.pmd, live.pte) {
        return Err(format!(
            "page tables: walked {pud}/{pmd}/{pte} (PUD/PMD/PTE), allocator counts {}/{}/{}",
            live.pud, live.pmd, live.pte
        ));
    }
    Ok(())
}

/// VMAs are sorted, disjoint, page aligned.
fn check_vmas(k: &Kernel) -> Result<(), String> {
    let mut prev_end = 0;
    for (s, v) in &k.vmas {
        if *s != v.start || v.start >= v.end || v.start % PAGE != 0 || v.end % PAGE != 0 {
            return Err(format!("bad VMA {v:?}"));
        }
        if v.start < prev_end {
            return Err(format!("overlapping VMA {v:?}"));
        }
        prev_end = v.end;
    }
    Ok(())
}

/// Entries only inside VMAs, of the right kind; swap slots exist. Returns how many times each
/// frame is mapped.
fn check_entries(k: &Kernel) -> Result<MapCounts, String> {
    let mut maps = MapCounts::new();
    for (gi, g) in k.pt.pgd.iter().enumerate() {
        let Some(g) = g else { continue };
        for (ui, u) in g.e.iter().enumerate() {
            let Some(u) = u else { continue };
            for (mi, m) in u.e.iter().enumerate() {
                let base = gi as u64 * PGDIR + ui as u64 * PUD + mi as u64 * PMD;
                check_pmd(k, base, m, &mut maps)?;
            }
        }
    }
    Ok(maps)
}

/// The PMD entry `m` mapping `base`, counting the frames it maps in `maps`.
fn check_pmd(k: &Kernel, base: u64, m: &Pmd, maps: &mut MapCounts) -> Result<(), String> {
    match m {
        Pmd::None => Ok(()),
        Pmd::Thp(h) => check_huge(k, base, *h, true, maps),
        Pmd::Hugetlb(h) => check_huge(k, base, *h, false, maps),
        Pmd::HugetlbMarker => {
            if !k.vma_at(base).is_some_and(|v| v.is_hugetlb()) {
                return Err(format!("hugetlb marker outside hugetlb at {base:#x}"));
            }
            Ok(())
        }
        Pmd::Table(t) => check_pte_table(k, base, t, maps),
    }
}

/// A THP (`thp`) or hugetlb entry `h` at `base` fits a VMA of its kind; its frames are counted.
fn check_huge(
    k: &Kernel,
    base: u64,
    h: Huge,
    thp: bool,
    maps: &mut MapCounts,
) -> Result<(), String> {
    let v = k
        .vma_at(base)
        .ok_or_else(|| format!("huge entry outside VMAs at {base:#x}"))?;
    let huge_ok = if thp { v.is_anon() } else { v.is_hugetlb() };
    if !huge_ok || v.start > base || v.end < base + PMD {
        return Err(format!("huge entry at {base:#x} does not fit {v:?}"));
    }
    if !is_zero_frame(h.base) {
        for i in 0..HPAGE_NR {
            *maps.entry(h.base + i).or_default() += 1;
        }
    }
    Ok(())
}

/// Every entry of the PTE table `t` at `base` lies in a VMA that is not hugetlb.
fn check_pte_table(
    k: &Kernel,
    base: u64,
    t: &PteTable,
    maps: &mut MapCounts,
) -> Result<(), String> {
    let vmas = k.vmas_in(base, base + PMD);
    for (i, e) in t.e.iter().enumerate() {
        if *e == Pte::None {
            continue;
        }
        let a = base + i as u64 * PAGE;
        let v = vmas
            .iter()
            .find(|v| v.start <= a && a < v.end)
            .ok_or_else(|| format!("PTE {e:?} outside VMAs at {a:#x}"))?;
        if v.is_hugetlb() {
            return Err(format!("PTE in a hugetlb VMA at {a:#x}"));
        }
        check_pte(k, v, a, *e, maps)?;
    }
    Ok(())
}

/// The PTE `e` at `a` in `v`: a present page is counted; a swap entry has its slot and is in a
/// VMA that can swap (anonymous or private file).
fn check_pte(k: &Kernel, v: &Vma, a: u64, e: Pte, maps: &mut MapCounts) -> Result<(), String> {
    match e {
        Pte::Present { frame, .. } if !is_zero_frame(frame) => {
            *maps.entry(frame).or_default() += 1;
        }
        Pte::Swap { slot, .. } => {
            if !k.swap.contains_key(&slot) {
                return Err(format!("swap slot {slot} missing at {a:#x}"));
            }
            if !v.is_anon() && !matches!(v.backing, Backing::File { shared: false, .. }) {
                return Err(format!("swap entry in a shared VMA at {a:#x}"));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Mapcounts add up to the walked `maps`, no frame leaks, and every mapped frame exists.
fn check_mapcounts(k: &Kernel, mut maps: MapCounts) -> Result<(), String> {
    for (f, fr) in &k.frames.map {
        let n = maps.remove(f).unwrap_or(0);
        if n != fr.mapcount {
            return Err(format!(
                "frame {f}: mapped {n} times, mapcount {}",
                fr.mapcount
            ));
        }
        let head = k.frames.map.get(&fr.folio);
        if fr.mapcount == 0 && !fr.cached && head.is_none_or(|h| h.pins == 0) && *f == fr.folio {
            // A head with no mapping, pin or cache must have live tails.
            let tails =
                (1..HPAGE_NR).any(|i| k.frames.map.get(&(f + i)).is_some_and(|t| t.folio == *f));
            if !tails {
                return Err(format!("frame {f} leaked"));
            }
        }
    }
    if let Some((f, n)) = maps.into_iter().next() {
        return Err(format!("frame {f} mapped {n} times but does not exist"));
    }
    Ok(())
}

/// Unread fault messages belong to blocked accesses, and the other way round.
fn check_messages(k: &Kernel) -> Result<(), String> {
    for (cid, c) in &k.ctxs {
        for id in &c.faults {
            let ok = k
                .pending
                .get(id)
                .and_then(|p| p.blocked)
                .is_some_and(|b| b.unread && b.ctx == *cid);
            if !ok {
                return Err(format!(
                    "context {cid}: message of access {id} without a blocked access"
                ));
            }
        }
    }
    for (id, p) in &k.pending {
        if let Some(b) = p.blocked
            && b.unread
            && !k.ctxs.get(&b.ctx).is_some_and(|c| c.faults.contains(id))
        {
            return Err(format!("access {id} blocked unread without a message"));
        }
    }
    Ok(())
}

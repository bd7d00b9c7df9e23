//! Internal consistency checks of the model, for tests and fuzzing.

use std::collections::HashMap;

use crate::kernel::Kernel;
use crate::pt::{HPAGE_NR, PAGE, PGDIR, PMD, PUD, Pmd, Pte, is_zero_frame};

/// The first violated invariant, described.
pub(crate) fn check(k: &Kernel) -> Result<(), String> {
    // Page-table counts match the allocator's.
    let (pud, pmd, pte) = k.pt.recount();
    let live = k.alloc.stats().live;
    if (pud, pmd, pte) != (live.pud, live.pmd, live.pte) {
        return Err(format!(
            "page tables: walked {pud}/{pmd}/{pte} (PUD/PMD/PTE), allocator counts {}/{}/{}",
            live.pud, live.pmd, live.pte
        ));
    }
    // VMAs are sorted, disjoint, page aligned.
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
    // Entries only inside VMAs, of the right kind; mapcounts add up; swap slots exist.
    let mut maps: HashMap<u64, u32> = HashMap::new();
    for (gi, g) in k.pt.pgd.iter().enumerate() {
        let Some(g) = g else { continue };
        for (ui, u) in g.e.iter().enumerate() {
            let Some(u) = u else { continue };
            for (mi, m) in u.e.iter().enumerate() {
                let base = gi as u64 * PGDIR + ui as u64 * PUD + mi as u64 * PMD;
                match m {
                    Pmd::None => {}
                    Pmd::Thp(h) | Pmd::Hugetlb(h) => {
                        let v = k
                            .vma_at(base)
                            .ok_or_else(|| format!("huge entry outside VMAs at {base:#x}"))?;
                        let huge_ok = if matches!(m, Pmd::Thp(_)) {
                            v.is_anon()
                        } else {
                            v.is_hugetlb()
                        };
                        if !huge_ok || v.start > base || v.end < base + PMD {
                            return Err(format!("huge entry at {base:#x} does not fit {v:?}"));
                        }
                        if !is_zero_frame(h.base) {
                            for i in 0..HPAGE_NR {
                                *maps.entry(h.base + i).or_default() += 1;
                            }
                        }
                    }
                    Pmd::HugetlbMarker => {
                        if !k.vma_at(base).is_some_and(|v| v.is_hugetlb()) {
                            return Err(format!("hugetlb marker outside hugetlb at {base:#x}"));
                        }
                    }
                    Pmd::Table(t) => {
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
                            match e {
                                Pte::Present { frame, .. } if !is_zero_frame(*frame) => {
                                    *maps.entry(*frame).or_default() += 1;
                                }
                                Pte::Swap { slot, .. } => {
                                    if !k.swap.contains_key(slot) {
                                        return Err(format!("swap slot {slot} missing at {a:#x}"));
                                    }
                                    if !v.is_anon()
                                        && !matches!(
                                            v.backing,
                                            crate::kernel::Backing::File { shared: false, .. }
                                        )
                                    {
                                        return Err(format!(
                                            "swap entry in a shared VMA at {a:#x}"
                                        ));
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
    }
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
    // Unread fault messages belong to blocked accesses.
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

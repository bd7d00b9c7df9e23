//! Snapshots of sparse private anonymous memory on the real kernel: only the 2 MiB blocks
//! holding a populated page are write-protected and copied, the page tables of the rest are
//! never allocated, and the image holds what was populated at the snapshot point, nothing
//! written after it.
//!
//! The only test of its binary: it compares this process's page-table memory (`VmPTE`)
//! before and after, which other tests running beside it would disturb.

mod common;

use std::sync::Mutex;

use uffd_wp::backend::linux::LinuxMm;
use uffd_wp::engine::snapshot::{self, ProcessRanges, SnapshotOptions, Source};
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, Range, RangeSet};
use uffd_wp::seam::FnQuiesce;
use uffd_wp::sys::mem::{Backing, Mapping, Thp};

const P: u64 = PAGE_SIZE;

use common::bit57;

/// This process's page tables, bytes.
fn vm_pte() -> u64 {
    uffd_wp::testing::status_kb("self", "VmPTE") << 10
}

fn block(a: u64) -> Range {
    let s = a & !(PMD_SIZE - 1);
    Range::from_bounds(s, s + PMD_SIZE)
}

/// 4 GiB reserved, three pages populated: two before the snapshot, one by the freeze itself
/// (after the engine's first scan, so only its scan inside the pause can find it). During the
/// copy, pages are written in each kind of place: a populated page (its old bytes must be in
/// the image), an unpopulated page of a protected block, a page of an untouched block (no
/// fault at all). Every run with and without pre-arming.
#[test]
fn sparse_memory_is_protected_and_copied_by_its_populated_blocks_only() {
    let Some(mm) = common::need("userfaultfd", LinuxMm::open()) else {
        return;
    };
    for prearm in [true, false] {
        one_snapshot(&mm, prearm);
    }
}

fn one_snapshot(mm: &LinuxMm, prearm: bool) {
    let len = 4u64 << 30;
    let m = Mapping::new(len, PMD_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
    let r = m.range();
    let (a, b, c) = (
        r.start() + P,
        r.start() + (1 << 30) + 3 * P,
        r.start() + (3 << 30) + 7 * P,
    );
    let (in_block, untouched) = (a + 5 * P, r.start() + (2 << 30));
    m.write(a, &[1; 8]).unwrap();
    m.write(b, &[2; 8]).unwrap();
    // Dense shared memory beside it, one page with nothing mapped but its data in the page
    // cache (a marker once protected, which the copier must not take for an empty page).
    let sh = Mapping::new(4 * P, P, Backing::SharedAnon, Thp::NoHuge).unwrap();
    let shr = sh.range();
    for p in shr.page_iter() {
        sh.write(p.start(), &[9; 8]).unwrap();
    }
    let zapped = shr.start() + P;
    sh.madvise(
        Range::from_bounds(zapped, zapped + P),
        rustix::mm::Advice::LinuxDontNeed,
    )
    .unwrap();
    let pte0 = vm_pte();
    let writer = Mutex::new(None);
    let during = Mutex::new(None);
    let freeze = || m.write(c, &[3; 8]).unwrap();
    let all = ProcessRanges {
        ranges: [r, shr].into_iter().collect(),
        sparse: RangeSet::single(r),
        ..ProcessRanges::default()
    };
    let opts = SnapshotOptions {
        prearm,
        ..SnapshotOptions::default()
    };
    let (img, rep) = snapshot::take_process(
        mm,
        &all,
        Source::Mm,
        &FnQuiesce(freeze, || {}),
        &opts,
        |_, _| {
            let mut d = during.lock().unwrap();
            if d.is_some() {
                return;
            }
            *d = Some(bit57(r));
            // Writes during the copy, from a thread of their own: a protected page waits
            // for the handler.
            let m = &m;
            let w = std::thread::scope(|s| {
                s.spawn(move || {
                    m.write(untouched, &[4; 8]).unwrap();
                    m.write(in_block, &[5; 8]).unwrap();
                    m.write(a, &[6; 8]).unwrap();
                    m.write(c, &[7; 8]).unwrap();
                })
                .join()
            });
            *writer.lock().unwrap() = Some(w.is_ok());
        },
    )
    .unwrap();
    let during = during
        .into_inner()
        .unwrap()
        .expect("progress during the copy");
    let blocks: RangeSet = [block(a), block(b), block(c)].into_iter().collect();
    assert_eq!(
        during, blocks,
        "prearm {prearm}: only the populated blocks are protected"
    );
    assert_eq!(writer.into_inner().unwrap(), Some(true));
    let pte_growth = vm_pte().saturating_sub(pte0);
    assert!(
        pte_growth < (1 << 20),
        "prearm {prearm}: page tables grew by {pte_growth} bytes (8 MiB for all of it)"
    );
    let first = |addr: u64| img.page(addr).unwrap()[0];
    assert_eq!(
        (first(a), first(b), first(c)),
        (1, 2, 3),
        "prearm {prearm}: populated at the snapshot point, the freeze's page too"
    );
    for p in shr.page_iter() {
        assert_eq!(
            first(p.start()),
            9,
            "prearm {prearm}: shared page {:#x}",
            p.start()
        );
    }
    assert_eq!(
        (first(in_block), first(untouched)),
        (0, 0),
        "prearm {prearm}: written after the snapshot point"
    );
    assert!(bit57(r).is_empty(), "nothing left protected");
    let outside = (len - blocks.bytes()) / P;
    let root = rustix::process::geteuid().is_root();
    if root {
        // The copier left every page but the three populated ones: it had found the page
        // written during the copy (in the first block) a marker before the write.
        assert_eq!(rep.unpopulated_pages, len / P - 3, "{rep:?}");
    } else {
        assert_eq!(rep.unpopulated_pages, outside, "{rep:?}");
    }
    assert!(bit57(shr).is_empty(), "nothing left protected");
    let data = img.data_in(r);
    assert!(
        data.bytes() <= if root { 4 * P } else { blocks.bytes() },
        "prearm {prearm}: the image holds {} bytes",
        data.bytes()
    );
    assert!(data.covers(&Range::from_bounds(c, c + P)));
    assert_eq!(rep.pages, len / P + 4, "all of it captured");
    assert!(rep.not_captured.is_empty(), "{:?}", rep.not_captured);
}

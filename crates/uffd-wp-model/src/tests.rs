//! Unit tests of the model core.

use uffd_wp::features::Features;
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range, RangeSet};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, Event, KernelReport, RegisterMode, ScanRequest, WpMode};
use uffd_wp::seam::{SCAN_WP_MATCHING, category};

use crate::*;

const P: u64 = PAGE_SIZE;

fn pages(r: Range, a: u64, b: u64) -> Range {
    Range::from_bounds(r.start() + a * P, r.start() + b * P)
}

fn open(sem: Semantics, uffd: UffdConfig) -> ModelMm {
    ModelMm::open(ModelConfig::with_semantics(sem), uffd).unwrap()
}

/// pagemap bits as the probe on the real kernel printed them: P S F W X.
fn flags(m: &Model, r: Range) -> String {
    m.pagemap(r)
        .iter()
        .map(|e| {
            let s: String = [(63, 'P'), (62, 'S'), (61, 'F'), (57, 'W'), (56, 'X')]
                .iter()
                .filter(|(b, _)| e >> b & 1 == 1)
                .map(|(_, c)| *c)
                .collect();
            if s.is_empty() { "-".to_string() } else { s }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn write(m: &Model, a: u64) {
    assert_eq!(m.write(a, b"Z").unwrap(), Progress::Done(()));
}

#[test]
fn tables_are_allocated_lazily_and_counted() {
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let r = m
        .map(4 * PUD_SIZE, PUD_SIZE, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    assert_eq!(
        m.table_counts(),
        TableCounts::default(),
        "mmap allocates nothing"
    );
    write(m, r.start());
    write(m, r.start() + 5 * P); // same PTE table
    write(m, r.start() + PMD_SIZE); // new PTE table
    write(m, r.start() + 2 * PUD_SIZE); // new PMD table and PTE table
    assert_eq!(
        m.table_counts(),
        TableCounts {
            pud: 1,
            pmd: 2,
            pte: 3
        }
    );
    // Protecting without markers allocates nothing...
    let wo = open(Semantics::Linux, UffdConfig::without_unpopulated());
    let m2 = wo.model();
    let r2 = m2
        .map(PUD_SIZE, PUD_SIZE, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    write(m2, r2.start());
    wo.register(r2, RegisterMode::WP).unwrap();
    let before = m2.alloc_stats().attempts;
    wo.writeprotect(r2, WpMode::Protect).unwrap();
    assert_eq!(m2.alloc_stats().attempts, before);
    // ...with markers, one PTE table per 2 MiB.
    mm.register(r, RegisterMode::WP).unwrap();
    mm.writeprotect(pages(r, 0, 512 * 8), WpMode::Protect)
        .unwrap();
    assert_eq!(
        m.table_counts().pte,
        3 + 6,
        "slots 2..8 of the first GiB got tables"
    );
    assert_eq!(flags(m, pages(r, 0, 2)), "PWX SW");
    m.check_invariants().unwrap();
    // munmap frees the tables it no longer needs.
    m.munmap(r).unwrap();
    assert_eq!(m.table_counts(), TableCounts::default());
    m.check_invariants().unwrap();
}

#[test]
fn pagemap_bits_match_the_real_kernel_probe() {
    // The same sequence as the probe run on this project's 6.18 machine; its output is quoted.
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let c = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(c, RegisterMode::WP).unwrap();
    write(m, c.start());
    mm.writeprotect(c, WpMode::Protect).unwrap();
    assert_eq!(flags(m, c), "PWX SW SW SW");
    m.read(c.start() + P, 1).unwrap();
    assert_eq!(
        flags(m, c),
        "PWX PW SW SW",
        "read of a marker maps the zero page, protected"
    );
    let mut b = [0u8; 1];
    mm.read_memory(c.start() + 2 * P, &mut b).unwrap();
    assert_eq!(
        flags(m, c),
        "PWX PW PW SW",
        "/proc/PID/mem read faults in too"
    );
    mm.writeprotect(c, WpMode::Unprotect { dontwake: false })
        .unwrap();
    assert_eq!(flags(m, c), "PX P P -");

    // memfd: protected pages become markers on MADV_PAGEOUT (even without swap), DONTNEED of
    // unprotected pages leaves nothing.
    let nm = ModelMm::open(
        ModelConfig::like_test_machine(),
        UffdConfig {
            features: Features::PAGEFAULT_FLAG_WP,
            user_mode_only: false,
        },
    )
    .unwrap();
    let m = nm.model();
    let d = m.map(4 * P, P, MapKind::Memfd).unwrap();
    nm.register(d, RegisterMode::WP).unwrap();
    write(m, d.start());
    write(m, d.start() + P);
    nm.writeprotect(pages(d, 0, 2), WpMode::Protect).unwrap();
    assert_eq!(flags(m, d), "PFWX PFWX - -");
    m.madvise(d, Advice::PageOut).unwrap();
    assert_eq!(flags(m, d), "SW SW - -");
    write(m, d.start() + 2 * P);
    write(m, d.start() + 3 * P);
    m.madvise(pages(d, 2, 4), Advice::DontNeed).unwrap();
    assert_eq!(flags(m, d), "SW SW - -");
    assert_eq!(m.peek(d.start() + 2 * P, 1), b"Z", "shmem keeps the data");
    // Anonymous MADV_PAGEOUT without swap leaves the pages.
    let e = m.map(2 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    write(m, e.start());
    write(m, e.start() + P);
    m.madvise(e, Advice::PageOut).unwrap();
    assert_eq!(flags(m, e), "PX PX");
    // THP: a read maps the huge zero page (PM_FILE), a write then a THP.
    let g = m.map(PMD_SIZE, PMD_SIZE, MapKind::Anon(Thp::Huge)).unwrap();
    m.read(g.start(), 1).unwrap();
    assert_eq!(flags(m, pages(g, 0, 2)), "PF PF");
    write(m, g.start() + P);
    assert_eq!(flags(m, pages(g, 0, 3)), "PX PX PX");
    m.check_invariants().unwrap();
}

#[test]
fn register_and_writeprotect_errnos() {
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let a = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    m.munmap(pages(a, 1, 2)).unwrap();
    // Registering over a gap works (observed: 0x17c for WP).
    assert_eq!(mm.register(a, RegisterMode::WP), Ok(0x17c));
    assert_eq!(mm.register(pages(a, 0, 1), RegisterMode(3)), Ok(0x17c));
    assert_eq!(
        mm.register(pages(a, 0, 1), RegisterMode::MISSING),
        Ok(0x13c)
    );
    assert_eq!(
        mm.register(pages(a, 1, 2), RegisterMode::WP),
        Err(Errno::INVAL)
    );
    assert_eq!(
        mm.writeprotect(pages(a, 1, 2), WpMode::Protect),
        Err(Errno::NOENT)
    );
    mm.register(a, RegisterMode::WP).unwrap();
    assert_eq!(mm.writeprotect(a, WpMode::Protect), Ok(()));
    assert_eq!(flags(m, a), "SW - SW SW");
    assert_eq!(mm.writeprotect_raw(a.start() + 1, P, 1), Err(Errno::INVAL));
    assert_eq!(mm.writeprotect_raw(a.start(), 0, 1), Err(Errno::INVAL));
    assert_eq!(
        mm.writeprotect_raw(a.start(), P, 3),
        Err(Errno::INVAL),
        "WP|DONTWAKE"
    );
    assert_eq!(mm.writeprotect_raw(a.start(), P, 4), Err(Errno::INVAL));
    assert_eq!(
        mm.writeprotect_raw(0, P, 1),
        Err(Errno::INVAL),
        "below mmap_min_addr"
    );
    // Unregistered tail: ENOENT, the prefix stays protected.
    let b = m.map(3 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(pages(b, 0, 2), RegisterMode::WP).unwrap();
    for i in 0..3 {
        write(m, b.start() + i * P);
    }
    assert_eq!(mm.writeprotect(b, WpMode::Protect), Err(Errno::NOENT));
    assert_eq!(flags(m, b), "PWX PWX PX");
    // Another uffd cannot register it (EBUSY) but can write-protect it.
    let other = m.open_uffd(UffdConfig::default()).unwrap();
    assert_eq!(
        other.register(pages(b, 0, 1), RegisterMode::WP),
        Err(Errno::BUSY)
    );
    other
        .writeprotect(pages(b, 0, 2), WpMode::Unprotect { dontwake: false })
        .unwrap();
    assert_eq!(flags(m, b), "PX PX PX");
    // ...but not unregister it (measured: EINVAL).
    assert_eq!(other.unregister(pages(b, 0, 2)), Err(Errno::INVAL));
    // A regular file can be registered for WP only with WP_ASYNC.
    let f = m.map(2 * P, P, MapKind::File { shared: true }).unwrap();
    assert_eq!(mm.register(f, RegisterMode::WP), Err(Errno::INVAL));
    let am = m.open_uffd(UffdConfig::async_wp()).unwrap();
    assert!(am.features().contains(Features::WP_UNPOPULATED));
    assert!(am.register(f, RegisterMode::WP).is_ok());
    assert_eq!(
        am.register(f, RegisterMode(3)),
        Err(Errno::INVAL),
        "MISSING on a file"
    );
    // Unknown features are refused by UFFDIO_API.
    assert_eq!(
        m.open_uffd(UffdConfig {
            features: Features(1 << 40),
            user_mode_only: false
        })
        .err(),
        Some(Errno::INVAL)
    );
    // After exit: ESRCH.
    m.exit();
    assert_eq!(mm.writeprotect(a, WpMode::Protect), Err(Errno::SRCH));
}

#[test]
fn thp_splits_on_partial_protection() {
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let r = m
        .map(2 * PMD_SIZE, PMD_SIZE, MapKind::Anon(Thp::Huge))
        .unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    write(m, r.start());
    write(m, r.start() + PMD_SIZE);
    let before = m.table_counts();
    assert_eq!(before.pte, 2, "two deposited tables");
    // Whole first THP: stays PMD-mapped.
    mm.writeprotect(pages(r, 0, 512), WpMode::Protect).unwrap();
    // Half of the second: split, only that half protected.
    mm.writeprotect(pages(r, 512, 768), WpMode::Protect)
        .unwrap();
    assert_eq!(
        m.table_counts(),
        before,
        "the split uses the deposited table"
    );
    let st = m.page_states(r);
    assert!(st[..768].iter().all(|s| s.present && s.uffd_wp));
    assert!(st[768..].iter().all(|s| s.present && !s.uffd_wp));
    let huge = m
        .scan(&ScanRequest {
            start: r.start(),
            end: r.end(),
            category_mask: category::HUGE,
            return_mask: category::HUGE,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(huge.regions.len(), 1);
    assert_eq!(
        (huge.regions[0].start, huge.regions[0].end),
        (r.start(), r.start() + PMD_SIZE)
    );
    // A sync write to the protected THP waits; un-protecting 4 KiB splits it and lets it go.
    let w = m.write(r.start() + 3 * P, b"x").unwrap();
    let Progress::Blocked(id) = w else {
        panic!("write should wait")
    };
    let ev = mm.read_events(8).unwrap();
    assert_eq!(
        ev,
        vec![Event::PageFault {
            flags: 3,
            address: r.start() + 3 * P,
            tid: 1
        }]
    );
    mm.writeprotect(pages(r, 3, 4), WpMode::Unprotect { dontwake: false })
        .unwrap();
    assert_eq!(m.completion(id), Some(Completion::Done));
    assert_eq!(m.peek(r.start() + 3 * P, 1), b"x");
    assert!(m.page_states(pages(r, 0, 3)).iter().all(|s| s.uffd_wp));
    m.check_invariants().unwrap();
}

#[test]
fn sync_writes_wait_until_unprotected() {
    // Sync: the write waits until un-protected; a wake without un-protecting re-faults.
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let r = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    write(m, r.start());
    mm.writeprotect(r, WpMode::Protect).unwrap();
    let Progress::Blocked(id) = m.write(r.start(), b"A").unwrap() else {
        panic!()
    };
    assert!(mm.wait_event(0).unwrap());
    assert_eq!(mm.read_events(4).unwrap().len(), 1);
    mm.wake(r).unwrap();
    assert!(m.is_waiting(id), "still protected: faults again");
    assert_eq!(mm.read_events(4).unwrap().len(), 1, "a new message");
    mm.writeprotect(pages(r, 0, 1), WpMode::Unprotect { dontwake: true })
        .unwrap();
    assert!(m.is_waiting(id), "DONTWAKE");
    mm.wake(pages(r, 0, 1)).unwrap();
    assert_eq!(m.completion(id), Some(Completion::Done));
    // A marker page written in sync mode: the page is allocated protected, then the fault.
    let Progress::Blocked(id2) = m.write(r.start() + P, b"B").unwrap() else {
        panic!()
    };
    assert_eq!(flags(m, pages(r, 1, 2)), "PWX");
    mm.writeprotect(r, WpMode::Unprotect { dontwake: false })
        .unwrap();
    assert_eq!(m.completion(id2), Some(Completion::Done));
    // Kernel-mode write with UFFD_USER_MODE_ONLY: EFAULT instead of waiting.
    let umo = m
        .open_uffd(UffdConfig {
            user_mode_only: true,
            ..UffdConfig::default()
        })
        .unwrap();
    let r2 = m.map(P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    umo.register(r2, RegisterMode::WP).unwrap();
    umo.writeprotect(r2, WpMode::Protect).unwrap();
    assert_eq!(
        m.write_as(
            r2.start(),
            b"k",
            Who {
                tid: 2,
                kernel: true
            }
        ),
        Err(Errno::FAULT)
    );
}

#[test]
fn async_writes_clear_the_bit_and_read_as_written() {
    // Async: the kernel clears the bit; the page reads as written.
    let am = open(Semantics::Linux, UffdConfig::async_wp());
    let m = am.model();
    let r = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    am.register(r, RegisterMode::WP).unwrap();
    am.writeprotect(r, WpMode::Protect).unwrap();
    write(m, r.start() + 2 * P);
    assert_eq!(flags(m, r), "SW SW PX SW");
    assert!(!am.wait_event(0).unwrap(), "no message in async mode");
    let dirty = am
        .scan_all(&ScanRequest {
            start: r.start(),
            end: r.end(),
            flags: SCAN_WP_MATCHING,
            category_mask: category::WRITTEN,
            return_mask: category::WRITTEN,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(dirty.regions.len(), 1);
    assert_eq!(dirty.regions[0].start, r.start() + 2 * P);
    assert_eq!(flags(m, r), "SW SW PWX SW", "WP_MATCHING re-protected it");
}

#[test]
fn dma_writes_through_a_pin_bypass_the_protection() {
    // DMA through a long-term pin: no fault, the bit stays, nothing reads as written.
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let r = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    let pin = m
        .pin(pages(r, 1, 3), PinFlags::IO_URING)
        .unwrap()
        .done()
        .unwrap();
    assert_eq!(m.vm_pin_pages(), 2);
    mm.writeprotect(r, WpMode::Protect).unwrap();
    m.dma_write(pin, 10, b"dma").unwrap();
    assert_eq!(m.peek(r.start() + P + 10, 3), b"dma");
    assert!(m.page_states(pages(r, 1, 3)).iter().all(|s| s.uffd_wp));
    assert!(!mm.wait_event(0).unwrap());
    assert_eq!(mm.pinned(r).unwrap(), RangeSet::single(pages(r, 1, 3)));
    // The pin survives MADV_DONTNEED: DMA lands in the orphaned page.
    m.madvise(pages(r, 1, 2), Advice::DontNeed).unwrap();
    m.dma_write(pin, 0, b"lost").unwrap();
    assert_eq!(m.peek(r.start() + P, 4), [0, 0, 0, 0]);
    m.unpin(pin).unwrap();
    assert_eq!(m.vm_pin_pages(), 0);
    m.check_invariants().unwrap();
}

/// The kernel-notes recipe: 2 GiB, first page and one page per 2 MiB of the second GiB touched,
/// 256 PTE tables allowed.
fn recipe(sem: Semantics) -> (ModelMm, Range) {
    let mm = open(sem, UffdConfig::default());
    let m = mm.model();
    let r = m
        .map(2 * PUD_SIZE, PUD_SIZE, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    write(m, r.start());
    for s in 512..1024 {
        write(m, r.start() + s * PMD_SIZE);
    }
    m.set_alloc_policy(FailPolicy::Budget(256));
    (mm, r)
}

fn slots(set: &RangeSet, r: Range) -> Vec<(u64, u64)> {
    set.offsets_from(r.start())
        .iter()
        .map(|[a, b]| (a / PMD_SIZE, b.div_ceil(PMD_SIZE)))
        .collect()
}

#[test]
fn lost_enomem_under_linux() {
    let (mm, r) = recipe(Semantics::Linux);
    // The raw call returns success...
    assert_eq!(mm.writeprotect(r, WpMode::Protect), Ok(()));
    // ...with slots [257, 512) unprotected, as reproduced on the real 6.18 kernel.
    let wp = mm.model().wp_set(r);
    assert_eq!(slots(&wp, r), vec![(0, 257), (512, 1024)]);
    mm.model().check_invariants().unwrap();
}

#[test]
fn no_lost_enomem_under_proposed() {
    let (mm, r) = recipe(Semantics::Proposed);
    assert_eq!(mm.writeprotect(r, WpMode::Protect), Err(Errno::NOMEM));
    assert_eq!(
        slots(&mm.model().wp_set(r), r),
        vec![(0, 257)],
        "stops at the failure"
    );
    // The report call keeps the errno and says where it stopped: slot 257, the first PTE
    // table the budget refused; the rest (767 slots) is not protected.
    let (mm, r) = recipe(Semantics::Proposed);
    let k = mm.writeprotect_report(r, WpMode::Protect, false);
    assert_eq!(k.result, Err(Errno::NOMEM));
    assert_eq!(k.done, 257 * PMD_SIZE);
    assert_eq!(k.stop(r), r.start() + 257 * PMD_SIZE);
    assert_eq!(k.pinned, 0);
    assert_eq!(r.len() - k.done, mm.model().bytes_not_protected(r, false));
    assert_eq!(slots(&mm.model().wp_set(r), r), vec![(0, 257)]);
    // Checks before the walk write done = 0: MODE_SKIP_PINNED without MODE_WP, unknown bits.
    let (mm, r) = recipe(Semantics::Proposed);
    for mode in [4, 8, 1 | 2] {
        let k = mm.writeprotect_report_raw(r.start(), r.len(), mode);
        assert_eq!((k.result, k.done, k.pinned), (Err(Errno::INVAL), 0, 0));
    }
    assert!(mm.model().wp_set(r).is_empty());
    // Linux has no such command: EINVAL (userfaultfd_ioctl()'s default), nothing written,
    // nothing protected; and it does not offer the feature bits.
    let (lm, r) = recipe(Semantics::Linux);
    assert_eq!(
        lm.writeprotect_report(r, WpMode::Protect, false),
        KernelReport::unsupported()
    );
    assert!(lm.model().wp_set(r).is_empty());
    let report_bits = Features::WP_REPORT.with(Features::WP_SKIP_PINNED);
    assert!(!lm.model().offered_features().contains(Features::WP_REPORT));
    assert!(mm.model().offered_features().contains(report_bits));
    let ask = UffdConfig::default().with_report_if(Features(!0));
    assert_eq!(lm.model().open_uffd(ask).err(), Some(Errno::INVAL));
}

/// The report call's `done` for each way the walk stops: an unregistered VMA (ENOENT at its
/// start), no VMA at all (ENOENT, 0), a gap inside the prefix (counted), success (the whole
/// length), pinned pages with and without MODE_SKIP_PINNED, and an un-protect.
#[test]
fn report_done_for_each_stop() {
    let mm = open(
        Semantics::Proposed,
        UffdConfig::default().with_report_if(Features(PROPOSED_FEATURES)),
    );
    let m = mm.model();
    let a = m.map(16 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(pages(a, 0, 8), RegisterMode::WP).unwrap();
    m.populate(a, true).unwrap();
    // Pages [0, 8) registered, [8, 16) not: ENOENT at page 8, the prefix protected.
    let k = mm.writeprotect_report(a, WpMode::Protect, false);
    assert_eq!((k.result, k.done), (Err(Errno::NOENT), 8 * P));
    assert_eq!(m.wp_set(a), RangeSet::single(pages(a, 0, 8)));
    // No VMA at all: ENOENT, done 0.
    let gap = pages(a, 16, 20);
    let k = mm.writeprotect_report(gap, WpMode::Protect, false);
    assert_eq!((k.result, k.done), (Err(Errno::NOENT), 0));
    // A gap inside the prefix counts as done.
    mm.register(pages(a, 8, 16), RegisterMode::WP).unwrap();
    m.munmap(pages(a, 4, 6)).unwrap();
    let k = mm.writeprotect_report(a, WpMode::Protect, false);
    assert_eq!((k.result, k.done, k.pinned), (Ok(()), a.len(), 0));
    // Pinned pages: without the mode they are protected like the rest; with it they are left
    // writable and counted.
    mm.writeprotect(a, WpMode::Unprotect { dontwake: false })
        .unwrap();
    let pin = match m.pin(pages(a, 10, 12), PinFlags::IO_URING).unwrap() {
        Progress::Done(p) => p,
        Progress::Blocked(_) => panic!("pinning waits"),
    };
    let k = mm.writeprotect_report(pages(a, 8, 16), WpMode::Protect, true);
    assert_eq!((k.result, k.done, k.pinned), (Ok(()), 8 * P, 2 * P));
    assert_eq!(
        m.wp_set(pages(a, 8, 16)),
        RangeSet::from_ranges([pages(a, 8, 10), pages(a, 12, 16)])
    );
    let k = mm.writeprotect_report(pages(a, 8, 16), WpMode::Protect, false);
    assert_eq!((k.result, k.done, k.pinned), (Ok(()), 8 * P, 0));
    // Already protected, a pinned page stays so and is not counted: `pinned` is what the
    // call left writable.
    let k = mm.writeprotect_report(pages(a, 8, 16), WpMode::Protect, true);
    assert_eq!((k.pinned, m.wp_set(pages(a, 8, 16)).pages()), (0, 8));
    // Un-protect through the report call.
    let k = mm.writeprotect_report(
        pages(a, 8, 16),
        WpMode::Unprotect { dontwake: false },
        false,
    );
    assert_eq!((k.result, k.done), (Ok(()), 8 * P));
    assert!(m.wp_set(pages(a, 8, 16)).is_empty());
    m.unpin(pin).unwrap();
    m.check_invariants().unwrap();
}

#[test]
fn odd_errnos_from_the_sum() {
    // 2 GiB; slot 0 of each PUD has an (emptied) PTE table, nothing else; no allocation works.
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let r = m
        .map(2 * PUD_SIZE, PUD_SIZE, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    let at = |off: u64| r.start() + off;
    for a in [at(0), at(PUD_SIZE), at(PUD_SIZE - P)] {
        write(m, a);
        m.madvise(Range::from_bounds(a, a + P), Advice::DontNeed)
            .unwrap();
    }
    m.set_alloc_policy(FailPolicy::Budget(0));
    let span = |a: u64, b: u64| Range::from_bounds(at(a), at(b));
    // Within one PUD the failure replaces the count (`pages = -ENOMEM`): ENOMEM.
    assert_eq!(
        mm.writeprotect(span(PMD_SIZE - 5 * P, 2 * PMD_SIZE), WpMode::Protect),
        Err(Errno::NOMEM)
    );
    // Across a PUD boundary the other PUD's count is added: 5 markers in PUD 0 (slot 511 has a
    // table), then PUD 1 slot 0 (512 markers) and slot 1 failing: 5 - 12 = -7 (E2BIG).
    assert_eq!(
        mm.writeprotect(
            span(PUD_SIZE - 5 * P, PUD_SIZE + PMD_SIZE + P),
            WpMode::Protect
        ),
        Err(Errno::from_raw_os_error(7))
    );
    // Two failures: slot 510 of PUD 0 fails at once, slot 1 of PUD 1 too: -24 (EMFILE).
    assert_eq!(
        mm.writeprotect(
            span(PUD_SIZE - 2 * PMD_SIZE, PUD_SIZE + PMD_SIZE + P),
            WpMode::Protect
        ),
        Err(Errno::MFILE)
    );
    // Enough pages elsewhere: success with the failure lost.
    assert_eq!(
        mm.writeprotect(
            span(PUD_SIZE - 20 * P, PUD_SIZE + PMD_SIZE + P),
            WpMode::Protect
        ),
        Ok(())
    );
    assert!(
        !m.wp_set(span(PUD_SIZE + PMD_SIZE, PUD_SIZE + PMD_SIZE + P))
            .covers(&span(PUD_SIZE + PMD_SIZE, PUD_SIZE + PMD_SIZE + P))
    );
    m.check_invariants().unwrap();
}

#[test]
fn mmap_changing_gives_eagain() {
    let mm = open(
        Semantics::Linux,
        UffdConfig {
            features: UffdConfig::default().features.with(Features::EVENT_REMOVE),
            user_mode_only: false,
        },
    );
    let m = mm.model();
    let r = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    write(m, r.start());
    let Progress::Blocked(id) = m.madvise(pages(r, 0, 1), Advice::DontNeed).unwrap() else {
        panic!("DONTNEED waits for the REMOVE event to be read")
    };
    assert_eq!(mm.writeprotect(r, WpMode::Protect), Err(Errno::AGAIN));
    assert_eq!(flags(m, pages(r, 0, 1)), "PX", "not zapped yet");
    let ev = mm.read_events(4).unwrap();
    assert_eq!(
        ev,
        vec![Event::Remove {
            start: r.start(),
            end: r.start() + P
        }]
    );
    assert_eq!(m.completion(id), Some(Completion::Done));
    assert_eq!(flags(m, pages(r, 0, 1)), "-");
    assert_eq!(mm.writeprotect(r, WpMode::Protect), Ok(()));
}

#[test]
fn closing_the_uffd_releases_protection_and_wakes() {
    let m = Model::new(ModelConfig::default());
    let mm = m.open_uffd(UffdConfig::default()).unwrap();
    let r = m.map(2 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    write(&m, r.start());
    mm.writeprotect(r, WpMode::Protect).unwrap();
    let Progress::Blocked(id) = m.write(r.start(), b"q").unwrap() else {
        panic!()
    };
    drop(mm);
    assert_eq!(m.completion(id), Some(Completion::Done));
    assert_eq!(flags(&m, r), "PX -");
    m.check_invariants().unwrap();
}

#[test]
fn scan_max_pages_and_walk_end() {
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let r = m.map(64 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    for i in (0..64).step_by(2) {
        write(m, r.start() + i * P);
    }
    let req = ScanRequest {
        start: r.start(),
        end: r.end(),
        category_mask: category::PRESENT,
        return_mask: category::PRESENT,
        max_pages: 5,
        ..Default::default()
    };
    let raw = m.pagemap_scan(&req, 100);
    assert_eq!(raw.result, Ok(5));
    assert_eq!(
        raw.walk_end,
        r.start() + 9 * P + P,
        "stopped after the 5th page"
    );
    // A vector of 3: three regions, walk_end where the 4th would start.
    let raw = m.pagemap_scan(
        &ScanRequest {
            max_pages: 0,
            ..req
        },
        3,
    );
    assert_eq!(raw.result, Ok(3));
    assert_eq!(raw.walk_end, r.start() + 6 * P);
    // Bad flags.
    assert_eq!(
        m.pagemap_scan(&ScanRequest { flags: 4, ..req }, 3).result,
        Err(Errno::INVAL)
    );
    // CHECK_WPASYNC on a VMA without async WP: EPERM.
    let raw = m.pagemap_scan(
        &ScanRequest {
            flags: uffd_wp::seam::SCAN_CHECK_WPASYNC,
            ..req
        },
        3,
    );
    assert_eq!(raw.result, Err(Errno::PERM));
    assert_eq!(raw.walk_end, r.end());
}

#[test]
fn wp_set_equals_pagemap_bit_57() {
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let r = m
        .map(3 * PMD_SIZE, PMD_SIZE, MapKind::Anon(Thp::Huge))
        .unwrap();
    let h = m.map(2 * PMD_SIZE, PMD_SIZE, MapKind::Hugetlb).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    mm.register(h, RegisterMode::WP).unwrap();
    write(m, r.start());
    write(m, r.start() + PMD_SIZE + 9 * P);
    write(m, h.start());
    mm.writeprotect(pages(r, 3, 700), WpMode::Protect).unwrap();
    mm.writeprotect(h, WpMode::Protect).unwrap();
    m.madvise(pages(r, 10, 12), Advice::DontNeed).unwrap();
    for x in [r, h] {
        assert_eq!(
            m.wp_set(x),
            uffd_wp::seam::pages_where(x, &m.page_states(x), |s| s.uffd_wp)
        );
    }
}

#[test]
fn stale_bits_survive_reregistration_and_close() {
    // Reproduced on the 6.18 machine: WP-protect, re-register MISSING only, close the uffd:
    // "PWX SW SW SW" stays; then a write to page 0 and a read of page 1: "PWX P SW SW".
    let m = Model::new(ModelConfig::default());
    let mm = m.open_uffd(UffdConfig::default()).unwrap();
    let a = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(a, RegisterMode::WP).unwrap();
    write(&m, a.start());
    mm.writeprotect(a, WpMode::Protect).unwrap();
    assert_eq!(flags(&m, a), "PWX SW SW SW");
    mm.register(a, RegisterMode::MISSING).unwrap();
    assert_eq!(flags(&m, a), "PWX SW SW SW");
    drop(mm);
    assert_eq!(flags(&m, a), "PWX SW SW SW");
    write(&m, a.start());
    m.read(a.start() + P, 1).unwrap();
    assert_eq!(flags(&m, a), "PWX P SW SW");
    m.check_invariants().unwrap();
}

#[test]
fn scan_of_unpopulated_pages_matches_the_machine() {
    // Measured on the 6.18.44 machine (see pagemap.rs): written in every path, markers armed.
    use uffd_wp::seam::category::{PRESENT, WRITTEN};
    let regions = |m: &Model, r: Range, flags: u64, mask: u64, ret: u64| -> Vec<(u64, u64, u64)> {
        let raw = m.pagemap_scan(
            &ScanRequest {
                flags,
                start: r.start(),
                end: r.end(),
                category_mask: mask,
                return_mask: ret,
                ..Default::default()
            },
            64,
        );
        raw.regions
            .iter()
            .map(|g| {
                (
                    (g.start - r.start()) / P,
                    (g.end - r.start()) / P,
                    g.categories,
                )
            })
            .collect()
    };
    for (mask, ret, want) in [
        (WRITTEN, WRITTEN, vec![(0, 4, WRITTEN)]),
        (
            WRITTEN,
            WRITTEN | PRESENT,
            vec![(0, 1, WRITTEN | PRESENT), (1, 4, WRITTEN)],
        ),
    ] {
        let am = open(Semantics::Linux, UffdConfig::async_wp());
        let m = am.model();
        let a = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
        am.register(a, RegisterMode::WP).unwrap();
        write(m, a.start());
        assert_eq!(regions(m, a, SCAN_WP_MATCHING, mask, ret), want);
        assert_eq!(flags(m, a), "PWX SW SW SW");
    }
    // A hole (no page table) in an async VMA: written, and armed.
    let am = open(Semantics::Linux, UffdConfig::async_wp());
    let m = am.model();
    let b = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    am.register(b, RegisterMode::WP).unwrap();
    assert_eq!(
        regions(m, b, SCAN_WP_MATCHING, WRITTEN, WRITTEN),
        vec![(0, 4, WRITTEN)]
    );
    assert_eq!(flags(m, b), "SW SW SW SW");
    // Unregistered anonymous memory and a memfd: none PTEs and holes read as written too.
    let c = m.map(4 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    assert_eq!(
        regions(m, c, 0, 0, WRITTEN | PRESENT),
        vec![(0, 4, WRITTEN)]
    );
    write(m, c.start());
    assert_eq!(
        regions(m, c, 0, 0, WRITTEN | PRESENT),
        vec![(0, 1, WRITTEN | PRESENT), (1, 4, WRITTEN)]
    );
    let d = m.map(4 * P, P, MapKind::Memfd).unwrap();
    write(m, d.start());
    assert_eq!(
        regions(m, d, 0, 0, 0x1ff),
        vec![(0, 1, WRITTEN | PRESENT | category::FILE), (1, 4, WRITTEN)]
    );
}

#[test]
fn unregister_does_not_wake_wp_faults() {
    // Measured on the 6.18 machine: a kernel-mode write blocked on a WP-only range stays
    // blocked through UFFDIO_UNREGISTER and goes on after UFFDIO_WAKE.
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let a = m.map(P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(a, RegisterMode::WP).unwrap();
    write(m, a.start());
    mm.writeprotect(a, WpMode::Protect).unwrap();
    let who = Who {
        tid: 9,
        kernel: true,
    };
    let Progress::Blocked(id) = m.write_as(a.start(), b"hello", who).unwrap() else {
        panic!("the write should wait")
    };
    assert_eq!(mm.read_events(4).unwrap().len(), 1);
    mm.unregister(a).unwrap();
    assert!(m.is_waiting(id));
    assert_eq!(flags(m, a), "PX");
    mm.wake(a).unwrap();
    assert_eq!(m.completion(id), Some(Completion::Done));
    assert_eq!(m.peek(a.start(), 5), b"hello");
}

/// VMAs merge as on the 6.18 machine (checked there with /proc/self/maps and smaps): two
/// adjacent fresh anonymous maps with the same advice become one VMA, which a THP can then
/// back; two that each got an `anon_vma` first stay apart even once their flags agree.
#[test]
fn adjacent_vmas_merge_unless_their_anon_vmas_differ() {
    let mm = open(Semantics::Linux, UffdConfig::default());
    let m = mm.model();
    let span = |a: u64, b: u64| {
        m.vmas()
            .iter()
            .filter(|v| v.start < b && v.end > a)
            .map(|v| (v.start - a, v.end - a))
            .collect::<Vec<_>>()
    };
    let half = PMD_SIZE / 2;
    let x = m
        .map(4 * PMD_SIZE, PMD_SIZE, MapKind::Anon(Thp::NoHuge))
        .unwrap()
        .start();
    let at = |a: u64, t| {
        m.map_at(Some(a), half, P, MapKind::Anon(Thp::Default))
            .unwrap();
        m.madvise(Range::new(a, half).unwrap(), t).unwrap();
    };
    // Fresh and fresh: one VMA, backed by a THP at the first write.
    at(x, Advice::HugePage);
    at(x + half, Advice::HugePage);
    assert_eq!(span(x, x + PMD_SIZE), vec![(0, PMD_SIZE)]);
    write(m, x);
    assert!(
        m.page_states(Range::new(x, PMD_SIZE).unwrap())
            .iter()
            .all(|s| s.present)
    );
    // Each written while their advice differed: two anon_vmas, never merged.
    let y = x + 2 * PMD_SIZE;
    at(y, Advice::HugePage);
    write(m, y);
    at(y + half, Advice::NoHugePage);
    write(m, y + half);
    assert_eq!(span(y, y + PMD_SIZE).len(), 2);
    m.madvise(Range::new(y + half, half).unwrap(), Advice::HugePage)
        .unwrap();
    assert_eq!(span(y, y + PMD_SIZE), vec![(0, half), (half, PMD_SIZE)]);
}

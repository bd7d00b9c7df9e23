//! Every page-table allocation of a protect, failed in turn, under both semantics.
//!
//! For layouts whose range spans several PMDs, PUDs (and a PGD boundary), each allocation index
//! the protect needs is failed alone (`FailPolicy::Nth`) and as the start of a budget that never
//! comes back (`FailPolicy::Budget`). Each time, on a freshly built identical model:
//! - the exact engine's `WpReport` (protect::write_protect on the model) partitions the request
//!   and its `protected` set equals the model's true page state;
//! - under `proposed` the uffd has `WP_REPORT`, so the engine takes the kernel's report (one
//!   call per target, read-back only past the prefix after a failure); and one raw
//!   `UFFDIO_WRITEPROTECT_REPORT` over the range returns the same errno as the plain ioctl,
//!   a `done` prefix that the model checks is in the requested state and past which nothing is
//!   protected, `pinned` equal to the pinned bytes of the prefix with `MODE_SKIP_PINNED`;
//! - under `linux`, one raw call over the whole range is also made, and the cases where it
//!   returned success while leaving pages unprotected (the lost ENOMEM) are counted.

use uffd_wp::engine::protect::{Exactness, OnError, WpOptions, write_protect};
use uffd_wp::features::Features;
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range, RangeSet};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, RegisterMode, WpMode};
use uffd_wp_model::{
    FailPolicy, MapKind, ModelConfig, ModelMm, PROPOSED_FEATURES, PinFlags, Progress, Semantics,
    Thp, UffdConfig,
};

const P: u64 = PAGE_SIZE;
const PGDIR: u64 = 1 << 39;

/// A layout: builds a fresh model and returns the uffd and the range to protect.
struct Layout {
    name: &'static str,
    build: fn(Semantics) -> (ModelMm, Range),
    /// Check every index (else every `stride`th in debug builds).
    always_full: bool,
    /// Has pinned pages: also run with `skip_pinned`.
    pins: bool,
}

fn touch(mm: &ModelMm, a: u64) {
    assert_eq!(mm.model().write(a, b"t").unwrap(), Progress::Done(()));
}

thread_local! {
    /// Layouts built on this thread do not ask for the report ([`same_figures`]).
    static WITHOUT_REPORT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A uffd that asks for the write-protect report where the semantics offers it (unless
/// [`WITHOUT_REPORT`]).
fn open(sem: Semantics) -> ModelMm {
    let uffd = UffdConfig::default().with_report_if(Features(PROPOSED_FEATURES));
    let uffd = match sem {
        Semantics::Proposed if !WITHOUT_REPORT.get() => uffd,
        _ => UffdConfig::default(),
    };
    ModelMm::open(ModelConfig::with_semantics(sem), uffd).unwrap()
}

/// PUD 0's last 3 slots (one populated), PUDs 1 and 2 populated except every 64th slot, PUD 3's
/// first 3 slots (no PMD table yet).
fn spans_puds(sem: Semantics) -> (ModelMm, Range) {
    let mm = open(sem);
    let m = mm.model();
    let base = m
        .map_at(
            Some(16 * PUD_SIZE),
            4 * PUD_SIZE,
            PUD_SIZE,
            MapKind::Anon(Thp::NoHuge),
        )
        .unwrap()
        .start();
    let r = Range::from_bounds(
        base + PUD_SIZE - 3 * PMD_SIZE,
        base + 3 * PUD_SIZE + 3 * PMD_SIZE,
    );
    mm.register(r, RegisterMode::WP).unwrap();
    touch(&mm, base + PUD_SIZE - PMD_SIZE + 7 * P);
    for s in 512..1536 {
        if s % 64 != 5 {
            touch(&mm, base + s * PMD_SIZE + (s % 512) * P);
        }
    }
    (mm, r)
}

/// Across a 512 GiB PGD boundary: the upper PGD entry has no PUD table yet.
fn spans_pgd(sem: Semantics) -> (ModelMm, Range) {
    let mm = open(sem);
    let m = mm.model();
    let b = PGDIR - 4 * PMD_SIZE;
    let r = m
        .map_at(Some(b), 8 * PMD_SIZE, PMD_SIZE, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    touch(&mm, b);
    touch(&mm, b + 2 * PMD_SIZE + P);
    (mm, r)
}

/// Several VMAs across a PUD boundary: a THP (split by the partial range), a gap, a memfd, and
/// anonymous memory with swap entries and a pinned page.
fn mixed(sem: Semantics) -> (ModelMm, Range) {
    let mm = open(sem);
    let m = mm.model();
    let base = 40 * PUD_SIZE;
    let thp = m
        .map_at(
            Some(base - 4 * PMD_SIZE),
            2 * PMD_SIZE,
            PMD_SIZE,
            MapKind::Anon(Thp::Huge),
        )
        .unwrap();
    touch(&mm, thp.start() + P);
    touch(&mm, thp.start() + PMD_SIZE + P);
    let fd = m
        .map_at(
            Some(base - PMD_SIZE),
            2 * PMD_SIZE,
            PMD_SIZE,
            MapKind::Memfd,
        )
        .unwrap();
    touch(&mm, fd.start() + 3 * P);
    let anon = m
        .map_at(
            Some(base + PMD_SIZE),
            3 * PMD_SIZE,
            PMD_SIZE,
            MapKind::Anon(Thp::NoHuge),
        )
        .unwrap();
    touch(&mm, anon.start());
    touch(&mm, anon.start() + P);
    touch(&mm, anon.start() + 2 * PMD_SIZE);
    m.madvise(
        Range::from_bounds(anon.start(), anon.start() + P),
        uffd_wp_model::Advice::PageOut,
    )
    .unwrap();
    m.pin(
        Range::from_bounds(anon.start() + P, anon.start() + 2 * P),
        PinFlags::IO_URING,
    )
    .unwrap();
    for v in [thp, fd, anon] {
        mm.register(v, RegisterMode::WP).unwrap();
    }
    let r = Range::from_bounds(thp.start() + 7 * P, anon.end() - 9 * P);
    (mm, r)
}

/// Hugetlb across a PUD boundary, the upper PUD without a PMD table.
fn hugetlb(sem: Semantics) -> (ModelMm, Range) {
    let mm = open(sem);
    let m = mm.model();
    let base = 64 * PUD_SIZE - 4 * PMD_SIZE;
    let r = m
        .map_at(Some(base), 8 * PMD_SIZE, PMD_SIZE, MapKind::Hugetlb)
        .unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    touch(&mm, base + PMD_SIZE);
    (mm, r)
}

/// The kernel-notes recipe (2 GiB, first page and one page per 2 MiB of the second GiB).
fn recipe(sem: Semantics) -> (ModelMm, Range) {
    let mm = open(sem);
    let m = mm.model();
    let r = m
        .map_at(
            Some(8 * PUD_SIZE),
            2 * PUD_SIZE,
            PUD_SIZE,
            MapKind::Anon(Thp::NoHuge),
        )
        .unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    touch(&mm, r.start());
    for s in 512..1024 {
        touch(&mm, r.start() + s * PMD_SIZE);
    }
    (mm, r)
}

const LAYOUTS: &[Layout] = &[
    Layout {
        name: "spans-puds",
        build: spans_puds,
        always_full: true,
        pins: false,
    },
    Layout {
        name: "spans-pgd",
        build: spans_pgd,
        always_full: true,
        pins: false,
    },
    Layout {
        name: "mixed",
        build: mixed,
        always_full: true,
        pins: true,
    },
    Layout {
        name: "hugetlb",
        build: hugetlb,
        always_full: true,
        pins: false,
    },
    Layout {
        name: "lost-enomem-recipe",
        build: recipe,
        always_full: false,
        pins: false,
    },
];

/// The engine's path: the kernel's report under `proposed` (one call over a range with no
/// pin to skip; nothing read back after a success over a fully mapped range, only the part
/// past the prefix after a failure), PUD-split calls under `linux`.
fn check_path(l: &Layout, sem: Semantics, rep: &uffd_wp::WpReport) {
    let what = format!("{} {sem:?}: {:?}", l.name, rep.provenance);
    match sem {
        Semantics::Linux => {
            assert_eq!(rep.provenance.exactness, Exactness::ReadBack, "{what}");
            assert!(rep.provenance.kernel.is_none(), "{what}");
        }
        Semantics::Proposed => {
            assert_eq!(rep.provenance.exactness, Exactness::KernelReport, "{what}");
            let k = rep.provenance.kernel.expect("kernel figures");
            if l.name == "mixed" {
                return; // a gap (read back) and, with skip_pinned, two targets
            }
            assert_eq!((rep.raw_calls, k.calls), (1, 1), "{what}");
            let past_prefix = rep.requested.len() - k.done;
            assert_eq!(rep.read_back_bytes, past_prefix, "{what}");
            assert_eq!(rep.error.is_some(), k.errno.is_some(), "{what}");
        }
    }
}

fn partition_ok(r: Range, rep: &uffd_wp::WpReport) -> bool {
    let all = rep.protected.union(&rep.skipped).union(&rep.not_protected);
    let disjoint = rep.protected.intersection(&rep.skipped).is_empty()
        && rep.protected.intersection(&rep.not_protected).is_empty()
        && rep.skipped.intersection(&rep.not_protected).is_empty();
    disjoint && all == RangeSet::single(r)
}

/// Under `proposed`, one raw `UFFDIO_WRITEPROTECT_REPORT` over a fresh layout with `policy`:
/// the same errno as the plain ioctl on another fresh copy, success covering the whole range,
/// nothing protected past `start + done` (the model itself checks that the prefix is in the
/// requested state), `pinned` the pinned bytes of the prefix with `skip`; the engine's bytes
/// not protected on a third copy (`engine_bytes`) are `len - done` (plus, in `mixed`, its gap).
fn report_case(l: &Layout, policy: FailPolicy, skip: bool, engine_bytes: u64) {
    let (pm, r) = (l.build)(Semantics::Proposed);
    pm.model().set_alloc_policy(policy);
    let k = pm.writeprotect_report(r, WpMode::Protect, skip);
    let (om, or) = (l.build)(Semantics::Proposed);
    om.model().set_alloc_policy(policy);
    let what = format!("{} {policy:?} skip={skip}: {k:?}", l.name);
    assert_eq!(k.result, om.writeprotect(or, WpMode::Protect), "{what}");
    assert!(k.done <= r.len() && k.done % P == 0, "{what}");
    if k.result.is_ok() {
        assert_eq!(k.done, r.len(), "{what}");
    } else {
        assert_eq!(k.result, Err(Errno::NOMEM), "{what}");
    }
    let prefix = k.prefix(r).map_or_else(RangeSet::new, RangeSet::single);
    let wp = pm.model().wp_set(r);
    assert!(
        wp.difference(&prefix).is_empty(),
        "{what}: protected past done"
    );
    let pinned = pm.model().pinned_pages(r).intersection(&prefix).bytes();
    assert_eq!(k.pinned, if skip { pinned } else { 0 }, "{what}");
    if l.name == "mixed" {
        assert!(engine_bytes >= r.len() - k.done, "{what}");
    } else {
        assert_eq!(engine_bytes, r.len() - k.done, "{what}");
    }
    pm.model().check_invariants().unwrap();
}

/// Under `proposed`, the engine's two paths on identical fresh layouts with `policy`: the
/// kernel's report and the read-back path (a uffd that does not ask for the report) give the
/// same protected, skipped and not-protected pages and the same failure kind; the failure's
/// address too, except where a gap lies between the failed call's start and the kernel's stop
/// (the read-back path names the gap's first page, the report path the first page at or after
/// the stop).
fn same_figures(l: &Layout, policy: FailPolicy, skip_pinned: bool) {
    let opts = WpOptions {
        skip_pinned,
        on_error: OnError::Stop,
    };
    let run = |without: bool| {
        WITHOUT_REPORT.set(without);
        let (mm, r) = (l.build)(Semantics::Proposed);
        WITHOUT_REPORT.set(false);
        mm.model().set_alloc_policy(policy);
        write_protect(&mm, r, &opts)
    };
    let (new, old) = (run(false), run(true));
    let what = format!("{} {policy:?} skip={skip_pinned}", l.name);
    match (new, old) {
        (Ok(n), Ok(o)) => {
            assert_eq!(n.provenance.exactness, Exactness::KernelReport, "{what}");
            assert_eq!(o.provenance.exactness, Exactness::ReadBack, "{what}");
            assert_eq!(
                (&n.protected, &n.skipped, &n.not_protected),
                (&o.protected, &o.skipped, &o.not_protected),
                "{what}"
            );
            let kind = |r: &uffd_wp::WpReport| r.error.as_ref().map(|e| (e.kind(), e.errno()));
            assert_eq!(kind(&n), kind(&o), "{what}");
            if l.name != "mixed" {
                let addr = |r: &uffd_wp::WpReport| r.error.as_ref().map(|e| e.addr());
                assert_eq!(addr(&n), addr(&o), "{what}");
            }
        }
        (Err(n), Err(o)) => assert_eq!((n.kind(), n.errno()), (o.kind(), o.errno()), "{what}"),
        (n, o) => panic!("{what}: report path {n:?}, read-back path {o:?}"),
    }
}

/// One case: a fresh model, `policy` set, the engine protects. Returns the report's
/// bytes-not-protected.
fn engine_case(l: &Layout, sem: Semantics, policy: FailPolicy, skip_pinned: bool) -> u64 {
    let (mm, r) = (l.build)(sem);
    mm.model().set_alloc_policy(policy);
    let opts = WpOptions {
        skip_pinned,
        on_error: OnError::Stop,
    };
    let truth_after;
    let bytes = match write_protect(&mm, r, &opts) {
        Ok(rep) => {
            assert!(
                partition_ok(r, &rep),
                "{} {sem:?} {policy:?}: not a partition",
                l.name
            );
            truth_after = mm.model().wp_set(r);
            assert_eq!(
                rep.protected, truth_after,
                "{} {sem:?} {policy:?}: report differs from the page tables",
                l.name
            );
            let pinned = mm.model().pinned_pages(r);
            if skip_pinned {
                assert_eq!(rep.skipped, pinned);
            }
            check_path(l, sem, &rep);
            rep.bytes_not_protected()
        }
        Err(e) => {
            // Nothing protected at all.
            assert!(
                mm.model().wp_set(r).is_empty(),
                "{} {sem:?} {policy:?}: Err({e}) but pages are protected",
                l.name
            );
            r.len()
        }
    };
    mm.model().check_invariants().unwrap();
    bytes
}

#[test]
fn every_allocation_failure_index() {
    let mut cases = 0u64;
    let mut lost = 0u64;
    let mut odd_errnos = 0u64;
    for l in LAYOUTS {
        // How many allocations a clean protect of the layout needs.
        let (mm, r) = (l.build)(Semantics::Linux);
        let before = mm.model().alloc_stats().attempts;
        mm.writeprotect(r, WpMode::Protect).unwrap();
        let n = mm.model().alloc_stats().attempts - before;
        assert!(n > 0, "{}: the protect allocates nothing", l.name);
        let stride = if l.always_full || !cfg!(debug_assertions) {
            1
        } else {
            37
        };
        for i in (1..=n + 1).step_by(stride) {
            for policy in [FailPolicy::Nth(i), FailPolicy::Budget(i - 1)] {
                for sem in [Semantics::Linux, Semantics::Proposed] {
                    for skip in [false, true] {
                        if skip && !l.pins {
                            continue;
                        }
                        let report_bytes = engine_case(l, sem, policy, skip);
                        cases += 1;
                        match sem {
                            Semantics::Proposed => {
                                report_case(l, policy, skip, report_bytes);
                                same_figures(l, policy, skip);
                                cases += 2;
                            }
                            Semantics::Linux if !skip => {
                                let (lm, lr) = (l.build)(sem);
                                lm.model().set_alloc_policy(policy);
                                let raw = lm.writeprotect(lr, WpMode::Protect);
                                let hole = lm.model().bytes_not_protected(lr, false) > 0;
                                match raw {
                                    Ok(()) if hole => lost += 1,
                                    Err(e) if e != Errno::NOMEM => odd_errnos += 1,
                                    _ => {}
                                }
                                cases += 1;
                            }
                            Semantics::Linux => {}
                        }
                    }
                }
            }
        }
        println!("{}: {} allocation indices", l.name, n);
    }
    println!(
        "exhaustive allocation failures: {cases} cases checked; under linux the raw call lost \
         the ENOMEM (success over a hole) in {lost} cases and returned an errno other than \
         ENOMEM in {odd_errnos}"
    );
    assert!(lost > 0, "the lost ENOMEM must show up");
}

#[test]
fn random_failures_with_retry() {
    // Seeded random failures; the engine's Retry policy either completes or reports exactly.
    let mut checked = 0;
    for seed in 0..40u64 {
        for sem in [Semantics::Linux, Semantics::Proposed] {
            let (mm, r) = spans_puds(sem);
            mm.model().set_alloc_policy(FailPolicy::Random {
                seed,
                per_million: 50_000,
            });
            let opts = WpOptions {
                skip_pinned: false,
                on_error: OnError::Retry {
                    attempts: 2,
                    backoff: std::time::Duration::ZERO,
                },
            };
            if let Ok(rep) = write_protect(&mm, r, &opts) {
                assert!(partition_ok(r, &rep));
                assert_eq!(rep.protected, mm.model().wp_set(r));
            }
            mm.model().check_invariants().unwrap();
            checked += 1;
        }
    }
    println!("random failures with retry: {checked} cases checked");
}

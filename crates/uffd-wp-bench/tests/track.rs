//! Kernel tests of the dirty tracker: epochs against the workload's ground truth (async and
//! sync WP), `walk_end` continuation with small vectors under `PM_SCAN_WP_MATCHING`, pins, and
//! nothing left protected after drop or an error.

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use uffd_wp::backend::inject::{InjectMm, Rule};
use uffd_wp::backend::linux::{Config, LinuxMm};
use uffd_wp::engine::track::{Method, Selection, TrackError, TrackOptions, Tracker};
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, ScanRequest};
use uffd_wp::sys::mem::{Backing, Mapping, Thp};
use uffd_wp::sys::pagemap::{Pagemap, SCAN_CHECK_WPASYNC, SCAN_WP_MATCHING, bits, category};
use uffd_wp_bench::workload::{Workload, WorkloadConfig};

/// A backend configured for `method`, or a skip naming what the kernel lacks.
fn backend(method: Method) -> Option<LinuxMm> {
    let sel = common::need(
        match method {
            Method::AsyncWp => "UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN",
            Method::SyncWp => "userfaultfd write-protection",
            Method::SoftDirty => "CONFIG_MEM_SOFT_DIRTY",
        },
        Selection::probe(Some(method)),
    )?;
    // Sync WP over unpopulated pages needs markers too.
    let cfg = match method {
        Method::SyncWp => Config {
            required: sel
                .config()
                .required
                .with(uffd_wp::features::Features::WP_UNPOPULATED),
            ..sel.config()
        },
        _ => sel.config(),
    };
    common::need("userfaultfd WP_UNPOPULATED", LinuxMm::open_with(cfg))
}

fn pages(r: Range, a: u64, b: u64) -> Range {
    Range::from_bounds(r.start() + a * PAGE_SIZE, r.start() + b * PAGE_SIZE)
}

fn page_set(r: Range, idx: impl IntoIterator<Item = u64>) -> RangeSet {
    idx.into_iter().map(|i| pages(r, i, i + 1)).collect()
}

/// Pagemap bit 57 of every page of `r`.
fn bit57(r: Range) -> RangeSet {
    let e = Pagemap::open_self()
        .unwrap()
        .entries(r.start(), r.pages())
        .unwrap();
    page_set(
        r,
        e.iter()
            .enumerate()
            .filter(|(_, x)| *x & bits::UFFD_WP != 0)
            .map(|(i, _)| i as u64),
    )
}

/// Lets the writers run until they wrote at least `n` more pages, then pauses them.
fn run_writers(w: &Workload, n: u64) {
    let before = w.writes();
    w.resume();
    while w.writes() < before + n {
        std::thread::yield_now();
    }
    w.pause();
}

/// Several epochs over a workload with 2 writers: each epoch's dirty set equals the pages the
/// writers recorded since the previous boundary, exactly; an epoch with the writers idle is
/// empty; after close nothing is protected.
fn epochs_match_ground_truth(method: Method) {
    let Some(mm) = backend(method) else { return };
    let w = Workload::start(WorkloadConfig {
        size: 32 << 20,
        threads: 2,
        ..Default::default()
    })
    .unwrap();
    let r = w.range();
    w.take_dirty();
    let mut t = Tracker::start(Arc::new(mm), r, method, TrackOptions::default()).unwrap();
    assert_eq!(bit57(r), RangeSet::single(r), "armed: all protected");
    for i in 0..6 {
        run_writers(&w, 500 + 700 * i);
        let e = t.epoch().unwrap();
        let truth = w.take_dirty();
        assert!(truth.pages() > 0, "the writers wrote");
        assert_eq!(e.index, i);
        assert_eq!(e.method, method);
        assert_eq!(e.pinned, RangeSet::new());
        assert_eq!(
            e.dirty,
            truth,
            "{method} epoch {i}: {} pages reported, {} written",
            e.dirty.pages(),
            truth.pages()
        );
        if method == Method::SyncWp {
            assert_eq!(e.faults, truth.pages(), "one fault per first write");
        }
        assert_eq!(bit57(r), RangeSet::single(r), "re-armed: all protected");
    }
    let e = t.epoch().unwrap();
    assert_eq!(e.dirty, RangeSet::new(), "idle epoch");
    t.close().unwrap();
    assert_eq!(bit57(r), RangeSet::new(), "nothing protected after close");
    run_writers(&w, 100);
}

#[test]
fn async_epochs_match_ground_truth() {
    epochs_match_ground_truth(Method::AsyncWp);
}

#[test]
fn sync_epochs_match_ground_truth() {
    epochs_match_ground_truth(Method::SyncWp);
}

/// `PAGEMAP_SCAN` with `WP_MATCHING` and a vector too small for the result: each call returns
/// what fits, re-protects exactly that, and `walk_end` says where to resume; resuming collects
/// every written page and leaves all of them protected. Checked with raw calls of 1 and 3
/// regions, and through the tracker (whose scan has room for 4096 regions per call) over 6000
/// separate regions.
#[test]
fn walk_end_continuation_with_small_vectors() {
    let Some(mm) = backend(Method::AsyncWp) else {
        return;
    };
    let mm = Arc::new(mm);
    let m = Mapping::new(64 << 20, 2 << 20, Backing::Anon, Thp::NoHuge).unwrap();
    let r = m.range();
    m.touch(r, 1).unwrap();
    let pm = Pagemap::open_self().unwrap();

    for vec_len in [1usize, 3] {
        let mut t =
            Tracker::start(Arc::clone(&mm), r, Method::AsyncWp, TrackOptions::default()).unwrap();
        // Every other page of the first 40: 20 one-page regions, plus a 5-page run.
        let mut written: Vec<u64> = (0..40).step_by(2).collect();
        written.extend(100..105);
        for &i in &written {
            m.touch(pages(r, i, i + 1), 2).unwrap();
        }
        let want = page_set(r, written.iter().copied());
        assert_eq!(bit57(r), RangeSet::single(r).difference(&want));
        let mut req = ScanRequest {
            flags: SCAN_WP_MATCHING | SCAN_CHECK_WPASYNC,
            start: r.start(),
            end: r.end(),
            category_mask: category::WRITTEN,
            return_mask: category::WRITTEN,
            ..Default::default()
        };
        let mut got = RangeSet::new();
        let mut calls = 0;
        loop {
            let res = uffd_wp::backend::linux::scan_once(&pm, &req, vec_len).unwrap();
            calls += 1;
            assert!(res.regions.len() <= vec_len);
            let this: RangeSet = res
                .regions
                .iter()
                .map(|g| Range::from_bounds(g.start, g.end))
                .collect();
            got.extend(&this);
            if res.walk_end >= r.end() {
                break;
            }
            // Stopped on a full vector: what was returned is protected again, what lies
            // after walk_end is not yet.
            assert_eq!(res.regions.len(), vec_len, "stopped early only when full");
            let done = Range::from_bounds(r.start(), res.walk_end);
            assert!(
                bit57(r).covers(&done),
                "vec {vec_len}: everything before walk_end {:#x} is protected",
                res.walk_end
            );
            let rest = Range::from_bounds(res.walk_end, r.end());
            assert_eq!(
                RangeSet::single(rest).difference(&bit57(rest)),
                want.clip(rest),
                "vec {vec_len}: the written pages after walk_end are still unprotected"
            );
            assert!(res.walk_end > req.start, "progress");
            req.start = res.walk_end;
        }
        assert_eq!(got, want, "vec {vec_len}: every written page, once");
        // The kernel stops only when a region does not fit, so 21 regions take exactly
        // ceil(21 / vec_len) calls (the last one walks on to the end).
        assert_eq!(calls, 21usize.div_ceil(vec_len), "vec {vec_len}: calls");
        assert_eq!(bit57(r), RangeSet::single(r), "all re-protected");
        assert_eq!(t.epoch().unwrap().dirty, RangeSet::new());
        t.close().unwrap();
    }

    // Through the tracker: 6000 one-page regions need a second call.
    let mut t =
        Tracker::start(Arc::clone(&mm), r, Method::AsyncWp, TrackOptions::default()).unwrap();
    let written: Vec<u64> = (0..12000).step_by(2).collect();
    for &i in &written {
        m.touch(pages(r, i, i + 1), 3).unwrap();
    }
    let e = t.epoch().unwrap();
    assert_eq!(e.dirty.as_slice().len(), 6000);
    assert_eq!(e.dirty, page_set(r, written.iter().copied()));
    assert_eq!(bit57(r), RangeSet::single(r));
    t.close().unwrap();
    assert_eq!(bit57(r), RangeSet::new());
}

/// Writes `r` page by page on another thread and waits up to 30 s for it to finish: a page
/// left write-protected in sync mode with no handler would block it forever.
fn writes_proceed(m: &Arc<Mapping>) -> bool {
    let (tx, rx) = mpsc::channel();
    let m2 = Arc::clone(m);
    std::thread::spawn(move || {
        m2.touch(m2.range(), 9).unwrap();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30)).is_ok()
}

/// Drop, an arming failure and an epoch failure each leave nothing protected and the range
/// unregistered: pagemap bit 57 is clear everywhere and a writer goes through.
#[test]
fn nothing_protected_after_drop_or_error() {
    for method in [Method::AsyncWp, Method::SyncWp] {
        let Some(mm) = backend(method) else { return };
        let mm = Arc::new(InjectMm::new(mm));
        let m = Arc::new(Mapping::new(8 << 20, 2 << 20, Backing::Anon, Thp::NoHuge).unwrap());
        let r = m.range();
        m.touch(pages(r, 0, 1024), 1).unwrap();

        // Drop after a few writes.
        let mut t = Tracker::start(Arc::clone(&mm), r, method, TrackOptions::default()).unwrap();
        m.touch(pages(r, 3, 9), 2).unwrap();
        assert_eq!(t.epoch().unwrap().dirty, pages_set(r, 3, 9));
        assert_eq!(bit57(r), RangeSet::single(r));
        drop(t);
        assert_eq!(bit57(r), RangeSet::new(), "{method}: dropped");
        assert!(writes_proceed(&m), "{method}: writes after drop");
        // Unregistered: registering again in another mode-less way works, and unregister of a
        // range not registered is a no-op; check with the kernel's answer to WRITEPROTECT.
        assert_eq!(
            mm.inner().writeprotect(r, uffd_wp::seam::WpMode::Protect),
            Err(Errno::NOENT),
            "{method}: unregistered after drop"
        );

        // Arming fails half-way (ENOMEM after the first 2 MiB really protected).
        mm.add_rule(Rule::nth(1, Errno::NOMEM, 2 << 20));
        let opts = TrackOptions {
            on_error: uffd_wp::OnError::Stop,
            ..Default::default()
        };
        let err = Tracker::start(Arc::clone(&mm), r, method, opts).unwrap_err();
        assert!(
            matches!(err, TrackError::Protect { addr, source: Some(_), .. } if addr == r.start() + (2 << 20)),
            "{method}: {err}"
        );
        assert_eq!(err.errno(), Errno::NOMEM);
        mm.clear_rules();
        assert_eq!(bit57(r), RangeSet::new(), "{method}: after a failed arming");
        assert!(writes_proceed(&m), "{method}: writes after a failed arming");

        // An epoch fails: async, the scan hits a VMA that is not registered (CHECK_WPASYNC's
        // EPERM); sync, the re-protection fails with ENOMEM.
        let mut t = Tracker::start(Arc::clone(&mm), r, method, opts).unwrap();
        m.touch(pages(r, 10, 20), 4).unwrap();
        let err = match method {
            Method::AsyncWp => {
                mm.inner().unregister(pages(r, 1024, 2048)).unwrap();
                t.epoch().unwrap_err()
            }
            _ => {
                mm.add_rule(Rule::nth(1, Errno::NOMEM, 0));
                t.epoch().unwrap_err()
            }
        };
        mm.clear_rules();
        match method {
            Method::AsyncWp => assert!(
                matches!(
                    err,
                    TrackError::Scan {
                        errno: Errno::PERM,
                        ..
                    }
                ),
                "{err}"
            ),
            _ => assert!(
                matches!(
                    err,
                    TrackError::Protect {
                        phase: uffd_wp::engine::track::Phase::Reprotect,
                        ..
                    }
                ),
                "{err}"
            ),
        }
        assert!(t.is_disarmed());
        assert!(matches!(t.epoch(), Err(TrackError::Disarmed { .. })));
        assert_eq!(bit57(r), RangeSet::new(), "{method}: after a failed epoch");
        assert!(writes_proceed(&m), "{method}: writes after a failed epoch");
        drop(t);
    }
}

fn pages_set(r: Range, a: u64, b: u64) -> RangeSet {
    RangeSet::single(pages(r, a, b))
}

/// Declared pins: left writable, reported in `pinned` every epoch and never in `dirty`; once
/// released, the pages (left writable) are dirty once and protected again.
#[test]
fn pinned_pages_are_dirty_every_epoch() {
    for method in [Method::AsyncWp, Method::SyncWp] {
        let Some(mm) = backend(method) else { return };
        let mm = Arc::new(mm);
        let m = Mapping::new(4 << 20, 2 << 20, Backing::Anon, Thp::NoHuge).unwrap();
        let r = m.range();
        m.touch(r, 1).unwrap();
        let pin = pages(r, 10, 20);
        mm.declare_pin(pin);
        let mut t = Tracker::start(Arc::clone(&mm), r, method, TrackOptions::default()).unwrap();
        assert_eq!(
            bit57(r),
            RangeSet::single(r).difference(&RangeSet::single(pin)),
            "{method}: pins left writable"
        );
        m.touch(pages(r, 5, 6), 2).unwrap();
        m.touch(pages(r, 15, 16), 2).unwrap();
        for i in 0..3 {
            let e = t.epoch().unwrap();
            assert_eq!(e.pinned, RangeSet::single(pin), "{method} epoch {i}");
            let want = if i == 0 {
                pages_set(r, 5, 6)
            } else {
                RangeSet::new()
            };
            assert_eq!(e.dirty, want, "{method} epoch {i}");
            assert_eq!(e.all_dirty(), want.union(&RangeSet::single(pin)));
        }
        mm.undeclare_pin(pin);
        let e = t.epoch().unwrap();
        assert_eq!(e.pinned, RangeSet::new());
        assert_eq!(
            e.dirty,
            RangeSet::single(pin),
            "{method}: released pins once"
        );
        assert_eq!(
            bit57(r),
            RangeSet::single(r),
            "{method}: released pins protected"
        );
        m.touch(pages(r, 12, 13), 3).unwrap();
        assert_eq!(t.epoch().unwrap().dirty, pages_set(r, 12, 13));
        t.close().unwrap();
        assert_eq!(bit57(r), RangeSet::new());
    }
}

/// Unpopulated pages: the first write to a never-touched page (PTE marker) is tracked too,
/// and a THP region is tracked per 4 KiB page.
#[test]
fn unpopulated_and_thp_pages_are_tracked() {
    for method in [Method::AsyncWp, Method::SyncWp] {
        let Some(mm) = backend(method) else { return };
        let mm = Arc::new(mm);
        for thp in [Thp::NoHuge, Thp::Huge] {
            let m = Mapping::new(8 << 20, 2 << 20, Backing::Anon, thp).unwrap();
            let r = m.range();
            m.touch(pages(r, 0, 1024), 1).unwrap(); // first 4 MiB populated
            let mut t =
                Tracker::start(Arc::clone(&mm), r, method, TrackOptions::default()).unwrap();
            let idx = [0u64, 1, 511, 512, 700, 1024, 1500, 2047];
            for &i in &idx {
                m.touch(pages(r, i, i + 1), 5).unwrap();
            }
            let e = t.epoch().unwrap();
            assert_eq!(e.dirty, page_set(r, idx), "{method} {thp:?}");
            m.touch(pages(r, 3, 4), 6).unwrap();
            assert_eq!(
                t.epoch().unwrap().dirty,
                page_set(r, [3]),
                "{method} {thp:?}"
            );
            t.close().unwrap();
            assert_eq!(bit57(r), RangeSet::new());
        }
    }
}

/// The probe's choice on this kernel follows its findings, and forcing an unavailable
/// method is refused with the feature named. Soft-dirty: this project's kernel is built
/// without CONFIG_MEM_SOFT_DIRTY; where it is, the forced soft-dirty tracker must work.
#[test]
fn probe_chooses_and_soft_dirty_is_reported() {
    let soft = uffd_wp::features::probe_soft_dirty();
    let sel = Selection::probe(None);
    if let Ok(s) = &sel {
        assert_eq!(s.soft_dirty, soft);
        let best = Method::ALL
            .into_iter()
            .find(|m| Selection::probe(Some(*m)).is_ok())
            .unwrap();
        assert_eq!(s.method, best);
    }
    match Selection::probe(Some(Method::SoftDirty)) {
        Err(TrackError::Unsupported { method, what }) => {
            assert!(!soft);
            assert_eq!(method, Method::SoftDirty);
            assert_eq!(what, "CONFIG_MEM_SOFT_DIRTY");
            eprintln!("NOTE: soft-dirty tracker not run on this kernel: no CONFIG_MEM_SOFT_DIRTY");
            let mm = LinuxMm::open_with(Config {
                required: uffd_wp::features::Features::empty(),
                ..Config::default()
            })
            .unwrap();
            assert_eq!(mm.clear_soft_dirty(), Err(Errno::OPNOTSUPP));
            let err = Tracker::start(
                Arc::new(mm),
                Range::new(4096, 4096).unwrap(),
                Method::SoftDirty,
                TrackOptions::default(),
            )
            .unwrap_err();
            assert!(matches!(
                err,
                TrackError::SoftDirty {
                    errno: Errno::OPNOTSUPP,
                    ..
                }
            ));
        }
        Err(e) => panic!("{e}"),
        Ok(s) => {
            assert!(soft);
            let mm = Arc::new(LinuxMm::open_with(s.config()).unwrap());
            let m = Mapping::new(1 << 20, 4096, Backing::Anon, Thp::NoHuge).unwrap();
            let r = m.range();
            m.touch(r, 1).unwrap();
            let mut t = Tracker::start(mm, r, Method::SoftDirty, TrackOptions::default()).unwrap();
            m.touch(pages(r, 7, 9), 2).unwrap();
            assert_eq!(t.epoch().unwrap().dirty, pages_set(r, 7, 9));
            assert_eq!(t.epoch().unwrap().dirty, RangeSet::new());
        }
    }
    // A uffd opened for async WP cannot do sync WP and vice versa.
    if let Some(mm) = backend(Method::AsyncWp) {
        let m = Mapping::anon(4096).unwrap();
        let err = Tracker::start(
            Arc::new(mm),
            m.range(),
            Method::SyncWp,
            TrackOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            TrackError::Unsupported {
                method: Method::SyncWp,
                ..
            }
        ));
    }
}

/// The benchmark's measuring code on a small region: both trackers' epochs are exact every
/// round (it fails otherwise), the figures are filled in, and the region counts are right.
#[test]
fn bench_measure_small_region() {
    use uffd_wp_bench::track::{TrackBenchConfig, measure};
    if backend(Method::AsyncWp).is_none() {
        return;
    }
    for thp in [Thp::NoHuge, Thp::Huge] {
        let cfg = TrackBenchConfig {
            size: 16 << 20,
            thp,
            fraction: 0.01,
            rounds: 3,
        };
        let mut steps = 0;
        let f = measure(&cfg, |_| steps += 1).unwrap();
        assert!(f.exact);
        assert_eq!(f.dirty_pages, 4096 / 100);
        assert!(f.uffd_epoch_ms > 0.0 && f.mprotect_epoch_ms > 0.0);
        assert!(f.uffd_first_write_us.p50 > 0.0 && f.mprotect_first_write_us.p50 > 0.0);
        assert!(steps >= 6, "{steps} progress steps");
    }
}

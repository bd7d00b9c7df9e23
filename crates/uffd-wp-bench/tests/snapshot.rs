//! Live snapshots of the built-in workload on the real kernel, checked by its oracle.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uffd_wp::backend::inject::{InjectMm, Rule};
use uffd_wp::backend::linux::LinuxMm;
use uffd_wp::engine::snapshot::{self, Copier, HandlerMode, SnapshotOptions, Source, Unprotected};
use uffd_wp::range::{PAGE_SIZE, RangeSet};
use uffd_wp::seam::Errno;
use uffd_wp::seam::FnQuiesce;
use uffd_wp::seam::prelude::*;
use uffd_wp::sys::pagemap::{Pagemap, bits};
use uffd_wp_bench::workload::{Workload, WorkloadConfig};

fn wp_bits_left(w: &Workload) -> u64 {
    let r = w.range();
    Pagemap::open_self()
        .unwrap()
        .entries(r.start(), r.pages())
        .unwrap()
        .iter()
        .filter(|e| *e & bits::UFFD_WP != 0)
        .count() as u64
}

/// Waits (10 s at most) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "waited 10 s for {what}"
        );
        std::thread::yield_now();
    }
}

fn run(
    mm: &dyn Mm,
    w: &Workload,
    opts: &SnapshotOptions,
) -> (snapshot::Image, snapshot::SnapshotReport, Vec<u64>) {
    run_watching(mm, w, opts, || {})
}

/// [`run`], calling `watch` at every progress report of the copy.
fn run_watching(
    mm: &dyn Mm,
    w: &Workload,
    opts: &SnapshotOptions,
    mut watch: impl FnMut(),
) -> (snapshot::Image, snapshot::SnapshotReport, Vec<u64>) {
    let at_freeze = Mutex::new(Vec::new());
    let at_resume = AtomicU64::new(0);
    let q = FnQuiesce(
        || {
            w.pause();
            *at_freeze.lock().unwrap() = w.versions();
        },
        || {
            at_resume.store(w.writes(), Ordering::Relaxed);
            w.resume();
        },
    );
    let ranges = RangeSet::single(w.range());
    let mut first = true;
    let (img, rep) = snapshot::take(
        mm,
        &ranges,
        Source::Mapping(w.mapping()),
        &q,
        opts,
        // After its first chunk (nothing un-protected yet: the copier releases whole 2 MiB
        // batches), the copier waits until a writer has written a page, so every snapshot of a
        // running workload races with its writers however slowly they wake, and serves at
        // least one fault. Every page is protected until then, so that write faulted and a
        // handler thread served it; an inline copier serves faults itself, so it is let go
        // once one is pending. (Had the copier gone on, a release of the faulting page would
        // have woken the writer and withdrawn the unread fault message.)
        |_, _| {
            if std::mem::take(&mut first) {
                let inline = matches!(opts.handler, HandlerMode::Inline { .. });
                wait_until("a writer to write during the snapshot", || {
                    w.writes() > at_resume.load(Ordering::Relaxed)
                        || (inline && mm.wait_event(1).unwrap_or(true))
                });
            }
            watch();
        },
    )
    .expect("snapshot");
    let v = at_freeze.into_inner().unwrap();
    (img, rep, v)
}

fn check(w: &Workload, img: &snapshot::Image, versions: &[u64]) {
    let base = w.range().start();
    let bad = Workload::check_image(versions, |p| img.page(base + p * PAGE_SIZE));
    assert!(
        bad.is_empty(),
        "{} inconsistent pages, first {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

fn workload(size: u64, threads: usize) -> Workload {
    Workload::start(WorkloadConfig {
        size,
        threads,
        ..WorkloadConfig::default()
    })
    .unwrap()
}

#[test]
fn snapshots_of_a_running_workload_are_consistent_in_every_handler_mode() {
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    let w = workload(32 << 20, 2);
    w.resume();
    for handler in [
        HandlerMode::Inline { chunk_pages: 32 },
        HandlerMode::Thread,
        HandlerMode::Hybrid { chunk_pages: 32 },
    ] {
        for protect_threads in [1, 2] {
            std::thread::sleep(Duration::from_millis(5));
            let opts = SnapshotOptions {
                handler,
                protect_threads,
                ..SnapshotOptions::default()
            };
            let writes_before = w.writes();
            let (img, rep, versions) = run(&mm, &w, &opts);
            check(&w, &img, &versions);
            assert_eq!(rep.pages, w.pages());
            assert!(rep.not_captured.is_empty());
            assert!(
                w.writes() > writes_before,
                "the writers ran during the snapshot"
            );
            // Every page was protected when the copier waited for the first write.
            assert!(rep.faults_served >= 1, "{handler:?}: {rep:?}");
        }
    }
    w.pause();
    assert_eq!(wp_bits_left(&w), 0, "nothing left write-protected");
}

/// The nice values of this process's threads (/proc/self/task/TID/stat, field 19).
fn thread_nice_values() -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        out.push(after_name.split(' ').nth(16).unwrap().parse().unwrap());
    }
    out
}

/// `Copier::Background`: the copy runs in a thread at nice 19 while it lasts (seen in
/// /proc), the rest of the process keeps its priority, and the snapshots stay consistent
/// with a handler thread alone or beside the copier's own polls.
#[test]
fn a_background_copier_runs_at_nice_19_and_snapshots_stay_consistent() {
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    let w = workload(128 << 20, 2);
    w.resume();
    for handler in [HandlerMode::Thread, HandlerMode::Hybrid { chunk_pages: 32 }] {
        let opts = SnapshotOptions {
            handler,
            copier: Copier::Background,
            ..SnapshotOptions::default()
        };
        let mut seen = Vec::new();
        let (img, rep, versions) = run_watching(&mm, &w, &opts, || {
            seen.push(thread_nice_values());
        });
        check(&w, &img, &versions);
        assert_eq!(rep.copier, Copier::Background);
        assert!(rep.faults_served >= 1, "{rep:?}");
        assert!(
            seen.iter()
                .any(|n| n.iter().filter(|&&x| x == 19).count() == 1),
            "one thread at nice 19 during the copy: {seen:?}"
        );
        assert!(
            seen.iter()
                .all(|n| n.iter().filter(|&&x| x == 0).count() >= 3),
            "the test, the handler and the writers keep nice 0: {seen:?}"
        );
    }
    assert!(
        thread_nice_values().iter().all(|&n| n == 0),
        "no thread left at nice 19: {:?}",
        thread_nice_values()
    );
    w.pause();
    assert_eq!(wp_bits_left(&w), 0, "nothing left write-protected");
}

#[test]
fn a_failed_protect_is_copied_during_the_freeze_and_stays_consistent() {
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    let mm = InjectMm::new(mm);
    let w = workload(8 << 20, 2);
    w.resume();
    // ENOMEM after half of the first call, every time: retries cannot help.
    mm.add_rule(Rule::covering(w.range().start() + (4 << 20), Errno::NOMEM));
    let (img, rep, versions) = run(&mm, &w, &SnapshotOptions::default());
    check(&w, &img, &versions);
    assert!(rep.copied_in_freeze_pages >= 1024, "{rep:?}");
    assert!(
        rep.protect_error
            .as_deref()
            .unwrap_or("")
            .contains("ENOMEM")
    );
    w.pause();
    assert_eq!(wp_bits_left(&w), 0);
}

#[test]
fn abort_policy_cleans_up_and_leaves_the_workload_running() {
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    let mm = InjectMm::new(mm);
    let w = workload(4 << 20, 1);
    w.resume();
    mm.add_rule(Rule::covering(w.range().start() + (2 << 20), Errno::NOMEM));
    let opts = SnapshotOptions {
        unprotected: Unprotected::Abort,
        ..SnapshotOptions::default()
    };
    let q = FnQuiesce(|| w.pause(), || w.resume());
    let err = snapshot::take(
        &mm,
        &RangeSet::single(w.range()),
        Source::Mapping(w.mapping()),
        &q,
        &opts,
        |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("ENOMEM"), "{err}");
    let before = w.writes();
    wait_until("the writers to resume after the abort", || {
        w.writes() > before
    });
    w.pause();
    assert_eq!(wp_bits_left(&w), 0);
}

#[test]
fn image_file_round_trips_and_skips_zero_pages() {
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    let w = Workload::start(WorkloadConfig {
        size: 4 << 20,
        threads: 1,
        prefill: false,
        hot_fraction: 0.25,
        ..WorkloadConfig::default()
    })
    .unwrap();
    w.resume();
    std::thread::sleep(Duration::from_millis(10));
    let (img, _, versions) = run(&mm, &w, &SnapshotOptions::default());
    let mut file = Vec::new();
    let (stored, zero) = img.write_to(&mut file).unwrap();
    assert!(zero >= w.pages() * 3 / 4, "untouched pages are not stored");
    assert_eq!(stored + zero, w.pages());
    let back = snapshot::Image::read_from(&file[..]).unwrap();
    check(&w, &back, &versions);
}

#[test]
fn the_oracle_catches_late_and_torn_pages() {
    use uffd_wp_bench::workload::{PageVerdict, check_page, page_image};
    assert_eq!(check_page(7, 3, &page_image(3, 7)), PageVerdict::Consistent);
    assert_eq!(
        check_page(7, 3, &page_image(4, 7)),
        PageVerdict::WrongVersion {
            expected: 3,
            found: 4
        }
    );
    let mut torn = page_image(3, 7);
    torn[2048..].copy_from_slice(&page_image(4, 7)[2048..]);
    assert_eq!(check_page(7, 3, &torn), PageVerdict::Torn);
    assert_eq!(
        check_page(8, 3, &page_image(3, 7)),
        PageVerdict::Torn,
        "misplaced page"
    );
    assert_eq!(check_page(7, 0, &page_image(0, 7)), PageVerdict::Consistent);

    // On the kernel: an image compared with versions from after the snapshot point fails.
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    let w = workload(4 << 20, 1);
    w.resume();
    let (img, _, _) = run(&mm, &w, &SnapshotOptions::default());
    let after = w.writes();
    wait_until("a write after the snapshot", || w.writes() > after);
    w.pause();
    let later = w.versions();
    let base = w.range().start();
    assert!(!Workload::check_image(&later, |p| img.page(base + p * PAGE_SIZE)).is_empty());
}

/// The stress run: 4 writer threads, 50 snapshots of 256 MiB, every one checked by the
/// oracle, alternating handler modes and pre-arming.
#[test]
fn stress_50_snapshots_of_256_mib_with_4_writers_are_all_consistent() {
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    let w = workload(256 << 20, 4);
    w.resume();
    let mut faults = 0;
    for i in 0..50 {
        let opts = SnapshotOptions {
            handler: match i % 3 {
                0 => HandlerMode::Inline { chunk_pages: 32 },
                1 => HandlerMode::Thread,
                _ => HandlerMode::Hybrid { chunk_pages: 32 },
            },
            // Not in step with the handler modes, so each mode runs with and without.
            prearm: i % 4 != 0,
            ..SnapshotOptions::default()
        };
        let (img, rep, versions) = run(&mm, &w, &opts);
        check(&w, &img, &versions);
        faults += rep.faults_served;
    }
    assert!(faults > 0);
    w.pause();
    assert_eq!(wp_bits_left(&w), 0);
}

/// Pre-arming over huge pages: each fault before the pause frees its whole huge page (no
/// split), which the pause re-protects, and so does each fault during the copy; the snapshots
/// stay consistent.
#[test]
fn prearmed_snapshots_of_huge_pages_are_consistent_and_re_protect_whole_huge_pages() {
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    if common::thp().is_none() {
        return;
    }
    for _ in 0..3 {
        let w = Workload::start(WorkloadConfig {
            size: 32 << 20,
            threads: 2,
            thp: true,
            ..WorkloadConfig::default()
        })
        .unwrap();
        w.resume();
        let opts = SnapshotOptions {
            prearm: true,
            ..SnapshotOptions::default()
        };
        let (img, rep, versions) = run(&mm, &w, &opts);
        check(&w, &img, &versions);
        assert!(rep.not_captured.is_empty());
        assert_eq!(rep.prearm_dirty_pages % 512, 0, "{rep:?}");
        // During the copy too, a fault frees its whole huge page: at most one fault per huge
        // page and writer (two writers can fault on one huge page at the same time).
        assert!(rep.faults_served <= 16 * 2, "{rep:?}");
        w.pause();
        assert_eq!(wp_bits_left(&w), 0);
    }
}

/// An un-protect failing while the writers run (the pre-arm handler's, or the copier's
/// release if no writer faulted before the pause): the snapshot fails with the errno and the
/// operation, never hangs on a writer left in a fault, and leaves the writers running with
/// nothing write-protected.
#[test]
fn a_failing_unprotect_fails_the_snapshot_cleanly() {
    let Some(mm) = common::need("userfaultfd with WP_UNPOPULATED", LinuxMm::open()) else {
        return;
    };
    let mm = InjectMm::new(mm);
    let w = workload(32 << 20, 2);
    w.resume();
    mm.add_rule(Rule {
        protect: false,
        ..Rule::nth(1, Errno::NOMEM, 0)
    });
    let q = FnQuiesce(|| w.pause(), || w.resume());
    let err = snapshot::take(
        &mm,
        &RangeSet::single(w.range()),
        Source::Mapping(w.mapping()),
        &q,
        &SnapshotOptions::default(),
        |_, _| {},
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("ENOMEM") && msg.contains("unprotect"), "{msg}");
    let before = w.writes();
    wait_until("the writers to go on after the failure", || {
        w.writes() > before
    });
    w.pause();
    assert_eq!(wp_bits_left(&w), 0);
}

//! The exact write-protect engine on the real kernel: every report is checked against
//! `/proc/self/pagemap` bit 57, read independently of the engine's own read-back.

mod common;

use std::time::Duration;

use proptest::prelude::*;
use uffd_wp::backend::inject::Rule;
use uffd_wp::backend::linux::lab::LinuxLab;
use uffd_wp::backend::linux::{Config, LinuxMm, OpenError};
use uffd_wp::engine::protect::{Exactness, FailureKind, OnError, WpError, WpOptions, WpReport};
use uffd_wp::features::Features;
use uffd_wp::range::{PAGE_SIZE, Range, RangeError, RangeSet};
use uffd_wp::scenario::LinuxLabs;
use uffd_wp::scenario::{self, Lab, LabError, MapKind, ScenarioError};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, KernelReport, RegisterMode, WpMode};
use uffd_wp::{unprotect, write_protect};

const P: u64 = PAGE_SIZE;

fn pages(r: Range, a: u64, b: u64) -> Range {
    Range::from_bounds(r.start() + a * P, r.start() + b * P)
}

fn set(r: Range, spans: &[(u64, u64)]) -> RangeSet {
    spans.iter().map(|&(a, b)| pages(r, a, b)).collect()
}

/// The report's three sets partition the request and `protected` is what the kernel says.
fn assert_exact(lab: &LinuxLab, rep: &WpReport) {
    let r = rep.requested;
    let all = rep.protected.union(&rep.skipped).union(&rep.not_protected);
    assert_eq!(all, RangeSet::single(r), "the sets must cover the request");
    assert!(rep.protected.intersection(&rep.skipped).is_empty());
    assert!(rep.protected.intersection(&rep.not_protected).is_empty());
    assert!(rep.skipped.intersection(&rep.not_protected).is_empty());
    assert_eq!(
        lab.verify_wp(r).unwrap(),
        rep.protected,
        "report must equal pagemap bit 57"
    );
}

/// The tests of this binary map, punch and unmap memory in one address space. A hole punched
/// for a test (a gap the kernel must skip) can be filled by another test's mmap running in
/// parallel (an io_uring ring's pages fit a 1-page hole: seen once in a lib test). They are
/// fast, so they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn registered(lab: &mut LinuxLab, n: u64, reg: (u64, u64)) -> Range {
    let r = lab.map(n * P, P, MapKind::Anon).unwrap();
    lab.mm()
        .register(pages(r, reg.0, reg.1), RegisterMode::WP)
        .unwrap();
    r
}

#[test]
fn every_builtin_scenario_verifies_on_linux() {
    let _serial = serial();
    if common::lab(true).is_none() {
        return;
    }
    for sc in scenario::SCENARIOS {
        match scenario::run(sc.name, &LinuxLabs) {
            Ok(out) => {
                assert!(!out.results.is_empty(), "{}: no step", sc.name);
                for s in &out.results {
                    assert!(
                        s.verified,
                        "{}/{}: report differs from pagemap",
                        sc.name, s.label
                    );
                }
            }
            // lost-enomem needs root, a memory cgroup and the uffd-wp binary; it has its own
            // test in the CLI crate.
            Err(ScenarioError::Lab(LabError::Unavailable { .. })) if sc.name == "lost-enomem" => {}
            Err(e) => panic!("{}: {e}", sc.name),
        }
    }
}

/// The policy steps of `injected-enomem` on the real kernel: each says what the policy did.
#[test]
fn injected_enomem_steps_stop_retry_and_roll_back() {
    let _serial = serial();
    if common::lab(true).is_none() {
        return;
    }
    let out = scenario::run("injected-enomem", &LinuxLabs).unwrap();
    let [stop, retry, rollback] = &out.results[..] else {
        panic!("three steps: {:?}", out.results);
    };
    for s in [stop, retry, rollback] {
        assert!(s.verified, "{}", s.label);
        assert_eq!(s.kernel_errno, Some(Errno::NOMEM), "{}", s.label);
        assert!(s.injected, "{}", s.label);
    }
    let r = stop.report.requested;
    assert_eq!(stop.report.protected, set(r, &[(0, 32)]));
    assert_eq!(stop.report.not_protected, set(r, &[(32, 64)]));
    assert_eq!(
        stop.report.error.as_ref().unwrap().kind(),
        FailureKind::NoMemory
    );
    assert!(!stop.report.rolled_back);
    // Each policy runs in a fresh mapping of its own.
    assert_eq!(
        retry.report.protected,
        RangeSet::single(retry.report.requested)
    );
    assert!(retry.report.error.is_none(), "the retry succeeded");
    assert!(rollback.report.protected.is_empty());
    assert!(rollback.report.rolled_back, "the step says it rolled back");
    assert_eq!(
        rollback.report.error.as_ref().unwrap().kind(),
        FailureKind::NoMemory
    );
}

#[test]
fn clean_protect_is_trusted_without_read_back() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 64, (0, 64));
    lab.touch(pages(r, 0, 10)).unwrap();
    let rep = write_protect(lab.mm(), r, &WpOptions::default()).unwrap();
    assert_exact(&lab, &rep);
    assert_eq!(rep.protected, RangeSet::single(r));
    assert_eq!(rep.raw_calls, 1);
    assert_eq!(rep.read_back_bytes, 0, "a clean return needs no read-back");
    assert_eq!(rep.error, None);
    let un = unprotect(lab.mm(), r, OnError::Stop).unwrap();
    assert_exact(&lab, &un);
    assert!(un.protected.is_empty());
}

#[test]
fn unregistered_tail_reports_enoent_and_the_protected_prefix() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 16, (0, 8));
    lab.touch(r).unwrap();
    let rep = write_protect(lab.mm(), r, &WpOptions::default()).unwrap();
    assert_exact(&lab, &rep);
    assert_eq!(rep.protected, set(r, &[(0, 8)]));
    assert_eq!(rep.not_protected, set(r, &[(8, 16)]));
    let e = rep.error.expect("an error");
    assert_eq!(e.kind(), FailureKind::NotRegistered);
    assert_eq!(e.errno(), Errno::NOENT);
    assert_eq!(e.addr(), r.start() + 8 * P);
    let j = rep_json_error(&rep_json(&lab, r));
    assert_eq!(j["kind"], "NotRegistered");
    assert_eq!(j["errno"], "ENOENT");
    assert_eq!(j["offset"], 8 * P);
}

fn rep_json(lab: &LinuxLab, r: Range) -> serde_json::Value {
    write_protect(lab.mm(), r, &WpOptions::default())
        .unwrap()
        .to_json()
}

fn rep_json_error(v: &serde_json::Value) -> serde_json::Value {
    v["error"].clone()
}

#[test]
fn a_gap_is_reported_not_protected_although_the_kernel_succeeds() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 16, (0, 16));
    lab.touch(r).unwrap();
    lab.punch(pages(r, 8, 9)).unwrap();
    // The raw call itself succeeds:
    lab.mm()
        .writeprotect(r, uffd_wp::seam::WpMode::Protect)
        .expect("the kernel skips gaps silently");
    let rep = write_protect(lab.mm(), r, &WpOptions::default()).unwrap();
    assert_exact(&lab, &rep);
    assert_eq!(rep.not_protected, set(r, &[(8, 9)]));
    assert_eq!(rep.error, None);
}

#[test]
fn unpopulated_pages_without_markers_are_not_protected() {
    let _serial = serial();
    let Some(mut lab) = common::lab(false) else {
        return;
    };
    let r = registered(&mut lab, 16, (0, 16));
    lab.touch(pages(r, 0, 4)).unwrap();
    let rep = write_protect(lab.mm(), r, &WpOptions::default()).unwrap();
    assert_exact(&lab, &rep);
    assert_eq!(rep.protected, set(r, &[(0, 4)]));
    assert_eq!(rep.not_protected, set(r, &[(4, 16)]));
}

fn injected(errno: Errno, on_error: OnError, times: u32) -> Option<(LinuxLab, Range, WpReport)> {
    let mut lab = common::lab(true)?;
    let r = registered(&mut lab, 64, (0, 64));
    lab.touch(r).unwrap();
    lab.inject(Rule::nth(1, errno, 32 * P).times(times));
    let opts = WpOptions {
        skip_pinned: false,
        on_error,
    };
    let rep = write_protect(lab.mm(), r, &opts).unwrap();
    assert_exact(&lab, &rep);
    Some((lab, r, rep))
}

#[test]
fn stop_reports_the_prefix_the_kernel_protected() {
    let _serial = serial();
    let Some((_, r, rep)) = injected(Errno::NOMEM, OnError::Stop, 1) else {
        return;
    };
    assert_eq!(rep.protected, set(r, &[(0, 32)]));
    assert_eq!(rep.error.as_ref().unwrap().kind(), FailureKind::NoMemory);
    assert_eq!(rep.error.as_ref().unwrap().addr(), r.start() + 32 * P);
    assert_eq!(rep.bytes_not_protected(), 32 * P);
}

#[test]
fn retry_completes_after_a_transient_enomem() {
    let _serial = serial();
    let retry = OnError::Retry {
        attempts: 2,
        backoff: Duration::from_millis(1),
    };
    let Some((lab, r, rep)) = injected(Errno::NOMEM, retry, 1) else {
        return;
    };
    assert_eq!(rep.protected, RangeSet::single(r));
    assert_eq!(rep.error, None);
    assert_eq!(rep.raw_calls, 2);
    assert_eq!(lab.raw_results().len(), 2);
}

#[test]
fn retry_gives_up_after_its_attempts() {
    let _serial = serial();
    let retry = OnError::Retry {
        attempts: 2,
        backoff: Duration::from_millis(1),
    };
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 64, (0, 64));
    lab.touch(r).unwrap();
    lab.inject(Rule::covering(r.start() + 32 * P, Errno::NOMEM)); // fails every time
    let opts = WpOptions {
        skip_pinned: false,
        on_error: retry,
    };
    let rep = write_protect(lab.mm(), r, &opts).unwrap();
    assert_exact(&lab, &rep);
    assert_eq!(rep.raw_calls, 3);
    assert_eq!(rep.protected, set(r, &[(0, 32)]));
    assert_eq!(rep.error.unwrap().kind(), FailureKind::NoMemory);
}

#[test]
fn retry_does_not_retry_enoent() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 16, (0, 8));
    let opts = WpOptions {
        skip_pinned: false,
        on_error: OnError::Retry {
            attempts: 5,
            backoff: Duration::from_millis(1),
        },
    };
    let rep = write_protect(lab.mm(), r, &opts).unwrap();
    assert_eq!(rep.raw_calls, 1);
    assert_exact(&lab, &rep);
}

#[test]
fn rollback_undoes_only_what_this_call_protected() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 64, (0, 64));
    lab.touch(r).unwrap();
    // Pages [0, 4) were protected before the call: rollback must leave them protected.
    write_protect(lab.mm(), pages(r, 0, 4), &WpOptions::default()).unwrap();
    lab.inject(Rule::nth(1, Errno::NOMEM, 32 * P));
    let opts = WpOptions {
        skip_pinned: false,
        on_error: OnError::Rollback,
    };
    let rep = write_protect(lab.mm(), r, &opts).unwrap();
    assert_exact(&lab, &rep);
    assert!(rep.rolled_back);
    assert_eq!(rep.protected, set(r, &[(0, 4)]));
    assert_eq!(rep.error.unwrap().kind(), FailureKind::NoMemory);
}

#[test]
fn rollback_with_nothing_left_is_an_error_and_changes_nothing() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 64, (0, 64));
    lab.touch(r).unwrap();
    lab.inject(Rule::nth(1, Errno::NOMEM, 32 * P));
    let opts = WpOptions {
        skip_pinned: false,
        on_error: OnError::Rollback,
    };
    let e = write_protect(lab.mm(), r, &opts).unwrap_err();
    assert_eq!(e.kind(), FailureKind::NoMemory);
    assert!(
        lab.verify_wp(r).unwrap().is_empty(),
        "nothing stays protected"
    );
}

#[test]
fn eagain_stop_fails_whole_and_retry_completes() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 8, (0, 8));
    lab.inject(Rule::nth(1, Errno::AGAIN, 0));
    let e = write_protect(lab.mm(), r, &WpOptions::default()).unwrap_err();
    assert_eq!(e.kind(), FailureKind::Busy);
    assert!(lab.verify_wp(r).unwrap().is_empty());
    lab.reset_injection();
    lab.inject(Rule::nth(1, Errno::AGAIN, 0));
    let opts = WpOptions {
        skip_pinned: false,
        on_error: OnError::Retry {
            attempts: 1,
            backoff: Duration::ZERO,
        },
    };
    let rep = write_protect(lab.mm(), r, &opts).unwrap();
    assert_exact(&lab, &rep);
    assert!(rep.complete());
}

#[test]
fn skip_pinned_leaves_declared_pins_writable() {
    let _serial = serial();
    let Some(mm) = common::need("userfaultfd", LinuxMm::open()) else {
        return;
    };
    let m = uffd_wp::sys::mem::Mapping::anon(32 * P).unwrap();
    let r = m.range();
    m.touch(r, 1).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    let pin = pages(r, 8, 12);
    mm.declare_pin(pin);
    let opts = WpOptions {
        skip_pinned: true,
        on_error: OnError::Stop,
    };
    let rep = write_protect(&mm, r, &opts).unwrap();
    assert_eq!(rep.skipped, RangeSet::single(pin));
    assert_eq!(rep.protected, set(r, &[(0, 8), (12, 32)]));
    assert_eq!(
        rep.bytes_not_protected(),
        0,
        "skipped pages count as success"
    );
    assert_eq!(mm.wp_pages(r).unwrap(), rep.protected);
    mm.undeclare_pin(pin);
}

#[test]
fn bad_ranges_are_refused_before_any_kernel_call() {
    let _serial = serial();
    use uffd_wp::engine::protect::{WpOp, check_range};
    for (start, len, want) in [
        (0x1001, P, RangeError::UnalignedStart(0x1001)),
        (0x1000, 0, RangeError::Empty),
        (0x1000, 10, RangeError::UnalignedLen(10)),
    ] {
        let e = check_range(WpOp::Protect, start, len).unwrap_err();
        assert!(matches!(e, WpError::InvalidRange { source, .. } if source == want));
        assert_eq!(e.errno(), Errno::INVAL);
        assert!(e.to_string().contains("UFFDIO_WRITEPROTECT"), "{e}");
    }
    let e = check_range(WpOp::Protect, u64::MAX - P + 1, 2 * P).unwrap_err();
    assert!(matches!(
        e,
        WpError::InvalidRange {
            source: RangeError::Overflow { .. },
            ..
        }
    ));
}

#[test]
fn unmapped_and_unregistered_ranges_fail_and_change_nothing() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    // A range outside any mapping: map then unmap it, so nothing is there.
    let r = lab.map(8 * P, P, MapKind::Anon).unwrap();
    lab.punch(r).unwrap();
    let e = write_protect(lab.mm(), r, &WpOptions::default()).unwrap_err();
    assert_eq!(e.errno(), Errno::NOENT, "{e}");
    assert!(e.to_string().contains(&format!("{:#x}", r.start())), "{e}");
    // Mapped but not registered.
    let u = lab.map(8 * P, P, MapKind::Anon).unwrap();
    lab.touch(u).unwrap();
    let e = write_protect(lab.mm(), u, &WpOptions::default()).unwrap_err();
    assert_eq!(e.kind(), FailureKind::NotRegistered);
    assert!(lab.verify_wp(u).unwrap().is_empty());
    // A range past the task size: the kernel's EINVAL, typed.
    let high = Range::new(0xffff_8000_0000_0000, 4 * P).unwrap();
    let e = write_protect(lab.mm(), high, &WpOptions::default()).unwrap_err();
    assert_eq!(e.kind(), FailureKind::Invalid, "{e}");
}

#[test]
fn unsupported_feature_is_a_typed_error() {
    let _serial = serial();
    if common::need("userfaultfd", LinuxMm::open()).is_none() {
        return;
    }
    let cfg = Config {
        required: uffd_wp::features::Features(1 << 40),
        ..Config::default()
    };
    match LinuxMm::open_with(cfg) {
        Err(OpenError::Unsupported { missing }) => assert_eq!(missing.0, 1 << 40),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn unknown_scenario_is_a_typed_error() {
    let _serial = serial();
    let e = scenario::run("no-such-scenario", &LinuxLabs).unwrap_err();
    assert!(matches!(e, ScenarioError::Unknown { .. }));
}

#[test]
fn pagemap_scan_read_back_equals_pagemap_bit_57() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let r = registered(&mut lab, 256, (0, 256));
    lab.touch(pages(r, 0, 100)).unwrap();
    for (a, b) in [(3, 7), (50, 120), (200, 201)] {
        write_protect(lab.mm(), pages(r, a, b), &WpOptions::default()).unwrap();
    }
    let engine = lab.mm().wp_pages(r).unwrap();
    assert_eq!(engine, lab.verify_wp(r).unwrap());
    assert_eq!(engine, set(r, &[(3, 7), (50, 120), (200, 201)]));
}

#[derive(Debug, Clone)]
struct Layout {
    pages: u64,
    registered: Vec<(u64, u64)>,
    touched: Vec<(u64, u64)>,
    holes: Vec<(u64, u64)>,
    protect: (u64, u64),
    wp_unpopulated: bool,
    inject: Option<(u64, u64, bool)>, // (nth call, prefix pages, enomem?)
    policy: u8,
}

fn spans(n: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0..n, 1..8u64), 0..4)
        .prop_map(move |v| v.into_iter().map(|(a, l)| (a, (a + l).min(n))).collect())
}

fn layout() -> impl Strategy<Value = Layout> {
    let n = 48u64;
    (
        spans(n),
        spans(n),
        spans(n),
        (0..n, 1..=n),
        any::<bool>(),
        prop::option::of((1..3u64, 0..16u64, any::<bool>())),
        0..3u8,
    )
        .prop_map(
            move |(mut registered, touched, holes, (a, l), wp, inject, policy)| {
                registered.push((0, n / 2)); // at least something registered
                Layout {
                    pages: n,
                    registered,
                    touched,
                    holes,
                    protect: (a, (a + l).min(n).max(a + 1)),
                    wp_unpopulated: wp,
                    inject,
                    policy,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    /// Random mappings, registrations, holes, pins, populated pages, injected failures and
    /// policies: the report always partitions the request and equals pagemap bit 57.
    #[test]
    fn reports_partition_the_request_and_match_the_page_tables(l in layout()) {
        let _serial = serial();
        let Some(mut lab) = common::lab(l.wp_unpopulated) else { return Ok(()) };
        let r = lab.map(l.pages * P, P, MapKind::Anon).unwrap();
        for &(a, b) in &l.registered {
            lab.mm().register(pages(r, a, b), RegisterMode::WP).unwrap();
        }
        for &(a, b) in &l.touched { lab.touch(pages(r, a, b)).unwrap(); }
        let holes: RangeSet = l.holes.iter().map(|&(a, b)| pages(r, a, b)).collect();
        for h in holes.iter() { lab.punch(*h).unwrap(); }
        if let Some((nth, prefix, enomem)) = l.inject {
            let errno = if enomem { Errno::NOMEM } else { Errno::AGAIN };
            lab.inject(Rule::nth(nth, errno, prefix * P));
        }
        let on_error = match l.policy {
            0 => OnError::Stop,
            1 => OnError::Retry { attempts: 1, backoff: Duration::ZERO },
            _ => OnError::Rollback,
        };
        let req = pages(r, l.protect.0, l.protect.1);
        let res = write_protect(lab.mm(), req, &WpOptions { skip_pinned: false, on_error });
        match res {
            Ok(rep) => {
                assert_exact(&lab, &rep);
                prop_assert!(rep.protected.intersection(&holes).is_empty());
                if rep.error.is_none() {
                    // A clean run protects every registered, mapped page, and with markers
                    // the unpopulated ones too.
                    let reg: RangeSet = l.registered.iter().map(|&(a, b)| pages(r, a, b)).collect();
                    let touched: RangeSet = l.touched.iter().map(|&(a, b)| pages(r, a, b)).collect();
                    let mut want = reg.clip(req).difference(&holes);
                    if !l.wp_unpopulated { want = want.intersection(&touched); }
                    prop_assert_eq!(&rep.protected, &want);
                }
            }
            Err(e) => {
                let truth = lab.verify_wp(req).unwrap();
                prop_assert!(truth.is_empty(), "Err returned but {truth:?} is protected: {e}");
            }
        }
    }
}

/// The write-protect report (kernel/README.md) is used exactly where the kernel offers it. On a
/// kernel without it (every released one, this host's 6.18) the probe says so, the command
/// answers EINVAL, writes nothing and protects nothing, and the exact engine keeps its
/// read-back path; on a kernel with it (the patched guest) the probe's trial call protects its
/// page with `done` = the page, and the engine takes the kernel's report: one call, nothing
/// read back.
#[test]
fn the_engine_takes_the_kernels_report_only_where_offered() {
    let _serial = serial();
    let Some(mut lab) = common::lab(true) else {
        return;
    };
    let probe = uffd_wp::features::probe();
    let offered = lab.mm().features().contains(Features::WP_REPORT);
    assert_eq!(probe.wp_report.report, offered, "{:?}", probe.wp_report);
    assert_eq!(probe.has(Features::WP_REPORT), offered);
    let trial = probe.wp_report.trial.clone().expect("a uffd for the trial");
    assert_eq!(trial.command, "0xc028aa06");

    let r = registered(&mut lab, 64, (0, 64));
    lab.touch(pages(r, 0, 10)).unwrap();
    let raw = lab
        .mm()
        .writeprotect_report(pages(r, 0, 32), WpMode::Protect, false);
    let rep = write_protect(lab.mm(), r, &WpOptions::default()).unwrap();
    assert_exact(&lab, &rep);
    assert_eq!(rep.protected, RangeSet::single(r));
    assert_eq!(rep.read_back_bytes, 0);
    assert_eq!(rep.raw_calls, 1);
    let json = rep.to_json();
    if offered {
        assert_eq!(trial.errno, None, "{trial:?}");
        assert_eq!(
            (trial.done, trial.protected),
            (trial.len, true),
            "{trial:?}"
        );
        assert_eq!((raw.result, raw.done), (Ok(()), 32 * P));
        assert_eq!(rep.provenance.exactness, Exactness::KernelReport);
        let k = rep.provenance.kernel.expect("kernel figures");
        assert_eq!((k.calls, k.done, k.errno), (1, r.len(), None));
        assert_eq!(json["exactness"], "kernel-report");
        assert_eq!(json["kernel"]["done"], r.len());
    } else {
        assert_eq!(trial.errno.as_deref(), Some("EINVAL"), "{trial:?}");
        assert_eq!((trial.done, trial.pinned, trial.protected), (0, 0, false));
        assert_eq!(probe.wp_report.engine_call, "UFFDIO_WRITEPROTECT");
        assert_eq!(probe.wp_report.exactness, "read-back");
        assert_eq!(raw, KernelReport::unsupported(), "EINVAL, nothing written");
        assert_eq!(rep.provenance.exactness, Exactness::ReadBack);
        assert_eq!(rep.provenance.kernel, None);
        assert_eq!(json["exactness"], "read-back");
        assert!(json["kernel"].is_null());
    }
    unprotect(lab.mm(), r, OnError::Stop).unwrap();
    // Without the feature the command touched nothing: everything the engine protected it
    // protected itself (checked above), and un-protecting leaves no bit.
    assert!(lab.verify_wp(r).unwrap().is_empty());
}

//! The exact engine on the kernel's write-protect report (kernel/README.md), end to end on the
//! model's proposed semantics: page-table allocation failures (the lab's budget and the
//! model's failure policies), injected failures, retry from `start + done`, rollback, and the
//! kernel's skip-pinned mode beside declared and discovered pins.

use std::time::Duration;

use uffd_wp::backend::inject::{InjectMm, Rule};
use uffd_wp::engine::protect::{Exactness, FailureKind, OnError, WpOptions, write_protect};
use uffd_wp::features::Features;
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range, RangeSet};
use uffd_wp::scenario::{Lab, LabConfig};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, RegisterMode, WpMode};
use uffd_wp_model::lab::{ModelLab, PAGE_TABLE_BUDGET};
use uffd_wp_model::{
    FailPolicy, MapKind, ModelConfig, ModelMm, PROPOSED_FEATURES, PinFlags, Progress, Semantics,
    Thp, UffdConfig,
};

const P: u64 = PAGE_SIZE;

fn stop() -> WpOptions {
    WpOptions::default()
}

fn retry(attempts: u32) -> WpOptions {
    WpOptions {
        skip_pinned: false,
        on_error: OnError::Retry {
            attempts,
            backoff: Duration::ZERO,
        },
    }
}

/// A proposed-semantics uffd that asks for the report, behind an injector (its call log).
fn open() -> InjectMm<ModelMm> {
    let uffd = UffdConfig::default().with_report_if(Features(PROPOSED_FEATURES));
    let mm = ModelMm::open(ModelConfig::with_semantics(Semantics::Proposed), uffd).unwrap();
    assert!(mm.features().contains(Features::WP_REPORT));
    InjectMm::new(mm)
}

/// 2 GiB over a PUD boundary, registered; one page per 2 MiB slot of the second GiB touched
/// (the lost-ENOMEM recipe's tables).
fn recipe(mm: &InjectMm<ModelMm>) -> Range {
    let m = mm.inner().model();
    let r = m
        .map_at(
            Some(8 * PUD_SIZE),
            2 * PUD_SIZE,
            PUD_SIZE,
            MapKind::Anon(Thp::NoHuge),
        )
        .unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    for s in 512..1024 {
        assert_eq!(
            m.write(r.start() + s * PMD_SIZE, b"t").unwrap(),
            Progress::Done(())
        );
    }
    r
}

/// The lab's page-table budget on the next call: one report call over the 2 GiB, ENOMEM with
/// the exact prefix (the budget's tables), read-back only past it; the same call resumed
/// protects everything with one call and no read-back.
#[test]
fn a_page_table_budget_stops_one_call_and_the_report_says_where() {
    let mut lab = ModelLab::open(Semantics::Proposed, LabConfig::default()).unwrap();
    let r = lab
        .map(2 * PUD_SIZE, PUD_SIZE, uffd_wp::scenario::MapKind::Anon)
        .unwrap();
    lab.mm().register(r, RegisterMode::WP).unwrap();
    lab.touch(Range::from_bounds(r.start(), r.start() + P))
        .unwrap();
    lab.limit_next_writeprotect().unwrap();
    let rep = write_protect(lab.mm(), r, &stop()).unwrap();
    let done = (1 + PAGE_TABLE_BUDGET) * PMD_SIZE;
    let k = rep.provenance.kernel.expect("kernel figures");
    assert_eq!(rep.provenance.exactness, Exactness::KernelReport);
    assert_eq!((k.calls, k.done, k.errno), (1, done, Some(Errno::NOMEM)));
    assert_eq!(k.stop, Some(r.start() + done));
    assert_eq!(rep.raw_calls, 1);
    assert_eq!(rep.read_back_bytes, r.len() - done, "only past the prefix");
    let prefix = Range::from_bounds(r.start(), r.start() + done);
    assert_eq!(rep.protected, RangeSet::single(prefix));
    assert_eq!(rep.bytes_not_protected(), r.len() - done);
    let e = rep.error.as_ref().expect("the failure");
    assert_eq!(
        (e.kind(), e.addr()),
        (FailureKind::NoMemory, r.start() + done)
    );
    assert_eq!(lab.verify_wp(r).unwrap(), rep.protected);
    assert_eq!(rep.to_json()["kernel"]["stop_offset"], done);

    let again = write_protect(lab.mm(), r, &stop()).unwrap();
    assert!(again.complete() && again.error.is_none());
    assert_eq!((again.raw_calls, again.read_back_bytes), (1, 0));
}

/// A transient allocation failure under the retry policy: the second call starts at the
/// first call's `start + done`, not at the start again.
#[test]
fn retry_resumes_at_start_plus_done() {
    let mm = open();
    let r = recipe(&mm);
    // Allocation 301 fails once: the first GiB's PMD table is allocation 1 and slot k's PTE
    // table allocation k + 2, so slot 299's.
    mm.inner().model().set_alloc_policy(FailPolicy::Nth(301));
    let rep = write_protect(&mm, r, &retry(2)).unwrap();
    assert!(rep.complete() && rep.error.is_none(), "{rep:?}");
    let calls = mm.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let first_done = calls[0].report.expect("a report call").0;
    assert_eq!(first_done, 299 * PMD_SIZE);
    assert_eq!(calls[0].result, Err(Errno::NOMEM));
    assert_eq!(
        calls[1].range,
        Range::from_bounds(r.start() + first_done, r.end())
    );
    assert_eq!(calls[1].result, Ok(()));
    let k = rep.provenance.kernel.unwrap();
    assert_eq!(
        (k.calls, k.done),
        (2, r.len()),
        "the two dones add up to the range"
    );
    assert_eq!(rep.read_back_bytes, 0);
    assert_eq!(mm.inner().model().wp_set(r), RangeSet::single(r));
}

/// Injected failures on the report call: the rule's real prefix is the call's `done`; Stop
/// reports it; Rollback un-protects exactly what this call protected.
#[test]
fn injected_failures_stop_and_roll_back_on_the_report_path() {
    let mm = open();
    let r = recipe(&mm);
    let m = mm.inner().model().clone();
    // A page protected before the call, past the failure: it stays, Stop or Rollback.
    let old = Range::from_bounds(r.end() - P, r.end());
    mm.writeprotect(old, WpMode::Protect).unwrap();
    mm.add_rule(Rule::nth(1, Errno::NOMEM, 3 * PUD_SIZE / 2).times(1));
    let rep = write_protect(&mm, r, &stop()).unwrap();
    let half = Range::from_bounds(r.start(), r.start() + 3 * PUD_SIZE / 2);
    assert_eq!(rep.protected, RangeSet::from_ranges([half, old]));
    assert_eq!(mm.calls().last().unwrap().report, Some((half.len(), 0)));
    assert_eq!(rep.error.as_ref().unwrap().addr(), half.end());
    assert_eq!(rep.read_back_bytes, r.len() - half.len());
    assert_eq!(m.wp_set(r), rep.protected);

    mm.writeprotect(r, WpMode::Unprotect { dontwake: false })
        .unwrap();
    mm.writeprotect(old, WpMode::Protect).unwrap();
    mm.add_rule(Rule::nth(1, Errno::NOMEM, PUD_SIZE / 2).times(1));
    let opts = WpOptions {
        skip_pinned: false,
        on_error: OnError::Rollback,
    };
    let rep = write_protect(&mm, r, &opts).unwrap();
    assert!(rep.rolled_back);
    assert_eq!(rep.protected, RangeSet::single(old));
    assert_eq!(m.wp_set(r), RangeSet::single(old));
    // An ENOENT-like stop the retry policy does not retry.
    mm.writeprotect(r, WpMode::Unprotect { dontwake: false })
        .unwrap();
    mm.clear_calls();
    mm.add_rule(Rule::nth(1, Errno::NOENT, PUD_SIZE).times(1));
    let rep = write_protect(&mm, r, &retry(3)).unwrap();
    assert_eq!(mm.calls().len(), 1);
    assert_eq!(rep.error.unwrap().kind(), FailureKind::NotRegistered);
}

/// 64 registered, populated pages, [16, 24) under an io_uring-like pin. The model's backend
/// discovers every pin unless they are hidden; then only the kernel's MODE_SKIP_PINNED finds
/// them.
fn pinned(mm: &InjectMm<ModelMm>) -> (Range, Range) {
    let m = mm.inner().model();
    let r = m.map(64 * P, P, MapKind::Anon(Thp::NoHuge)).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    m.populate(r, true).unwrap();
    let buf = Range::from_bounds(r.start() + 16 * P, r.start() + 24 * P);
    assert!(matches!(
        m.pin(buf, PinFlags::IO_URING),
        Ok(Progress::Done(_))
    ));
    (r, buf)
}

/// skip_pinned asks the kernel too: pins the backend sees are skipped before the call
/// (discovered), pins it cannot see are left writable by the kernel and located; without
/// skip_pinned the kernel protects them (the hazard); a pinned page already protected before
/// the call stays so and is not counted by the kernel.
#[test]
fn skip_pinned_says_which_source_answered() {
    let opts = WpOptions {
        skip_pinned: true,
        on_error: OnError::Stop,
    };
    // Visible pins: discovered, the kernel has nothing left to skip.
    let mm = open();
    let (r, buf) = pinned(&mm);
    let rep = write_protect(&mm, r, &opts).unwrap();
    assert_eq!(rep.skipped, RangeSet::single(buf));
    assert_eq!(rep.provenance.skipped_discovered, RangeSet::single(buf));
    assert!(rep.provenance.skipped_kernel.is_empty());
    assert_eq!(
        rep.provenance.kernel.unwrap().calls,
        2,
        "one call per side of the pin"
    );
    assert_eq!(rep.provenance.kernel.unwrap().pinned, 0);

    // Hidden pins: the kernel skips them, the engine finds where.
    let mm = open();
    let (r, buf) = pinned(&mm);
    mm.inner().hide_pins(true);
    let rep = write_protect(&mm, r, &opts).unwrap();
    assert_eq!(rep.skipped, RangeSet::single(buf));
    assert_eq!(rep.provenance.skipped_kernel, RangeSet::single(buf));
    assert!(rep.provenance.skipped_discovered.is_empty());
    let k = rep.provenance.kernel.unwrap();
    assert_eq!((k.calls, k.done, k.pinned), (1, r.len(), buf.len()));
    assert_eq!(rep.bytes_not_protected(), 0);
    assert_eq!(rep.unexplained_pinned_bytes, 0);
    assert_eq!(
        mm.inner().model().wp_set(r),
        RangeSet::single(buf).complement_in(r)
    );
    let j = rep.to_json();
    assert_eq!(j["skipped_by"]["kernel"][0][0], 16 * P);
    assert_eq!(j["kernel"]["pinned"], buf.len());

    // Without skip_pinned the kernel protects the pinned pages like the others (the seed's
    // hazard: a device can still write them).
    let rep = write_protect(&mm, r, &stop()).unwrap();
    assert_eq!(rep.protected, RangeSet::single(r));
    assert!(rep.skipped.is_empty());
    // Now protected, they are still pinned, and the kernel leaves them as they are without
    // counting them (`pinned` is what the call left writable: kernel/README.md); with the pins
    // hidden from /proc nothing can tell, which is why a monitor must protect with
    // skip_pinned from the start.
    let rep = write_protect(&mm, r, &opts).unwrap();
    assert!(rep.skipped.is_empty());
    assert_eq!(rep.provenance.kernel.unwrap().pinned, 0);
    assert_eq!(rep.unexplained_pinned_bytes, 0);
    assert_eq!(mm.inner().model().wp_set(r), RangeSet::single(r));
}

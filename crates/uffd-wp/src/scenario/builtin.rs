//! The built-in scenarios.

use std::time::Duration;

use super::{Lab, LabConfig, LabFactory, MapKind, ScenarioError, Step, step};
use crate::backend::inject::Rule;
use crate::engine::protect::{OnError, WpOp, WpOptions, unprotect, write_protect};
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::{Errno, RegisterMode};

/// A named scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name on the command line.
    pub name: &'static str,
    /// One line on what it shows.
    pub about: &'static str,
    /// Runs it.
    pub run: fn(&dyn LabFactory) -> Result<Vec<Step>, ScenarioError>,
    /// How many of its labs limit page-table allocations ([`crate::scenario::Lab::limit_next_writeprotect`]);
    /// the Linux labs run such a scenario in a limited helper process, one memory cgroup per
    /// such lab ([`crate::scenario::limited`]).
    pub page_table_limits: u8,
}

/// Every built-in scenario.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "clean",
        about: "64 pages, half populated, registered: protect all, then un-protect all",
        run: clean,
        page_table_limits: 0,
    },
    Scenario {
        name: "unregistered-tail",
        about: "16 pages, only the first 8 registered: ENOENT, the prefix stays protected",
        run: unregistered_tail,
        page_table_limits: 0,
    },
    Scenario {
        name: "hole",
        about: "16 registered pages with page 8 unmapped: the kernel skips the gap silently",
        run: hole,
        page_table_limits: 0,
    },
    Scenario {
        name: "unpopulated",
        about: "untouched pages with and without WP_UNPOPULATED",
        run: unpopulated,
        page_table_limits: 0,
    },
    Scenario {
        name: "injected-enomem",
        about: "ENOMEM injected half-way through a call: stop, retry and rollback policies",
        run: injected_enomem,
        page_table_limits: 0,
    },
    Scenario {
        name: "injected-eagain",
        about: "EAGAIN (event in flight) injected: stop, then retry",
        run: injected_eagain,
        page_table_limits: 0,
    },
    Scenario {
        name: "snapshot-enomem",
        about: "a live snapshot whose write-protect fails with ENOMEM: copy in the freeze, or abort clean",
        run: snapshot_enomem,
        page_table_limits: 0,
    },
    Scenario {
        name: "track-eagain",
        about: "dirty tracking with EAGAIN injected: arming retries and tracks exactly, or fails clean",
        run: track_eagain,
        page_table_limits: 0,
    },
    Scenario {
        name: "lost-enomem",
        about: "the kernel's own silent partial failure: success returned, 0.5 GiB unprotected",
        run: lost_enomem,
        page_table_limits: 2,
    },
    Scenario {
        name: "pinned-io-uring",
        about: "an io_uring fixed buffer written through its pin: no WP fault, page still \
                protected; skip_pinned leaves the buffer writable",
        run: pinned_io_uring,
        page_table_limits: 0,
    },
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

const P: u64 = PAGE_SIZE;

fn pages(r: Range, a: u64, b: u64) -> Range {
    Range::from_bounds(r.start() + a * P, r.start() + b * P)
}

/// Maps `n` pages of anonymous memory and registers them (all of them, or the first `reg`).
fn registered(lab: &mut dyn Lab, n: u64, reg: u64) -> Result<Range, ScenarioError> {
    let r = lab.map(n * P, P, MapKind::Anon)?;
    lab.mm()
        .register(pages(r, 0, reg), RegisterMode::WP)
        .map_err(ScenarioError::setup("UFFDIO_REGISTER (WP)"))?;
    Ok(r)
}

fn protect_step(
    lab: &dyn Lab,
    label: &str,
    note: &str,
    r: Range,
    opts: WpOptions,
) -> Result<Step, ScenarioError> {
    let res = write_protect(lab.mm(), r, &opts);
    // A rollback that leaves nothing protected returns Err (the contract); the step's report,
    // rebuilt from the read-back, still says the rollback happened.
    let rolled_back = matches!(opts.on_error, OnError::Rollback) && res.is_err();
    let mut s = step(lab, label, note, r, WpOp::Protect, res)?;
    s.report.rolled_back |= rolled_back;
    Ok(s)
}

fn clean(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    let mut lab = f.open(LabConfig::default())?;
    let r = registered(lab.as_mut(), 64, 64)?;
    lab.touch(pages(r, 0, 32))?;
    let a = protect_step(
        lab.as_ref(),
        "protect",
        "one raw call, clean return trusted: no read-back",
        r,
        WpOptions::default(),
    )?;
    let res = unprotect(lab.mm(), r, OnError::Stop);
    let b = step(
        lab.as_ref(),
        "unprotect",
        "every page writable again",
        r,
        WpOp::Unprotect,
        res,
    )?;
    Ok(vec![a, b])
}

fn unregistered_tail(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    let mut lab = f.open(LabConfig::default())?;
    let r = registered(lab.as_mut(), 16, 8)?;
    lab.touch(r)?;
    Ok(vec![protect_step(
        lab.as_ref(),
        "protect",
        "ENOENT at the first unregistered page; pages before it stay protected",
        r,
        WpOptions::default(),
    )?])
}

fn hole(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    let mut lab = f.open(LabConfig::default())?;
    let r = registered(lab.as_mut(), 16, 16)?;
    lab.touch(r)?;
    lab.punch(pages(r, 8, 9))?;
    Ok(vec![protect_step(
        lab.as_ref(),
        "protect",
        "the kernel returns success and skips the gap; the report names it",
        r,
        WpOptions::default(),
    )?])
}

fn unpopulated(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    let mut out = Vec::new();
    for (wp_unpopulated, label, note) in [
        (
            true,
            "with-wp-unpopulated",
            "PTE markers: untouched pages are protected too",
        ),
        (
            false,
            "without-wp-unpopulated",
            "no markers: the 12 untouched pages cannot be protected, and the kernel says nothing",
        ),
    ] {
        let mut lab = f.open(LabConfig {
            wp_unpopulated,
            async_wp: false,
        })?;
        let r = registered(lab.as_mut(), 16, 16)?;
        lab.touch(pages(r, 0, 4))?;
        out.push(protect_step(
            lab.as_ref(),
            label,
            note,
            r,
            WpOptions::default(),
        )?);
    }
    Ok(out)
}

fn policy_steps(
    f: &dyn LabFactory,
    errno: Errno,
    policies: &[(&str, OnError, u32, &str)],
) -> Result<Vec<Step>, ScenarioError> {
    let mut out = Vec::new();
    for &(label, on_error, times, note) in policies {
        let mut lab = f.open(LabConfig::default())?;
        let r = registered(lab.as_mut(), 64, 64)?;
        lab.touch(r)?;
        let prefix = if errno == Errno::AGAIN {
            0
        } else {
            r.len() / 2
        };
        lab.inject(Rule::nth(1, errno, prefix).times(times));
        let opts = WpOptions {
            skip_pinned: false,
            on_error,
        };
        out.push(protect_step(lab.as_ref(), label, note, r, opts)?);
    }
    Ok(out)
}

const RETRY: OnError = OnError::Retry {
    attempts: 3,
    backoff: Duration::from_millis(1),
};

fn injected_enomem(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    policy_steps(
        f,
        Errno::NOMEM,
        &[
            (
                "stop",
                OnError::Stop,
                1,
                "the kernel protected 32 of 64 pages, then failed: the report says which",
            ),
            (
                "retry",
                RETRY,
                1,
                "the first attempt fails, the retry protects everything",
            ),
            (
                "rollback",
                OnError::Rollback,
                1,
                "all or nothing: the 32 pages this call protected are un-protected again",
            ),
        ],
    )
}

fn injected_eagain(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    policy_steps(
        f,
        Errno::AGAIN,
        &[
            (
                "stop",
                OnError::Stop,
                1,
                "an event is in flight: nothing was done, the call fails whole",
            ),
            (
                "retry",
                RETRY,
                1,
                "after the event, the retry protects everything",
            ),
        ],
    )
}

fn lost_enomem(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    super::lost_enomem::run(f)
}

/// The layout of `pinned-io-uring`: this many registered, populated pages...
pub const PINNED_PAGES: u64 = 16;
/// ...of which `[4, 8)` are an io_uring fixed buffer...
pub const PINNED_BUFFER: (u64, u64) = (4, 8);
/// ...and the write through the pin lands on this page.
pub const PINNED_WRITE_PAGE: u64 = 5;

/// A lab with the `pinned-io-uring` layout: the range and the pinned buffer.
fn pinned_lab(f: &dyn LabFactory) -> Result<(Box<dyn Lab>, Range, Range), ScenarioError> {
    let mut lab = f.open(LabConfig::default())?;
    let r = registered(lab.as_mut(), PINNED_PAGES, PINNED_PAGES)?;
    lab.touch(r)?;
    let buf = pages(r, PINNED_BUFFER.0, PINNED_BUFFER.1);
    lab.pin_fixed_buffer(buf)?;
    Ok((lab, r, buf))
}

fn pinned_io_uring(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    let (b0, b1) = PINNED_BUFFER;
    let w = PINNED_WRITE_PAGE;

    // 1. Trusting the protection: skip_pinned off, then the kernel writes through the pin.
    let (mut lab, r, _) = pinned_lab(f)?;
    let res = write_protect(lab.mm(), r, &WpOptions::default());
    let page = pages(r, w, w + 1);
    let data = vec![0xa5u8; P as usize];
    let pw = lab.write_through_pin(page.start(), &data)?;
    let still = lab.verify_wp(page)? == RangeSet::single(page);
    let note = format!(
        "skip_pinned off: all {PINNED_PAGES} pages protected, pages [{b0}, {b1}) an io_uring \
         fixed buffer (a long-term pin taken before the protection). IORING_OP_READ_FIXED then \
         wrote {} bytes into page {w} through the pin: data landed: {}, WP faults raised: {}, \
         page {w} still reads back as protected: {still}. This is the hazard: a tracker or \
         snapshot that trusts this report misses that write ('verified' only compares the \
         report with the page tables, which agree)",
        pw.bytes, pw.landed, pw.wp_faults
    );
    let a = step(lab.as_ref(), "trusting", &note, r, WpOp::Protect, res)?;
    drop(lab);

    // 2. skip_pinned: the buffer is found as a pin and left writable.
    let (lab, r, buf) = pinned_lab(f)?;
    let opts = WpOptions {
        skip_pinned: true,
        on_error: OnError::Stop,
    };
    let res = write_protect(lab.mm(), r, &opts);
    let exact = res
        .as_ref()
        .is_ok_and(|rep| rep.skipped == RangeSet::single(buf));
    let note = format!(
        "skip_pinned on: the pinned pages are found by the backend itself (on Linux in \
         /proc/self/fdinfo of the ring) and left writable; skipped is exactly the buffer \
         [{b0}, {b1}): {exact}; they count as protected (bytes not protected 0), the rest is \
         protected"
    );
    let b = step(lab.as_ref(), "skip-pinned", &note, r, WpOp::Protect, res)?;
    Ok(vec![a, b])
}

/// The snapshot engine when write-protection fails part-way (ENOMEM on every attempt at the
/// second half): with `CopyInFreeze` the unprotected half is copied while frozen and the image
/// is still exact; with `Report` it is left out and listed in `not_captured` (exactly that
/// half), the rest exact; with `Abort` the engine gives up and leaves nothing protected or
/// registered.
fn snapshot_enomem(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    use crate::engine::snapshot::{self, SnapshotOptions, Source, Unprotected};
    use crate::range::RangeSet;
    use crate::seam::FnQuiesce;
    let mut out = Vec::new();
    for (label, unprotected) in [
        ("copy-in-freeze", Unprotected::CopyInFreeze),
        ("report", Unprotected::Report),
        ("abort", Unprotected::Abort),
    ] {
        let mut lab = f.open(LabConfig::default())?;
        let r = lab.map(64 * P, P, MapKind::Anon)?;
        lab.touch(pages(r, 0, 48))?;
        lab.inject(Rule::covering(r.start() + 32 * P, Errno::NOMEM));
        let opts = SnapshotOptions {
            unprotected,
            prearm: false,
            ..SnapshotOptions::default()
        };
        let q = FnQuiesce(|| {}, || {});
        let res = snapshot::take(
            lab.mm(),
            &RangeSet::single(r),
            Source::Mm,
            &q,
            &opts,
            |_, _| {},
        );
        let raw = lab.raw_results();
        let first_err = raw.iter().find(|(e, _)| e.is_some()).copied();
        // Exact image: every page equals memory, which nobody wrote since the snapshot point.
        let (image_exact, detail) = match &res {
            Ok((img, rep)) => {
                let left_out: RangeSet = rep
                    .not_captured
                    .iter()
                    .map(|n| crate::range::Range::from_bounds(n.range[0], n.range[1]))
                    .collect();
                let expected_out = match unprotected {
                    Unprotected::Report => RangeSet::single(pages(r, 32, 64)),
                    _ => RangeSet::new(),
                };
                let mut same = left_out == expected_out;
                for p in r.page_iter().filter(|p| !left_out.contains(p.start())) {
                    let mut mem = vec![0u8; P as usize];
                    lab.mm()
                        .read_memory(p.start(), &mut mem)
                        .map_err(ScenarioError::setup("reading memory back"))?;
                    same &= img.page(p.start()).as_deref() == Some(&mem[..]);
                }
                (same, serde_json::to_value(rep).unwrap_or_default())
            }
            Err(e) => (true, serde_json::json!({ "error": e.to_string() })),
        };
        // Nothing may stay registered: protecting again must fail with ENOENT.
        lab.reset_injection();
        let still_registered = lab
            .mm()
            .writeprotect(r, crate::seam::WpMode::Protect)
            .is_ok();
        let truth = lab.verify_wp(r)?;
        let report = crate::engine::protect::WpReport {
            op: WpOp::Protect,
            requested: r,
            not_protected: truth.complement_in(r),
            protected: truth.clone(),
            skipped: RangeSet::new(),
            error: None,
            rolled_back: false,
            raw_calls: raw.len() as u32,
            read_back_bytes: 0,
            unexplained_pinned_bytes: 0,
            provenance: Default::default(),
        };
        out.push(Step {
            label: label.into(),
            kernel_errno: first_err.and_then(|(e, _)| e),
            injected: first_err.is_some_and(|(_, i)| i),
            verified: truth.is_empty() && !still_registered && image_exact,
            note: match unprotected {
                Unprotected::Abort => "ENOMEM on every attempt at the second half: the engine aborts, un-protects and unregisters everything (the report shows what is left protected: nothing)".into(),
                Unprotected::Report => "ENOMEM on every attempt at the second half: those 32 pages are left out and listed in not_captured (detail); the other 32 equal memory page for page, and nothing is left protected or registered".into(),
                _ => "ENOMEM on every attempt at the second half: those 32 pages are copied while frozen; the image equals memory page for page, and nothing is left protected or registered".into(),
            },
            detail: Some(detail),
            report,
        });
    }
    Ok(out)
}

/// The dirty tracker (async WP) when `UFFDIO_WRITEPROTECT` says EAGAIN (an event in flight):
/// once, arming retries and the epochs are exact; always, arming fails and leaves nothing
/// protected or registered.
fn track_eagain(f: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    use crate::engine::track::{Method, TrackOptions, Tracker};
    use crate::range::RangeSet;
    let mut out = Vec::new();
    for (label, times) in [("arm-retry", 1), ("arm-fails", 0)] {
        let mut lab = f.open(LabConfig {
            wp_unpopulated: true,
            async_wp: true,
        })?;
        let r = lab.map(64 * P, P, MapKind::Anon)?;
        lab.touch(pages(r, 0, 16))?;
        lab.inject(Rule::covering(r.start(), Errno::AGAIN).times(times));
        let opts = TrackOptions {
            on_error: RETRY,
            ..TrackOptions::default()
        };
        let raw_before = lab.raw_results();
        let first_err = raw_before.iter().find(|(e, _)| e.is_some()).copied();
        let (exact, detail) = match Tracker::start(lab.mm_arc(), r, Method::AsyncWp, opts) {
            Ok(mut t) => {
                let mut exact = true;
                let mut epochs = Vec::new();
                for (a, b) in [(4u64, 9u64), (20, 21), (40, 64)] {
                    lab.touch(pages(r, a, b))?;
                    match t.epoch() {
                        Ok(e) => {
                            exact &= e.dirty == RangeSet::single(pages(r, a, b));
                            epochs.push(serde_json::to_value(&e).unwrap_or_default());
                        }
                        Err(e) => {
                            exact = false;
                            epochs.push(serde_json::json!({ "error": e.to_string() }));
                        }
                    }
                }
                exact &= t.close().is_ok();
                (exact, serde_json::json!({ "epochs": epochs }))
            }
            Err(e) => (times == 0, serde_json::json!({ "error": e.to_string() })),
        };
        let raw = lab.raw_results();
        let first_err = first_err.or_else(|| raw.iter().find(|(e, _)| e.is_some()).copied());
        lab.reset_injection();
        let still_registered = lab
            .mm()
            .writeprotect(r, crate::seam::WpMode::Protect)
            .is_ok();
        let truth = lab.verify_wp(r)?;
        out.push(Step {
            label: label.into(),
            kernel_errno: first_err.and_then(|(e, _)| e),
            injected: first_err.is_some_and(|(_, i)| i),
            verified: exact && truth.is_empty() && !still_registered,
            note: if times == 1 {
                "EAGAIN once while arming: the retry arms the range, three epochs report exactly the pages written, closing leaves nothing protected".into()
            } else {
                "EAGAIN on every attempt: arming fails with a typed error and leaves nothing protected or registered".into()
            },
            detail: Some(detail),
            report: crate::engine::protect::WpReport {
                op: WpOp::Protect,
                requested: r,
                not_protected: truth.complement_in(r),
                protected: truth,
                skipped: RangeSet::new(),
                error: None,
                rolled_back: false,
                raw_calls: raw.len() as u32,
                read_back_bytes: 0,
                unexplained_pinned_bytes: 0,
                provenance: Default::default(),
            },
        });
    }
    Ok(out)
}

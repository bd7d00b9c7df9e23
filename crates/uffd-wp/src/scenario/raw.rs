//! What scenarios that set a raw call beside the exact engine share: the raw call's step (the
//! state read back and verified), the engine's step, the set-up they start from, and how notes
//! name 2 MiB slots and sizes.

use crate::engine::protect::write_protect;
use crate::engine::protect::{FailureKind, OnError, WpError, WpOp, WpOptions, WpReport};
use crate::range::{PAGE_SIZE, PMD_SIZE, Range, RangeSet};
use crate::scenario::{Lab, MapKind, ScenarioError, Step, step};
use crate::seam::lab::RawReturn;
use crate::seam::{Errno, KernelReport, RegisterMode};
use crate::sys::errno_name;

/// An offset as a 2 MiB slot number (with a fraction when it is not on a slot boundary).
pub fn slot(off: u64) -> String {
    if off % PMD_SIZE == 0 {
        (off / PMD_SIZE).to_string()
    } else {
        format!("{:.4}", off as f64 / PMD_SIZE as f64)
    }
}

/// `set` as 2 MiB slot ranges from `base`, e.g. `[257, 512) [512, 1024)`, or `none`.
pub fn slots(set: &RangeSet, base: u64) -> String {
    if set.is_empty() {
        return "none".into();
    }
    set.offsets_from(base)
        .iter()
        .map(|[a, b]| format!("[{}, {})", slot(*a), slot(*b)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bytes in MiB (three decimals unless whole).
pub fn mib(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.3} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// A raw result as notes name it.
pub fn result_name(e: Option<Errno>) -> String {
    e.map_or_else(|| "0 (success)".to_string(), errno_name)
}

/// What the raw call returned, in words (for a call over `r`).
pub fn describe(ret: &RawReturn, r: Range) -> String {
    match ret {
        RawReturn::Linux(res) => format!("UFFDIO_WRITEPROTECT returned {}", result_name(res.err())),
        RawReturn::Report(k) => format!(
            "UFFDIO_WRITEPROTECT_REPORT returned {}, done {} ({}: stopped at slot {}, {} not \
             protected), pinned {}",
            result_name(k.errno()),
            k.done,
            mib(k.done),
            slot(k.stop(r) - r.start()),
            mib(r.len() - (k.stop(r) - r.start())),
            k.pinned
        ),
    }
}

/// What the raw call over `r` returned, as a step's `detail.kernel_returned`: `{"call":
/// "UFFDIO_WRITEPROTECT", "errno": null | "ENOMEM"}`, or for the report call also `done`,
/// `pinned`, the stop offset and the bytes it says are not protected (`len - done`).
pub fn returned_json(ret: &RawReturn, r: Range) -> serde_json::Value {
    let mut v = serde_json::json!({ "call": ret.call(), "errno": ret.errno().map(errno_name) });
    if let RawReturn::Report(k) = ret {
        let done = k.stop(r) - r.start();
        v["done"] = k.done.into();
        v["pinned"] = k.pinned.into();
        v["stop_offset"] = done.into();
        v["bytes_not_protected"] = (r.len() - done).into();
    }
    v
}

/// Whether a report call's answer agrees with the state read back: its prefix is protected
/// (or skipped as pinned), its `pinned` is the skipped part of the prefix, and a success
/// covers the whole range.
fn report_agrees(k: &KernelReport, r: Range, protected: &RangeSet, skipped: &RangeSet) -> bool {
    let Some(prefix) = k.prefix(r) else {
        return k.done == 0 && k.pinned == 0 && k.result.is_err();
    };
    let prefix = RangeSet::single(prefix);
    prefix.difference(protected).difference(skipped).is_empty()
        && k.pinned == skipped.intersection(&prefix).bytes()
        && (k.result.is_err() || k.done == r.len())
}

/// The step of a raw call: the report is the state read back, verified against the lab's
/// independent read-back and, for the report call, against the prefix and pins it returned.
pub fn raw_step(
    lab: &dyn Lab,
    label: &str,
    r: Range,
    ret: &RawReturn,
    skipped: RangeSet,
    note: String,
) -> Result<Step, ScenarioError> {
    let protected = lab
        .mm()
        .wp_pages(r)
        .map_err(ScenarioError::setup("reading back the raw call's result"))?
        .difference(&skipped);
    let not_protected = RangeSet::single(r)
        .difference(&protected)
        .difference(&skipped);
    let errno = ret.errno();
    let report = WpReport {
        op: WpOp::Protect,
        requested: r,
        error: errno.map(|errno| WpError::Kernel {
            op: WpOp::Protect,
            kind: FailureKind::of(errno),
            errno,
            addr: not_protected.first_addr().unwrap_or(r.start()),
        }),
        protected,
        skipped,
        not_protected,
        rolled_back: false,
        raw_calls: 1,
        read_back_bytes: r.len(),
        unexplained_pinned_bytes: 0,
        provenance: Default::default(),
    };
    let returned_ok = match ret {
        RawReturn::Report(k) => report_agrees(k, r, &report.protected, &report.skipped),
        RawReturn::Linux(_) => true,
    };
    Ok(Step {
        label: label.into(),
        kernel_errno: errno,
        injected: false,
        verified: lab.verify_wp(r)? == report.protected && returned_ok,
        note,
        // The value the call returned beside the true state, for programs (the note says it
        // for people).
        detail: Some(serde_json::json!({
            "kernel_returned": returned_json(ret, r),
            "true_bytes_not_protected": report.bytes_not_protected(),
        })),
        report,
    })
}

/// The step of one exact-engine call (its report, or after `Err` the state read back).
pub fn engine_step(
    lab: &dyn Lab,
    label: &str,
    r: Range,
    opts: WpOptions,
    note: impl FnOnce(&Step) -> String,
) -> Result<Step, ScenarioError> {
    let res = write_protect(lab.mm(), r, &opts);
    let mut s = step(lab, label, "", r, WpOp::Protect, res)?;
    s.note = note(&s);
    Ok(s)
}

/// The engine's options that stop at the first failure.
pub fn stop() -> WpOptions {
    WpOptions {
        skip_pinned: false,
        on_error: OnError::Stop,
    }
}

/// `what`, then the engine step's first raw error, its calls and its report in slots.
pub fn engine_note(s: &Step, base: u64, what: &str) -> String {
    let r = &s.report;
    format!(
        "{what}: first raw error {}, {} raw calls; report: protected slots {}, not protected {} \
         ({} bytes){}",
        result_name(s.kernel_errno),
        r.raw_calls,
        slots(&r.protected, base),
        slots(&r.not_protected, base),
        r.bytes_not_protected(),
        r.error.as_ref().map_or(String::new(), |e| format!(
            ", error {} at slot {}",
            e.kind(),
            slot(e.addr().saturating_sub(base))
        ))
    )
}

/// Maps `len` bytes (4 KiB pages) aligned to `align` and registers them for WP.
pub fn registered(lab: &mut dyn Lab, len: u64, align: u64) -> Result<Range, ScenarioError> {
    let r = lab.map(len, align, MapKind::Anon)?;
    lab.mm()
        .register(r, RegisterMode::WP)
        .map_err(ScenarioError::setup("UFFDIO_REGISTER (WP)"))?;
    Ok(r)
}

/// Writes the page at `addr`.
pub fn touch_at(lab: &mut dyn Lab, addr: u64) -> Result<(), ScenarioError> {
    Ok(lab.touch(Range::from_bounds(addr, addr + PAGE_SIZE))?)
}

//! The `lost-enomem` scenario, on any lab that can limit page-table allocations.
//!
//! Reproduces shared/kernel-notes.md, "A success can hide a hole": a page-table allocation
//! failure inside `UFFDIO_WRITEPROTECT` is turned into `-ENOMEM` for one 1 GiB PUD by
//! change_pmd_range(), but change_pud_range() *adds* it to the pages changed in the next PUD, so
//! the ioctl returns 0 with the rest of the first GiB left unprotected (mm/mprotect.c).
//!
//! Recipe: a 1 GiB aligned 2 GiB private anonymous mapping, THP off, registered for WP on a uffd
//! with `WP_UNPOPULATED`; its first page and one page in every 2 MiB slot of its second GiB
//! touched (so those page tables exist); page-table allocations limited for the next raw call
//! ([`Lab::limit_next_writeprotect`]: on Linux a memory cgroup of 1 MiB, which the Linux labs
//! give inside a limited helper process, see [`super::limited`]; on the model a budget of page
//! tables).
//!
//! # Steps
//! 1. `raw-ioctl`: one raw call over the 2 GiB ([`Lab::raw_protect`]:
//!    `UFFDIO_WRITEPROTECT_REPORT` where the uffd offers it, a patched kernel or the model's
//!    proposed semantics); the report is an exact read-back, the report call's `done` checked
//!    against it.
//! 2. `exact-engine`: [`write_protect`](crate::engine::protect::write_protect) with
//!    [`OnError::Stop`](crate::engine::protect::OnError::Stop) on a fresh identical set-up with
//!    the same limit. Without the kernel's report the engine never lets one raw call span a
//!    PUD boundary, so the failure surfaces as ENOMEM on the first GiB's call; with it, one
//!    call over the 2 GiB reports ENOMEM and the prefix itself.
//! 3. `exact-engine-resume`: the same call once the limit is lifted protects everything.

use crate::engine::protect::{FailureKind, WpError, WpReport};
use crate::range::{PMD_SIZE, PUD_SIZE, Range, RangeSet};
use crate::scenario::raw::{
    describe, engine_step, mib, raw_step, registered, result_name, slot, slots, stop, touch_at,
};
use crate::scenario::{Lab, LabConfig, LabFactory, ScenarioError, Step};
use crate::seam::Errno;
use crate::seam::lab::RawReturn;

/// The size of each mapping: two PUDs.
const LEN: u64 = 2 * PUD_SIZE;
/// 2 MiB slots per GiB.
const SLOTS_PER_GIB: u64 = PUD_SIZE / PMD_SIZE;

/// Runs the three steps on labs of `labs` (each of the two set-ups in a lab of its own).
pub fn run(labs: &dyn LabFactory) -> Result<Vec<Step>, ScenarioError> {
    let (mut a, ra) = recipe(labs)?;
    let limit = a.limit_next_writeprotect()?;
    let ret = a.raw_protect(ra, false);
    let s1 = raw_step(&*a, "raw-ioctl", ra, &ret, RangeSet::new(), String::new())?;
    let s1 = Step {
        note: raw_note(ra, &ret, &s1.report, &limit),
        ..s1
    };

    let (mut b, rb) = recipe(labs)?;
    let limit = b.limit_next_writeprotect()?;
    let s2 = engine_step(&*b, "exact-engine", rb, stop(), |s| {
        engine_note(rb, s.kernel_errno, &s.report, &limit)
    })?;
    b.reset_injection();
    let s3 = engine_step(&*b, "exact-engine-resume", rb, stop(), |s| {
        resume_note(s.kernel_errno, &s.report)
    })?;
    Ok(vec![s1, s2, s3])
}

/// A lab with the recipe's mapping: 2 GiB, 1 GiB aligned, 4 KiB pages, registered for WP; its
/// first page and one page per 2 MiB slot of its second GiB touched.
fn recipe(labs: &dyn LabFactory) -> Result<(Box<dyn Lab>, Range), ScenarioError> {
    let mut lab = labs.open(LabConfig::default())?;
    let r = registered(&mut *lab, LEN, PUD_SIZE)?;
    touch_at(&mut *lab, r.start())?;
    for s in SLOTS_PER_GIB..2 * SLOTS_PER_GIB {
        touch_at(&mut *lab, r.start() + s * PMD_SIZE)?;
    }
    Ok((lab, r))
}

/// The offset `h` where the hole begins when `protected` is exactly `[0, h)` plus the whole
/// second GiB with `h` inside the first GiB.
fn hole_shape(r: Range, protected: &RangeSet) -> Option<u64> {
    let second = Range::from_bounds(r.start() + PUD_SIZE, r.end());
    match protected.as_slice() {
        [a, b] if a.start() == r.start() && a.end() < second.start() && *b == second => {
            Some(a.end() - r.start())
        }
        [b] if *b == second => Some(0),
        _ => None,
    }
}

/// The offset `h` when `protected` is exactly `[0, h)` with `h` inside the first GiB.
fn prefix_shape(r: Range, protected: &RangeSet) -> Option<u64> {
    match protected.as_slice() {
        [] => Some(0),
        [a] if a.start() == r.start() && a.end() < r.start() + PUD_SIZE => {
            Some(a.end() - r.start())
        }
        _ => None,
    }
}

fn raw_note(r: Range, ret: &RawReturn, report: &WpReport, limit: &str) -> String {
    let n = report.bytes_not_protected();
    let head = format!(
        "one raw call over the 2 GiB under a {limit}: {}",
        describe(ret, r)
    );
    match (
        ret,
        prefix_shape(r, &report.protected),
        hole_shape(r, &report.protected),
    ) {
        (RawReturn::Linux(Ok(())), _, Some(h)) => format!(
            "{head}, yet {n} bytes ({}) are NOT protected: a page-table allocation failed at \
             2 MiB slot {s} of the first GiB, change_pmd_range() skipped the rest of that GiB \
             and the second GiB's pages summed its -ENOMEM away. Protected: slots [0, {s}) and \
             the whole second GiB [512, 1024); hole: slots [{s}, 512)",
            mib(n),
            s = slot(h)
        ),
        (RawReturn::Report(k), Some(h), _)
            if k.errno() == Some(Errno::NOMEM) && k.stop(r) == r.start() + h =>
        {
            format!(
                "{head}: the report stops at the failure and says where: ENOMEM, stop address \
                 {:#x} (slot {s}), protected slots [0, {s}), not protected [{s}, 1024) ({n} \
                 bytes = len - done)",
                k.stop(r),
                s = slot(h)
            )
        }
        (RawReturn::Linux(Ok(())), _, None) if n == 0 => format!(
            "{head} and every page is protected: no page-table allocation failed, the hole \
             did not reproduce"
        ),
        _ => format!(
            "{head}; {n} bytes ({}) not protected, in 2 MiB slots {}; NOT the expected shape",
            mib(n),
            slots(&report.not_protected, r.start())
        ),
    }
}

fn engine_note(r: Range, kernel_errno: Option<Errno>, report: &WpReport, limit: &str) -> String {
    let base = r.start();
    let n = report.bytes_not_protected();
    let err = report.error.as_ref();
    let stopped_at = err.map(|e| slot(e.addr().saturating_sub(base)));
    match (
        kernel_errno,
        err.map(WpError::kind),
        prefix_shape(r, &report.protected),
    ) {
        (Some(Errno::NOMEM), Some(FailureKind::NoMemory), Some(h)) => format!(
            "fresh identical set-up, same {limit}: {}; stopped there: protected slots \
             [0, {s}), not protected [{s}, 1024) ({n} bytes, {}), error NoMemory at slot {}",
            how(report),
            mib(n),
            stopped_at.unwrap_or_default(),
            s = slot(h)
        ),
        (e, kind, _) => format!(
            "fresh identical set-up, same {limit}: first raw error {}, report error {}, \
             protected slots {}, not protected slots {} ({n} bytes); NOT the expected ENOMEM on \
             the first GiB's call with a protected prefix",
            result_name(e),
            kind.map_or("none".into(), |k| format!(
                "{k} at slot {}",
                stopped_at.unwrap_or_default()
            )),
            slots(&report.protected, base),
            slots(&report.not_protected, base)
        ),
    }
}

/// How the engine learnt where the failure was.
fn how(report: &WpReport) -> String {
    match report.provenance.kernel {
        Some(k) => format!(
            "the engine took the kernel's report: {} UFFDIO_WRITEPROTECT_REPORT call(s) over \
             the 2 GiB, ENOMEM with done {} (stop address at slot {}), and read back only the \
             {} past the prefix",
            k.calls,
            k.done,
            k.stop
                .map_or("?".into(), |a| slot(a - report.requested.start())),
            mib(report.read_back_bytes)
        ),
        None => "the engine never lets one raw call span a 1 GiB PUD, so its first call (the \
                 first GiB alone) failed with ENOMEM, which one PUD cannot sum away"
            .into(),
    }
}

fn resume_note(kernel_errno: Option<Errno>, rep: &WpReport) -> String {
    format!(
        "limit lifted: the same write_protect again; raw result {}, {} raw calls, {} bytes not \
         protected{}",
        result_name(kernel_errno),
        rep.raw_calls,
        rep.bytes_not_protected(),
        if rep.complete() && rep.error.is_none() {
            ": all 2 GiB protected"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let r = Range::new(PUD_SIZE * 8, LEN).unwrap();
        let b = r.start();
        let set = |v: &[(u64, u64)]| {
            RangeSet::from_ranges(v.iter().map(|&(s, e)| Range::from_bounds(b + s, b + e)))
        };
        let h = 257 * PMD_SIZE;
        assert_eq!(hole_shape(r, &set(&[(0, h), (PUD_SIZE, LEN)])), Some(h));
        assert_eq!(hole_shape(r, &set(&[(0, LEN)])), None);
        assert_eq!(hole_shape(r, &set(&[(0, h)])), None);
        assert_eq!(prefix_shape(r, &set(&[(0, h)])), Some(h));
        assert_eq!(prefix_shape(r, &set(&[(0, h), (PUD_SIZE, LEN)])), None);
        assert_eq!(slot(h), "257");
        assert_eq!(slots(&set(&[(h, PUD_SIZE)]), b), "[257, 512)");
    }
}

//! `uffd-wp snapshot --pid P --range START:LEN`: a live snapshot of another process.
//!
//! The remote backend ([`LinuxMm::attach`]: a uffd created inside the target) with the
//! ptrace quiesce ([`RemoteQuiesce`]) and page reads through process_vm_readv
//! ([`Source::Mm`]). There is no oracle for a foreign process: `consistent` is `null`.
//! If this process dies at any point after the attach, the kernel releases the uffd (which
//! un-protects every page) and detaches the stopped threads: the target runs on.

use std::sync::Arc;
use std::time::Duration;

use uffd_wp::backend::linux::remote::{self, Cancel, FreezeStats, Observer, Step};
use uffd_wp::backend::linux::{AttachError, AttachReport, Config, LinuxMm, RemoteQuiesce};
use uffd_wp::backend::procfs;
use uffd_wp::engine::snapshot::{self, Source};
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet, parse_size};
use uffd_wp::seam::{FnQuiesce, Quiesce};
use uffd_wp::sys::signal;

use super::Args;
use crate::CliError;

/// The `--stall-at` points besides the protocol's [`Step`]s: in the copy (the range
/// write-protected, the first chunk copied, faults not served).
const STALL_COPY: &str = "copy";

/// Every `--stall-at` name: each [`Step`] and [`STALL_COPY`].
pub fn stall_points() -> Vec<&'static str> {
    let mut v: Vec<&str> = Step::ALL.iter().map(Step::name).collect();
    v.push(STALL_COPY);
    v
}

/// Parses `--stall-at`.
pub fn parse_stall(s: &str) -> Result<String, String> {
    if stall_points().contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!("one of: {}", stall_points().join(", ")))
    }
}

/// Prints the marker the tests wait for, then waits to be killed; a stop signal ends the wait.
fn stall(what: &str) -> Result<(), Cancel> {
    eprintln!("uffd-wp: STALLED at {what}");
    loop {
        if signal::caught_signal().is_some() {
            return Err(Cancel);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The CLI's [`Observer`]: cancels once a stop signal was caught (and remembers where);
/// stalls at `--stall-at`; with `UFFD_WP_TRACE_STEPS` set (tests), names every step on stderr
/// as it is reached.
#[derive(Debug)]
pub(crate) struct CliObserver {
    stall: Option<String>,
    trace: bool,
    t0: std::time::Instant,
    cancelled_at: std::sync::Mutex<Option<Step>>,
}

impl CliObserver {
    /// An observer stalling at `stall` (a `--stall-at` name), tracing if the environment says.
    pub(crate) fn new(stall: Option<String>) -> CliObserver {
        CliObserver {
            stall,
            trace: std::env::var_os("UFFD_WP_TRACE_STEPS").is_some(),
            t0: std::time::Instant::now(),
            cancelled_at: std::sync::Mutex::new(None),
        }
    }

    /// Names `what` on stderr (`uffd-wp: STEP what +Nus`) when tracing.
    pub(crate) fn trace(&self, what: &str) {
        if self.trace {
            // One write, so that a kill never cuts a line.
            let line = format!(
                "uffd-wp: STEP {what} +{}us\n",
                self.t0.elapsed().as_micros()
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        }
    }

    /// Where a stop signal was acted on: `attach`, `freeze`, or `None` (not at a step).
    pub(crate) fn cancelled_during(&self) -> Option<&'static str> {
        let at = *self.cancelled_at.lock().expect("observer lock");
        at.map(|s| match s {
            Step::Freezing | Step::Frozen => "freeze",
            _ => "attach",
        })
    }
}

impl Observer for CliObserver {
    fn at(&self, step: Step) -> Result<(), Cancel> {
        self.trace(step.name());
        if signal::caught_signal().is_some() {
            self.cancelled_at
                .lock()
                .expect("observer lock")
                .get_or_insert(step);
            return Err(Cancel);
        }
        if self.stall.as_deref() == Some(step.name()) {
            return stall(step.name());
        }
        Ok(())
    }
}

/// A number of `--range`: hex with `0x`, or with a hex letter and no `0x` (as pasted from
/// /proc/PID/maps), else decimal.
fn parse_addr(t: &str) -> Result<u64, String> {
    let hex = |h: &str| {
        u64::from_str_radix(h, 16).map_err(|_| format!("{t:?} is not a hexadecimal address"))
    };
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return hex(h);
    }
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_hexdigit()) {
        return if t.chars().all(|c| c.is_ascii_digit()) {
            t.parse().map_err(|_| format!("{t:?} is too large"))
        } else {
            hex(t)
        };
    }
    Err(format!(
        "{t:?} is not an address (decimal, or hex with or without 0x)"
    ))
}

/// Parses `START:LEN` (START an address, see `parse_addr`; LEN bytes with an optional K, M,
/// G or T suffix, or 0x hex) or `START-END` as /proc/PID/maps prints it (hex, `0x` optional).
pub(crate) fn parse_range(s: &str) -> Result<Range, CliError> {
    let bad = |why: String| CliError::Usage(format!("--range {s:?}: {why}"));
    let (start, end) = if let Some((a, l)) = s.split_once(':') {
        let start = parse_addr(a).map_err(bad)?;
        let len = match l.strip_prefix("0x").or_else(|| l.strip_prefix("0X")) {
            Some(h) => u64::from_str_radix(h, 16).map_err(|e| bad(format!("LEN: {e}")))?,
            None => parse_size(l).map_err(bad)?,
        };
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad("START + LEN overflows".into()))?;
        (start, end)
    } else if let Some((a, b)) = s.split_once('-') {
        let hex = |t: &str| {
            let h = t.strip_prefix("0x").unwrap_or(t);
            u64::from_str_radix(h, 16).map_err(|_| bad(format!("{t:?} is not hexadecimal")))
        };
        (hex(a)?, hex(b)?)
    } else {
        return Err(bad(
            "expected START:LEN (e.g. 0x7f0000000000:64M) or START-END as in /proc/PID/maps".into(),
        ));
    };
    check_bounds(start, end).map_err(bad)
}

/// A non-empty page-aligned range, or why not.
fn check_bounds(start: u64, end: u64) -> Result<Range, String> {
    let down = |a: u64| a & !(PAGE_SIZE - 1);
    if start % PAGE_SIZE != 0 {
        return Err(format!(
            "START {start:#x} is not a multiple of the page size {PAGE_SIZE} (the page holding it starts at {:#x})",
            down(start)
        ));
    }
    if end <= start {
        return Err("the range is empty".into());
    }
    if end % PAGE_SIZE != 0 {
        return Err(format!(
            "the length {} is not a multiple of the page size {PAGE_SIZE}",
            end - start
        ));
    }
    Ok(Range::from_bounds(start, end))
}

/// Maps an attach or freeze error, a cancel by a stop signal becoming `Interrupted`.
fn attach_error(operation: &'static str, pid: u32, source: AttachError) -> CliError {
    match (source, signal::caught_signal()) {
        (AttachError::Cancelled { .. }, Some(sig)) => CliError::Interrupted {
            signal: sig,
            during: if operation == "freezing" {
                "freeze"
            } else {
                "attach"
            },
        },
        (source, _) => CliError::Attach {
            operation,
            pid,
            source,
        },
    }
}

/// Everything that can fail before the target is touched: the process and permission checks,
/// the range against its mappings, the `--out` file (created).
fn check_first(a: &Args, pid: u32, r: Range) -> Result<Option<super::Out>, CliError> {
    remote::preflight(pid as i32).map_err(|e| attach_error("checking", pid, e))?;
    check_mapped(r, pid)?;
    super::create_out(a.out.as_deref())
}

/// Runs it.
pub(super) fn run(a: &Args, pid: u32, range: &str) -> Result<(), CliError> {
    let r = parse_range(range)?;
    let out = check_first(a, pid, r)?;
    signal::catch_stop_signals().map_err(|errno| CliError::Os {
        operation: "installing the signal handlers".into(),
        errno,
    })?;
    let obs = Arc::new(CliObserver::new(a.stall_at.clone()));
    obs.trace("begin");
    let (mm, attach) = LinuxMm::attach_observed(pid, a.thread, Config::default(), &*obs)
        .map_err(|e| attach_error("attaching to", pid, e))?;
    let rq = RemoteQuiesce::with_observer(pid, obs);
    let (img, rep) = take_remote(a, &mm, r, &rq, pid)?;
    let freeze = rq.last_stats();
    drop(mm);
    signal::default_stop_signals();
    if let Some(sig) = signal::caught_signal() {
        return Err(CliError::Interrupted {
            signal: sig,
            during: "copy",
        });
    }
    let stored = super::write_image(&img, out)?;
    print_remote(a, pid, r, &attach, freeze, &rep, stored);
    Ok(())
}

/// Fails unless `r` is entirely mapped in the target (read from /proc/PID/maps).
fn check_mapped(r: Range, pid: u32) -> Result<(), CliError> {
    match procfs::fully_mapped(pid as i32, r) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CliError::Usage(format!(
            "--range {:#x}-{:#x} is not entirely mapped in process {pid} (see /proc/{pid}/maps)",
            r.start(),
            r.end()
        ))),
        Err(e) => Err(CliError::Os {
            operation: format!("reading /proc/{pid}/maps"),
            errno: e,
        }),
    }
}

/// Ends the run from inside the copy after a stop signal: the process exit closes the uffd,
/// whose release un-protects every page and wakes every faulting thread (the target is not
/// frozen during the copy).
fn exit_interrupted(a: &Args, sig: i32) -> ! {
    let e = CliError::Interrupted {
        signal: sig,
        during: "copy",
    };
    if a.json {
        crate::print_json(&serde_json::json!({ "error": e.report() }));
    }
    eprintln!("uffd-wp: error: {e}");
    std::process::exit(i32::from(e.exit_code()))
}

/// Snapshots `r` of the target, frozen by `rq` (stalling where `--stall-at` says).
fn take_remote(
    a: &Args,
    mm: &LinuxMm,
    r: Range,
    rq: &RemoteQuiesce,
    pid: u32,
) -> Result<(snapshot::Image, snapshot::SnapshotReport), CliError> {
    let opts = super::options(a);
    let q = FnQuiesce(|| rq.freeze(), || rq.resume());
    let bar = super::copy_bar(super::report::show_progress(a.json), r.pages());
    let stall_copy = a.stall_at.as_deref() == Some(STALL_COPY);
    let res = snapshot::take(
        mm,
        &RangeSet::single(r),
        Source::Mm,
        &q as &dyn Quiesce,
        &opts,
        |done, total| {
            bar.set_position(done);
            if stall_copy && done < total {
                let _ = stall(STALL_COPY);
            }
            if let Some(sig) = signal::caught_signal() {
                exit_interrupted(a, sig);
            }
        },
    );
    bar.finish_and_clear();
    if let Some(e) = rq.last_error() {
        return Err(attach_error("freezing", pid, e));
    }
    res.map_err(CliError::from)
}

/// Prints the report of a snapshot of another process.
fn print_remote(
    a: &Args,
    pid: u32,
    r: Range,
    attach: &AttachReport,
    freeze: FreezeStats,
    rep: &snapshot::SnapshotReport,
    stored: Option<u64>,
) {
    let remote = serde_json::json!({
        "pid": pid,
        "range": [r.start(), r.end()],
        "attach": attach,
        "freeze": freeze,
        "read": "process_vm_readv",
    });
    super::print_report(a, rep, stored, "remote", remote, || {
        println!(
            "snapshot of {} of process {pid} at {:#x} (no oracle: consistency not checked)",
            crate::report::fmt_bytes(r.len()),
            r.start()
        );
        println!(
            "  attach           {:.0} us (thread {} stopped {:.0} us, entry stop {:?})",
            attach.total_us, attach.tid, attach.stopped_us, attach.site
        );
        println!(
            "  pause            {:.0} us (stopping {} threads {:.0} us, write-protect {:.0} us, {} raw calls)",
            rep.pause_us, freeze.threads, rep.freeze_us, rep.protect_us, rep.protect_raw_calls
        );
        println!(
            "  copy             {:.1} ms, {:.0} MB/s (process_vm_readv)",
            rep.copy_ms, rep.copy_mb_s
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        let r = parse_range("0x7f0000000000:64M").unwrap();
        assert_eq!((r.start(), r.len()), (0x7f00_0000_0000, 64 << 20));
        let r = parse_range("4096:8192").unwrap();
        assert_eq!((r.start(), r.len()), (4096, 8192));
        assert!(parse_range("4096").is_err());
        assert!(parse_range("4095:4096").is_err());
        assert!(parse_range("4096:0").is_err());
        assert!(parse_range("0xffffffffffff0000:1G").is_err());
        // As pasted from /proc/PID/maps: hex without 0x, START-END or START:LEN.
        let r = parse_range("7f3c2a1b2000-7f3c2a1b4000").unwrap();
        assert_eq!((r.start(), r.len()), (0x7f3c_2a1b_2000, 8192));
        let r = parse_range("7f3c2a1b2000:8K").unwrap();
        assert_eq!(r.start(), 0x7f3c_2a1b_2000);
        let r = parse_range("0x10000:1T").unwrap();
        assert_eq!(r.len(), 1 << 40);
        let e = parse_range("0x1001:4096").unwrap_err().to_string();
        assert!(e.contains("page size") && e.contains("0x1000"), "{e}");
        let e = parse_range("zz:4096").unwrap_err().to_string();
        assert!(e.contains("not an address"), "{e}");
        let e = parse_range("4096:1X").unwrap_err().to_string();
        assert!(e.contains("K, M, G or T"), "{e}");
    }
}

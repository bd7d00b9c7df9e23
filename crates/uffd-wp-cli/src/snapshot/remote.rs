//! `uffd-wp snapshot --pid P --range START:LEN`: a live snapshot of another process.
//!
//! The remote backend ([`LinuxMm::attach`]: a uffd created inside the target) with the
//! ptrace quiesce ([`RemoteQuiesce`]) and page reads through process_vm_readv
//! ([`Source::Mm`]). There is no oracle for a foreign process: `consistent` is `null`.
//! If this process dies at any point after the attach, the kernel releases the uffd (which
//! un-protects every page) and detaches the stopped threads: the target runs on.

use std::time::Duration;

use uffd_wp::backend::linux::remote::FreezeStats;
use uffd_wp::backend::linux::{AttachReport, Config, LinuxMm, RemoteQuiesce};
use uffd_wp::engine::snapshot::{self, Source};
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet, parse_size};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{FnQuiesce, Quiesce};

use super::Args;
use crate::CliError;

/// Where `--stall-at` stops (for the tests that kill the monitor mid-snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StallAt {
    /// Inside the pause: every thread of the target stopped, nothing protected yet.
    Freeze,
    /// In the copy: the range write-protected, the first chunk copied, faults not served.
    Copy,
}

/// Prints the marker the tests wait for, then sleeps until killed.
fn stall(what: &str) -> ! {
    eprintln!("uffd-wp: STALLED at {what}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Parses `START:LEN` (START decimal or 0x hex; LEN decimal, 0x hex, or with K/M/G).
pub(crate) fn parse_range(s: &str) -> Result<Range, CliError> {
    let bad = |why: String| CliError::Usage(format!("--range {s:?}: {why}"));
    let (a, l) = s
        .split_once(':')
        .ok_or_else(|| bad("expected START:LEN".into()))?;
    let num = |t: &str| -> Result<u64, String> {
        match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(h) => u64::from_str_radix(h, 16).map_err(|e| e.to_string()),
            None => parse_size(t),
        }
    };
    let start = num(a).map_err(bad)?;
    let len = num(l).map_err(bad)?;
    if start % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
        return Err(bad(format!(
            "START and LEN must be multiples of {PAGE_SIZE}, LEN non-zero"
        )));
    }
    let end = start
        .checked_add(len)
        .ok_or_else(|| bad("overflows".into()))?;
    Ok(Range::from_bounds(start, end))
}

/// Runs it.
pub(super) fn run(a: &Args, pid: u32, range: &str) -> Result<(), CliError> {
    let r = parse_range(range)?;
    let out = super::create_out(a.out.as_deref())?;
    let (mm, attach) =
        LinuxMm::attach_with_report(pid, Config::default()).map_err(|source| CliError::Attach {
            operation: "attaching to",
            pid,
            source,
        })?;
    check_mapped(&mm, r, pid)?;
    let rq = RemoteQuiesce::new(pid);
    let (img, rep) = take_remote(a, &mm, r, &rq, pid)?;
    let freeze = rq.last_stats();
    let stored = super::write_image(&img, out)?;
    print_remote(a, pid, r, &attach, freeze, &rep, stored);
    Ok(())
}

/// Fails unless `r` is entirely mapped in the target.
fn check_mapped(mm: &LinuxMm, r: Range, pid: u32) -> Result<(), CliError> {
    match mm.fully_mapped(r) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CliError::Usage(format!(
            "{r} is not entirely mapped in process {pid}"
        ))),
        Err(e) => Err(CliError::Os {
            operation: format!("reading /proc/{pid}/maps"),
            errno: e,
        }),
    }
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
    let q = FnQuiesce(
        || {
            rq.freeze();
            if a.stall_at == Some(StallAt::Freeze) && rq.is_frozen() {
                stall("freeze");
            }
        },
        || rq.resume(),
    );
    let bar = super::copy_bar(super::report::show_progress(a.json), r.pages());
    let stall_copy = a.stall_at == Some(StallAt::Copy);
    let res = snapshot::take(
        mm,
        &RangeSet::single(r),
        Source::Mm,
        &q as &dyn Quiesce,
        &opts,
        |done, total| {
            bar.set_position(done);
            if stall_copy && done < total {
                stall("copy");
            }
        },
    );
    bar.finish_and_clear();
    if let Some(e) = rq.last_error() {
        return Err(CliError::Attach {
            operation: "freezing",
            pid,
            source: e,
        });
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
            "snapshot of {} MiB of process {pid} at {:#x} (no oracle: consistency not checked)",
            r.len() >> 20,
            r.start()
        );
        println!(
            "  attach           {:.0} us (thread {} stopped {:.0} us, syscall site {:?})",
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
    }
}

//! `uffd-wp track`: dirty-tracking epochs over the built-in workload, each epoch's dirty count
//! beside the workload's own ground truth.
//!
//! The writers run for `--interval-ms`, are paused at a page boundary, the tracker ends the
//! epoch, and the workload says which pages its writers wrote since the previous boundary
//! (`Workload::take_dirty`); then the writers resume. An epoch is `exact` when the tracker's
//! dirty set (pinned pages included) equals that truth, page for page. Exit status 1 when any
//! epoch is not exact.
//!
//! `uffd-wp bench track` (wired in `bench.rs`): the uffd tracker's epoch against an
//! mprotect/SIGSEGV tracker's over 1 GiB with 1% of the pages written (see
//! `uffd_wp_bench::track`).

use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use serde::Serialize;

use uffd_wp::backend::linux::LinuxMm;
use uffd_wp::engine::track::{Epoch, Method, Selection, TrackOptions, Tracker};
use uffd_wp::range::{RangeSet, parse_size};
use uffd_wp::sys::mem::Thp;
use uffd_wp_bench::track::{self as tbench, TrackBenchConfig, TrackFigures};
use uffd_wp_bench::workload::{Workload, WorkloadConfig};

use crate::CliError;
use crate::report;

/// Arguments of `uffd-wp track`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the workload's region (suffix K, M, G; a multiple of 2 MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Number of epochs.
    #[arg(long, default_value_t = 10)]
    epochs: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// How long the writers run in each epoch, in milliseconds.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Tracking method (async-wp, sync-wp, soft-dirty); the best the kernel offers by default.
    #[arg(long, value_parser = parse_method)]
    method: Option<Method>,
    /// Back the region with transparent huge pages.
    #[arg(long)]
    thp: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
        format!("{s:?}: the methods are {}", names.join(", "))
    })
}

/// One epoch of the report.
#[derive(Debug, Serialize)]
struct EpochRow {
    index: u64,
    /// Pages the tracker reported dirty (pinned included).
    dirty_pages: u64,
    /// Pages the writers wrote in the epoch (ground truth).
    truth_pages: u64,
    /// `dirty == truth`, page for page.
    exact: bool,
    /// Written pages the tracker did not report.
    missed_pages: u64,
    /// Reported pages nobody wrote.
    extra_pages: u64,
    /// Pinned pages (reported dirty whatever was written).
    pinned_pages: u64,
    /// Time of the epoch boundary (scan and re-arm).
    epoch_us: f64,
    /// Sync WP: faults served in the epoch.
    faults: u64,
}

/// The `--json` output.
#[derive(Debug, Serialize)]
struct Output {
    method: Method,
    selection: Selection,
    size: u64,
    pages: u64,
    threads: usize,
    interval_ms: u64,
    thp: bool,
    epochs: Vec<EpochRow>,
    exact: bool,
    epoch_us_median: f64,
    epoch_us_max: f64,
    writes: u64,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    check_args(a)?;
    let (mm, selection) = tbench::open_linux(a.method)?;
    let w = start_workload(a)?;
    let bar = report::bar(
        report::show_progress(a.json),
        a.epochs,
        "{msg} [{bar:30}] {pos}/{len} epochs",
        format!("tracking ({})", selection.method),
    );
    let mut t = Tracker::start(
        Arc::new(mm),
        w.range(),
        selection.method,
        TrackOptions::default(),
    )?;
    let rows = run_epochs(a, &w, &mut t, &bar)?;
    bar.finish_and_clear();
    t.close()?;
    let writes = w.writes();
    drop(w);
    let out = Output::new(a, selection, rows, writes);
    report::emit(a.json, &out, print_epochs);
    if out.exact {
        Ok(())
    } else {
        Err(CliError::Unverified(
            "a tracking epoch differs from the workload's ground truth".into(),
        ))
    }
}

/// Checks `--size` (what both `track` and `bench track` need: whole 2 MiB blocks).
fn check_size(size: u64) -> Result<(), CliError> {
    if size == 0 || size % (2 << 20) != 0 {
        return Err(CliError::Usage(format!(
            "--size {size} is not a positive multiple of 2 MiB"
        )));
    }
    Ok(())
}

/// Checks the arguments of `track` before anything is touched.
fn check_args(a: &Args) -> Result<(), CliError> {
    check_size(a.size)?;
    if a.threads == 0 || a.epochs == 0 {
        return Err(CliError::Usage(
            "--threads and --epochs must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Starts the workload, its writers parked and its ground truth cleared.
fn start_workload(a: &Args) -> Result<Workload, CliError> {
    let w = Workload::start(WorkloadConfig {
        size: a.size,
        threads: a.threads,
        thp: a.thp,
        ..Default::default()
    })
    .map_err(|errno| CliError::Os {
        operation: "starting the workload".into(),
        errno,
    })?;
    w.take_dirty();
    Ok(w)
}

/// Runs the epochs: the writers write for `--interval-ms`, are parked, and the tracker's
/// epoch is set beside the pages they wrote.
fn run_epochs(
    a: &Args,
    w: &Workload,
    t: &mut Tracker<LinuxMm>,
    bar: &ProgressBar,
) -> Result<Vec<EpochRow>, CliError> {
    let mut rows = Vec::new();
    for _ in 0..a.epochs {
        w.resume();
        std::thread::sleep(Duration::from_millis(a.interval_ms));
        w.pause();
        let e = t.epoch()?;
        let truth = w.take_dirty();
        rows.push(EpochRow::new(&e, &truth));
        bar.inc(1);
    }
    Ok(rows)
}

impl EpochRow {
    /// The row of epoch `e`, against the pages the writers wrote in it.
    fn new(e: &Epoch, truth: &RangeSet) -> EpochRow {
        let got = e.all_dirty();
        EpochRow {
            index: e.index,
            dirty_pages: got.pages(),
            truth_pages: truth.pages(),
            exact: got == *truth,
            missed_pages: truth.difference(&got).pages(),
            extra_pages: got.difference(truth).pages(),
            pinned_pages: e.pinned.pages(),
            epoch_us: e.elapsed.as_secs_f64() * 1e6,
            faults: e.faults,
        }
    }
}

impl Output {
    /// The report of a run with `a`: its epochs and their summary.
    fn new(a: &Args, selection: Selection, rows: Vec<EpochRow>, writes: u64) -> Output {
        let mut us: Vec<f64> = rows.iter().map(|r| r.epoch_us).collect();
        us.sort_by(f64::total_cmp);
        Output {
            method: selection.method,
            selection,
            size: a.size,
            pages: a.size / uffd_wp::PAGE_SIZE,
            threads: a.threads,
            interval_ms: a.interval_ms,
            thp: a.thp,
            exact: rows.iter().all(|r| r.exact),
            epoch_us_median: us[us.len() / 2],
            epoch_us_max: us[us.len() - 1],
            writes,
            epochs: rows,
        }
    }
}

/// The text report of `track`: a table of the epochs and a verdict.
fn print_epochs(out: &Output) {
    println!(
        "method {} ({}); {}, {} writers, {} ms per epoch",
        out.method,
        out.selection.reason,
        crate::report::fmt_bytes(out.size),
        out.threads,
        out.interval_ms
    );
    println!(
        "{:>5} {:>10} {:>10} {:>6} {:>7} {:>7} {:>10}",
        "epoch", "dirty", "truth", "exact", "missed", "extra", "epoch_us"
    );
    for r in &out.epochs {
        println!(
            "{:>5} {:>10} {:>10} {:>6} {:>7} {:>7} {:>10.0}",
            r.index,
            r.dirty_pages,
            r.truth_pages,
            r.exact,
            r.missed_pages,
            r.extra_pages,
            r.epoch_us
        );
    }
    println!(
        "{}: every epoch {}; epoch median {:.0} us, max {:.0} us",
        if out.exact { "exact" } else { "NOT EXACT" },
        if out.exact {
            "equals the writers' ground truth"
        } else {
            "should equal the writers' ground truth"
        },
        out.epoch_us_median,
        out.epoch_us_max
    );
}

/// The goal: a uffd epoch at least this many times faster than an mprotect one.
const GOAL_EPOCH_RATIO: f64 = 20.0;

/// Arguments of `uffd-wp bench track`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Region size (suffix K, M, G; a multiple of 2 MiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Fraction of the pages written per epoch.
    #[arg(long, default_value_t = 0.01)]
    fraction: f64,
    /// Timed rounds per tracker and page kind (medians are reported); one more warm-up round.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Only this page kind (4k or thp); both by default.
    #[arg(long, value_parser = parse_kind)]
    kind: Option<Thp>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_kind(s: &str) -> Result<Thp, String> {
    match s {
        "4k" => Ok(Thp::NoHuge),
        "thp" => Ok(Thp::Huge),
        _ => Err(format!("{s:?}: the page kinds are 4k and thp")),
    }
}

/// The `--json` output of `bench track`.
#[derive(Debug, Serialize)]
struct BenchOutput {
    bench: &'static str,
    size: u64,
    fraction: f64,
    rounds: usize,
    goals: BenchGoals,
    /// The 4 KiB figure of `epoch_ratio_vs_mprotect` (THP's when only THP was measured).
    epoch_ratio_vs_mprotect: f64,
    #[serde(rename = "4k", skip_serializing_if = "Option::is_none")]
    small: Option<TrackFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thp: Option<TrackFigures>,
}

#[derive(Debug, Serialize)]
struct BenchGoals {
    epoch_ratio_vs_mprotect: f64,
}

/// Runs `uffd-wp bench track`.
pub fn bench(a: &BenchArgs) -> Result<(), CliError> {
    check_size(a.size)?;
    if !(a.fraction > 0.0 && a.fraction <= 1.0) {
        return Err(CliError::Usage(format!(
            "--fraction {} is not in (0, 1]",
            a.fraction
        )));
    }
    let show = report::show_progress(a.json);
    let mut out = BenchOutput::new(a);
    for thp in [Thp::NoHuge, Thp::Huge] {
        if a.kind.is_some_and(|k| k != thp) {
            continue;
        }
        let f = bench_kind(a, thp, show)?;
        out.add(thp, f);
    }
    report::emit(a.json, &out, print_bench);
    Ok(())
}

impl BenchOutput {
    /// The report of `bench track` before any page kind is measured.
    fn new(a: &BenchArgs) -> BenchOutput {
        BenchOutput {
            bench: "track",
            size: a.size,
            fraction: a.fraction,
            rounds: a.rounds.max(1),
            goals: BenchGoals {
                epoch_ratio_vs_mprotect: GOAL_EPOCH_RATIO,
            },
            epoch_ratio_vs_mprotect: f64::NAN,
            small: None,
            thp: None,
        }
    }

    /// Adds the figures of one page kind (the first measured gives the headline ratio).
    fn add(&mut self, thp: Thp, f: TrackFigures) {
        if self.epoch_ratio_vs_mprotect.is_nan() {
            self.epoch_ratio_vs_mprotect = f.epoch_ratio_vs_mprotect;
        }
        match thp {
            Thp::Huge => self.thp = Some(f),
            _ => self.small = Some(f),
        }
    }
}

/// Measures both trackers on one page kind, with a progress bar if `show`.
fn bench_kind(a: &BenchArgs, thp: Thp, show: bool) -> Result<TrackFigures, CliError> {
    let cfg = TrackBenchConfig {
        size: a.size,
        thp,
        fraction: a.fraction,
        rounds: a.rounds.max(1),
    };
    let pb = report::bar(
        show,
        2 * a.size + 2 * cfg.rounds as u64,
        "{msg} [{bar:30}] {percent}%",
        format!("bench track {}", tbench::kind_name(thp)),
    );
    let f = tbench::measure(&cfg, |s| match s {
        tbench::Step::Populated(b) => pb.inc(b),
        _ => pb.inc(1),
    })
    .map_err(|e| CliError::Unverified(e.to_string()))?;
    pb.finish_and_clear();
    Ok(f)
}

/// The text report of `bench track`.
fn print_bench(out: &BenchOutput) {
    println!(
        "dirty tracking: {} MiB, {:.1}% of the pages written per epoch, medians of {} rounds",
        out.size >> 20,
        out.fraction * 100.0,
        out.rounds
    );
    for f in [&out.small, &out.thp].into_iter().flatten() {
        print_bench_kind(f);
    }
}

/// The text report of one page kind of `bench track`.
fn print_bench_kind(f: &TrackFigures) {
    println!("{} ({} dirty pages per epoch):", f.kind, f.dirty_pages);
    println!(
        "  epoch boundary: uffd {:.3} ms; mprotect {:.3} ms (re-arm runs {:.3}, whole range {:.3}) -> {:.1}x (goal {GOAL_EPOCH_RATIO}x)",
        f.uffd_epoch_ms,
        f.mprotect_epoch_ms,
        f.mprotect_epoch_pages_ms,
        f.mprotect_epoch_range_ms,
        f.epoch_ratio_vs_mprotect
    );
    println!(
        "  first write: uffd async p50 {:.2} us p99 {:.2}; mprotect+SIGSEGV p50 {:.2} us p99 {:.2} -> {:.1}x; plain write p50 {:.2} us",
        f.uffd_first_write_us.p50,
        f.uffd_first_write_us.p99,
        f.mprotect_first_write_us.p50,
        f.mprotect_first_write_us.p99,
        f.write_ratio_vs_mprotect,
        f.plain_write_us.p50
    );
    println!(
        "  whole epoch (first writes + boundary): uffd {:.2} ms; mprotect {:.2} ms -> {:.1}x",
        f.uffd_epoch_total_ms, f.mprotect_epoch_total_ms, f.epoch_total_ratio_vs_mprotect
    );
}

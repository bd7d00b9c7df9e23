//! `uffd-wp bench snapshot`: live snapshots against their alternatives in the same run (see
//! `uffd_wp_bench::snapshot`): the pause against `fork()` (and `gcore`), the copy against
//! memcpy, the fault latency against a bare handler.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use uffd_wp::engine::snapshot::SnapshotOptions;
use uffd_wp::range::parse_size;
use uffd_wp_bench::protect::PageKind;
use uffd_wp_bench::snapshot::{
    self as sbench, FaultConfig, FaultFigures, Gcore, PauseConfig, PauseFigures, PauseVariant, Step,
};

use crate::CliError;
use crate::report;

/// The goals.
const GOAL_PAUSE_4K: f64 = 0.5;
const GOAL_PAUSE_THP: f64 = 0.1;
const GOAL_COPY: f64 = 0.7;
const GOAL_FAULT: f64 = 1.25;

/// Arguments of `uffd-wp bench snapshot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the workload's region (suffix K, M, G; a multiple of 2 MiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Recorded rounds per page kind (medians are reported); one more warm-up round.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Writer threads of the workload.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// Only this page kind (4k or thp); both by default.
    #[arg(long, value_parser = super::parse_kind)]
    kind: Option<PageKind>,
    /// Region of the fault-latency cases (4 KiB pages; the writer writes its last pages).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    fault_region: u64,
    /// Timed writes per fault-latency case and round.
    #[arg(long, default_value_t = 300)]
    fault_writes: usize,
    /// Recorded fault-latency rounds.
    #[arg(long, default_value_t = 5)]
    fault_rounds: usize,
    /// Skip the fault-latency cases.
    #[arg(long)]
    no_faults: bool,
    /// Do not time gcore.
    #[arg(long)]
    no_gcore: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct PauseGoals {
    #[serde(rename = "4k")]
    small: f64,
    thp: f64,
}

#[derive(Debug, Serialize)]
struct Goals {
    pause_ratio_vs_fork: PauseGoals,
    copy_ratio_vs_memcpy: f64,
    fault_ratio_vs_raw: f64,
}

/// The `--json` output.
#[derive(Debug, Serialize)]
struct Output {
    bench: &'static str,
    size: u64,
    runs: usize,
    writers: usize,
    cpus: usize,
    /// /proc/loadavg (1, 5, 15 min) before and after.
    load_before: [f64; 3],
    load_after: [f64; 3],
    goals: Goals,
    /// 4 KiB figures (THP's when only THP was measured).
    pause_ratio_vs_fork: f64,
    copy_ratio_vs_memcpy: f64,
    fault_ratio_vs_raw: f64,
    /// The THP figures beside them (a THP miss is not hidden behind the 4 KiB headline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_ratio_vs_fork_thp: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    copy_ratio_vs_memcpy_thp: Option<f64>,
    /// `SnapshotOptions::default().handler`.
    engine_default_handler: String,
    #[serde(rename = "4k", skip_serializing_if = "Option::is_none")]
    small: Option<PauseFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thp: Option<PauseFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    faults: Option<FaultFigures>,
}

pub(super) fn loadavg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|x| x.parse().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

pub(super) fn spinner(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    if a.size == 0 || a.size % (2 << 20) != 0 || a.writers == 0 {
        return Err(CliError::Usage(format!(
            "--size {} must be a positive multiple of 2 MiB and --writers at least 1",
            a.size
        )));
    }
    let show = report::show_progress(a.json);
    let mut out = Output::new(a);
    for kind in PageKind::ALL {
        if a.kind.is_some_and(|k| k != kind) {
            continue;
        }
        let f = pause_kind(a, kind, show)?;
        out.add_pause(kind, f);
    }
    if !a.no_faults {
        let f = faults(a, show)?;
        out.fault_ratio_vs_raw = f.fault_ratio_vs_raw;
        out.faults = Some(f);
    }
    out.load_after = loadavg();
    report::emit(a.json, &out, print_table);
    Ok(())
}

/// A measurement's failure, as the command reports it.
fn bench_err(e: sbench::SnapshotBenchError) -> CliError {
    CliError::Unverified(e.to_string())
}

impl Output {
    /// The report before anything is measured (the load average now).
    fn new(a: &Args) -> Output {
        Output {
            bench: "snapshot",
            size: a.size,
            runs: a.runs.max(1),
            writers: a.writers,
            cpus: sbench::allowed_cpus().len(),
            load_before: loadavg(),
            load_after: [f64::NAN; 3],
            goals: Goals {
                pause_ratio_vs_fork: PauseGoals {
                    small: GOAL_PAUSE_4K,
                    thp: GOAL_PAUSE_THP,
                },
                copy_ratio_vs_memcpy: GOAL_COPY,
                fault_ratio_vs_raw: GOAL_FAULT,
            },
            pause_ratio_vs_fork: f64::NAN,
            copy_ratio_vs_memcpy: f64::NAN,
            pause_ratio_vs_fork_thp: None,
            copy_ratio_vs_memcpy_thp: None,
            fault_ratio_vs_raw: f64::NAN,
            engine_default_handler: format!("{:?}", SnapshotOptions::default().handler),
            small: None,
            thp: None,
            faults: None,
        }
    }

    /// Adds the pause figures of one page kind (the first measured gives the headline ratios).
    fn add_pause(&mut self, kind: PageKind, f: PauseFigures) {
        if self.pause_ratio_vs_fork.is_nan() {
            self.pause_ratio_vs_fork = f.pause_ratio_vs_fork;
            self.copy_ratio_vs_memcpy = f.copy_ratio_vs_memcpy;
        }
        match kind {
            PageKind::Small => self.small = Some(f),
            PageKind::Thp => {
                self.pause_ratio_vs_fork_thp = Some(f.pause_ratio_vs_fork);
                self.copy_ratio_vs_memcpy_thp = Some(f.copy_ratio_vs_memcpy);
                self.thp = Some(f);
            }
        }
    }
}

/// Measures pause and copy on one page kind, with a spinner if `show`.
fn pause_kind(a: &Args, kind: PageKind, show: bool) -> Result<PauseFigures, CliError> {
    let pb = spinner(show);
    let (mut rounds, total) = (0, a.runs.max(1));
    pb.set_message(format!("{}: starting the workload", kind.name()));
    let f = sbench::measure_pause(
        &PauseConfig {
            size: a.size,
            kind,
            runs: a.runs,
            writers: a.writers,
            gcore: !a.no_gcore,
        },
        |s| {
            if s == Step::Round {
                rounds += 1;
            }
            pb.set_message(format!(
                "{}: pause and copy, round {rounds}/{total}",
                kind.name()
            ));
        },
    )
    .map_err(bench_err)?;
    pb.finish_and_clear();
    Ok(f)
}

/// Measures the fault-latency cases, with a spinner if `show`.
fn faults(a: &Args, show: bool) -> Result<FaultFigures, CliError> {
    let pb = spinner(show);
    pb.set_message("fault latency: filling the region");
    let mut cases = 0;
    let f = sbench::measure_faults(
        &FaultConfig {
            region: a.fault_region,
            writes: a.fault_writes,
            rounds: a.fault_rounds,
        },
        |_| {
            cases += 1;
            pb.set_message(format!("fault latency: {cases} cases done"));
        },
    )
    .map_err(bench_err)?;
    pb.finish_and_clear();
    Ok(f)
}

fn verdict(met: bool) -> &'static str {
    if met { "ok" } else { "MISSED" }
}

/// The text report of `bench snapshot`.
fn print_table(o: &Output) {
    println!(
        "bench snapshot: {} MiB, {} writers, medians of {} rounds; load average {:.2} before, {:.2} after",
        o.size >> 20,
        o.writers,
        o.runs,
        o.load_before[0],
        o.load_after[0]
    );
    for (f, goal) in [(&o.small, GOAL_PAUSE_4K), (&o.thp, GOAL_PAUSE_THP)] {
        if let Some(f) = f {
            print_pause(f, goal);
        }
    }
    if let Some(f) = &o.faults {
        print_faults(o, f);
    }
}

/// The text report of one page kind's pause and copy (`goal`: its pause ratio's).
fn print_pause(f: &PauseFigures, goal: f64) {
    println!(
        "\n{} (huge pages >= {:.0}% of the region when measured):",
        f.kind,
        f.min_huge_fraction * 100.0
    );
    println!("  fork()                       {:>9.3} ms", f.fork_ms);
    for v in [&f.prearm, &f.no_prearm] {
        print_pause_variant(v, f.default_prearm);
    }
    println!(
        "  pause_ratio_vs_fork          {:>9.3}  goal <= {goal}: {}",
        f.pause_ratio_vs_fork,
        verdict(f.pause_ratio_vs_fork <= goal)
    );
    println!(
        "  copy: snapshot {:.0} MB/s, memcpy {:.0} MB/s (writers running) -> {:.2}x  goal >= {GOAL_COPY}: {}",
        f.copy_mb_s,
        f.memcpy_mb_s,
        f.copy_ratio_vs_memcpy,
        verdict(f.copy_ratio_vs_memcpy >= GOAL_COPY)
    );
    println!(
        "  copy, writers parked: snapshot {:.0} MB/s, memcpy {:.0} MB/s -> {:.2}x; live snapshot vs parked memcpy {:.2}x",
        f.idle_copy_mb_s, f.idle_memcpy_mb_s, f.copy_ratio_idle, f.copy_ratio_vs_idle_memcpy
    );
    match &f.gcore {
        Gcore::NotInstalled => println!("  gcore: not installed"),
        Gcore::Skipped => {}
        Gcore::Ran {
            ms,
            core_bytes,
            success,
        } => println!(
            "  gcore of a forked copy:      {:>9.1} ms ({} MiB core{})",
            ms,
            core_bytes >> 20,
            if *success { "" } else { ", FAILED" }
        ),
    }
    println!("  {} snapshots, all consistent", f.snapshots);
}

/// The text line of one pause variant (pre-armed or not; `default_prearm`: the default's).
fn print_pause_variant(v: &PauseVariant, default_prearm: bool) {
    println!(
        "  pause, {:<11}           {:>9.3} ms (stop writers {:.3}, protect {:.3}; {:.0} pages re-protected; oracle bookkeeping {:.3} excluded) -> {:.3}x fork, {:.3}x without stopping the writers{}",
        if v.prearm { "pre-armed" } else { "no pre-arm" },
        v.pause_ms,
        v.freeze_ms,
        v.protect_ms,
        v.prearm_dirty_pages,
        v.oracle_ms,
        v.pause_ratio_vs_fork,
        v.engine_pause_ratio_vs_fork,
        if v.prearm == default_prearm {
            " (default)"
        } else {
            ""
        }
    );
}

/// The text report of the fault-latency cases.
fn print_faults(o: &Output, f: &FaultFigures) {
    println!(
        "\nsync fault latency, timed by the writer ({} writes x {} rounds per case; plain write {:.2} us):",
        f.writes, f.rounds, f.plain_write_p50_us
    );
    println!(
        "  {:<14} {:<10} {:>8} {:>9} {:>9} {:>9}",
        "server", "placement", "faulted", "p50 us", "p99 us", "max us"
    );
    for c in &f.cases {
        println!(
            "  {:<14} {:<10} {:>8} {:>9.2} {:>9.2} {:>9.1}",
            c.server.name(),
            c.placement.name(),
            c.samples,
            c.latency_us.p50,
            c.latency_us.p99,
            c.latency_us.max
        );
    }
    println!(
        "  engine default ({}) / raw poll: same CPU {:.2}x, other CPU {:.2}x; fault_ratio_vs_raw {:.2}  goal <= {GOAL_FAULT}: {}",
        o.engine_default_handler,
        f.ratio_same_cpu,
        f.ratio_other_cpu,
        f.fault_ratio_vs_raw,
        verdict(f.fault_ratio_vs_raw <= GOAL_FAULT)
    );
    println!(
        "  engine default / raw poll unpinned {:.2}x; fastest: {}",
        f.ratio_unpinned, f.fastest
    );
}

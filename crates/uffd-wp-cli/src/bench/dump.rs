//! `uffd-wp bench dump`: a live whole-process dump against gcore on the same running target,
//! in the same run (see `uffd_wp_bench::dump`): the pause against gcore's stop, the target's
//! longest stall and its throughput during the copy against the same target undisturbed, the
//! core write against a plain sequential write of the same size.

use std::path::{Path, PathBuf};

use serde::Serialize;

use uffd_wp::helper::{Helper, Kind};
use uffd_wp::range::parse_size;
use uffd_wp_bench::dump::{
    self as dbench, DumpBenchConfig, DumpBenchError, DumpFigures, Step, TargetSpec,
};

use super::snapshot::{loadavg, spinner};
use crate::workload::Target;
use crate::{CliError, report};

/// Arguments of `uffd-wp bench dump`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The target's region (suffix K, M, G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// The target's writer threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Recorded rounds, each a dump and a gcore (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The target's report interval, ms: the resolution of its stall and throughput windows.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Where the cores and the plain file are written (and removed); default: the temporary
    /// directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The `--json` output.
#[derive(Debug, Serialize)]
struct Output {
    bench: &'static str,
    cpus: usize,
    /// /proc/loadavg (1, 5, 15 min) before and after.
    load_before: [f64; 3],
    load_after: [f64; 3],
    /// Where the files were written.
    dir: String,
    #[serde(flatten)]
    figures: DumpFigures,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    let cfg = DumpBenchConfig {
        size: a.size,
        threads: a.threads,
        rounds: a.rounds.max(1),
        interval_ms: a.interval_ms,
        dir: a.dir.clone().unwrap_or_else(std::env::temp_dir),
    };
    if a.size == 0 || a.size % uffd_wp::PAGE_SIZE != 0 || a.threads == 0 || a.interval_ms == 0 {
        return Err(CliError::Usage(format!(
            "--size {} must be a non-zero multiple of 4 KiB, --threads and --interval-ms at \
             least 1",
            a.size
        )));
    }
    let load_before = loadavg();
    let pb = spinner(report::show_progress(a.json));
    pb.set_message("starting the target");
    let total = cfg.rounds;
    let figures = dbench::measure(&cfg, spawn, |s| {
        pb.set_message(match s {
            Step::Target => "the target runs".to_string(),
            Step::Dump(r) => format!("round {}/{total}: dump", r + 1),
            Step::Write(r) => format!("round {}/{total}: core and plain write", r + 1),
            Step::Gcore(r) => format!("round {}/{total}: gcore", r + 1),
            Step::Background(r) => format!("round {}/{total}: dump, background copier", r + 1),
        })
    })
    .map_err(|e| match e {
        DumpBenchError::Inconsistent { .. } => CliError::Unverified(e.to_string()),
        e => CliError::DumpBench(e),
    })?;
    pb.finish_and_clear();
    let out = Output {
        bench: "dump",
        cpus: uffd_wp_bench::snapshot::allowed_cpus().len(),
        load_before,
        load_after: loadavg(),
        dir: cfg.dir.display().to_string(),
        figures,
    };
    report::emit(a.json, &out, print_table);
    Ok(())
}

/// The target: this executable as the workload helper.
fn spawn(spec: &TargetSpec) -> Result<Helper, uffd_wp::helper::HelperError> {
    let target = Target {
        size: spec.size,
        threads: spec.threads,
        thp: false,
        interval_ms: spec.interval_ms,
        zoo: false,
        spinners: 0,
    };
    Helper::spawn(Path::new("/proc/self/exe"), &[], Kind::Workload, &target)
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("n/a (gcore not installed)".to_string(), |v| {
        format!("{v:.1}{unit}")
    })
}

/// The text report.
fn print_table(o: &Output) {
    let f = &o.figures;
    println!(
        "bench dump: {} MiB target, {} writers ({} threads), medians of {} rounds; {} CPUs, \
         load average {:.2} before, {:.2} after",
        f.size >> 20,
        f.writers,
        f.threads,
        f.rounds,
        o.cpus,
        o.load_before[0],
        o.load_after[0]
    );
    println!("\n  pause                   {:>12.1} us", f.pause_us);
    println!(
        "  gcore stop              {:>15}",
        opt(f.gcore_stop_us, " us")
    );
    let ratio = f.pause_ratio_vs_gcore;
    println!(
        "  pause_ratio_vs_gcore    {:>15}  goal <= {}: {}",
        ratio.map_or("n/a".to_string(), |r| format!("{r:.4}")),
        f.goal_pause_ratio_vs_gcore,
        match ratio {
            Some(r) if r <= f.goal_pause_ratio_vs_gcore => "ok",
            Some(_) => "MISSED",
            None => "-",
        }
    );
    println!(
        "\n  target's longest stall: dump {:.1} us (whole capture, {:.0} ms), undisturbed {:.1} us, \
         gcore {}",
        f.target_max_stall_us,
        f.capture_ms,
        f.undisturbed_max_stall_us,
        opt(f.gcore_max_stall_us, " us")
    );
    println!(
        "  target's writes/s: during the copy {:.0}, undisturbed just before {:.0} -> {:.2}x",
        f.throughput_during_copy, f.throughput_undisturbed, f.throughput_ratio
    );
    println!(
        "  core write {:.0} MB/s, plain sequential write {:.0} MB/s -> {:.2}x ({} MiB core, {} \
         MiB of holes; gcore's core {} MiB in {})",
        f.core_write_mb_s,
        f.seq_write_mb_s,
        f.core_write_ratio_vs_seq,
        f.core_bytes >> 20,
        f.hole_bytes >> 20,
        f.gcore_core_bytes.map_or(0, |b| b >> 20),
        opt(f.gcore_wall_ms, " ms")
    );
    let ms = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0} ms"));
    println!(
        "  copier normal:     copy {:.0} ms, target's writes/s {:.2}x undisturbed, longest stall \
         {:.1} us, run-queue wait {}",
        f.copy_ms,
        f.throughput_ratio,
        f.target_max_stall_us,
        ms(f.runqueue_wait_ms)
    );
    println!(
        "  copier background: copy {:.0} ms, target's writes/s {:.2}x undisturbed, longest stall \
         {:.1} us, run-queue wait {} (pause {:.1} us)",
        f.background_copy_ms,
        f.background_throughput_ratio,
        f.background_max_stall_us,
        ms(f.background_runqueue_wait_ms),
        f.background_pause_us
    );
    println!("  every dump consistent with itself: {}", f.consistent);
}

//! `uffd-wp snapshot`: a live snapshot of the built-in workload, checked by its oracle.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use uffd_wp::backend::linux::LinuxMm;
use uffd_wp::engine::snapshot::{self, HandlerMode, SnapshotOptions, Source};
use uffd_wp::range::{PAGE_SIZE, RangeSet, parse_size};
use uffd_wp::seam::FnQuiesce;
use uffd_wp_bench::workload::{Workload, WorkloadConfig};

use crate::CliError;
use crate::report;

pub(crate) mod remote;

/// Arguments of `uffd-wp snapshot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the built-in workload's region (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Writer threads of the workload.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Back the region with transparent huge pages.
    #[arg(long)]
    thp: bool,
    /// Who serves WP faults during the copy: `inline` (the copier polls between chunks of 32
    /// pages), `thread` (a handler thread in poll(2)) or `hybrid` (both; the default, fastest
    /// wherever the writer runs: docs/benchmarks.md).
    #[arg(long, value_enum)]
    handler: Option<Handler>,
    /// Threads that write-protect during the pause (default: the CPU count for 4 KiB pages,
    /// 1 with THP, where splitting costs more than it saves).
    #[arg(long)]
    protect_threads: Option<usize>,
    /// Protect the whole range inside the pause instead of pre-arming before it (pre-arming is
    /// the default for 4 KiB pages; never used with THP).
    #[arg(long)]
    no_prearm: bool,
    /// Write the image to this file (format: docs/snapshot-format.md).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Print the JSON report.
    #[arg(long)]
    json: bool,
    /// Snapshot another process instead of the built-in workload (a uffd created inside it
    /// through ptrace; needs root or CAP_SYS_PTRACE over it). Needs --range.
    #[arg(long, requires = "range")]
    pid: Option<u32>,
    /// With --pid: the range to capture, START:LEN (START decimal, or hex with or without 0x;
    /// LEN with K, M, G or T) or START-END as /proc/PID/maps prints it.
    #[arg(long, requires = "pid")]
    range: Option<String>,
    /// Tests only: stop at this step of the attach/freeze/copy protocol and wait to be killed
    /// (a stop signal ends the wait and the run).
    #[arg(long, hide = true, requires = "pid", value_parser = remote::parse_stall)]
    stall_at: Option<String>,
    /// Tests only: the thread of the target that runs the injected calls.
    #[arg(long, hide = true, requires = "pid")]
    thread: Option<u32>,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    if let (Some(pid), Some(range)) = (a.pid, a.range.as_deref()) {
        return remote::run(a, pid, range);
    }
    if a.size < PAGE_SIZE || a.size % PAGE_SIZE != 0 || a.threads == 0 {
        return Err(CliError::Usage(format!(
            "--size must be a non-zero multiple of {PAGE_SIZE} and --threads at least 1"
        )));
    }
    let out = create_out(a.out.as_deref())?;
    let mm = LinuxMm::open()?;
    let w = start_workload(a)?;
    let opts = options(a);
    let mut t = take_local(&mm, &w, &opts, report::show_progress(a.json))?;
    let base = w.range().start();
    let bad = Workload::check_image(&t.versions, |p| t.img.page(base + p * PAGE_SIZE));
    t.rep.consistent = Some(bad.is_empty());
    let stored = write_image(&t.img, out)?;
    print_local(a, &opts, &t, bad.len(), stored);
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CliError::Unverified(format!(
            "{} pages inconsistent with the snapshot point, first: {:?}",
            bad.len(),
            &bad[..bad.len().min(3)]
        )))
    }
}

/// Starts the built-in workload and lets its writers run for a moment.
fn start_workload(a: &Args) -> Result<Workload, CliError> {
    let w = Workload::start(WorkloadConfig {
        size: a.size,
        threads: a.threads,
        thp: a.thp,
        ..WorkloadConfig::default()
    })
    .map_err(|errno| CliError::Os {
        operation: "starting the workload".into(),
        errno,
    })?;
    w.resume();
    std::thread::sleep(Duration::from_millis(50));
    Ok(w)
}

/// The bar of the copy (both paths), hidden unless `show`.
fn copy_bar(show: bool, pages: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(pages);
    b.set_style(
        ProgressStyle::with_template("copying {bar:40} {pos}/{len} pages {elapsed}")
            .expect("progress template"),
    );
    b
}

/// A snapshot of the built-in workload, with what its oracle needs to check it.
struct Local {
    img: snapshot::Image,
    rep: snapshot::SnapshotReport,
    /// Every page's version at the freeze.
    versions: Vec<u64>,
    /// The oracle's time inside the freeze, taken out of the report's pause figures.
    oracle_us: f64,
    /// Page writes while the snapshot was taken.
    writes_during: u64,
}

/// Snapshots the running workload (reading its versions inside the freeze), then parks it.
fn take_local(
    mm: &LinuxMm,
    w: &Workload,
    opts: &SnapshotOptions,
    show: bool,
) -> Result<Local, CliError> {
    let bar = copy_bar(show, w.pages());
    // The oracle's version table is taken inside the freeze, into a buffer allocated (and
    // touched) beforehand; its time is instrumentation, not part of an application's pause,
    // and is taken out of the pause figures as `uffd-wp bench snapshot` does.
    let at_freeze = Mutex::new(w.versions());
    let oracle = Mutex::new(std::time::Duration::ZERO);
    let q = FnQuiesce(
        || {
            w.pause();
            let t = std::time::Instant::now();
            w.versions_into(&mut at_freeze.lock().expect("versions"));
            *oracle.lock().expect("oracle time") = t.elapsed();
        },
        || w.resume(),
    );
    let writes_before = w.writes();
    let (img, mut rep) = snapshot::take(
        mm,
        &RangeSet::single(w.range()),
        Source::Mapping(w.mapping()),
        &q,
        opts,
        |done, _| bar.set_position(done),
    )?;
    bar.finish_and_clear();
    let oracle_us = oracle.into_inner().expect("oracle time").as_secs_f64() * 1e6;
    rep.pause_us -= oracle_us;
    rep.freeze_us -= oracle_us;
    let writes_during = w.writes() - writes_before;
    w.pause();
    Ok(Local {
        img,
        rep,
        versions: at_freeze.into_inner().expect("versions"),
        oracle_us,
        writes_during,
    })
}

/// Prints the report of a snapshot of the built-in workload (`bad`: inconsistent pages).
fn print_local(a: &Args, opts: &SnapshotOptions, t: &Local, bad: usize, stored: Option<u64>) {
    let (rep, writes_during, oracle_us) = (&t.rep, t.writes_during, t.oracle_us);
    let workload = serde_json::json!({
        "size": a.size, "threads": a.threads, "thp": a.thp,
        "writes_during_snapshot": writes_during,
        "inconsistent_pages": bad,
        "oracle_us_excluded_from_pause": oracle_us,
    });
    print_report(a, rep, stored, "workload", workload, || {
        println!(
            "snapshot of {} ({} writer threads, {}): {}",
            report::fmt_bytes(a.size),
            a.threads,
            if a.thp { "THP" } else { "4 KiB pages" },
            if bad == 0 {
                "CONSISTENT"
            } else {
                "INCONSISTENT"
            }
        );
        println!(
            "  pause            {:.0} us (stopping writers {:.0} us, write-protect {:.0} us, {} raw calls)",
            rep.pause_us, rep.freeze_us, rep.protect_us, rep.protect_raw_calls
        );
        println!(
            "  pre-armed        {} (pages written meanwhile, re-protected in the pause: {})",
            opts.prearm, rep.prearm_dirty_pages
        );
        println!(
            "  copy             {:.1} ms, {:.0} MB/s",
            rep.copy_ms, rep.copy_mb_s
        );
        println!(
            "  writes meanwhile {writes_during} (the oracle's {oracle_us:.0} us in the freeze are not counted in the pause)"
        );
    });
}

/// `--handler`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Handler {
    Inline,
    Thread,
    Hybrid,
}

/// The engine options the flags ask for (the same for this process and another one).
fn options(a: &Args) -> SnapshotOptions {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    SnapshotOptions {
        protect_threads: a.protect_threads.unwrap_or(if a.thp { 1 } else { cpus }),
        handler: match a.handler {
            None => SnapshotOptions::default().handler,
            Some(Handler::Inline) => HandlerMode::Inline { chunk_pages: 32 },
            Some(Handler::Thread) => HandlerMode::Thread,
            Some(Handler::Hybrid) => HandlerMode::Hybrid { chunk_pages: 32 },
        },
        prearm: !a.thp && !a.no_prearm,
        ..SnapshotOptions::default()
    }
}

/// Writes the image to `--out` if given; returns the pages stored.
/// The `--out` file, created (truncated) before anything is done to the memory, so that an
/// unwritable path fails before the snapshot rather than after it.
struct Out {
    path: std::path::PathBuf,
    file: std::fs::File,
}

fn create_out(out: Option<&std::path::Path>) -> Result<Option<Out>, CliError> {
    let Some(path) = out else { return Ok(None) };
    let file = std::fs::File::create(path).map_err(|source| CliError::Io {
        operation: "creating",
        path: path.display().to_string(),
        source,
    })?;
    Ok(Some(Out {
        path: path.to_path_buf(),
        file,
    }))
}

/// Writes the image into the `--out` file; returns the pages stored.
fn write_image(img: &snapshot::Image, out: Option<Out>) -> Result<Option<u64>, CliError> {
    let Some(Out { path, file }) = out else {
        return Ok(None);
    };
    let (stored, _) = img
        .write_to(std::io::BufWriter::new(file))
        .map_err(|source| CliError::Io {
            operation: "writing",
            path: path.display().to_string(),
            source,
        })?;
    Ok(Some(stored))
}

/// The report as JSON, with the issue's `fault_latency_us` (the handler-side service time) and
/// the pages stored in the image.
fn report_json(rep: &snapshot::SnapshotReport, stored: Option<u64>) -> serde_json::Value {
    let mut v = serde_json::to_value(rep).expect("report");
    v["fault_latency_us"] = v["fault_service_us"].clone();
    if let Some(s) = stored {
        v["stored_pages"] = s.into();
    }
    v
}

/// Prints a snapshot's report (both paths): under `--json` the engine's report with `extra`
/// under `key`, else `head`'s own lines, then the lines both paths share.
fn print_report(
    a: &Args,
    rep: &snapshot::SnapshotReport,
    stored: Option<u64>,
    key: &str,
    extra: serde_json::Value,
    head: impl FnOnce(),
) {
    let mut v = report_json(rep, stored);
    v[key] = extra;
    report::emit(a.json, &v, |_| {
        head();
        print_common(rep, stored, a.out.as_deref());
    });
}

/// The report lines both paths print after their own header and pause line.
fn print_common(
    rep: &snapshot::SnapshotReport,
    stored: Option<u64>,
    out: Option<&std::path::Path>,
) {
    println!(
        "  faults served    {} (p50 {:.1} us, p99 {:.1} us, max {:.1} us)",
        rep.faults_served,
        rep.fault_service_us.p50,
        rep.fault_service_us.p99,
        rep.fault_service_us.max
    );
    println!("  pinned pages     {}", rep.pinned_pages);
    println!("  not captured     {}", rep.not_captured.len());
    if let (Some(s), Some(path)) = (stored, out) {
        println!(
            "  image            {} ({} pages stored, zero pages omitted)",
            path.display(),
            s
        );
    }
}

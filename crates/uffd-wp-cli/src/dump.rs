//! `uffd-wp dump [PID]`: an ELF core of a whole running process at one instant, while it runs.
//!
//! With a PID, that process is dumped to `core.PID` (like gcore). Without one, a built-in
//! target is started in a process of its own (the workload: writer threads and the version
//! table they keep in another mapping), dumped live, and the dump checked against itself: every
//! page of the region must hold the version the table in the same dump records, except the one
//! page each writer may be writing at the freeze.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use uffd_wp::dump::{self, Captured, DumpOptions, DumpReport};
use uffd_wp::engine::snapshot::Copier;
use uffd_wp::helper::{Helper, Kind};
use uffd_wp::range::{RangeSet, parse_size};
use uffd_wp_bench::workload::{DumpVerdict, Layout};

use crate::snapshot::remote::parse_range;
use crate::workload::Target;
use crate::{CliError, report};

/// Arguments of `uffd-wp dump`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process to dump. Without it, a built-in target is started, dumped and checked.
    pid: Option<u32>,
    /// The core file (default `core.PID`, like gcore).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Only this range, START:LEN (repeatable); other mappings are in the core with no bytes.
    #[arg(long = "range")]
    ranges: Vec<String>,
    /// The coredump filter, hex (core(5); default: the target's /proc/PID/coredump_filter).
    #[arg(long, value_parser = parse_filter)]
    filter: Option<u32>,
    /// The built-in target's region (K, M, G).
    #[arg(long, default_value = "64M", value_parser = parse_size, conflicts_with = "pid")]
    size: u64,
    /// The built-in target's writer threads.
    #[arg(long, default_value_t = 2, conflicts_with = "pid")]
    threads: usize,
    /// How the copy after the pause competes with the target for CPU: `normal` (the
    /// shortest copy) or `background` (the copier at nice 19 takes only the CPU the target
    /// leaves; faults are still served at once).
    #[arg(long, value_enum, default_value_t = CopierArg::Normal)]
    copier: CopierArg,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `--copier`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CopierArg {
    Normal,
    Background,
}

fn parse_filter(s: &str) -> Result<u32, String> {
    let t = s.trim_start_matches("0x").trim_start_matches("0X");
    u32::from_str_radix(t, 16).map_err(|e| format!("--filter {s:?}: not hex: {e}"))
}

/// How long the built-in target may take to start.
const TARGET_PATIENCE: Duration = Duration::from_secs(60);

/// The report of `uffd-wp dump`.
#[derive(Debug, Serialize)]
struct Output {
    /// The core file.
    core: String,
    /// What the capture did.
    #[serde(flatten)]
    dump: DumpReport,
    /// The built-in target's check of the dump against itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    oracle: Option<DumpVerdict>,
    /// Where the built-in target keeps its region and its version table.
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Layout>,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    let opts = options(a)?;
    let mut target = match a.pid {
        Some(_) => None,
        None => Some(start_target(a)?),
    };
    let pid = a
        .pid
        .or(target.as_ref().map(|t| t.layout.pid))
        .expect("a pid");
    let path = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("core.{pid}")));
    let file = create(&path)?;
    let bar = report::bar(
        report::show_progress(a.json),
        0,
        "{msg:10} [{bar:30}] {pos}/{len} pages {elapsed}",
        "copying".into(),
    );
    let cap = dump::capture(pid, &opts, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|source| CliError::Dump { pid, source })?;
    bar.finish_and_clear();
    let oracle = target.as_mut().map(|t| t.check(&cap));
    dump::write_core(&cap, &file, |_, _| {}).map_err(|source| CliError::Dump { pid, source })?;
    let out = Output {
        core: path.display().to_string(),
        dump: cap.report,
        oracle,
        target: target.as_ref().map(|t| t.layout),
    };
    report::emit(a.json, &out, print);
    match out.oracle {
        Some(v) if v.inconsistent > 0 => Err(CliError::Unverified(format!(
            "{} pages of the dump are inconsistent with the version table in the same dump",
            v.inconsistent
        ))),
        _ => Ok(()),
    }
}

fn options(a: &Args) -> Result<DumpOptions, CliError> {
    let only = if a.ranges.is_empty() {
        None
    } else {
        let rs = a
            .ranges
            .iter()
            .map(|r| parse_range(r))
            .collect::<Result<Vec<_>, _>>()?;
        Some(RangeSet::from_ranges(rs))
    };
    let mut opts = DumpOptions {
        filter: a.filter,
        only,
        ..DumpOptions::default()
    };
    opts.snapshot.copier = match a.copier {
        CopierArg::Normal => Copier::Normal,
        CopierArg::Background => Copier::Background,
    };
    Ok(opts)
}

fn create(path: &Path) -> Result<std::fs::File, CliError> {
    std::fs::File::create(path).map_err(|source| CliError::Io {
        operation: "creating",
        path: path.display().to_string(),
        source,
    })
}

/// The built-in target: the workload in a helper process (killed when dropped).
struct BuiltIn {
    _helper: Helper,
    layout: Layout,
}

fn start_target(a: &Args) -> Result<BuiltIn, CliError> {
    let target = Target {
        size: a.size,
        threads: a.threads,
        thp: false,
        interval_ms: 1000,
        zoo: false,
        spinners: 0,
    };
    let failed = |e: String| CliError::Os {
        operation: format!("starting the built-in target: {e}"),
        errno: uffd_wp::sys::Errno::CHILD,
    };
    let mut helper = Helper::spawn(Path::new("/proc/self/exe"), &[], Kind::Workload, &target)
        .map_err(|e| failed(e.to_string()))?;
    let head: serde_json::Value = helper
        .recv(TARGET_PATIENCE)
        .map_err(|e| failed(e.to_string()))?;
    Ok(BuiltIn {
        layout: Layout::from_header(&head).map_err(failed)?,
        _helper: helper,
    })
}

impl BuiltIn {
    /// The dump against itself: the region's pages against the version table, both read
    /// from the capture.
    fn check(&mut self, cap: &Captured) -> DumpVerdict {
        self.layout.check(|a, b| {
            let _ = cap.read(a, b);
        })
    }
}

fn print(o: &Output) {
    let d = &o.dump;
    println!("dumped process {} to {}", d.pid, o.core);
    println!(
        "  threads {}, paused {:.0} us (freeze {:.0} us, of which registers and in-freeze copies {:.0} us)",
        d.threads, d.pause_us, d.freeze_us, d.capture_in_freeze_us
    );
    println!(
        "  {} bytes write-protected and copied live, {} bytes copied inside the freeze",
        d.write_protected_bytes, d.in_freeze_bytes
    );
    if let Some(c) = &d.target_cpu {
        println!(
            "  the target over {:.0} ms: {:.0} ms on a CPU, {:.0} ms waiting for one",
            c.wall_ms, c.on_cpu_ms, c.runqueue_wait_ms
        );
    }
    for m in &d.mappings {
        let how = serde_json::to_value(&m.method).unwrap_or_default();
        println!(
            "  {:#014x}-{:#014x} {} {:>12} {} {}",
            m.start,
            m.end,
            m.perms,
            m.bytes,
            how["method"].as_str().unwrap_or(""),
            if m.name.is_empty() { "" } else { &m.name }
        );
    }
    if let Some(v) = &o.oracle {
        println!(
            "  oracle: {} pages consistent, {} in flight (at most one per writer), {} inconsistent",
            v.consistent, v.in_flight, v.inconsistent
        );
    }
}

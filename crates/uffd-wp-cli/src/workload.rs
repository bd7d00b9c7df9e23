//! `uffd-wp workload` (hidden): the built-in workload in a process of its own, forever, as a
//! target for the remote backend (`uffd-wp snapshot --pid`) and its tests.
//!
//! Prints one JSON line `{"pid":..,"start":..,"len":..,"threads":..}` once the writers run,
//! then `{"writes":N}` (total page writes so far) every `--interval-ms`, until killed or until
//! stdout is closed.

use std::io::Write;
use std::time::Duration;

use uffd_wp::range::parse_size;
use uffd_wp_bench::workload::{Workload, WorkloadConfig};

use crate::CliError;

/// Arguments of `uffd-wp workload`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the region (K, M, G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    size: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Back the region with transparent huge pages.
    #[arg(long)]
    thp: bool,
    /// Milliseconds between two write-count lines.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
}

/// Runs it (returns only when stdout is closed).
pub fn run(a: &Args) -> Result<(), CliError> {
    if a.size < uffd_wp::PAGE_SIZE || a.size % uffd_wp::PAGE_SIZE != 0 || a.threads == 0 {
        return Err(CliError::Usage(
            "--size must be a non-zero multiple of the page size and --threads at least 1".into(),
        ));
    }
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
    let mut out = std::io::stdout().lock();
    let head = serde_json::json!({
        "pid": std::process::id(),
        "start": w.range().start(),
        "len": w.range().len(),
        "threads": a.threads,
    });
    if writeln!(out, "{head}").and_then(|()| out.flush()).is_err() {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(a.interval_ms.max(1)));
        let line = serde_json::json!({ "writes": w.writes() });
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}

//! `uffd-wp bench <what>`: benchmarks on the real kernel. `protect` compares the exact
//! write-protect engine with the raw `UFFDIO_WRITEPROTECT` (see `uffd_wp_bench::protect`).

use serde::Serialize;

use uffd_wp::range::{PMD_SIZE, PUD_SIZE, parse_size};
use uffd_wp_bench::protect::{self as bench, PageKind, ProtectBench, ProtectFigures};

use crate::{CliError, report};

mod dump;
mod plot;
mod snapshot;

/// The goal for a clean success: exact at most this times the raw call.
const GOAL_CLEAN: f64 = 1.05;
/// The goal after a failure half-way.
const GOAL_PARTIAL: f64 = 1.5;

/// Arguments of `uffd-wp bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

/// What to benchmark.
#[derive(Debug, clap::Subcommand)]
enum What {
    /// Exact write_protect against the raw UFFDIO_WRITEPROTECT, clean and failing half-way,
    /// on 4 KiB pages and on THP.
    Protect(ProtectArgs),
    /// The dirty tracker's epoch against an mprotect/SIGSEGV tracker's, and the cost of a
    /// first write under each (1 GiB, 1% written, 4 KiB pages and THP).
    Track(crate::track::BenchArgs),
    /// Live snapshots against fork() (pause), memcpy (copy) and a bare fault handler (fault
    /// latency), 1 GiB, 4 KiB pages and THP.
    Snapshot(snapshot::Args),
    /// A live whole-process dump against gcore on the same running target: the pause against
    /// gcore's stop, the target's stall and throughput during the copy, the core write
    /// against a plain sequential write (1 GiB, 2 writers).
    Dump(dump::Args),
    /// An SVG of the ratios in `--json` outputs of the benches against the goals.
    Plot(plot::Args),
}

/// Arguments of `uffd-wp bench protect`.
#[derive(Debug, clap::Args)]
struct ProtectArgs {
    /// Bytes to protect (suffix K, M, G; a multiple of 2 MiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Timed rounds per page kind (medians are reported); one more unrecorded warm-up round.
    #[arg(long, default_value_t = 15)]
    runs: usize,
    /// Where the range starts inside a 1 GiB PUD (suffix K, M, G; a multiple of 2 MiB). By
    /// default a PUD boundary falls in the middle of the range (512M for 1G): the engine splits
    /// the clean call in two raw calls, as for most real mappings, and the partial run fails at
    /// that boundary, so the engine reads back exactly the uncertain half. With another offset
    /// the failure falls inside a raw call, which is then read back from its start.
    #[arg(long, value_parser = parse_size)]
    pud_offset: Option<u64>,
    /// Only this page kind (4k or thp); both by default.
    #[arg(long, value_parser = parse_kind)]
    kind: Option<PageKind>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_kind(s: &str) -> Result<PageKind, String> {
    PageKind::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| format!("{s:?}: the page kinds are 4k and thp"))
}

/// The `--json` output of `bench protect`.
#[derive(Debug, Serialize)]
struct ProtectOutput {
    bench: &'static str,
    size: u64,
    runs: usize,
    pud_offset: u64,
    goals: Goals,
    /// The page kind whose figures also stand at the top level (`raw_ms`, `exact_ms`, `ratio`,
    /// `partial_*`, as the issue spells them): 4k unless `--kind thp`.
    headline_kind: &'static str,
    #[serde(flatten)]
    headline: Option<ProtectFigures>,
    #[serde(rename = "4k", skip_serializing_if = "Option::is_none")]
    small: Option<ProtectFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thp: Option<ProtectFigures>,
}

#[derive(Debug, Serialize)]
struct Goals {
    ratio: f64,
    partial_ratio: f64,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    match &a.what {
        What::Protect(p) => protect(p),
        What::Track(t) => crate::track::bench(t),
        What::Snapshot(s) => snapshot::run(s),
        What::Dump(d) => dump::run(d),
        What::Plot(p) => plot::run(p),
    }
}

fn protect(a: &ProtectArgs) -> Result<(), CliError> {
    if a.size == 0 || a.size % PMD_SIZE != 0 {
        return Err(CliError::Usage(format!(
            "--size {} is not a positive multiple of 2 MiB",
            a.size
        )));
    }
    let pud_offset = a
        .pud_offset
        .unwrap_or(((PUD_SIZE - (a.size / 2) % PUD_SIZE) % PUD_SIZE) & !(PMD_SIZE - 1));
    if pud_offset % PMD_SIZE != 0 || pud_offset >= PUD_SIZE {
        return Err(CliError::Usage(format!(
            "--pud-offset {pud_offset} is not a multiple of 2 MiB below 1 GiB"
        )));
    }
    let show = report::show_progress(a.json);
    let mut out = ProtectOutput {
        bench: "protect",
        size: a.size,
        runs: a.runs.max(1),
        pud_offset,
        goals: Goals {
            ratio: GOAL_CLEAN,
            partial_ratio: GOAL_PARTIAL,
        },
        headline_kind: "4k",
        headline: None,
        small: None,
        thp: None,
    };
    for kind in PageKind::ALL {
        if a.kind.is_some_and(|k| k != kind) {
            continue;
        }
        let figs = protect_kind(a, kind, pud_offset, show)?;
        match kind {
            PageKind::Small => out.small = Some(figs),
            PageKind::Thp => out.thp = Some(figs),
        }
    }
    out.headline = out.small.clone().or_else(|| out.thp.clone());
    if out.small.is_none() {
        out.headline_kind = "thp";
    }
    report::emit(a.json, &out, print_table);
    Ok(())
}

fn protect_kind(
    a: &ProtectArgs,
    kind: PageKind,
    pud_offset: u64,
    show: bool,
) -> Result<ProtectFigures, CliError> {
    let b = ProtectBench::new(a.size, kind, pud_offset)?;
    let pb = report::bar(
        show,
        a.size,
        "{msg:18} [{bar:30}] {bytes}/{total_bytes} {elapsed}",
        format!("{}: populating", kind.name()),
    );
    b.populate(64 << 20, |done| pb.set_position(done))?;
    pb.finish_and_clear();
    let runs = a.runs.max(1);
    let pb = report::bar(
        show,
        4 * runs as u64,
        "{msg:18} [{bar:30}] {pos}/{len} {elapsed}",
        format!("{}: measuring", kind.name()),
    );
    let figs = bench::measure(&b, runs, |_| pb.inc(1))?;
    pb.finish_and_clear();
    Ok(figs)
}

fn human_bytes(b: u64) -> String {
    if b >= PUD_SIZE && b % PUD_SIZE == 0 {
        format!("{} GiB", b / PUD_SIZE)
    } else if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{b} bytes")
    }
}

fn verdict(ratio: f64, goal: f64) -> &'static str {
    if ratio <= goal { "ok" } else { "MISSED" }
}

fn print_table(o: &ProtectOutput) {
    println!(
        "bench protect: {} anonymous, starting {} into a 1 GiB PUD; medians of {} runs, raw and \
         exact alternated",
        human_bytes(o.size),
        human_bytes(o.pud_offset),
        o.runs
    );
    println!(
        "\n{:<5} {:>8} {:>10} {:>10} {:>7} {:>7}   {:>10} {:>10} {:>7} {:>7}  {:>9}",
        "kind",
        "huge",
        "raw ms",
        "exact ms",
        "ratio",
        "<=1.05",
        "part. raw",
        "part. exact",
        "ratio",
        "<=1.5",
        "read back"
    );
    for (name, f) in [("4k", &o.small), ("thp", &o.thp)] {
        let Some(f) = f else { continue };
        println!(
            "{:<5} {:>7.0}% {:>10.3} {:>10.3} {:>6.3}x {:>7}   {:>10.3} {:>10.3} {:>6.3}x {:>7}  {:>9}",
            name,
            f.huge_bytes as f64 * 100.0 / o.size as f64,
            f.raw_ms,
            f.exact_ms,
            f.ratio,
            verdict(f.ratio, o.goals.ratio),
            f.partial_raw_ms,
            f.partial_exact_ms,
            f.partial_ratio,
            verdict(f.partial_ratio, o.goals.partial_ratio),
            human_bytes(f.partial_read_back_bytes),
        );
    }
    println!(
        "\nraw: one UFFDIO_WRITEPROTECT over the range; exact: write_protect (default options, \
         {} raw call(s), nothing read back).\npartial: raw = one raw call over the first half; \
         exact = write_protect with ENOMEM injected at the middle (Stop), reading back the \
         uncertain part.",
        o.small
            .as_ref()
            .or(o.thp.as_ref())
            .map_or(0, |f| f.raw_calls)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse() {
        assert_eq!(parse_kind("4k"), Ok(PageKind::Small));
        assert_eq!(parse_kind("thp"), Ok(PageKind::Thp));
        assert!(parse_kind("2m").is_err());
    }
}

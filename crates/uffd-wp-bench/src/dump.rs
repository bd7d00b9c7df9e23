//! Measuring code of `uffd-wp bench dump`: a live whole-process dump ([`uffd_wp::dump`])
//! against `gcore`, on the same target in the same run.
//!
//! The target is the built-in workload in a process of its own (started by the caller, who
//! knows the executable: [`measure`] takes a spawn function), its writers rewriting pages of
//! the region while each writer tracks its longest gap between two page writes. Every
//! `interval_ms` it reports `{"writes":N,"max_gap_us":G,"t_ns":T}` ([`crate::workload`]):
//! total writes, the longest stall that ended since its previous line, and the line's
//! `CLOCK_MONOTONIC` time, on which this process places its own measurements. Each round:
//!
//! - **dump**: after an undisturbed lead longer than the previous copy, the target is
//!   captured ([`uffd_wp::dump::capture`]). Our pause is the report's `pause_us`; from the
//!   target's side, its longest stall over the lines covering the whole capture (attach,
//!   pre-arming, pause, copy, release) and its write rate over those covering the copy,
//!   against the same over the undisturbed stretch of the same length just before. The capture is checked against itself (the workload's oracle), then
//!   written as a core ([`uffd_wp::dump::write_core`]), timed against a plain sequential write
//!   of the same number of bytes into the same directory (both into the page cache: no
//!   fsync, as neither gcore nor the kernel's core dumps sync), which of the two goes first
//!   alternating from round to round.
//! - **gcore**: `gcore -o PREFIX PID` on the same target. Its stop time is how long the target
//!   was seen stopped (`t`/`T` in `/proc/PID/task/*/stat`, polled every
//!   [`WATCH_PERIOD`] from a thread of this process), and the target's own longest stall in
//!   the lines covering the run.
//!
//! Rounds alternate which of the two goes first; absolute figures are medians over the
//! rounds, ratios medians of each round's ratio (each round pairs measurements taken a few
//! seconds apart, under the same machine load).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uffd_wp::dump::{self, Captured, DumpError, DumpOptions};
use uffd_wp::engine::snapshot::Copier;
use uffd_wp::helper::{Helper, HelperError};
use uffd_wp::range::PAGE_SIZE;

use crate::snapshot::{median, run_gcore};
use crate::workload::{DumpVerdict, Layout, monotonic_ns};

/// The goal: the dump's pause at most this fraction of gcore's stop.
pub const GOAL_PAUSE_RATIO_VS_GCORE: f64 = 0.01;

/// How often the stop watcher reads the target's thread states during gcore.
pub const WATCH_PERIOD: Duration = Duration::from_micros(200);

/// How long the target may take to start (mapping and filling its region).
const TARGET_PATIENCE: Duration = Duration::from_secs(300);

/// How long to wait for the target's next line.
const LINE_PATIENCE: Duration = Duration::from_secs(60);

/// Why the benchmark could not run, or found a dump wrong.
#[derive(Debug, thiserror::Error)]
pub enum DumpBenchError {
    /// Bad parameters.
    #[error("bad benchmark parameters: {0}")]
    Params(String),
    /// Starting the target or reading its reports failed.
    #[error("the target: {0}")]
    Target(#[from] HelperError),
    /// The target's reports do not say what the benchmark needs.
    #[error("the target's report: {0}")]
    Report(String),
    /// The dump failed.
    #[error("dump: {0}")]
    Dump(#[from] DumpError),
    /// A file operation (writing the core or the plain file, running gcore) failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or program.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The dump is not one instant of the target.
    #[error(
        "round {round}: {pages} pages of the dump are inconsistent with the version table in the same dump"
    )]
    Inconsistent {
        /// The round.
        round: usize,
        /// Pages no single instant explains.
        pages: u64,
    },
}

impl DumpBenchError {
    /// The errno that best explains it, when there is one.
    pub fn errno(&self) -> Option<uffd_wp::sys::Errno> {
        match self {
            DumpBenchError::Dump(e) => Some(e.errno()),
            DumpBenchError::Io { source, .. } => Some(uffd_wp::sys::errno_of(source)),
            _ => None,
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DumpBenchError {
    let path = path.display().to_string();
    move |source| DumpBenchError::Io { what, path, source }
}

/// The target the caller's spawn function starts: the workload helper with these settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TargetSpec {
    /// Region size.
    pub size: u64,
    /// Writer threads.
    pub threads: usize,
    /// Milliseconds between two of its report lines.
    pub interval_ms: u64,
}

/// What [`measure`] measures.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpBenchConfig {
    /// The target's region (a non-zero multiple of the page size).
    pub size: u64,
    /// Its writer threads.
    pub threads: usize,
    /// Recorded rounds.
    pub rounds: usize,
    /// The target's report interval, ms (the resolution of its throughput windows).
    pub interval_ms: u64,
    /// Where the cores and the plain file are written (and removed).
    pub dir: PathBuf,
}

impl Default for DumpBenchConfig {
    /// 1 GiB, 2 writers, 3 rounds, 10 ms reports, the temporary directory.
    fn default() -> Self {
        DumpBenchConfig {
            size: 1 << 30,
            threads: 2,
            rounds: 3,
            interval_ms: 10,
            dir: std::env::temp_dir(),
        }
    }
}

/// Where [`measure`] is (for a progress display).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The target runs.
    Target,
    /// Round `n` (from 0): dumping.
    Dump(usize),
    /// Round `n`: writing the core and the plain file.
    Write(usize),
    /// Round `n`: running gcore.
    Gcore(usize),
    /// Round `n`: dumping with the background copier.
    Background(usize),
}

/// One report line of the target.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
struct Line {
    writes: u64,
    max_gap_us: f64,
    t_ns: u64,
}

/// The running target and the lines it has reported.
struct Target {
    helper: Helper,
    layout: Layout,
    lines: Vec<Line>,
}

impl Target {
    fn start(
        spec: &TargetSpec,
        spawn: impl FnOnce(&TargetSpec) -> Result<Helper, HelperError>,
    ) -> Result<Target, DumpBenchError> {
        let mut helper = spawn(spec)?;
        let head: serde_json::Value = helper.recv(TARGET_PATIENCE)?;
        let layout = Layout::from_header(&head).map_err(DumpBenchError::Report)?;
        Ok(Target {
            layout,
            lines: Vec::new(),
            helper,
        })
    }

    /// Receives lines until `n` of them are later than `t_ns`.
    fn wait_after(&mut self, t_ns: u64, n: usize) -> Result<(), DumpBenchError> {
        while self.lines.iter().filter(|l| l.t_ns > t_ns).count() < n {
            let l: Line = self.helper.recv(LINE_PATIENCE)?;
            self.lines.push(l);
        }
        Ok(())
    }

    /// Sleeps `d` while receiving the lines that arrive meanwhile.
    fn run_for(&mut self, d: Duration) -> Result<(), DumpBenchError> {
        let until = monotonic_ns() + d.as_nanos() as u64;
        self.wait_after(until, 1)
    }

    /// The capture checked against itself (the workload's oracle).
    fn verdict(&self, cap: &Captured) -> DumpVerdict {
        self.layout.check(|a, b| {
            let _ = cap.read(a, b);
        })
    }
}

/// The target's writes and stalls over a stretch of time, from its lines.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    /// From the first line used to the last, ms.
    pub ms: f64,
    /// Page writes per second.
    pub writes_per_s: f64,
    /// The longest gap between two page writes of a writer, us.
    pub max_stall_us: f64,
}

impl Window {
    /// Over lines `i0..=i1` (writes from line i0 to line i1), stalls reported by the lines
    /// after i0 up to `stall_end`.
    fn of(lines: &[Line], i0: usize, i1: usize, stall_end: usize) -> Option<Window> {
        let (a, b) = (lines.get(i0)?, lines.get(i1)?);
        let dt = b.t_ns.checked_sub(a.t_ns).filter(|&d| d > 0)? as f64 / 1e9;
        let stall = lines.get(i0 + 1..=stall_end)?;
        Some(Window {
            ms: dt * 1e3,
            writes_per_s: (b.writes - a.writes) as f64 / dt,
            max_stall_us: stall.iter().map(|l| l.max_gap_us).fold(0.0, f64::max),
        })
    }

    /// The lines covering [a, b]: from the last at or before `a` to the first after `b`, stalls
    /// up to one line more (a writer held until `b` reports its gap once it writes again,
    /// which may be after the target's next line).
    fn covering(lines: &[Line], a: u64, b: u64) -> Option<Window> {
        let i0 = lines.iter().rposition(|l| l.t_ns <= a)?;
        let i1 = i0 + 1 + lines[i0 + 1..].iter().position(|l| l.t_ns > b)?;
        Window::of(lines, i0, i1, (i1 + 1).min(lines.len() - 1))
    }

    /// The lines inside [a, b] (undisturbed: nothing after `b` counts).
    fn inside(lines: &[Line], a: u64, b: u64) -> Option<Window> {
        let i0 = lines.iter().position(|l| l.t_ns >= a)?;
        let i1 = lines.iter().rposition(|l| l.t_ns <= b)?;
        Window::of(lines, i0, i1, i1)
    }
}

/// Watches the target's thread states from a thread of this process: when any was seen
/// stopped (`t`: ptrace stop, `T`: job control) first and last.
struct StopWatch {
    done: Arc<AtomicBool>,
    handle: JoinHandle<Option<(u64, u64)>>,
}

impl StopWatch {
    fn start(pid: u32) -> StopWatch {
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        let handle = std::thread::spawn(move || {
            let mut seen: Option<(u64, u64)> = None;
            while !d.load(Ordering::Acquire) {
                if any_stopped(pid) {
                    let now = monotonic_ns();
                    seen = Some(seen.map_or((now, now), |(first, _)| (first, now)));
                }
                std::thread::sleep(WATCH_PERIOD);
            }
            seen
        });
        StopWatch { done, handle }
    }

    /// From the first poll that saw a stopped thread to the last, us (`None`: none seen).
    fn finish(self) -> Option<f64> {
        self.done.store(true, Ordering::Release);
        let seen = self.handle.join().expect("stop watcher");
        seen.map(|(first, last)| (last - first) as f64 / 1e3)
    }
}

/// Whether a thread of `pid` is stopped (`t` or `T` in its `/proc/PID/task/TID/stat`).
fn any_stopped(pid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                Some(rest.trim_start().starts_with(['t', 'T']))
            })
            .unwrap_or(false)
    })
}

/// One round's dump, from our side and the target's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DumpSide {
    /// The target's threads, all captured at the freeze.
    pub threads: usize,
    /// `DumpReport::pause_us`: the target stopped, us.
    pub pause_us: f64,
    /// Of which stopping every thread and capturing registers and in-freeze copies, us.
    pub freeze_us: f64,
    /// Of which write-protecting (the pages written since pre-arming), us.
    pub protect_us: f64,
    /// Pages the writers wrote during the last pre-arm pass (re-protected in the pause).
    pub prearm_dirty_pages: u64,
    /// Pre-arm passes before the pause (each re-protects what was written during the last).
    pub prearm_passes: u32,
    /// The whole capture (attach, plan, pause, copy), ms.
    pub capture_ms: f64,
    /// The snapshot's copy after the pause, ms.
    pub copy_ms: f64,
    /// Write-protect faults of the writers served during the copy.
    pub faults_served: u64,
    /// The target's longest stall over the whole capture (attach, pre-arming, pause, copy,
    /// release), us.
    pub max_stall_us: f64,
    /// The target over the whole capture (its stall is `max_stall_us`).
    pub capture: Window,
    /// The target over the copy after the pause.
    pub during: Window,
    /// The target over the undisturbed stretch of the same length just before.
    pub undisturbed: Window,
    /// `during.writes_per_s / undisturbed.writes_per_s`.
    pub throughput_ratio: f64,
    /// Pages caught mid-write (at most one per writer), by the oracle.
    pub in_flight_pages: u64,
    /// The target's threads runnable but waiting for a CPU over the capture, summed, ms
    /// (`DumpReport::target_cpu`; `None` without schedstat).
    pub runqueue_wait_ms: Option<f64>,
}

/// One round's core write against a plain write.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriteSide {
    /// The core file's length.
    pub core_bytes: u64,
    /// Of which left as holes (all-zero pages).
    pub hole_bytes: u64,
    /// `write_core`, core bytes per second, MB/s (10^6 bytes).
    pub core_write_mb_s: f64,
    /// A plain sequential write of as many bytes into the same directory, MB/s.
    pub seq_write_mb_s: f64,
    /// The plain file's length (the core's, or an earlier round's core's when written first).
    pub seq_bytes: u64,
    /// The plain file was written first.
    pub seq_first: bool,
    /// `core_write_mb_s / seq_write_mb_s`.
    pub core_write_ratio_vs_seq: f64,
}

/// One round's gcore.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GcoreSide {
    /// gcore's wall time (gdb's start, attach, core, detach), ms.
    pub wall_ms: f64,
    /// How long the target was seen stopped, us (`None`: never seen stopped).
    pub stop_seen_us: Option<f64>,
    /// The target over gcore's run.
    pub during: Window,
    /// Its core's size.
    pub core_bytes: u64,
    /// Whether gcore exited with success.
    pub success: bool,
}

/// One round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DumpRound {
    /// Our dump.
    pub dump: DumpSide,
    /// The core write.
    pub write: WriteSide,
    /// gcore (`None`: not installed).
    pub gcore: Option<GcoreSide>,
    /// The same dump with the background copier (`Copier::Background`).
    pub background: DumpSide,
}

/// The figures of a run: medians over the rounds, and each round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DumpFigures {
    /// The target's region.
    pub size: u64,
    /// Its writer threads.
    pub writers: usize,
    /// All its threads (writers, the reporting main thread), as the dump captured them.
    pub threads: usize,
    /// Recorded rounds.
    pub rounds: usize,
    /// The target's report interval, ms.
    pub interval_ms: u64,
    /// [`GOAL_PAUSE_RATIO_VS_GCORE`].
    pub goal_pause_ratio_vs_gcore: f64,
    /// Our pause (`DumpReport::pause_us`), us.
    pub pause_us: f64,
    /// gcore's stop: the target seen stopped, us (its longest stall where the watcher saw
    /// no stop). `None`: gcore is not installed.
    pub gcore_stop_us: Option<f64>,
    /// `pause_us / gcore_stop_us`, median of the rounds' (goal: at most 0.01).
    pub pause_ratio_vs_gcore: Option<f64>,
    /// The target's longest stall over the dump's whole capture, us.
    pub target_max_stall_us: f64,
    /// Its longest stall over the undisturbed stretch before, us.
    pub undisturbed_max_stall_us: f64,
    /// Its longest stall over gcore's run, us.
    pub gcore_max_stall_us: Option<f64>,
    /// `target_max_stall_us / gcore_max_stall_us`, median of the rounds'.
    pub stall_ratio_vs_gcore: Option<f64>,
    /// The target's page writes per second over the copy after the pause.
    pub throughput_during_copy: f64,
    /// The same over the undisturbed stretch before.
    pub throughput_undisturbed: f64,
    /// `throughput_during_copy / throughput_undisturbed`, median of the rounds'.
    pub throughput_ratio: f64,
    /// The core write (`write_core`), MB/s.
    pub core_write_mb_s: f64,
    /// A plain sequential write of as many bytes, MB/s.
    pub seq_write_mb_s: f64,
    /// `core_write_mb_s / seq_write_mb_s`, median of the rounds'.
    pub core_write_ratio_vs_seq: f64,
    /// The core file's length.
    pub core_bytes: u64,
    /// Of which holes.
    pub hole_bytes: u64,
    /// The whole capture (attach, plan, pause, copy), ms.
    pub capture_ms: f64,
    /// gcore's wall time, ms.
    pub gcore_wall_ms: Option<f64>,
    /// gcore's core's length.
    pub gcore_core_bytes: Option<u64>,
    /// The same figures with the background copier: its pause, us.
    pub background_pause_us: f64,
    /// With the background copier: the target's longest stall over the capture, us.
    pub background_max_stall_us: f64,
    /// With the background copier: the target's throughput over the copy against
    /// undisturbed, median of the rounds'.
    pub background_throughput_ratio: f64,
    /// With the background copier: the copy after the pause, ms.
    pub background_copy_ms: f64,
    /// The copy after the pause with the normal copier, ms.
    pub copy_ms: f64,
    /// The target's run-queue wait over the capture (normal copier), ms.
    pub runqueue_wait_ms: Option<f64>,
    /// The same with the background copier, ms.
    pub background_runqueue_wait_ms: Option<f64>,
    /// Every dump was checked against itself and is one instant of the target.
    pub consistent: bool,
    /// Each round.
    pub per_round: Vec<DumpRound>,
}

/// Runs the benchmark: starts the target with `spawn` (the workload helper, see
/// [`TargetSpec`]), then `cfg.rounds` rounds of a dump and a gcore of it (module docs).
pub fn measure(
    cfg: &DumpBenchConfig,
    spawn: impl FnOnce(&TargetSpec) -> Result<Helper, HelperError>,
    mut progress: impl FnMut(Step),
) -> Result<DumpFigures, DumpBenchError> {
    if cfg.size == 0 || cfg.size % PAGE_SIZE != 0 || cfg.threads == 0 || cfg.interval_ms == 0 {
        return Err(DumpBenchError::Params(format!(
            "size {} must be a non-zero multiple of the page size, threads {} and interval {} \
             ms at least 1",
            cfg.size, cfg.threads, cfg.interval_ms
        )));
    }
    let spec = TargetSpec {
        size: cfg.size,
        threads: cfg.threads,
        interval_ms: cfg.interval_ms,
    };
    let mut t = Target::start(&spec, spawn)?;
    progress(Step::Target);
    // The first lead assumes a copy at 500 MB/s; later ones follow the previous copy.
    let mut last = Duration::from_secs_f64(cfg.size as f64 / 500e6);
    let mut rounds = Vec::new();
    for r in 0..cfg.rounds.max(1) {
        let gcore_first = r % 2 == 1;
        let mut gcore = None;
        if gcore_first {
            progress(Step::Gcore(r));
            gcore = gcore_round(&mut t, &cfg.dir)?;
        }
        progress(Step::Dump(r));
        let lead = last.mul_f64(1.5).max(Duration::from_millis(300));
        let pace = (lead, cfg.interval_ms);
        let (cap, dump) = dump_round(&mut t, pace, Copier::Normal, r)?;
        last = Duration::from_secs_f64(dump.during.ms / 1e3);
        progress(Step::Write(r));
        let seq_first = rounds
            .last()
            .filter(|_| r % 2 == 1)
            .map(|p: &DumpRound| p.write.core_bytes);
        let write = write_round(&cap, &cfg.dir, seq_first);
        drop(cap);
        let write = write?;
        if !gcore_first {
            progress(Step::Gcore(r));
            gcore = gcore_round(&mut t, &cfg.dir)?;
        }
        progress(Step::Background(r));
        let lead = last.mul_f64(3.0).max(Duration::from_millis(300));
        let (_, background) = dump_round(&mut t, (lead, cfg.interval_ms), Copier::Background, r)?;
        rounds.push(DumpRound {
            dump,
            write,
            gcore,
            background,
        });
    }
    Ok(figures(cfg, rounds))
}

fn no_window(what: &str) -> DumpBenchError {
    DumpBenchError::Report(format!("too few report lines around {what}"))
}

/// Runs the target undisturbed for `lead`, then dumps it; the capture is checked against
/// itself. The target's stall counts over the whole capture, its throughput over the copy
/// (from the first to the last progress call of the copy after the pause), against the
/// undisturbed stretch of the same length (at least 5 report intervals, within the lead)
/// just before the capture.
fn dump_round(
    t: &mut Target,
    (lead, interval_ms): (Duration, u64),
    copier: Copier,
    round: usize,
) -> Result<(Captured, DumpSide), DumpBenchError> {
    let lead_start = monotonic_ns();
    t.run_for(lead)?;
    let a = monotonic_ns();
    let t0 = Instant::now();
    let mut copy: Option<(u64, u64)> = None;
    let mut opts = DumpOptions::default();
    opts.snapshot.copier = copier;
    let cap = dump::capture(t.layout.pid, &opts, |_, _| {
        let now = monotonic_ns();
        copy = Some(copy.map_or((now, now), |(first, _)| (first, now)));
    })?;
    let capture = t0.elapsed();
    let b = monotonic_ns();
    t.wait_after(b, 2)?;
    let (c0, c1) = copy.unwrap_or((a, b));
    let capture_w = Window::covering(&t.lines, a, b).ok_or_else(|| no_window("the dump"))?;
    let during = Window::covering(&t.lines, c0, c1).ok_or_else(|| no_window("the copy"))?;
    let span = (c1 - c0).max(5 * interval_ms * 1_000_000);
    let undisturbed = Window::inside(&t.lines, a.saturating_sub(span).max(lead_start), a)
        .ok_or_else(|| no_window("the undisturbed stretch"))?;
    let v = t.verdict(&cap);
    if v.inconsistent > 0 {
        return Err(DumpBenchError::Inconsistent {
            round,
            pages: v.inconsistent,
        });
    }
    let rep = &cap.report;
    let side = DumpSide {
        threads: rep.threads,
        pause_us: rep.pause_us,
        freeze_us: rep.freeze_us,
        protect_us: rep.snapshot.as_ref().map_or(0.0, |s| s.protect_us),
        prearm_dirty_pages: rep.snapshot.as_ref().map_or(0, |s| s.prearm_dirty_pages),
        prearm_passes: rep.snapshot.as_ref().map_or(0, |s| s.prearm_passes),
        capture_ms: capture.as_secs_f64() * 1e3,
        copy_ms: rep.snapshot.as_ref().map_or(0.0, |s| s.copy_ms),
        faults_served: rep.snapshot.as_ref().map_or(0, |s| s.faults_served),
        max_stall_us: capture_w.max_stall_us,
        capture: capture_w,
        during,
        undisturbed,
        throughput_ratio: during.writes_per_s / undisturbed.writes_per_s,
        in_flight_pages: v.in_flight,
        runqueue_wait_ms: rep.target_cpu.map(|c| c.runqueue_wait_ms),
    };
    Ok((cap, side))
}

/// Writes `cap` as a core into `dir` and a plain file of as many bytes, each removed before
/// the other is written. With `seq_first` (the core's length in an earlier round: the same
/// target gives the same length, within a few pages), the plain file goes first: the order
/// alternates from round to round, since on this kind of machine the second of two large
/// writes often runs at a different speed than the first (page cache pages freed a moment
/// ago against pages the guest has not touched for a while).
fn write_round(
    cap: &Captured,
    dir: &Path,
    seq_first: Option<u64>,
) -> Result<WriteSide, DumpBenchError> {
    let plain = dir.join(format!("uffd-wp-bench-dump-{}.seq", std::process::id()));
    let seq = |bytes: u64| {
        let took = plain_write(&plain, bytes);
        let _ = std::fs::remove_file(&plain);
        took.map_err(io("writing", &plain))
    };
    let early = seq_first.map(|b| seq(b).map(|t| (b, t))).transpose()?;
    let core = dir.join(format!("uffd-wp-bench-dump-{}.core", std::process::id()));
    let f = File::create(&core).map_err(io("creating", &core))?;
    let t0 = Instant::now();
    let stats = dump::write_core(cap, &f, |_, _| {});
    let core_took = t0.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&core);
    let stats = stats?;
    let (seq_bytes, seq_took) = match early {
        Some(e) => e,
        None => (stats.file_size, seq(stats.file_size)?),
    };
    let mb_s = |b: u64, d: Duration| b as f64 / d.as_secs_f64().max(1e-9) / 1e6;
    let (core_mb_s, seq_mb_s) = (mb_s(stats.file_size, core_took), mb_s(seq_bytes, seq_took));
    Ok(WriteSide {
        core_bytes: stats.file_size,
        hole_bytes: stats.hole_bytes,
        seq_bytes,
        seq_first: seq_first.is_some(),
        core_write_mb_s: core_mb_s,
        seq_write_mb_s: seq_mb_s,
        core_write_ratio_vs_seq: core_mb_s / seq_mb_s,
    })
}

/// Writes `bytes` bytes (not zero: no hole) into a new file `path`, 1 MiB per `write`, as the
/// core writer does; returns the time the writes took.
fn plain_write(path: &Path, bytes: u64) -> std::io::Result<Duration> {
    let mut f = File::create(path)?;
    let buf = vec![0xa5u8; 1 << 20];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(t.elapsed())
}

/// How long the target runs undisturbed before gcore.
const GCORE_SETTLE: Duration = Duration::from_millis(300);

/// Runs gcore on the target (its core written into `dir`, then removed), watching its
/// threads' states meanwhile. `None`: gcore is not installed.
fn gcore_round(t: &mut Target, dir: &Path) -> Result<Option<GcoreSide>, DumpBenchError> {
    t.run_for(GCORE_SETTLE)?;
    let prefix = dir.join(format!("uffd-wp-bench-gcore-{}", std::process::id()));
    let a = monotonic_ns();
    let watch = StopWatch::start(t.layout.pid);
    let run = run_gcore(t.layout.pid, &prefix);
    let seen = watch.finish();
    let b = monotonic_ns();
    let Some(run) = run.map_err(io("running gcore for", &prefix))? else {
        return Ok(None);
    };
    if !run.success {
        return Err(DumpBenchError::Report(format!(
            "gcore of process {} failed ({} bytes of core)",
            t.layout.pid, run.core_bytes
        )));
    }
    t.wait_after(b, 2)?;
    let during = Window::covering(&t.lines, a, b).ok_or_else(|| no_window("gcore"))?;
    Ok(Some(GcoreSide {
        wall_ms: run.took.as_secs_f64() * 1e3,
        stop_seen_us: seen,
        during,
        core_bytes: run.core_bytes,
        success: run.success,
    }))
}

/// gcore's stop in a round: as seen by the watcher, else the target's longest stall.
fn gcore_stop(g: &GcoreSide) -> f64 {
    g.stop_seen_us.unwrap_or(g.during.max_stall_us)
}

/// The medians of the rounds.
fn figures(cfg: &DumpBenchConfig, rounds: Vec<DumpRound>) -> DumpFigures {
    let med = |f: &dyn Fn(&DumpRound) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let gmed = |f: &dyn Fn(&DumpRound, &GcoreSide) -> f64| {
        let v: Vec<f64> = rounds
            .iter()
            .filter_map(|r| Some(f(r, r.gcore.as_ref()?)))
            .collect();
        (!v.is_empty()).then(|| median(&v))
    };
    let omed = |f: &dyn Fn(&DumpRound) -> Option<f64>| {
        let v: Vec<f64> = rounds.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&v))
    };
    DumpFigures {
        size: cfg.size,
        writers: cfg.threads,
        threads: rounds.first().map_or(0, |r| r.dump.threads),
        rounds: rounds.len(),
        interval_ms: cfg.interval_ms,
        goal_pause_ratio_vs_gcore: GOAL_PAUSE_RATIO_VS_GCORE,
        pause_us: med(&|r| r.dump.pause_us),
        gcore_stop_us: gmed(&|_, g| gcore_stop(g)),
        pause_ratio_vs_gcore: gmed(&|r, g| r.dump.pause_us / gcore_stop(g)),
        target_max_stall_us: med(&|r| r.dump.max_stall_us),
        undisturbed_max_stall_us: med(&|r| r.dump.undisturbed.max_stall_us),
        gcore_max_stall_us: gmed(&|_, g| g.during.max_stall_us),
        stall_ratio_vs_gcore: gmed(&|r, g| r.dump.max_stall_us / g.during.max_stall_us),
        throughput_during_copy: med(&|r| r.dump.during.writes_per_s),
        throughput_undisturbed: med(&|r| r.dump.undisturbed.writes_per_s),
        throughput_ratio: med(&|r| r.dump.throughput_ratio),
        core_write_mb_s: med(&|r| r.write.core_write_mb_s),
        seq_write_mb_s: med(&|r| r.write.seq_write_mb_s),
        core_write_ratio_vs_seq: med(&|r| r.write.core_write_ratio_vs_seq),
        core_bytes: med(&|r| r.write.core_bytes as f64) as u64,
        hole_bytes: med(&|r| r.write.hole_bytes as f64) as u64,
        capture_ms: med(&|r| r.dump.capture_ms),
        gcore_wall_ms: gmed(&|_, g| g.wall_ms),
        gcore_core_bytes: gmed(&|_, g| g.core_bytes as f64).map(|b| b as u64),
        background_pause_us: med(&|r| r.background.pause_us),
        background_max_stall_us: med(&|r| r.background.max_stall_us),
        background_throughput_ratio: med(&|r| r.background.throughput_ratio),
        background_copy_ms: med(&|r| r.background.copy_ms),
        copy_ms: med(&|r| r.dump.copy_ms),
        runqueue_wait_ms: omed(&|r| r.dump.runqueue_wait_ms),
        background_runqueue_wait_ms: omed(&|r| r.background.runqueue_wait_ms),
        consistent: true,
        per_round: rounds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(writes: u64, max_gap_us: f64, ms: u64) -> Line {
        Line {
            writes,
            max_gap_us,
            t_ns: ms * 1_000_000,
        }
    }

    /// Lines every 10 ms; a stall from 35 to 62 ms is reported by the line at 70 ms.
    fn lines() -> Vec<Line> {
        vec![
            line(0, 5.0, 0),
            line(100, 6.0, 10),
            line(200, 7.0, 20),
            line(300, 4.0, 30),
            line(305, 3.0, 40),
            line(305, 0.0, 50),
            line(305, 0.0, 60),
            line(350, 27_000.0, 70),
            line(450, 5.0, 80),
        ]
    }

    #[test]
    fn covering_window_takes_the_stall_reported_after_it() {
        let w = Window::covering(&lines(), 35_000_000, 62_000_000).unwrap();
        // From the line at 30 ms to the one at 70 ms; the stall line is the one after 62 ms.
        assert_eq!(w.ms, 40.0);
        assert_eq!(w.writes_per_s, 50.0 / 0.040);
        assert_eq!(w.max_stall_us, 27_000.0);
        // Ending exactly on a line: one more line for the stall.
        let w = Window::covering(&lines(), 35_000_000, 60_000_000).unwrap();
        assert_eq!(w.max_stall_us, 27_000.0);
    }

    #[test]
    fn inside_window_ignores_what_follows() {
        let w = Window::inside(&lines(), 0, 30_000_000).unwrap();
        assert_eq!(w.ms, 30.0);
        assert_eq!(w.writes_per_s, 300.0 / 0.030);
        assert_eq!(
            w.max_stall_us, 7.0,
            "the line at 0 ms reports what came before"
        );
        assert!(Window::inside(&lines(), 0, 5_000_000).is_none(), "one line");
        assert!(Window::covering(&lines(), 75_000_000, 90_000_000).is_none());
    }

    #[test]
    fn bad_parameters_are_refused() {
        let cfg = DumpBenchConfig {
            size: 4097,
            ..DumpBenchConfig::default()
        };
        let e = measure(&cfg, |_| unreachable!("no target"), |_| {});
        assert!(matches!(e, Err(DumpBenchError::Params(_))));
    }
}

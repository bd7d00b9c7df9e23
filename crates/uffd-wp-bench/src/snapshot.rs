//! Measuring code shared by `uffd-wp bench snapshot` and the criterion bench
//! (`benches/snapshot.rs`): the snapshot engine against its alternatives, in the same run, on
//! the built-in workload ([`crate::workload`]):
//!
//! - **pause** ([`measure_pause`]): the writers' pause of a live snapshot (freeze to resume:
//!   stopping the writers, write-protecting, resuming them), with and without pre-arming,
//!   against the `fork()` of the same process holding the same populated region (the call in
//!   the parent; the child `_exit`s at once), and, where gdb is installed, a `gcore` of a forked
//!   copy of the process;
//! - **copy**: the snapshot's copy throughput against a `memcpy` of the same region into a
//!   populated buffer, both with the writers running (as during a live snapshot) and with them
//!   parked;
//! - **fault latency** ([`measure_faults`]): a writer thread writes to write-protected pages and
//!   times each write; the faults are served by a bare handler (poll, read,
//!   `UFFDIO_WRITEPROTECT` un-protect + wake; or a busy loop of non-blocking reads) or by the
//!   snapshot engine (inline in the copier, or its handler thread), with the handler on the
//!   writer's CPU and on the other one.
//!
//! Every snapshot taken here is checked with the workload's oracle; a measurement fails if one
//! is not consistent.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
use serde::Serialize;

use crate::protect::PageKind;
use crate::sys::fork::{SleepingChild, time_fork};
use crate::workload::{Workload, WorkloadConfig};
use uffd_wp::backend::linux::{LinuxMm, OpenError};
use uffd_wp::engine::snapshot::{
    HandlerMode, Image, Percentiles, SnapshotError, SnapshotOptions, SnapshotReport, Source, take,
};
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, Range, RangeSet};
use uffd_wp::seam::category;
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, Event, FnQuiesce, RegisterMode, ScanRequest, WpMode};
use uffd_wp::sys::errno_name;

/// Why a snapshot benchmark could not run, or found a snapshot wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotBenchError {
    /// Bad parameters.
    #[error("bad benchmark parameters: {0}")]
    Params(String),
    /// The userfaultfd backend could not be opened.
    #[error("opening the userfaultfd backend: {0}")]
    Open(#[from] OpenError),
    /// Setting something up failed.
    #[error("benchmark set-up: {what}: {}", errno_name(*errno))]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// A snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The oracle found pages that do not hold their version at the snapshot point.
    #[error("{what}: {pages} pages inconsistent with the snapshot point")]
    Inconsistent {
        /// Which snapshot.
        what: String,
        /// Inconsistent pages.
        pages: usize,
    },
    /// A fault-latency round served a different number of faults than it timed writes to
    /// write-protected pages (each must fault exactly once).
    #[error("{what}: {faults} faults served for {writes} writes to write-protected pages")]
    FaultCount {
        /// Which case.
        what: String,
        /// Faults served.
        faults: u64,
        /// Writes timed.
        writes: u64,
    },
}

fn setup(what: &'static str) -> impl Fn(Errno) -> SnapshotBenchError {
    move |errno| SnapshotBenchError::Setup { what, errno }
}

/// Median of some values (NaN when empty).
pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The CPUs this thread may run on, ascending.
pub fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => vec![0],
    }
}

/// Pins the calling thread to one CPU until dropped, then restores its affinity.
struct Pinned(Option<CpuSet>);

impl Pinned {
    /// Pins to `cpu`; `None` leaves the thread where the scheduler puts it.
    fn to(cpu: Option<usize>) -> Result<Pinned, SnapshotBenchError> {
        let Some(cpu) = cpu else {
            return Ok(Pinned(None));
        };
        let old = sched_getaffinity(None).map_err(setup("sched_getaffinity"))?;
        let mut set = CpuSet::new();
        set.set(cpu);
        sched_setaffinity(None, &set).map_err(setup("sched_setaffinity"))?;
        Ok(Pinned(Some(old)))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = sched_setaffinity(None, &old);
        }
    }
}

/// Checks `img` against the versions at the snapshot point.
fn check(
    w: &Workload,
    img: &Image,
    versions: &[u64],
    what: &str,
) -> Result<(), SnapshotBenchError> {
    let base = w.range().start();
    let bad = Workload::check_image(versions, |p| img.page(base + p * PAGE_SIZE));
    if bad.is_empty() {
        Ok(())
    } else {
        Err(SnapshotBenchError::Inconsistent {
            what: what.to_string(),
            pages: bad.len(),
        })
    }
}

/// Bytes of `r` mapped by huge pages (`PAGE_IS_HUGE`).
fn huge_bytes(mm: &LinuxMm, r: Range) -> Result<u64, SnapshotBenchError> {
    let res = mm
        .scan_all(&ScanRequest {
            start: r.start(),
            end: r.end(),
            category_mask: category::HUGE,
            return_mask: category::HUGE,
            ..Default::default()
        })
        .map_err(setup("PAGEMAP_SCAN(PAGE_IS_HUGE)"))?;
    Ok(res.regions.iter().map(|r| r.end - r.start).sum())
}

/// A snapshot of the whole workload region with options `opts`. With `live`, the writers run
/// before and after the pause (they are frozen by the snapshot's quiesce callback); otherwise
/// they stay parked throughout. Returns the report, checked by the oracle, and the time the
/// oracle's own bookkeeping took inside the freeze (copying the workload's version table, 2 MiB
/// per GiB), which the report's `pause_us` and `freeze_us` no longer include: it is the
/// benchmark's instrumentation, not part of a pause an application would see.
pub fn snapshot_workload(
    mm: &LinuxMm,
    w: &Workload,
    opts: &SnapshotOptions,
    live: bool,
) -> Result<(SnapshotReport, Duration), SnapshotBenchError> {
    let at_freeze = Mutex::new(Vec::new());
    let oracle = Mutex::new(Duration::ZERO);
    let record = || {
        let t = Instant::now();
        *at_freeze.lock().expect("versions") = w.versions();
        *oracle.lock().expect("oracle time") = t.elapsed();
    };
    let ranges = RangeSet::single(w.range());
    let res = if live {
        w.resume();
        std::thread::sleep(Duration::from_millis(20));
        let q = FnQuiesce(
            || {
                w.pause();
                record();
            },
            || w.resume(),
        );
        let res = take(
            mm,
            &ranges,
            Source::Mapping(w.mapping()),
            &q,
            opts,
            |_, _| {},
        );
        w.pause();
        res
    } else {
        w.pause();
        let q = FnQuiesce(record, || {});
        take(
            mm,
            &ranges,
            Source::Mapping(w.mapping()),
            &q,
            opts,
            |_, _| {},
        )
    };
    let (img, mut rep) = res?;
    let versions = at_freeze.into_inner().expect("versions");
    let oracle = oracle.into_inner().expect("oracle time");
    let oracle_us = oracle.as_secs_f64() * 1e6;
    rep.pause_us -= oracle_us;
    rep.freeze_us -= oracle_us;
    let what = format!(
        "{} snapshot (prearm {}, {:?})",
        if live { "live" } else { "idle" },
        opts.prearm,
        opts.handler
    );
    check(w, &img, &versions, &what)?;
    rep.consistent = Some(true);
    Ok((rep, oracle))
}

/// Times a memcpy of the whole workload region into a fresh populated buffer (the C
/// library's `memcpy` in one call, [`Image::memcpy_from_mapping`]: at this size it streams by
/// itself). With `live`, the writers run meanwhile. Returns MB/s (10^6 bytes).
pub fn memcpy_mb_s(w: &Workload, live: bool) -> Result<f64, SnapshotBenchError> {
    let r = w.range();
    let img = Image::new(&RangeSet::single(r)).map_err(setup("allocating the memcpy buffer"))?;
    if live {
        w.resume();
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let res = img.memcpy_from_mapping(w.mapping(), r.start(), r.len());
    let d = t.elapsed();
    if live {
        w.pause();
    }
    res.map_err(setup("memcpy"))?;
    Ok(r.len() as f64 / d.as_secs_f64().max(1e-9) / 1e6)
}

/// What a `gcore` of the process gave.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Gcore {
    /// gdb's `gcore` is not on the PATH.
    NotInstalled,
    /// It ran.
    Ran {
        /// Wall time of `gcore -o FILE PID`, ms.
        ms: f64,
        /// Size of the core file.
        core_bytes: u64,
        /// Whether it exited with success.
        success: bool,
    },
    /// It was not asked for.
    Skipped,
}

/// One `gcore -o PREFIX PID` run ([`run_gcore`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GcoreRun {
    /// Its wall time.
    pub took: Duration,
    /// Size of the core file it wrote (0 if none).
    pub core_bytes: u64,
    /// Whether it exited with success.
    pub success: bool,
}

/// Runs `gcore -o PREFIX PID` (its output discarded), times it and removes the core file it
/// writes (`PREFIX.PID`). `Ok(None)`: gcore is not on the PATH.
pub fn run_gcore(pid: u32, prefix: &std::path::Path) -> std::io::Result<Option<GcoreRun>> {
    let core = prefix.with_file_name(format!(
        "{}.{pid}",
        prefix
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("core"),
    ));
    let t = Instant::now();
    let status = std::process::Command::new("gcore")
        .arg("-o")
        .arg(prefix)
        .arg(pid.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let took = t.elapsed();
    let status = match status {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let core_bytes = std::fs::metadata(&core).map_or(0, |m| m.len());
    let _ = std::fs::remove_file(&core);
    Ok(Some(GcoreRun {
        took,
        core_bytes,
        success: status.success(),
    }))
}

/// Runs `gcore -o FILE PID` on a forked copy of this process (sleeping in `pause(2)`, holding
/// the same memory) and times it; the core file is removed afterwards.
pub fn time_gcore() -> Result<Gcore, SnapshotBenchError> {
    let child = SleepingChild::fork().map_err(setup("fork"))?;
    let prefix = std::env::temp_dir().join(format!("uffd-wp-bench-core-{}", std::process::id()));
    let run = run_gcore(child.pid(), &prefix);
    drop(child);
    match run {
        Ok(None) => Ok(Gcore::NotInstalled),
        Ok(Some(r)) => Ok(Gcore::Ran {
            ms: ms(r.took),
            core_bytes: r.core_bytes,
            success: r.success,
        }),
        Err(e) => Err(SnapshotBenchError::Setup {
            what: "running gcore",
            errno: uffd_wp::sys::errno_of(&e),
        }),
    }
}

/// What [`measure_pause`] measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PauseConfig {
    /// Region size (a multiple of 2 MiB).
    pub size: u64,
    /// Page kind.
    pub kind: PageKind,
    /// Recorded rounds (one more warm-up round is not recorded).
    pub runs: usize,
    /// Writer threads of the workload.
    pub writers: usize,
    /// Also time a `gcore` (if installed).
    pub gcore: bool,
}

impl Default for PauseConfig {
    /// 1 GiB of 4 KiB pages, 5 rounds, 2 writers, gcore.
    fn default() -> Self {
        PauseConfig {
            size: 1 << 30,
            kind: PageKind::Small,
            runs: 5,
            writers: 2,
            gcore: true,
        }
    }
}

/// The snapshot options `uffd-wp snapshot` uses by default for a page kind: pre-arming and one
/// protecting thread per CPU for 4 KiB pages, neither with THP (protecting huge pages is cheap,
/// and splitting it only adds wake-ups).
pub fn default_options(kind: PageKind) -> SnapshotOptions {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    SnapshotOptions {
        protect_threads: if kind == PageKind::Thp { 1 } else { cpus },
        prearm: kind != PageKind::Thp,
        ..SnapshotOptions::default()
    }
}

/// Pause figures of one snapshot variant (medians over the recorded rounds).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PauseVariant {
    /// Pre-arming on.
    pub prearm: bool,
    /// Writers frozen (freeze to resume), ms.
    pub pause_ms: f64,
    /// Of which stopping the writers, ms.
    pub freeze_ms: f64,
    /// Of which write-protecting, ms.
    pub protect_ms: f64,
    /// Pages written between pre-arming and the pause (re-protected in it).
    pub prearm_dirty_pages: f64,
    /// `pause_ms / fork_ms`.
    pub pause_ratio_vs_fork: f64,
    /// `(pause_ms - freeze_ms) / fork_ms`: what the engine adds to stopping the writers.
    pub engine_pause_ratio_vs_fork: f64,
    /// Copy throughput with the writers running, MB/s.
    pub copy_mb_s: f64,
    /// WP faults served first during the copy.
    pub faults_served: f64,
    /// Fault service time in the engine (message read to wake), p50 over rounds, us.
    pub fault_service_p50_us: f64,
    /// The oracle's bookkeeping inside the freeze (copying the version table), ms: not counted
    /// in `pause_ms` or `freeze_ms`.
    pub oracle_ms: f64,
}

/// The figures of one page kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PauseFigures {
    /// `"4k"` or `"thp"`.
    pub kind: &'static str,
    /// Region size.
    pub size: u64,
    /// Recorded rounds.
    pub runs: usize,
    /// Writer threads.
    pub writers: usize,
    /// Smallest fraction of the region mapped by huge pages when a fork or a live snapshot
    /// started (THP: a live snapshot's faults split the huge pages they hit, so each live
    /// snapshot gets a fresh region).
    pub min_huge_fraction: f64,
    /// `fork()` of the process holding the populated region, writers parked, ms (median).
    pub fork_ms: f64,
    /// The default variant for this kind (pre-arming for 4 KiB pages, not with THP).
    pub default_prearm: bool,
    /// The default variant's pause, ms.
    pub pause_ms: f64,
    /// The default variant's `pause_ms / fork_ms` (goal: at most 0.5 at 4 KiB, 0.1 with THP).
    pub pause_ratio_vs_fork: f64,
    /// With pre-arming.
    pub prearm: PauseVariant,
    /// Without pre-arming.
    pub no_prearm: PauseVariant,
    /// Snapshot copy throughput with the writers running (default variant), MB/s.
    pub copy_mb_s: f64,
    /// memcpy of the region with the writers running, MB/s.
    pub memcpy_mb_s: f64,
    /// `copy_mb_s / memcpy_mb_s` (goal: at least 0.7).
    pub copy_ratio_vs_memcpy: f64,
    /// Snapshot copy throughput with the writers parked throughout, MB/s.
    pub idle_copy_mb_s: f64,
    /// memcpy with the writers parked, MB/s.
    pub idle_memcpy_mb_s: f64,
    /// `idle_copy_mb_s / idle_memcpy_mb_s`: the engine's own copy overhead.
    pub copy_ratio_idle: f64,
    /// `copy_mb_s / idle_memcpy_mb_s`: the live copy against an undisturbed memcpy.
    pub copy_ratio_vs_idle_memcpy: f64,
    /// `gcore` of a forked copy of the process.
    pub gcore: Gcore,
    /// Snapshots taken, each checked by the oracle.
    pub snapshots: usize,
    /// Every snapshot was consistent (the measurement fails otherwise).
    pub consistent: bool,
}

/// Which part of a measurement just finished (for progress display).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A workload was started (its region populated).
    Workload,
    /// One recorded round.
    Round,
    /// One fault-latency case of one round.
    FaultCase,
}

/// Measures pause and copy for one page kind. See the module docs.
pub fn measure_pause(
    cfg: &PauseConfig,
    mut progress: impl FnMut(Step),
) -> Result<PauseFigures, SnapshotBenchError> {
    if cfg.size == 0 || cfg.size % PMD_SIZE != 0 {
        return Err(SnapshotBenchError::Params(format!(
            "size {:#x} is not a positive multiple of 2 MiB",
            cfg.size
        )));
    }
    let b = PauseBench::new(cfg)?;
    let mut s = PauseSamples::default();
    let mut w = b.start(&mut progress)?;
    let runs = cfg.runs.max(1);
    for round in 0..=runs {
        w = b.round(w, round, &mut s, &mut progress)?;
        if round > 0 {
            progress(Step::Round);
        }
    }
    let gcore = if cfg.gcore {
        time_gcore()?
    } else {
        Gcore::Skipped
    };
    drop(w);
    Ok(b.figures(runs, &s, gcore))
}

/// What the rounds of [`measure_pause`] collect (recorded rounds only, except `snapshots`).
#[derive(Debug)]
struct PauseSamples {
    /// `fork()` times, ms.
    fork: Vec<f64>,
    /// Each variant's live snapshots: the report and the oracle's time inside the freeze.
    reps: [Vec<(SnapshotReport, Duration)>; 2],
    /// memcpy with the writers running, MB/s.
    memcpy: Vec<f64>,
    /// memcpy with the writers parked, MB/s.
    idle_memcpy: Vec<f64>,
    /// Idle snapshots' copy throughput, MB/s.
    idle_copy: Vec<f64>,
    /// Smallest fraction of the region in huge pages when a fork or live snapshot started.
    min_huge: f64,
    /// Snapshots taken, warm-up included.
    snapshots: usize,
}

impl Default for PauseSamples {
    fn default() -> Self {
        PauseSamples {
            fork: Vec::new(),
            reps: [Vec::new(), Vec::new()],
            memcpy: Vec::new(),
            idle_memcpy: Vec::new(),
            idle_copy: Vec::new(),
            min_huge: 1.0,
            snapshots: 0,
        }
    }
}

/// What every round of [`measure_pause`] uses.
struct PauseBench<'a> {
    cfg: &'a PauseConfig,
    mm: LinuxMm,
    /// The page kind's default options (the idle snapshot's).
    base: SnapshotOptions,
    /// The default options with pre-arming, and without.
    variants: [SnapshotOptions; 2],
}

impl<'a> PauseBench<'a> {
    /// Opens the backend and derives the options for `cfg`'s page kind.
    fn new(cfg: &'a PauseConfig) -> Result<Self, SnapshotBenchError> {
        let mm = LinuxMm::open()?;
        let base = default_options(cfg.kind);
        let variants = [
            SnapshotOptions {
                prearm: true,
                ..base
            },
            SnapshotOptions {
                prearm: false,
                ..base
            },
        ];
        Ok(PauseBench {
            cfg,
            mm,
            base,
            variants,
        })
    }

    fn thp(&self) -> bool {
        self.cfg.kind == PageKind::Thp
    }

    /// Starts a workload with its region populated.
    fn start(&self, progress: &mut dyn FnMut(Step)) -> Result<Workload, SnapshotBenchError> {
        let w = Workload::start(WorkloadConfig {
            size: self.cfg.size,
            threads: self.cfg.writers,
            thp: self.thp(),
            ..WorkloadConfig::default()
        })
        .map_err(setup("starting the workload"))?;
        progress(Step::Workload);
        Ok(w)
    }

    /// One round (round 0 is the unrecorded warm-up): the copy baselines and an idle snapshot,
    /// then a fork and a live snapshot per variant. Returns the workload to go on with (with
    /// THP a fresh one: a live snapshot's faults split the huge pages they hit).
    fn round(
        &self,
        mut w: Workload,
        round: usize,
        s: &mut PauseSamples,
        progress: &mut dyn FnMut(Step),
    ) -> Result<Workload, SnapshotBenchError> {
        self.copy_baselines(&w, round, s)?;
        let vorder: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for (n, &v) in vorder.iter().enumerate() {
            if self.thp() && n > 0 {
                // The previous live snapshot split the huge pages its faults hit.
                drop(w);
                w = self.start(progress)?;
            }
            self.live_snapshot(&w, v, round > 0, s)?;
        }
        if self.thp() {
            drop(w);
            w = self.start(progress)?;
        }
        Ok(w)
    }

    /// The copy baselines (memcpy with the writers running and parked, in an order that
    /// alternates by round) and an idle snapshot, on an unsplit region.
    fn copy_baselines(
        &self,
        w: &Workload,
        round: usize,
        s: &mut PauseSamples,
    ) -> Result<(), SnapshotBenchError> {
        let keep = round > 0;
        let order: [bool; 2] = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for live in order {
            let m = memcpy_mb_s(w, live)?;
            if keep {
                if live {
                    &mut s.memcpy
                } else {
                    &mut s.idle_memcpy
                }
                .push(m);
            }
        }
        let (rep, _) = snapshot_workload(&self.mm, w, &self.base, false)?;
        s.snapshots += 1;
        if keep {
            s.idle_copy.push(rep.copy_mb_s);
        }
        Ok(())
    }

    /// A timed fork, then a live snapshot with variant `v`; recorded if `keep`.
    fn live_snapshot(
        &self,
        w: &Workload,
        v: usize,
        keep: bool,
        s: &mut PauseSamples,
    ) -> Result<(), SnapshotBenchError> {
        let huge = huge_bytes(&self.mm, w.range())? as f64 / self.cfg.size as f64;
        let d = time_fork().map_err(setup("fork"))?;
        let (rep, oracle) = snapshot_workload(&self.mm, w, &self.variants[v], true)?;
        s.snapshots += 1;
        if keep {
            s.min_huge = s.min_huge.min(huge);
            s.fork.push(ms(d));
            s.reps[v].push((rep, oracle));
        }
        Ok(())
    }

    /// The figures: medians of the samples, and the ratios of the default variant.
    fn figures(&self, runs: usize, s: &PauseSamples, gcore: Gcore) -> PauseFigures {
        let fork_ms = median(&s.fork);
        let prearm = variant_figures(&s.reps[0], self.variants[0].prearm, fork_ms);
        let no_prearm = variant_figures(&s.reps[1], self.variants[1].prearm, fork_ms);
        let default = if self.base.prearm {
            &prearm
        } else {
            &no_prearm
        };
        let (memcpy_mb_s, idle_memcpy_mb_s) = (median(&s.memcpy), median(&s.idle_memcpy));
        let idle_copy_mb_s = median(&s.idle_copy);
        PauseFigures {
            kind: self.cfg.kind.name(),
            size: self.cfg.size,
            runs,
            writers: self.cfg.writers,
            min_huge_fraction: s.min_huge,
            fork_ms,
            default_prearm: self.base.prearm,
            pause_ms: default.pause_ms,
            pause_ratio_vs_fork: default.pause_ratio_vs_fork,
            copy_mb_s: default.copy_mb_s,
            memcpy_mb_s,
            copy_ratio_vs_memcpy: default.copy_mb_s / memcpy_mb_s,
            idle_copy_mb_s,
            idle_memcpy_mb_s,
            copy_ratio_idle: idle_copy_mb_s / idle_memcpy_mb_s,
            copy_ratio_vs_idle_memcpy: default.copy_mb_s / idle_memcpy_mb_s,
            prearm,
            no_prearm,
            gcore,
            snapshots: s.snapshots,
            consistent: true,
        }
    }
}

/// The figures of one variant: medians of its reports `r` (with the oracle's times).
fn variant_figures(r: &[(SnapshotReport, Duration)], prearm: bool, fork_ms: f64) -> PauseVariant {
    let col = |f: &dyn Fn(&SnapshotReport) -> f64| {
        median(&r.iter().map(|(r, _)| f(r)).collect::<Vec<_>>())
    };
    let pause_ms = col(&|r| r.pause_us / 1e3);
    PauseVariant {
        prearm,
        pause_ms,
        freeze_ms: col(&|r| r.freeze_us / 1e3),
        protect_ms: col(&|r| r.protect_us / 1e3),
        prearm_dirty_pages: col(&|r| r.prearm_dirty_pages as f64),
        pause_ratio_vs_fork: pause_ms / fork_ms,
        engine_pause_ratio_vs_fork: col(&|r| (r.pause_us - r.freeze_us) / 1e3) / fork_ms,
        copy_mb_s: col(&|r| r.copy_mb_s),
        faults_served: col(&|r| r.faults_served as f64),
        fault_service_p50_us: col(&|r| r.fault_service_us.p50),
        oracle_ms: median(&r.iter().map(|(_, d)| ms(*d)).collect::<Vec<_>>()),
    }
}

/// Who serves the faults in a fault-latency case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Server {
    /// A bare handler thread: `poll(2)`, `read(2)`, `UFFDIO_WRITEPROTECT` (un-protect + wake).
    RawPoll,
    /// A bare handler thread busy-polling: non-blocking `read(2)` in a loop (`sched_yield`
    /// when nothing is pending, so a writer on the same CPU gets to run), then the ioctl.
    RawBusy,
    /// The snapshot engine, [`HandlerMode::Inline`] with the default chunk (32 pages): the
    /// copier polls between chunks.
    EngineInline,
    /// The snapshot engine, [`HandlerMode::Thread`]: a handler thread sleeping in `poll(2)`.
    EngineThread,
    /// The snapshot engine, [`HandlerMode::Hybrid`] (32 pages): a handler thread, and the
    /// copier polling between chunks.
    EngineHybrid,
}

impl Server {
    /// Every server, in report order.
    pub const ALL: [Server; 5] = [
        Server::RawPoll,
        Server::RawBusy,
        Server::EngineInline,
        Server::EngineThread,
        Server::EngineHybrid,
    ];

    /// The report name.
    pub fn name(self) -> &'static str {
        match self {
            Server::RawPoll => "raw-poll",
            Server::RawBusy => "raw-busy",
            Server::EngineInline => "engine-inline",
            Server::EngineThread => "engine-thread",
            Server::EngineHybrid => "engine-hybrid",
        }
    }

    /// The engine's handler mode, for an engine server.
    pub fn handler(self) -> Option<HandlerMode> {
        match self {
            Server::RawPoll | Server::RawBusy => None,
            Server::EngineInline => Some(HandlerMode::Inline {
                chunk_pages: INLINE_CHUNK,
            }),
            Server::EngineThread => Some(HandlerMode::Thread),
            Server::EngineHybrid => Some(HandlerMode::Hybrid {
                chunk_pages: INLINE_CHUNK,
            }),
        }
    }

    /// The server that runs [`SnapshotOptions::default`]'s handler.
    pub fn engine_default() -> Server {
        let d = SnapshotOptions::default().handler;
        Server::ALL
            .into_iter()
            .find(|s| s.handler() == Some(d))
            .expect("the default handler is benchmarked")
    }
}

/// Where the handler runs relative to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Both pinned to the same CPU.
    SameCpu,
    /// Pinned to two different CPUs.
    OtherCpu,
    /// Neither pinned: where the scheduler puts them (what the engine does by itself).
    Unpinned,
}

impl Placement {
    /// The report name.
    pub fn name(self) -> &'static str {
        match self {
            Placement::SameCpu => "same-cpu",
            Placement::OtherCpu => "other-cpu",
            Placement::Unpinned => "unpinned",
        }
    }
}

/// What [`measure_faults`] measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Region size (4 KiB pages; the writer writes its last pages, which the copier reaches
    /// last).
    pub region: u64,
    /// Timed writes per case and round.
    pub writes: usize,
    /// Recorded rounds (one more warm-up round is not recorded).
    pub rounds: usize,
}

impl Default for FaultConfig {
    /// 512 MiB, 300 writes, 5 rounds.
    fn default() -> Self {
        FaultConfig {
            region: 512 << 20,
            writes: 300,
            rounds: 5,
        }
    }
}

/// Fault latency of one case, timed from the writer's side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultCase {
    /// Who served the faults.
    pub server: Server,
    /// Where it ran.
    pub placement: Placement,
    /// Timed writes that faulted: all of them (the engine's copier waits for the writer
    /// before it un-protects the writer's pages).
    pub samples: usize,
    /// Timed writes.
    pub writes: usize,
    /// Write latency percentiles, us.
    pub latency_us: Percentiles,
}

/// The fault-latency figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultFigures {
    /// Region size.
    pub region: u64,
    /// Timed writes per case and round.
    pub writes: usize,
    /// Recorded rounds.
    pub rounds: usize,
    /// A plain write to a writable page (the timer's own cost), p50 us.
    pub plain_write_p50_us: f64,
    /// Every case.
    pub cases: Vec<FaultCase>,
    /// The case with the lowest p50.
    pub fastest: String,
    /// The server running [`SnapshotOptions::default`]'s handler.
    pub engine_default: Server,
    /// Engine default p50 over the bare poll handler's p50, writer and handler on one CPU.
    pub ratio_same_cpu: f64,
    /// The same, handler on the other CPU.
    pub ratio_other_cpu: f64,
    /// Engine default over the bare poll handler, neither pinned.
    pub ratio_unpinned: f64,
    /// The worse of `ratio_same_cpu` and `ratio_other_cpu` (goal: at most 1.25).
    pub fault_ratio_vs_raw: f64,
    /// The fastest engine case's p50 over the fastest bare case's p50.
    pub best_engine_vs_best_raw: f64,
    /// Snapshots taken, each checked by the oracle.
    pub snapshots: usize,
    /// Every snapshot was consistent (the measurement fails otherwise).
    pub consistent: bool,
}

/// Inline chunk of the engine's fault-latency rounds, pages.
const INLINE_CHUNK: u32 = 32;

/// How close (pages from the end) an engine round's copier may come before it waits for the
/// writer of `n` pages: the pages written, the chunks an inline copier is let through (one per
/// fault at most) and a release batch.
fn guard_pages(n: usize) -> u64 {
    n as u64 * (1 + u64::from(INLINE_CHUNK)) + uffd_wp::engine::snapshot::RELEASE_BATCH / PAGE_SIZE
}

/// The pages the writer writes: the last `n` of `r`, last first.
fn fault_pages(r: Range, n: usize) -> Vec<u64> {
    (1..=n as u64).map(|i| r.end() - i * PAGE_SIZE).collect()
}

/// Starts the writer of an engine round and holds the copier back until the writer is done.
#[derive(Debug, Default)]
struct Gate {
    /// The pause is over: the writer may write.
    go: AtomicBool,
    /// The writer has written all its pages (or gave up).
    done: AtomicBool,
}

/// Pinned to `cpu`, waits for `gate.go` (if any), then writes one byte (flipped) into each
/// page, timing each write, then puts the byte back (untimed: the page is writable by then), so
/// the region keeps matching its versions.
fn timed_writes(
    w: &Workload,
    pages: &[u64],
    cpu: Option<usize>,
    gate: Option<&Gate>,
) -> Result<Vec<u64>, SnapshotBenchError> {
    let _pin = Pinned::to(cpu)?;
    if let Some(g) = gate {
        while !g.go.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }
    let m = w.mapping();
    let mut out = Vec::with_capacity(pages.len());
    for &p in pages {
        let a = p + PAGE_SIZE / 2;
        let mut b = [0u8];
        m.read(a, &mut b).map_err(setup("reading a page"))?;
        let flipped = [b[0] ^ 0xff];
        let t = Instant::now();
        m.write(a, &flipped).map_err(setup("writing a page"))?;
        out.push(t.elapsed().as_nanos() as u64);
        m.write(a, &b).map_err(setup("restoring a page"))?;
    }
    Ok(out)
}

/// One round of a bare handler: the pages write-protected, the writer on `wcpu`, the handler
/// on `hcpu`.
fn raw_round(
    mm: &LinuxMm,
    w: &Workload,
    pages: &[u64],
    busy: bool,
    wcpu: Option<usize>,
    hcpu: Option<usize>,
) -> Result<Vec<u64>, SnapshotBenchError> {
    let r = w.range();
    mm.register(r, RegisterMode::WP)
        .map_err(setup("UFFDIO_REGISTER(WP)"))?;
    let lo = *pages.iter().min().expect("pages");
    let hi = *pages.iter().max().expect("pages") + PAGE_SIZE;
    let res = mm
        .writeprotect(Range::from_bounds(lo, hi), WpMode::Protect)
        .map_err(setup("UFFDIO_WRITEPROTECT"));
    let res = res.and_then(|()| {
        let (stop, ready) = (AtomicBool::new(false), AtomicBool::new(false));
        let served = AtomicU64::new(0);
        let uffd = mm.uffd();
        std::thread::scope(|s| {
            let handler = s.spawn(|| -> Result<(), SnapshotBenchError> {
                let _pin = Pinned::to(hcpu)?;
                ready.store(true, Ordering::Release);
                loop {
                    if !busy && !uffd.poll(10).map_err(setup("poll(uffd)"))? {
                        if stop.load(Ordering::Acquire) {
                            return Ok(());
                        }
                        continue;
                    }
                    let msgs = uffd.read_msgs(16).map_err(setup("read(uffd)"))?;
                    if msgs.is_empty() {
                        if stop.load(Ordering::Acquire) {
                            return Ok(());
                        }
                        if busy {
                            std::thread::yield_now();
                        }
                        continue;
                    }
                    for m in msgs {
                        if let Event::PageFault { address, .. } = Event::decode(&m) {
                            let page = address & !(PAGE_SIZE - 1);
                            uffd.writeprotect(page, PAGE_SIZE, 0)
                                .map_err(setup("UFFDIO_WRITEPROTECT(unprotect)"))?;
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
            while !ready.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(1));
            let lat = timed_writes(w, pages, wcpu, None);
            stop.store(true, Ordering::Release);
            let h = handler.join().expect("handler thread");
            let lat = lat?;
            h?;
            let faults = served.load(Ordering::Relaxed);
            if faults != pages.len() as u64 {
                return Err(SnapshotBenchError::FaultCount {
                    what: format!("bare handler (busy {busy})"),
                    faults,
                    writes: pages.len() as u64,
                });
            }
            Ok(lat)
        })
    });
    let _ = mm.writeprotect(r, WpMode::Unprotect { dontwake: false });
    let _ = mm.unregister(r);
    res
}

/// One round of the engine: a snapshot of the workload region taken from a thread pinned to
/// `hcpu` (its copier, and its handler threads, which inherit the pinning), the writer on
/// `wcpu` writing as soon as the pause ends. Checked by the oracle. Returns the latencies of the
/// writes that faulted.
fn engine_round(
    mm: &LinuxMm,
    w: &Workload,
    pages: &[u64],
    handler: HandlerMode,
    wcpu: Option<usize>,
    hcpu: Option<usize>,
) -> Result<Vec<u64>, SnapshotBenchError> {
    let gate = Gate::default();
    let at_freeze = Mutex::new(Vec::new());
    let q = FnQuiesce(
        || *at_freeze.lock().expect("versions") = w.versions(),
        || gate.go.store(true, Ordering::Release),
    );
    let opts = SnapshotOptions {
        handler,
        ..SnapshotOptions::default()
    };
    let ranges = RangeSet::single(w.range());
    let (lat, snap) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let r = timed_writes(w, pages, wcpu, Some(&gate));
            gate.done.store(true, Ordering::Release);
            r
        });
        let uffd = mm.uffd();
        let inline = matches!(
            handler,
            HandlerMode::Inline { .. } | HandlerMode::Hybrid { .. }
        );
        let guard_pages = guard_pages(pages.len());
        let snap = Pinned::to(hcpu).and_then(|pin| {
            let r = take(
                mm,
                &ranges,
                Source::Mapping(w.mapping()),
                &q,
                &opts,
                // Once the copier comes within one release batch of the writer's pages, it
                // waits for the writer, so every timed write faults however the two are
                // scheduled (left running, it would copy and un-protect those pages first).
                // Before that it copies as in any snapshot. While it waits, a handler thread
                // serves the faults; an inline copier is let through one chunk whenever a
                // fault is pending, since it serves faults before each chunk.
                |done, total| {
                    let tail = total.saturating_sub(guard_pages);
                    while done >= tail
                        && !gate.done.load(Ordering::Acquire)
                        && !(inline && uffd.poll(0).unwrap_or(true))
                    {
                        std::thread::yield_now();
                    }
                },
            );
            drop(pin);
            r.map_err(SnapshotBenchError::from)
        });
        // If the snapshot failed before its pause ended, release the writer (nothing is
        // protected any more).
        gate.go.store(true, Ordering::Release);
        (writer.join().expect("writer thread"), snap)
    });
    let (img, rep) = snap?;
    let lat = lat?;
    let what = format!("fault-latency snapshot ({handler:?})");
    let versions = at_freeze.into_inner().expect("versions");
    check(w, &img, &versions, &what)?;
    // The copier waited for the writer: each timed write faulted once and was served.
    if rep.faults_served != lat.len() as u64 {
        return Err(SnapshotBenchError::FaultCount {
            what,
            faults: rep.faults_served,
            writes: lat.len() as u64,
        });
    }
    Ok(lat)
}

/// A populated region (the workload's, without writer threads) and a uffd, on which single
/// fault-latency rounds run: [`FaultBench::run`].
#[derive(Debug)]
pub struct FaultBench {
    // Declared first: the uffd goes before the region.
    mm: LinuxMm,
    w: Workload,
    pages: Vec<u64>,
    cpus: Vec<usize>,
}

impl FaultBench {
    /// Maps and fills `region` bytes of 4 KiB pages; each round writes its last `writes` pages.
    pub fn new(region: u64, writes: usize) -> Result<FaultBench, SnapshotBenchError> {
        let mm = LinuxMm::open()?;
        let w = Workload::start(WorkloadConfig {
            size: region,
            threads: 0,
            thp: false,
            ..WorkloadConfig::default()
        })
        .map_err(setup("starting the workload"))?;
        let pages = fault_pages(w.range(), writes);
        Ok(FaultBench {
            mm,
            w,
            pages,
            cpus: allowed_cpus(),
        })
    }

    /// The placements this machine offers (other CPU only with at least two CPUs).
    pub fn placements(&self) -> Vec<Placement> {
        if self.cpus.len() > 1 {
            vec![Placement::SameCpu, Placement::OtherCpu, Placement::Unpinned]
        } else {
            vec![Placement::SameCpu, Placement::Unpinned]
        }
    }

    /// One round: the writer (pinned to the first allowed CPU, unless unpinned) writes its
    /// pages, timing each write, while `server` serves the faults from `placement`. Returns the
    /// latencies (ns) of the writes that faulted. An engine round takes a snapshot, checked by
    /// the oracle.
    pub fn run(
        &self,
        server: Server,
        placement: Placement,
    ) -> Result<Vec<u64>, SnapshotBenchError> {
        let (wcpu, hcpu) = match placement {
            Placement::SameCpu => (Some(self.cpus[0]), Some(self.cpus[0])),
            Placement::OtherCpu => (
                Some(self.cpus[0]),
                Some(*self.cpus.get(1).ok_or_else(|| {
                    SnapshotBenchError::Params("only one CPU: no other-CPU placement".into())
                })?),
            ),
            Placement::Unpinned => (None, None),
        };
        let (mm, w, pages) = (&self.mm, &self.w, &self.pages[..]);
        match server {
            Server::RawPoll => raw_round(mm, w, pages, false, wcpu, hcpu),
            Server::RawBusy => raw_round(mm, w, pages, true, wcpu, hcpu),
            engine => {
                let handler = engine.handler().expect("an engine server");
                engine_round(mm, w, pages, handler, wcpu, hcpu)
            }
        }
    }

    /// The same writes with nothing protected: the timer's and the loop's own cost (ns).
    pub fn plain_writes(&self) -> Result<Vec<u64>, SnapshotBenchError> {
        timed_writes(&self.w, &self.pages, Some(self.cpus[0]), None)
    }
}

/// Measures the fault latency of every server at every placement (other-CPU cases only with
/// at least two CPUs), rounds alternating the order of the cases.
pub fn measure_faults(
    cfg: &FaultConfig,
    mut progress: impl FnMut(Step),
) -> Result<FaultFigures, SnapshotBenchError> {
    let n = cfg.writes.max(1);
    // The copier must have room to copy before it waits for the writer.
    let min = 2 * guard_pages(n) * PAGE_SIZE;
    if cfg.region % PMD_SIZE != 0 || cfg.region < min {
        return Err(SnapshotBenchError::Params(format!(
            "fault region {:#x} must be a multiple of 2 MiB and at least {min:#x} bytes for \
             {n} pages written",
            cfg.region
        )));
    }
    let fb = FaultBench::new(cfg.region, n)?;
    progress(Step::Workload);
    let mut cases: Vec<(Server, Placement, Vec<u64>, usize)> = Vec::new();
    for s in Server::ALL {
        for p in fb.placements() {
            cases.push((s, p, Vec::new(), 0));
        }
    }
    let mut snapshots = 0;
    let rounds = cfg.rounds.max(1);
    let mut plain = Vec::new();
    for round in 0..=rounds {
        let keep = round > 0;
        let k = cases.len();
        for i in 0..k {
            // Rotate the order from round to round so the cases share the noise.
            let (server, placement, _, _) = cases[(i + round) % k];
            let lat = fb.run(server, placement)?;
            if server.handler().is_some() {
                snapshots += 1;
            }
            if keep {
                let c = &mut cases[(i + round) % k];
                c.2.extend(lat);
                c.3 += n;
                progress(Step::FaultCase);
            }
        }
        if keep {
            plain.extend(fb.plain_writes()?);
        }
    }
    let cases: Vec<FaultCase> = cases
        .into_iter()
        .map(|(server, placement, ns, writes)| FaultCase {
            server,
            placement,
            samples: ns.len(),
            writes,
            latency_us: Percentiles::of_ns(ns),
        })
        .collect();
    let p50 = |s: Server, p: Placement| {
        cases
            .iter()
            .find(|c| c.server == s && c.placement == p)
            .map_or(f64::NAN, |c| c.latency_us.p50)
    };
    let ratio = |s: Server, p: Placement| p50(s, p) / p50(Server::RawPoll, p);
    let best = |engine: bool| {
        cases
            .iter()
            .filter(|c| c.server.handler().is_some() == engine)
            .map(|c| c.latency_us.p50)
            .fold(f64::INFINITY, f64::min)
    };
    let fastest = cases
        .iter()
        .min_by(|a, b| a.latency_us.p50.total_cmp(&b.latency_us.p50))
        .map(|c| format!("{} {}", c.server.name(), c.placement.name()))
        .unwrap_or_default();
    let default = Server::engine_default();
    let (rs, ro) = (
        ratio(default, Placement::SameCpu),
        ratio(default, Placement::OtherCpu),
    );
    Ok(FaultFigures {
        region: cfg.region,
        writes: n,
        rounds,
        plain_write_p50_us: Percentiles::of_ns(plain).p50,
        fastest,
        ratio_same_cpu: rs,
        ratio_other_cpu: ro,
        ratio_unpinned: ratio(default, Placement::Unpinned),
        engine_default: default,
        fault_ratio_vs_raw: if ro.is_nan() { rs } else { rs.max(ro) },
        best_engine_vs_best_raw: best(true) / best(false),
        cases,
        snapshots,
        consistent: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> bool {
        match LinuxMm::open() {
            Ok(_) => true,
            Err(e) => {
                if std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1") {
                    panic!("kernel feature userfaultfd required (UFFD_WP_REQUIRE_KERNEL=1): {e}");
                }
                eprintln!("SKIPPED: needs kernel feature userfaultfd: {e}");
                false
            }
        }
    }

    /// A small pause/copy measurement on both page kinds: every snapshot is oracle-checked,
    /// the figures are positive and the default variant is the one the CLI uses.
    #[test]
    fn pause_figures_are_complete() {
        if !kernel() {
            return;
        }
        for kind in PageKind::ALL {
            let f = measure_pause(
                &PauseConfig {
                    size: 8 << 20,
                    kind,
                    runs: 1,
                    writers: 2,
                    gcore: false,
                },
                |_| {},
            )
            .unwrap();
            assert!(f.consistent);
            assert_eq!(
                f.snapshots,
                2 * 3,
                "{kind:?}: 3 snapshots per round, 2 rounds"
            );
            assert_eq!(f.default_prearm, kind == PageKind::Small);
            assert!(f.fork_ms > 0.0 && f.pause_ms > 0.0 && f.memcpy_mb_s > 0.0);
            assert!(f.prearm.pause_ms > 0.0 && f.no_prearm.pause_ms > 0.0);
            assert!(f.copy_ratio_vs_memcpy > 0.0 && f.idle_copy_mb_s > 0.0);
            assert_eq!(f.gcore, Gcore::Skipped);
        }
    }

    /// Every fault case gets exactly its samples (each write faulted once: the rounds check
    /// the fault counts), and the engine's snapshots are consistent.
    #[test]
    fn fault_cases_are_complete() {
        if !kernel() {
            return;
        }
        let f = measure_faults(
            &FaultConfig {
                region: 64 << 20,
                writes: 20,
                rounds: 1,
            },
            |_| {},
        )
        .unwrap();
        let placements = if allowed_cpus().len() > 1 { 3 } else { 2 };
        assert_eq!(f.cases.len(), Server::ALL.len() * placements);
        for c in &f.cases {
            assert_eq!((c.samples, c.writes), (20, 20), "{c:?}");
        }
        eprintln!("{f:#?}");
        let engines = Server::ALL.iter().filter(|s| s.handler().is_some()).count();
        assert_eq!(
            f.snapshots,
            2 * engines * placements,
            "warm-up + 1 round each"
        );
        assert_eq!(f.engine_default, Server::engine_default());
        assert!(f.fault_ratio_vs_raw > 0.0);
    }

    #[test]
    fn too_small_fault_region_is_refused() {
        let e = measure_faults(
            &FaultConfig {
                region: 2 << 20,
                writes: 300,
                rounds: 1,
            },
            |_| {},
        );
        assert!(matches!(e, Err(SnapshotBenchError::Params(_))));
    }

    #[test]
    fn fault_pages_are_the_last_ones_last_first() {
        let r = Range::from_bounds(0x10000, 0x20000);
        assert_eq!(fault_pages(r, 2), vec![0x1f000, 0x1e000]);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}

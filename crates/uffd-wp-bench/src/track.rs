//! Measuring code shared by `uffd-wp bench track` and the criterion bench (`benches/track.rs`):
//! the uffd dirty tracker (async WP + `PAGEMAP_SCAN`) against the classic mprotect/SIGSEGV
//! tracker ([`crate::sys::sigsegv::MprotectTracker`]) on the same workload:
//!
//! - a populated region (`size`, 4 KiB pages or THP), armed;
//! - each round writes one byte in a fraction of its pages (default 1%: one page chosen at
//!   random in every block of 100), timing each first write on its own;
//! - then one epoch boundary is timed: for uffd, [`Tracker::epoch`] (one `PAGEMAP_SCAN` with
//!   `WP_MATCHING` that returns and re-protects the written pages); for mprotect, taking the
//!   bitmap and re-arming, by dirty runs (one `mprotect` each) and, in alternate rounds, over
//!   the whole region (one `mprotect`); the faster of the two is the baseline.
//!
//! Every epoch's dirty set is checked against the pages written. A warm-up round is not
//! recorded (with THP, the first round also splits the huge pages, as both trackers do).
//!
//! Also [`open_linux`], which probes the kernel and opens the Linux backend for a tracker (for
//! `uffd-wp track`): the tracker engine takes any [`uffd_wp::Mm`] and never chooses a backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sys::sigsegv::MprotectTracker;
use uffd_wp::backend::linux::{Config, LinuxMm};
use uffd_wp::engine::track::{Method, Selection, TrackError, TrackOptions, Tracker};
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, Range, RangeSet};
use uffd_wp::seam::Errno;
use uffd_wp::sys::errno_name;
use uffd_wp::sys::mem::{Backing, Mapping, Thp};

/// Why a tracking benchmark could not run or found a wrong epoch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackBenchError {
    /// The size is not a positive multiple of 2 MiB, or the fraction not in (0, 1].
    #[error("bad benchmark parameters: {0}")]
    Params(String),
    /// The uffd tracker failed.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// Mapping, populating or the mprotect tracker failed.
    #[error("benchmark set-up: {what}: {}", errno_name(*errno))]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// An epoch's dirty set differs from the pages written.
    #[error("{tracker} epoch reported {got} dirty pages, {want} were written ({missed} missed)")]
    Wrong {
        /// `"uffd"` or `"mprotect"`.
        tracker: &'static str,
        /// Pages reported.
        got: u64,
        /// Pages written.
        want: u64,
        /// Written pages not reported.
        missed: u64,
    },
}

/// Probes the kernel, chooses a tracking method (or checks `forced`), and opens a [`LinuxMm`]
/// on this process configured for it ([`Selection::config`]).
pub fn open_linux(forced: Option<Method>) -> Result<(LinuxMm, Selection), TrackError> {
    let sel = Selection::probe(forced)?;
    let mm = LinuxMm::open_with(sel.config()).map_err(TrackError::Open)?;
    Ok((mm, sel))
}

fn setup(what: &'static str) -> impl Fn(Errno) -> TrackBenchError {
    move |errno| TrackBenchError::Setup { what, errno }
}

/// The report name of a page kind: `"4k"` or `"thp"`.
pub fn kind_name(thp: Thp) -> &'static str {
    match thp {
        Thp::Huge => "thp",
        _ => "4k",
    }
}

/// The pages (indices) written in round `round`: one in every block of `1/fraction` pages,
/// at a pseudo-random place in the block.
pub fn dirty_pages(pages: u64, fraction: f64, round: u64) -> Vec<u64> {
    let block = ((1.0 / fraction).round() as u64).max(1);
    (0..pages / block)
        .map(|b| {
            let mut x = b
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(round.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
            x ^= x >> 31;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 29;
            b * block + x % block
        })
        .collect()
}

fn new_mapping(
    size: u64,
    thp: Thp,
    mut progress: impl FnMut(u64),
) -> Result<Mapping, TrackBenchError> {
    if size == 0 || size % PMD_SIZE != 0 {
        return Err(TrackBenchError::Params(format!(
            "size {size:#x} is not a positive multiple of 2 MiB"
        )));
    }
    let m = Mapping::new(size, PMD_SIZE, Backing::Anon, thp).map_err(setup("mmap"))?;
    let r = m.range();
    for chunk in r.split_at_multiples(64 << 20) {
        m.touch(chunk, 1).map_err(setup("populating"))?;
        progress(chunk.len());
    }
    Ok(m)
}

/// Writes one byte in each page of `pages` (indices into `r`), timing each write if `lat`.
fn write_pages(m: &Mapping, pages: &[u64], value: u8, mut lat: Option<&mut Vec<Duration>>) {
    let r = m.range();
    for &i in pages {
        let p = Range::from_bounds(r.start() + i * PAGE_SIZE, r.start() + (i + 1) * PAGE_SIZE);
        let t = Instant::now();
        m.touch(p, value).expect("page inside the mapping");
        if let Some(l) = lat.as_deref_mut() {
            l.push(t.elapsed());
        }
    }
}

fn page_set(r: Range, pages: &[u64]) -> RangeSet {
    pages
        .iter()
        .map(|&i| Range::from_bounds(r.start() + i * PAGE_SIZE, r.start() + (i + 1) * PAGE_SIZE))
        .collect()
}

fn check(tracker: &'static str, got: &RangeSet, want: &RangeSet) -> Result<(), TrackBenchError> {
    if got == want {
        return Ok(());
    }
    Err(TrackBenchError::Wrong {
        tracker,
        got: got.pages(),
        want: want.pages(),
        missed: want.difference(got).pages(),
    })
}

/// The uffd side: a populated region armed with an async-WP [`Tracker`].
#[derive(Debug)]
pub struct UffdSide {
    // Declared first: dropped (disarmed) before the mapping goes.
    tracker: Tracker<LinuxMm>,
    mapping: Mapping,
    /// Time arming took (register + exact write-protect of the whole region).
    pub arm: Duration,
}

impl UffdSide {
    /// Maps and populates `size` bytes, then arms them. `progress` gets populated bytes.
    pub fn new(size: u64, thp: Thp, progress: impl FnMut(u64)) -> Result<Self, TrackBenchError> {
        let mm = LinuxMm::open_with(Config::async_wp()).map_err(TrackError::Open)?;
        let mapping = new_mapping(size, thp, progress)?;
        let t0 = Instant::now();
        let tracker = Tracker::start(
            Arc::new(mm),
            mapping.range(),
            Method::AsyncWp,
            TrackOptions::default(),
        )?;
        Ok(UffdSide {
            arm: t0.elapsed(),
            tracker,
            mapping,
        })
    }

    /// The region.
    pub fn range(&self) -> Range {
        self.mapping.range()
    }

    /// Writes the given pages (timing each write into `lat` if given).
    pub fn write(&self, pages: &[u64], lat: Option<&mut Vec<Duration>>) {
        write_pages(&self.mapping, pages, 2, lat);
    }

    /// One timed epoch boundary; checks it returned exactly `pages`.
    pub fn epoch(&mut self, pages: &[u64]) -> Result<Duration, TrackBenchError> {
        let t0 = Instant::now();
        let e = self.tracker.epoch()?;
        let d = t0.elapsed();
        check("uffd", &e.all_dirty(), &page_set(self.range(), pages))?;
        Ok(d)
    }
}

/// How the mprotect tracker re-arms at an epoch boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rearm {
    /// One `mprotect(PROT_READ)` per run of dirty pages.
    Pages,
    /// One `mprotect(PROT_READ)` over the whole region.
    Range,
}

/// The mprotect side: a populated region armed read-only with the SIGSEGV tracker.
#[derive(Debug)]
pub struct MprotectSide {
    tracker: MprotectTracker,
    /// Time arming took (one `mprotect(PROT_READ)` over the region).
    pub arm: Duration,
}

impl MprotectSide {
    /// Maps and populates `size` bytes, installs the SIGSEGV handler and arms.
    pub fn new(size: u64, thp: Thp, progress: impl FnMut(u64)) -> Result<Self, TrackBenchError> {
        let mapping = new_mapping(size, thp, progress)?;
        let tracker =
            MprotectTracker::new(mapping).map_err(setup("installing the SIGSEGV handler"))?;
        let t0 = Instant::now();
        tracker.arm().map_err(setup("mprotect(PROT_READ)"))?;
        Ok(MprotectSide {
            arm: t0.elapsed(),
            tracker,
        })
    }

    /// The region.
    pub fn range(&self) -> Range {
        self.tracker.range()
    }

    /// Writes the given pages (timing each write into `lat` if given).
    pub fn write(&self, pages: &[u64], lat: Option<&mut Vec<Duration>>) {
        write_pages(self.tracker.mapping(), pages, 2, lat);
    }

    /// One timed epoch boundary (take the bitmap, re-arm); checks it found exactly `pages`.
    pub fn epoch(&mut self, pages: &[u64], rearm: Rearm) -> Result<Duration, TrackBenchError> {
        let t0 = Instant::now();
        let d = self.tracker.take_dirty();
        match rearm {
            Rearm::Pages => self.tracker.rearm_pages(&d),
            Rearm::Range => self.tracker.rearm_range(),
        }
        .map_err(setup("mprotect(PROT_READ) re-arm"))?;
        let el = t0.elapsed();
        check("mprotect", &d, &page_set(self.range(), pages))?;
        Ok(el)
    }
}

/// Median, 99th percentile and maximum of some durations, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Of `samples` (NaN when empty).
    pub fn of(samples: &[Duration]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles {
                p50: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            };
        }
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.5),
            p99: at(0.99),
            max: us[us.len() - 1],
        }
    }
}

/// The median of some durations, in milliseconds.
pub fn median_ms(samples: &[Duration]) -> f64 {
    Percentiles::of(samples).p50 / 1e3
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackBenchConfig {
    /// Region size (a multiple of 2 MiB).
    pub size: u64,
    /// Page kind.
    pub thp: Thp,
    /// Fraction of the pages written per epoch.
    pub fraction: f64,
    /// Recorded rounds (one more warm-up round is not recorded).
    pub rounds: usize,
}

impl Default for TrackBenchConfig {
    /// 1 GiB of 4 KiB pages, 1% written, 7 rounds.
    fn default() -> Self {
        TrackBenchConfig {
            size: 1 << 30,
            thp: Thp::NoHuge,
            fraction: 0.01,
            rounds: 7,
        }
    }
}

/// The figures of one page kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackFigures {
    /// `"4k"` or `"thp"`.
    pub kind: &'static str,
    /// Region size.
    pub size: u64,
    /// Pages written per epoch.
    pub dirty_pages: u64,
    /// Recorded rounds.
    pub rounds: usize,
    /// Median uffd epoch (`PAGEMAP_SCAN` with `WP_MATCHING`), ms.
    pub uffd_epoch_ms: f64,
    /// Median mprotect epoch re-arming by dirty runs, ms.
    pub mprotect_epoch_pages_ms: f64,
    /// Median mprotect epoch re-arming the whole region, ms.
    pub mprotect_epoch_range_ms: f64,
    /// The faster of the two mprotect epochs, ms.
    pub mprotect_epoch_ms: f64,
    /// `mprotect_epoch_ms / uffd_epoch_ms` (goal: at least 20).
    pub epoch_ratio_vs_mprotect: f64,
    /// First write to a page write-protected for async WP (the kernel resolves the fault), us.
    pub uffd_first_write_us: Percentiles,
    /// First write to a read-only page (SIGSEGV, handler's mprotect, return), us.
    pub mprotect_first_write_us: Percentiles,
    /// A write to a page already writable (the timer's and the loop's own cost), us.
    pub plain_write_us: Percentiles,
    /// `mprotect_first_write_us.p50 / uffd_first_write_us.p50`.
    pub write_ratio_vs_mprotect: f64,
    /// Median over rounds of the time the round's first writes took under the uffd tracker
    /// (each includes the write itself and the timer), ms.
    pub uffd_writes_ms: f64,
    /// The same under the mprotect tracker, ms.
    pub mprotect_writes_ms: f64,
    /// What tracking one epoch costs in all with uffd: `uffd_writes_ms + uffd_epoch_ms`.
    pub uffd_epoch_total_ms: f64,
    /// The same with mprotect: `mprotect_writes_ms + mprotect_epoch_ms`.
    pub mprotect_epoch_total_ms: f64,
    /// `mprotect_epoch_total_ms / uffd_epoch_total_ms`.
    pub epoch_total_ratio_vs_mprotect: f64,
    /// Arming the region: register + exact write-protect, ms.
    pub uffd_arm_ms: f64,
    /// Arming the region: one `mprotect(PROT_READ)`, ms.
    pub mprotect_arm_ms: f64,
    /// Every epoch returned exactly the pages written (the measurement fails otherwise).
    pub exact: bool,
}

/// Which part of [`measure`] just finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Populated this many bytes.
    Populated(u64),
    /// A recorded round of the uffd tracker.
    UffdRound,
    /// A recorded round of the mprotect tracker.
    MprotectRound,
}

/// Measures both trackers on fresh regions of the same kind, one after the other. Fails if any
/// epoch is not exact.
pub fn measure(
    cfg: &TrackBenchConfig,
    mut progress: impl FnMut(Step),
) -> Result<TrackFigures, TrackBenchError> {
    if !(cfg.fraction > 0.0 && cfg.fraction <= 1.0) {
        return Err(TrackBenchError::Params(format!(
            "fraction {} is not in (0, 1]",
            cfg.fraction
        )));
    }
    let rounds = cfg.rounds.max(1);
    let u = measure_uffd(cfg, rounds, &mut progress)?;
    let m = measure_mprotect(cfg, rounds, &mut progress)?;
    Ok(figures(cfg, rounds, &u, &m))
}

/// What the uffd tracker's recorded rounds measured.
#[derive(Debug, Default)]
struct UffdSamples {
    /// Arming the region.
    arm: Duration,
    /// Pages written per round.
    dirty_pages: u64,
    /// Epoch boundaries.
    epoch: Vec<Duration>,
    /// First writes, each on its own.
    write: Vec<Duration>,
    /// Each round's first writes in all.
    sums: Vec<Duration>,
    /// Second writes to the same pages (already writable).
    plain: Vec<Duration>,
}

/// What the mprotect tracker's recorded rounds measured.
#[derive(Debug, Default)]
struct MprotectSamples {
    /// Arming the region.
    arm: Duration,
    /// Epoch boundaries re-arming by dirty runs.
    pages: Vec<Duration>,
    /// Epoch boundaries re-arming the whole region.
    range: Vec<Duration>,
    /// First writes, each on its own.
    write: Vec<Duration>,
    /// Each round's first writes in all.
    sums: Vec<Duration>,
}

/// The total of `v[from..]`.
fn sum_since(v: &[Duration], from: usize) -> Duration {
    v[from..].iter().sum()
}

/// The uffd tracker on a fresh region: a warm-up round, then `rounds` recorded ones.
fn measure_uffd(
    cfg: &TrackBenchConfig,
    rounds: usize,
    progress: &mut dyn FnMut(Step),
) -> Result<UffdSamples, TrackBenchError> {
    let pages = cfg.size / PAGE_SIZE;
    let mut u = UffdSide::new(cfg.size, cfg.thp, |b| progress(Step::Populated(b)))?;
    let mut s = UffdSamples::default();
    for round in 0..=rounds {
        let keep = round > 0;
        let set = dirty_pages(pages, cfg.fraction, round as u64);
        s.dirty_pages = set.len() as u64;
        let from = s.write.len();
        u.write(&set, keep.then_some(&mut s.write));
        if keep {
            s.sums.push(sum_since(&s.write, from));
            write_pages(&u.mapping, &set, 3, Some(&mut s.plain));
        }
        let d = u.epoch(&set)?;
        if keep {
            s.epoch.push(d);
            progress(Step::UffdRound);
        }
    }
    s.arm = u.arm;
    Ok(s)
}

/// The mprotect tracker on a fresh region: a warm-up round, then `rounds` recorded ones of
/// each re-arm (alternating, by dirty runs first).
fn measure_mprotect(
    cfg: &TrackBenchConfig,
    rounds: usize,
    progress: &mut dyn FnMut(Step),
) -> Result<MprotectSamples, TrackBenchError> {
    let pages = cfg.size / PAGE_SIZE;
    let mut m = MprotectSide::new(cfg.size, cfg.thp, |b| progress(Step::Populated(b)))?;
    let mut s = MprotectSamples::default();
    for round in 0..=2 * rounds {
        let keep = round > 0;
        let set = dirty_pages(pages, cfg.fraction, round as u64);
        let from = s.write.len();
        m.write(&set, keep.then_some(&mut s.write));
        if keep {
            s.sums.push(sum_since(&s.write, from));
        }
        let rearm = if round % 2 == 0 {
            Rearm::Pages
        } else {
            Rearm::Range
        };
        let d = m.epoch(&set, rearm)?;
        if keep {
            match rearm {
                Rearm::Pages => s.pages.push(d),
                Rearm::Range => s.range.push(d),
            }
            if round % 2 == 0 {
                progress(Step::MprotectRound);
            }
        }
    }
    s.arm = m.arm;
    Ok(s)
}

/// The figures: medians and percentiles of both trackers' samples, and their ratios.
fn figures(
    cfg: &TrackBenchConfig,
    rounds: usize,
    u: &UffdSamples,
    m: &MprotectSamples,
) -> TrackFigures {
    let uffd_epoch_ms = median_ms(&u.epoch);
    let (pages_ms, range_ms) = (median_ms(&m.pages), median_ms(&m.range));
    let mprotect_epoch_ms = pages_ms.min(range_ms);
    let (uw, mw) = (Percentiles::of(&u.write), Percentiles::of(&m.write));
    let (uffd_writes_ms, mprotect_writes_ms) = (median_ms(&u.sums), median_ms(&m.sums));
    let uffd_epoch_total_ms = uffd_writes_ms + uffd_epoch_ms;
    let mprotect_epoch_total_ms = mprotect_writes_ms + mprotect_epoch_ms;
    TrackFigures {
        kind: kind_name(cfg.thp),
        size: cfg.size,
        dirty_pages: u.dirty_pages,
        rounds,
        uffd_epoch_ms,
        mprotect_epoch_pages_ms: pages_ms,
        mprotect_epoch_range_ms: range_ms,
        mprotect_epoch_ms,
        epoch_ratio_vs_mprotect: mprotect_epoch_ms / uffd_epoch_ms,
        uffd_first_write_us: uw,
        mprotect_first_write_us: mw,
        plain_write_us: Percentiles::of(&u.plain),
        write_ratio_vs_mprotect: mw.p50 / uw.p50,
        uffd_writes_ms,
        mprotect_writes_ms,
        uffd_epoch_total_ms,
        mprotect_epoch_total_ms,
        epoch_total_ratio_vs_mprotect: mprotect_epoch_total_ms / uffd_epoch_total_ms,
        uffd_arm_ms: u.arm.as_secs_f64() * 1e3,
        mprotect_arm_ms: m.arm.as_secs_f64() * 1e3,
        exact: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_one_per_block_and_vary_by_round() {
        let a = dirty_pages(100_000, 0.01, 1);
        assert_eq!(a.len(), 1000);
        assert!(a.iter().enumerate().all(|(b, &p)| p / 100 == b as u64));
        assert_ne!(a, dirty_pages(100_000, 0.01, 2));
        assert_eq!(dirty_pages(10, 1.0, 0), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn percentiles() {
        let us =
            |v: &[u64]| -> Vec<Duration> { v.iter().map(|&x| Duration::from_micros(x)).collect() };
        let p = Percentiles::of(&us(&[5, 1, 3]));
        assert_eq!((p.p50, p.max), (3.0, 5.0));
        assert!(Percentiles::of(&[]).p50.is_nan());
    }
}

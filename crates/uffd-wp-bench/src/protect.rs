//! Measuring code shared by `uffd-wp bench` and the criterion benches (`benches/protect.rs`).
//!
//! [`ProtectBench`] owns one populated, WP-registered anonymous mapping on the real kernel and
//! times, on it, the raw `UFFDIO_WRITEPROTECT` against the exact engine
//! ([`uffd_wp::engine::protect::write_protect`]):
//! - **clean**: one raw call over the whole range, against `write_protect` with default options
//!   (which splits at 1 GiB PUD boundaries, checks the range has no gap and trusts the clean
//!   return: nothing is read back);
//! - **partial**: a failure half-way. The raw figure is the kernel work done before the failure
//!   (one raw call over the first half); the exact figure is `write_protect` with
//!   [`OnError::Stop`] through an [`InjectMm`] whose rule lets the real kernel protect up to the
//!   middle and then returns ENOMEM, so the engine reads back what is uncertain.
//!
//! Only the protecting call is timed: every sample starts from the same state (nothing
//! protected, every page populated) and un-protects outside the timed part. Each sample is
//! checked against pagemap bit 57 outside the timed part too, unless [`ProtectBench::verify`]
//! is turned off (the criterion benches do).

use std::time::{Duration, Instant};

use serde::Serialize;

use uffd_wp::backend::inject::{InjectMm, Rule};
use uffd_wp::backend::linux::{LinuxMm, OpenError};
use uffd_wp::engine::protect::{OnError, WpError, WpOptions, WpReport, write_protect};
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range, RangeSet};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, RegisterMode, ScanRequest, WpMode};
use uffd_wp::sys::errno_name;
use uffd_wp::sys::mem::{Backing, Mapping, Thp};
use uffd_wp::sys::pagemap::{Pagemap, bits, category};

/// The page size backing the benchmark's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PageKind {
    /// 4 KiB pages (`MADV_NOHUGEPAGE`).
    #[serde(rename = "4k")]
    Small,
    /// Transparent huge pages (`MADV_HUGEPAGE`).
    #[serde(rename = "thp")]
    Thp,
}

impl PageKind {
    /// Both kinds, in report order.
    pub const ALL: [PageKind; 2] = [PageKind::Small, PageKind::Thp];

    /// The report key: `"4k"` or `"thp"`.
    pub fn name(self) -> &'static str {
        match self {
            PageKind::Small => "4k",
            PageKind::Thp => "thp",
        }
    }
}

/// Why a benchmark could not run, or found the engine or the kernel misbehaving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BenchError {
    /// The userfaultfd backend could not be opened.
    #[error("opening the userfaultfd backend: {0}")]
    Open(#[from] OpenError),
    /// The size is not a positive multiple of 2 MiB.
    #[error("benchmark size {size:#x} must be a positive multiple of 2 MiB")]
    Size {
        /// The size asked for.
        size: u64,
    },
    /// The offset in the PUD is not a multiple of 2 MiB.
    #[error("benchmark PUD offset {offset:#x} must be a multiple of 2 MiB")]
    PudOffset {
        /// The offset asked for.
        offset: u64,
    },
    /// Setting up or resetting the memory failed.
    #[error("benchmark set-up: {what}: {}", errno_name(*errno))]
    Setup {
        /// What was being done.
        what: String,
        /// The errno.
        errno: Errno,
    },
    /// A raw `UFFDIO_WRITEPROTECT` that should succeed failed.
    #[error("raw UFFDIO_WRITEPROTECT over {range}: {}", errno_name(*errno))]
    Raw {
        /// The call's range.
        range: Range,
        /// The kernel's errno.
        errno: Errno,
    },
    /// The exact engine returned an error.
    #[error("write_protect over {range}: {source}")]
    Engine {
        /// The request.
        range: Range,
        /// The engine's error.
        source: WpError,
    },
    /// A report or the page tables were not what the measured operation must leave.
    #[error("benchmark check failed over {range}: {what}")]
    Check {
        /// The range concerned.
        range: Range,
        /// What was wrong.
        what: String,
    },
}

fn setup(what: &str) -> impl FnOnce(Errno) -> BenchError + '_ {
    move |errno| BenchError::Setup {
        what: what.to_string(),
        errno,
    }
}

/// One populated, WP-registered mapping and a uffd, ready to be protected again and again.
///
/// The mapping starts `pud_offset` bytes after a 1 GiB boundary, so where the range crosses a
/// PUD boundary (and the engine splits its raw calls) is fixed, run after run.
#[derive(Debug)]
pub struct ProtectBench {
    // Declared first so the uffd is closed (releasing the protection) before the unmap.
    mm: InjectMm<LinuxMm>,
    map: Mapping,
    pagemap: Pagemap,
    range: Range,
    kind: PageKind,
    /// Check pagemap bit 57 after every timed operation (outside the timed part).
    pub verify: bool,
}

impl ProtectBench {
    /// Maps `size` bytes (a multiple of 2 MiB) of `kind` memory starting `pud_offset` bytes (a
    /// multiple of 2 MiB) after a 1 GiB boundary and registers it for WP. The memory is not
    /// populated yet: call [`ProtectBench::populate`].
    pub fn new(size: u64, kind: PageKind, pud_offset: u64) -> Result<ProtectBench, BenchError> {
        if size == 0 || size % PMD_SIZE != 0 {
            return Err(BenchError::Size { size });
        }
        let pud_offset = pud_offset % PUD_SIZE;
        if pud_offset % PMD_SIZE != 0 {
            return Err(BenchError::PudOffset { offset: pud_offset });
        }
        let mm = LinuxMm::open()?;
        let thp = match kind {
            PageKind::Small => Thp::NoHuge,
            PageKind::Thp => Thp::Huge,
        };
        let mut map =
            Mapping::new(size + pud_offset, PUD_SIZE, Backing::Anon, thp).map_err(setup("mmap"))?;
        let start = map.range().start() + pud_offset;
        if pud_offset > 0 {
            map.punch(Range::from_bounds(map.range().start(), start))
                .map_err(setup("munmap the head"))?;
        }
        let range = Range::from_bounds(start, start + size);
        mm.register(range, RegisterMode::WP)
            .map_err(setup("UFFDIO_REGISTER(WP)"))?;
        Ok(ProtectBench {
            mm: InjectMm::new(mm),
            map,
            pagemap: Pagemap::open_self().map_err(setup("open /proc/self/pagemap"))?,
            range,
            kind,
            verify: true,
        })
    }

    /// Writes every page (the first touch allocates it), in steps of at most `step` bytes,
    /// calling `progress` with the bytes done after each step.
    pub fn populate(&self, step: u64, mut progress: impl FnMut(u64)) -> Result<(), BenchError> {
        let step = step.max(PMD_SIZE) & !(PMD_SIZE - 1);
        let mut done = 0;
        for part in self.range.split_at_multiples(step) {
            self.map.touch(part, 0x5a).map_err(setup("touch pages"))?;
            done += part.len();
            progress(done);
        }
        Ok(())
    }

    /// The benchmarked range.
    pub fn range(&self) -> Range {
        self.range
    }

    /// Where the partial benchmark fails: the middle of the range, rounded down to 2 MiB.
    pub fn mid(&self) -> u64 {
        self.range.start() + ((self.range.len() / 2) & !(PMD_SIZE - 1))
    }

    /// The page kind.
    pub fn kind(&self) -> PageKind {
        self.kind
    }

    /// The backend (without injection rules unless a partial run is in progress).
    pub fn mm(&self) -> &LinuxMm {
        self.mm.inner()
    }

    /// Bytes of the range mapped by huge pages (`PAGE_IS_HUGE`).
    pub fn huge_bytes(&self) -> Result<u64, BenchError> {
        let res = self
            .mm
            .scan_all(&ScanRequest {
                start: self.range.start(),
                end: self.range.end(),
                category_mask: category::HUGE,
                return_mask: category::HUGE,
                ..Default::default()
            })
            .map_err(setup("PAGEMAP_SCAN(PAGE_IS_HUGE)"))?;
        Ok(res.regions.iter().map(|r| r.end - r.start).sum())
    }

    /// Bytes of the range that are not present (should be 0 once populated).
    pub fn absent_bytes(&self) -> Result<u64, BenchError> {
        let res = self
            .mm
            .scan_all(&ScanRequest {
                start: self.range.start(),
                end: self.range.end(),
                category_inverted: category::PRESENT,
                category_mask: category::PRESENT,
                return_mask: category::PRESENT,
                ..Default::default()
            })
            .map_err(setup("PAGEMAP_SCAN(!PAGE_IS_PRESENT)"))?;
        Ok(res.regions.iter().map(|r| r.end - r.start).sum())
    }

    fn check_wp(&self, want: &RangeSet, what: &str) -> Result<(), BenchError> {
        if !self.verify {
            return Ok(());
        }
        let now = self.wp_bits()?;
        if &now != want {
            return Err(BenchError::Check {
                range: self.range,
                what: format!(
                    "{what}: {} bytes protected, expected {}",
                    now.bytes(),
                    want.bytes()
                ),
            });
        }
        Ok(())
    }

    /// The pages of the range whose pagemap bit 57 (uffd-wp) is set, read independently of the
    /// engine's `PAGEMAP_SCAN` read-back.
    pub fn wp_bits(&self) -> Result<RangeSet, BenchError> {
        let entries = self
            .pagemap
            .entries(self.range.start(), self.range.pages())
            .map_err(setup("read /proc/self/pagemap"))?;
        let mut set = RangeSet::new();
        let mut run: Option<u64> = None;
        let addr = |i: usize| self.range.start() + i as u64 * PAGE_SIZE;
        for (i, e) in entries.iter().enumerate() {
            match (e & bits::UFFD_WP != 0, run) {
                (true, None) => run = Some(addr(i)),
                (false, Some(a)) => {
                    set.insert(Range::from_bounds(a, addr(i)));
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(a) = run {
            set.insert(Range::from_bounds(a, self.range.end()));
        }
        Ok(set)
    }

    /// Un-protects the whole range (raw, untimed) and checks nothing is left protected.
    pub fn reset(&self) -> Result<(), BenchError> {
        self.release()?;
        self.check_wp(&RangeSet::new(), "after un-protect")
    }

    /// Un-protects the whole range (raw, untimed), the last thing every measurement does, so
    /// each timed call starts from the same state: right after an un-protect of the range.
    /// Whether it left anything protected is checked by the next measurement, which compares
    /// the whole range with what it should have protected, and by the final [`reset`].
    ///
    /// [`reset`]: ProtectBench::reset
    fn release(&self) -> Result<(), BenchError> {
        self.mm
            .inner()
            .writeprotect(self.range, WpMode::Unprotect { dontwake: false })
            .map_err(setup("UFFDIO_WRITEPROTECT(unprotect)"))
    }

    fn raw_over(&self, r: Range) -> Result<Duration, BenchError> {
        let t = Instant::now();
        let res = self.mm.inner().writeprotect(r, WpMode::Protect);
        let d = t.elapsed();
        res.map_err(|errno| BenchError::Raw { range: r, errno })?;
        self.check_wp(&RangeSet::single(r), "after the raw call")?;
        self.release()?;
        Ok(d)
    }

    /// Times one raw `UFFDIO_WRITEPROTECT` over the whole range.
    pub fn raw(&self) -> Result<Duration, BenchError> {
        self.raw_over(self.range)
    }

    /// Times one raw `UFFDIO_WRITEPROTECT` over the first half (up to [`ProtectBench::mid`]):
    /// the kernel work a call failing half-way has done.
    pub fn partial_raw(&self) -> Result<Duration, BenchError> {
        self.raw_over(Range::from_bounds(self.range.start(), self.mid()))
    }

    /// Times `write_protect` with default options over the whole range. The report must be
    /// complete, without error, and read nothing back.
    pub fn exact(&self) -> Result<(Duration, WpReport), BenchError> {
        let opts = WpOptions::default();
        let t = Instant::now();
        let res = write_protect(self.mm.inner(), self.range, &opts);
        let d = t.elapsed();
        let report = res.map_err(|source| BenchError::Engine {
            range: self.range,
            source,
        })?;
        let bad = |what: String| BenchError::Check {
            range: self.range,
            what,
        };
        if !report.complete() || report.error.is_some() {
            return Err(bad(format!(
                "clean write_protect left {} bytes unprotected (error {:?})",
                report.bytes_not_protected(),
                report.error
            )));
        }
        if report.read_back_bytes != 0 {
            return Err(bad(format!(
                "clean write_protect read back {} bytes",
                report.read_back_bytes
            )));
        }
        self.check_wp(&report.protected, "after write_protect")?;
        self.release()?;
        Ok((d, report))
    }

    /// Times `write_protect` with [`OnError::Stop`] while an injected ENOMEM fails the raw call
    /// covering [`ProtectBench::mid`] after the real kernel protected up to it. The report must
    /// say exactly: protected up to the middle, not protected after, ENOMEM at the middle.
    pub fn partial_exact(&self) -> Result<(Duration, WpReport), BenchError> {
        let mid = self.mid();
        let opts = WpOptions {
            skip_pinned: false,
            on_error: OnError::Stop,
        };
        self.mm.clear_calls();
        self.mm.add_rule(Rule::covering(mid, Errno::NOMEM));
        let t = Instant::now();
        let res = write_protect(&self.mm, self.range, &opts);
        let d = t.elapsed();
        self.mm.clear_rules();
        self.mm.clear_calls();
        let report = res.map_err(|source| BenchError::Engine {
            range: self.range,
            source,
        })?;
        let head = Range::from_bounds(self.range.start(), mid);
        let tail = Range::from_bounds(mid, self.range.end());
        let err_ok = matches!(
            &report.error,
            Some(WpError::Kernel { errno, addr, .. }) if *errno == Errno::NOMEM && *addr == mid
        );
        if report.protected != RangeSet::single(head)
            || report.not_protected != RangeSet::single(tail)
            || !err_ok
        {
            return Err(BenchError::Check {
                range: self.range,
                what: format!(
                    "partial write_protect reported protected {:?}, not protected {:?}, \
                     error {:?}; expected {head} / {tail} / ENOMEM at {mid:#x}",
                    report.protected, report.not_protected, report.error
                ),
            });
        }
        self.check_wp(&report.protected, "after the partial write_protect")?;
        self.release()?;
        Ok((d, report))
    }
}

/// The median of some durations, in milliseconds.
pub fn median_ms(samples: &[Duration]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    }
}

/// The figures of one page kind: medians over the runs, raw and exact measured alternately.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProtectFigures {
    /// Median of one raw `UFFDIO_WRITEPROTECT` over the whole range.
    pub raw_ms: f64,
    /// Median of `write_protect` (default options) over the whole range.
    pub exact_ms: f64,
    /// `exact_ms / raw_ms`.
    pub ratio: f64,
    /// Median of one raw call over the first half.
    pub partial_raw_ms: f64,
    /// Median of `write_protect` with a failure injected half-way.
    pub partial_exact_ms: f64,
    /// `partial_exact_ms / partial_raw_ms`.
    pub partial_ratio: f64,
    /// Raw calls the clean `write_protect` issued.
    pub raw_calls: u32,
    /// Raw calls the partial `write_protect` issued.
    pub partial_raw_calls: u32,
    /// Bytes the partial `write_protect` read back.
    pub partial_read_back_bytes: u64,
    /// Bytes of the range mapped by huge pages when measured.
    pub huge_bytes: u64,
}

/// Which measurement a [`measure`] step just did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The raw clean call.
    Raw,
    /// The exact clean call.
    Exact,
    /// The raw call over the first half.
    PartialRaw,
    /// The exact call failing half-way.
    PartialExact,
}

/// Runs `runs` rounds (after one unrecorded warm-up round) of raw, exact, partial raw and
/// partial exact, alternating the order of raw and exact from round to round so they share the
/// noise, and returns the medians. `progress` is called after each timed step.
pub fn measure(
    b: &ProtectBench,
    runs: usize,
    mut progress: impl FnMut(Step),
) -> Result<ProtectFigures, BenchError> {
    let runs = runs.max(1);
    let (mut raw, mut exact, mut praw, mut pexact) = (vec![], vec![], vec![], vec![]);
    let (mut raw_calls, mut partial_raw_calls, mut partial_read_back_bytes) = (0, 0, 0);
    b.reset()?;
    for round in 0..=runs {
        let keep = round > 0;
        let raw_first = round % 2 == 0;
        for i in 0..2 {
            if (i == 0) == raw_first {
                let d = b.raw()?;
                if keep {
                    raw.push(d);
                    progress(Step::Raw);
                }
            } else {
                let (d, rep) = b.exact()?;
                raw_calls = rep.raw_calls;
                if keep {
                    exact.push(d);
                    progress(Step::Exact);
                }
            }
        }
        for i in 0..2 {
            if (i == 0) == raw_first {
                let d = b.partial_raw()?;
                if keep {
                    praw.push(d);
                    progress(Step::PartialRaw);
                }
            } else {
                let (d, rep) = b.partial_exact()?;
                partial_raw_calls = rep.raw_calls;
                partial_read_back_bytes = rep.read_back_bytes;
                if keep {
                    pexact.push(d);
                    progress(Step::PartialExact);
                }
            }
        }
    }
    b.reset()?;
    let (raw_ms, exact_ms) = (median_ms(&raw), median_ms(&exact));
    let (partial_raw_ms, partial_exact_ms) = (median_ms(&praw), median_ms(&pexact));
    Ok(ProtectFigures {
        raw_ms,
        exact_ms,
        ratio: exact_ms / raw_ms,
        partial_raw_ms,
        partial_exact_ms,
        partial_ratio: partial_exact_ms / partial_raw_ms,
        raw_calls,
        partial_raw_calls,
        partial_read_back_bytes,
        huge_bytes: b.huge_bytes()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bench, or a skip naming the feature (a panic with `UFFD_WP_REQUIRE_KERNEL=1`).
    fn bench(size: u64, kind: PageKind, pud_offset: u64) -> Option<ProtectBench> {
        match ProtectBench::new(size, kind, pud_offset) {
            Ok(b) => Some(b),
            Err(BenchError::Open(e)) => {
                if std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1") {
                    panic!("kernel feature userfaultfd required (UFFD_WP_REQUIRE_KERNEL=1): {e}");
                }
                eprintln!("SKIPPED: needs kernel feature userfaultfd: {e}");
                None
            }
            Err(e) => panic!("bench set-up: {e}"),
        }
    }

    /// A small range across a PUD boundary: the clean call splits in two raw calls and reads
    /// nothing back; the partial one fails at the boundary and reads back exactly the second
    /// half; every sample is checked against pagemap bit 57 and the range ends unprotected.
    #[test]
    fn measure_checks_every_sample() {
        let size = 4 << 20;
        for kind in PageKind::ALL {
            let Some(b) = bench(size, kind, PUD_SIZE - (2 << 20)) else {
                return;
            };
            assert!(b.range().split_at_multiples(PUD_SIZE).count() == 2);
            b.populate(2 << 20, |_| {}).unwrap();
            assert_eq!(b.absent_bytes().unwrap(), 0, "{kind:?}: populated");
            let mut steps = Vec::new();
            let f = measure(&b, 3, |s| steps.push(s)).unwrap();
            assert_eq!(steps.len(), 12, "{kind:?}: 4 timed steps per round");
            assert_eq!(f.raw_calls, 2, "{kind:?}");
            assert_eq!(f.partial_raw_calls, 2, "{kind:?}");
            assert_eq!(f.partial_read_back_bytes, size / 2, "{kind:?}");
            assert!(f.raw_ms > 0.0 && f.exact_ms > 0.0 && f.partial_exact_ms > 0.0);
            assert_eq!(
                b.wp_bits().unwrap(),
                RangeSet::new(),
                "{kind:?}: left clean"
            );
            if kind == PageKind::Small {
                assert_eq!(f.huge_bytes, 0, "MADV_NOHUGEPAGE gives 4 KiB pages");
            }
        }
    }

    /// Sizes that are not a positive multiple of 2 MiB are refused before anything is mapped.
    #[test]
    fn bad_sizes_are_refused() {
        for size in [0, 4096, (2 << 20) + 4096] {
            assert!(matches!(
                ProtectBench::new(size, PageKind::Small, 0),
                Err(BenchError::Size { .. })
            ));
        }
    }

    #[test]
    fn median_of_odd_and_even() {
        let ms =
            |v: &[u64]| -> Vec<Duration> { v.iter().map(|&x| Duration::from_millis(x)).collect() };
        assert_eq!(median_ms(&ms(&[5, 1, 3])), 3.0);
        assert_eq!(median_ms(&ms(&[4, 1, 3, 2])), 2.5);
        assert!(median_ms(&[]).is_nan());
    }
}

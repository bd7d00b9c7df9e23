//! Differential testing: the reference model (`linux` semantics) against the real kernel.
//!
//! A [`Case`] is a feature set and a random sequence of operations on a 64-page arena that
//! straddles a 1 GiB PUD boundary: map (anonymous, memfd, regular file private or shared),
//! unmap, CPU write (served by a handler in sync mode), `MADV_DONTNEED`, `MADV_PAGEOUT`, register, unregister, raw `UFFDIO_WRITEPROTECT` on
//! and off, `PAGEMAP_SCAN` with and without `PM_SCAN_WP_MATCHING`. The same sequence runs on
//! the kernel (in a worker child process, so a hang or a crash cannot take the driver down)
//! and on the model; after every operation both report the same observables: the return value
//! or errno, the WP faults delivered, the scan's regions and `walk_end`, and the pagemap
//! present and uffd-wp bits of every arena page; at the end, the first byte of every present
//! page. The first difference fails the case, and the case is shrunk (proptest) to a minimal
//! sequence that still differs.
//!
//! A quarter of the cases run in a second, 2 MiB-aligned THP arena ([`CaseConfig::thp`]).
//!
//! With a swap area active ([`Env::detect`]; [`MachineSetup`] makes one), every case runs with
//! swap: anonymous `MADV_PAGEOUT` swaps pages out on the kernel and on the model
//! ([`CaseConfig::swap`]), and the pagemap swap and uffd-wp bits of swap entries, the scan's
//! `SWAPPED`/`WRITTEN` categories, WP faults on swapped pages and the contents read back after
//! swap-in are compared. Two kernel behaviours had to be pinned down for that (DESIGN.md): the
//! kernel worker runs on one CPU (a page faulted in on another CPU sits in that CPU's LRU batch,
//! which `MADV_PAGEOUT` cannot reclaim: the outcome varied from run to run), and a THP reached
//! by `MADV_PAGEOUT` is split, its all-zero pages remapped to the shared zero page.
//!
//! Page-table allocation failures: where the kernel can fail its Nth page allocation on demand
//! (`fail-nth`, kernel/run's test kernels; [`Env::fail_alloc`]), half the cases inject them
//! ([`CaseConfig::fail_alloc`]): they run in a third arena whose page tables exist only while
//! the case's own mappings need them, start with a mapping registered across the PUD
//! boundary, and [`Op::ProtectFailing`] fails exactly the Nth table allocation of one
//! write-protect, on the kernel (fault injection, armed right before the ioctl) and on the model
//! (its allocator), so the errno, `done`, the WP bits and markers left behind are compared.
//!
//! Not covered (say so before trusting the model there): `MADV_PAGEOUT` of shmem, hugetlb, and
//! page-table allocation failures on kernels without fault injection (these machines' own).

use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde::{Deserialize, Serialize};
use uffd_wp::backend::linux::fail_nth::FailNth;
use uffd_wp::features::Features;
use uffd_wp::helper::{Helper, HelperError, Kind};
use uffd_wp::range::PAGE_SIZE;

mod arena;
mod driver;
mod kernel;
mod model;
mod setup;

pub use kernel::worker_main;
pub use setup::{MachineSetup, SetupError};

/// Pages in the arena.
pub const ARENA_PAGES: u64 = 64;
/// Pages in the THP arena (two 2 MiB huge pages, 2 MiB aligned), where operation offsets and
/// lengths are scaled by [`THP_SCALE`].
pub const THP_ARENA_PAGES: u64 = 1024;
/// Scale of operation offsets and lengths in the THP arena.
pub const THP_SCALE: u64 = 16;
/// Where the THP arena starts below the PUD boundary the small arena straddles.
pub const THP_ARENA_BELOW_PUD: u64 = 512 << 20;

/// Pages in the arena of a case.
pub fn arena_pages(thp: bool) -> u64 {
    if thp { THP_ARENA_PAGES } else { ARENA_PAGES }
}
/// Arena pages below the PUD boundary.
pub const BELOW_PUD: u64 = 32;

/// Pages written outside the arena, in the two PMDs it spans (the first page of the PMD below
/// the boundary, the last of the PMD above), so both sides keep those page tables for good.
pub fn guard_pages(boundary: u64) -> [u64; 2] {
    use uffd_wp::range::PMD_SIZE;
    [boundary - PMD_SIZE, boundary + PMD_SIZE - PAGE_SIZE]
}

/// One operation, addresses in pages from the arena's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `mmap` anonymous private (or a memfd, shared) memory at `off` (skipped if it overlaps a
    /// mapping: both sides see the same skip).
    Map {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
        /// What backs it.
        kind: MapKind,
    },
    /// `munmap`.
    Unmap {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
    },
    /// A CPU write of one byte to page `off` (skipped if unmapped).
    Write {
        /// Page.
        off: u64,
    },
    /// `MADV_DONTNEED` on the mapped parts of the range.
    DontNeed {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
    },
    /// `MADV_PAGEOUT` on the anonymous parts of the range (these machines have no swap, so the
    /// pages stay; on shmem the kernel's outcome varies from run to run).
    PageOut {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
    },
    /// An io_uring fixed buffer over page `off` (a `FOLL_WRITE | FOLL_LONGTERM` pin, which
    /// faults the page in for write first), `IORING_OP_READ_FIXED` of 8 bytes into it through
    /// the pin (no page-table access, no WP fault), then the buffer unregistered. Anonymous and
    /// shmem pages only.
    PinWrite {
        /// Page.
        off: u64,
    },
    /// `UFFDIO_REGISTER` in WP mode.
    Register {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
    },
    /// `UFFDIO_UNREGISTER`.
    Unregister {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
    },
    /// Raw `UFFDIO_WRITEPROTECT`, protecting or not.
    Protect {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
        /// `MODE_WP`.
        wp: bool,
    },
    /// A raw write-protect (`MODE_WP`) whose `nth` page-table allocation fails, and only it:
    /// the kernel's fault injection (`fail-nth`, the test kernels of kernel/run) against the
    /// model's allocator. Only in [`CaseConfig::fail_alloc`] cases, whose arena starts with no
    /// page tables; elsewhere it runs as a plain [`Op::Protect`].
    ProtectFailing {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
        /// Which allocation of the call fails (1-based).
        nth: u64,
    },
    /// One `PAGEMAP_SCAN` for written pages (room for 64 regions).
    Scan {
        /// First page.
        off: u64,
        /// Pages.
        pages: u64,
        /// `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`.
        wp_matching: bool,
    },
}

/// What backs a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapKind {
    /// Private anonymous memory.
    Anon,
    /// A memfd (shmem), shared.
    Shmem,
    /// A regular file, private (uffd-wp cannot register it).
    FilePrivate,
    /// A regular file, shared (uffd-wp cannot register it).
    FileShared,
}

/// The uffd features of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseConfig {
    /// `UFFD_FEATURE_WP_ASYNC` (implies `WP_UNPOPULATED`).
    pub async_wp: bool,
    /// `UFFD_FEATURE_WP_UNPOPULATED`.
    pub unpopulated: bool,
    /// Run in the THP arena: anonymous mappings get `MADV_HUGEPAGE`, ranges are scaled by
    /// [`THP_SCALE`] so operations cover parts of huge pages and whole ones.
    #[serde(default)]
    pub thp: bool,
    /// A swap device is active: anonymous `MADV_PAGEOUT` really swaps pages out (the kernel
    /// worker refuses the case if `/proc/swaps` lists none; the model runs with
    /// `ModelConfig::swap`).
    #[serde(default)]
    pub swap: bool,
    /// The kernel offers `UFFDIO_WRITEPROTECT_REPORT` (the patch series, kernel/README.md):
    /// the case asks for it, every write-protect goes through it (its errno, `done` and
    /// `pinned` compared), and the model runs under its `proposed` semantics.
    #[serde(default)]
    pub report: bool,
    /// Page-table allocation failures are injected ([`Op::ProtectFailing`]): the case runs in
    /// the arena whose page tables exist only while the case's own mappings need them (a
    /// 2 GiB hole around it, [`crate::arena`]), so a write-protect has tables to allocate.
    #[serde(default)]
    pub fail_alloc: bool,
}

impl CaseConfig {
    /// The features asked for.
    pub fn features(self) -> Features {
        let mut f = Features::PAGEFAULT_FLAG_WP;
        if self.report {
            f = f.with(Features::WP_REPORT).with(Features::WP_SKIP_PINNED);
        }
        if self.unpopulated || self.async_wp {
            f = f.with(Features::WP_UNPOPULATED);
        }
        if self.async_wp {
            f = f.with(Features::WP_ASYNC);
        }
        f
    }
}

/// What the machine offers beyond the defaults, which decides the kinds of cases generated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    /// A swap device is active (`/proc/swaps` lists one): every case runs with swap.
    pub swap: bool,
    /// The kernel offers `UFFDIO_WRITEPROTECT_REPORT`: every case uses it, against the
    /// model's `proposed` semantics ([`CaseConfig::report`]).
    pub report: bool,
    /// The kernel fails one page allocation on demand (`fail-nth`, kernel/run's test kernels):
    /// half the cases inject page-table allocation failures ([`CaseConfig::fail_alloc`]).
    #[serde(default)]
    pub fail_alloc: bool,
}

impl Env {
    /// What this machine offers now.
    pub fn detect() -> Env {
        Env {
            swap: swap_active(),
            report: uffd_wp::features::kernel_features()
                .is_ok_and(|f| f.contains(Features::WP_REPORT.with(Features::WP_SKIP_PINNED))),
            fail_alloc: FailNth::available(),
        }
    }
}

/// Whether `/proc/swaps` lists an active swap area.
pub fn swap_active() -> bool {
    std::fs::read_to_string("/proc/swaps")
        .is_ok_and(|s| s.lines().skip(1).any(|l| !l.trim().is_empty()))
}

/// A test case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    /// Features.
    pub config: CaseConfig,
    /// Operations.
    pub ops: Vec<Op>,
}

/// What one operation showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepObs {
    /// `"ok"`, `"skipped"` or the errno's name.
    pub result: String,
    /// WP faults delivered: (page, `UFFD_PAGEFAULT_FLAG_*`).
    pub faults: Vec<[u64; 2]>,
    /// A scan's regions (pages: start, end, categories) and `walk_end` page.
    pub scan: Option<(Vec<[u64; 3]>, u64)>,
    /// Per arena page: `.` unmapped or none, `p` present, `P` present and uffd-wp, `m` uffd-wp
    /// marker or swap entry.
    pub pages: String,
}

/// What a whole case showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseObs {
    /// Per operation.
    pub steps: Vec<StepObs>,
    /// The first byte of every present or swapped page at the end, read by a CPU read (a
    /// swapped page is swapped back in; `-1`: neither present nor swapped).
    pub content: Vec<i16>,
}

/// The strategy for cases.
pub fn case_strategy(env: Env) -> impl Strategy<Value = Case> {
    let range = (0..ARENA_PAGES, 1..=16u64);
    // With swap, MADV_PAGEOUT has more to show: more of it.
    let pageout: u32 = if env.swap { 3 } else { 1 };
    let op = prop_oneof![
        3 => (range.clone(), prop_oneof![4 => Just(MapKind::Anon), 3 => Just(MapKind::Shmem), 1 => Just(MapKind::FilePrivate), 1 => Just(MapKind::FileShared)]).prop_map(|((off, pages), kind)| Op::Map { off, pages, kind }),
        1 => range.clone().prop_map(|(off, pages)| Op::Unmap { off, pages }),
        4 => (0..ARENA_PAGES).prop_map(|off| Op::Write { off }),
        1 => (0..ARENA_PAGES).prop_map(|off| Op::PinWrite { off }),
        1 => range.clone().prop_map(|(off, pages)| Op::DontNeed { off, pages }),
        pageout => range.clone().prop_map(|(off, pages)| Op::PageOut { off, pages }),
        3 => range.clone().prop_map(|(off, pages)| Op::Register { off, pages }),
        1 => range.clone().prop_map(|(off, pages)| Op::Unregister { off, pages }),
        4 => (range.clone(), prop::bool::weighted(0.75)).prop_map(|((off, pages), wp)| Op::Protect { off, pages, wp }),
        3 => (range.clone(), 1..=5u64).prop_map(|((off, pages), nth)| Op::ProtectFailing { off, pages, nth }),
        2 => (range, any::<bool>()).prop_map(|((off, pages), wp_matching)| Op::Scan { off, pages, wp_matching }),
    ];
    let fail_share = if env.fail_alloc { 0.5 } else { 0.0 };
    (
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.25),
        prop::bool::weighted(fail_share),
        fail_alloc_start(),
        prop::collection::vec(op, 1..24),
    )
        .prop_map(
            move |(async_wp, unpopulated, thp, fail_alloc, start, mut ops)| {
                if fail_alloc {
                    ops.splice(0..0, start);
                }
                Case {
                    config: CaseConfig {
                        async_wp,
                        unpopulated,
                        // The fresh arena is the small one's shape: no THP there.
                        thp: thp && !fail_alloc,
                        swap: env.swap,
                        report: env.report,
                        fail_alloc,
                    },
                    ops,
                }
            },
        )
}

/// How a case that injects allocation failures starts, so that its write-protects have page
/// tables to allocate: a mapping that often crosses the PUD boundary (anonymous or shmem, the
/// kinds a write-protect installs markers in, with `WP_UNPOPULATED` for anonymous memory),
/// registered, and a first armed write-protect of it.
fn fail_alloc_start() -> impl Strategy<Value = Vec<Op>> {
    (
        (BELOW_PUD - 16)..BELOW_PUD,
        4..=16u64,
        prop_oneof![Just(MapKind::Anon), Just(MapKind::Shmem)],
        1..=5u64,
    )
        .prop_map(|(off, pages, kind, nth)| {
            vec![
                Op::Map { off, pages, kind },
                Op::Register { off, pages },
                Op::ProtectFailing { off, pages, nth },
            ]
        })
}

/// Decodes fuzzer bytes into a case: the first byte picks the features, then every 4 bytes
/// make one operation (kind, first page, pages, flag).
pub fn case_from_bytes(data: &[u8]) -> Case {
    let cfg = data.first().copied().unwrap_or(0);
    let ops = data
        .get(1..)
        .unwrap_or(&[])
        .chunks_exact(4)
        .take(64)
        .map(|c| {
            let (off, pages, flag) = (
                u64::from(c[1]) % ARENA_PAGES,
                1 + u64::from(c[2]) % 16,
                c[3],
            );
            match c[0] % 12 {
                0 => Op::Map {
                    off,
                    pages,
                    kind: [
                        MapKind::Anon,
                        MapKind::Shmem,
                        MapKind::FilePrivate,
                        MapKind::FileShared,
                    ][usize::from(flag % 4)],
                },
                1 => Op::Unmap { off, pages },
                2 | 3 => Op::Write { off },
                4 => Op::DontNeed { off, pages },
                5 => Op::PageOut { off, pages },
                6 => Op::Register { off, pages },
                7 => Op::Unregister { off, pages },
                10 => Op::PinWrite { off },
                11 => Op::ProtectFailing {
                    off,
                    pages,
                    nth: 1 + u64::from(flag % 5),
                },
                8 => Op::Protect {
                    off,
                    pages,
                    wp: flag % 4 != 0,
                },
                _ => Op::Scan {
                    off,
                    pages,
                    wp_matching: flag % 2 == 1,
                },
            }
        })
        .collect();
    Case {
        config: CaseConfig {
            async_wp: cfg & 1 != 0,
            unpopulated: cfg & 2 != 0,
            thp: cfg & 4 != 0,
            swap: cfg & 8 != 0,
            report: cfg & 16 != 0,
            fail_alloc: cfg & 32 != 0 && cfg & 4 == 0,
        },
        ops,
    }
}

/// The fuzz target's body (fuzz/fuzz_targets/model_ops.rs), also run on its corpus by a
/// regular test: any operation sequence on the model must not panic, must keep the model's
/// invariants after every operation, and the exact engine's report over the arena afterwards
/// must partition it and equal the model's page tables. Returns what went wrong.
pub fn fuzz_model(data: &[u8]) -> Result<(), String> {
    model::fuzz(&case_from_bytes(data), data.last().copied().unwrap_or(0))
}

/// A difference between the kernel and the model.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// The (shrunk) case.
    pub case: Case,
    /// The first operation whose observations differ (None: the final contents differ, or
    /// the kernel side failed).
    pub step: Option<usize>,
    /// What the kernel showed there.
    pub kernel: serde_json::Value,
    /// What the model showed there.
    pub model: serde_json::Value,
}

/// The result of [`compare`].
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// Whether the cases ran with swap (anonymous `MADV_PAGEOUT` swapping pages out).
    pub swap: bool,
    /// Whether the cases used `UFFDIO_WRITEPROTECT_REPORT`, against the model's `proposed`
    /// semantics (else the old call against `linux`).
    pub report: bool,
    /// The model's semantics the kernel was compared with.
    pub semantics: &'static str,
    /// Cases run.
    pub cases: u64,
    /// Operations run (on each side).
    pub ops: u64,
    /// Cases with page-table allocation failures injected ([`CaseConfig::fail_alloc`]).
    pub fail_alloc_cases: u64,
    /// Write-protects run with an allocation failure armed ([`Op::ProtectFailing`]), and how
    /// many of them the kernel answered with ENOMEM (the others allocated fewer tables than
    /// the armed one, or failed earlier).
    pub injected: u64,
    /// Of those, answered ENOMEM by the kernel.
    pub injected_enomem: u64,
    /// What the kernel answered the armed write-protects, by result (`ok` or the errno's
    /// name): on stock the lost ENOMEMs show as `ok` or as another errno.
    pub injected_outcomes: std::collections::BTreeMap<String, u64>,
    /// Cases that differed.
    pub mismatches: u64,
    /// The first mismatch, shrunk.
    pub first_mismatch: Option<Mismatch>,
}

/// Why a comparison could not run.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The kernel worker could not be started or stopped answering.
    #[error("kernel worker: {0}")]
    Worker(String),
    /// proptest could not generate a case.
    #[error("generating a case: {0}")]
    Generate(String),
}

/// How long a case may take on the kernel before its worker is replaced.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs cases on the kernel: a [`Kind::CompareWorker`] helper process (see
/// [`uffd_wp::helper`]) of an executable that serves it with [`worker_main`].
#[derive(Debug)]
pub struct Worker {
    exe: PathBuf,
    helper: Helper,
}

impl Worker {
    /// Starts `exe` as the worker.
    pub fn spawn(exe: &Path) -> Result<Worker, CompareError> {
        let helper = Helper::spawn(exe, &[], Kind::CompareWorker, &())
            .map_err(|e| CompareError::Worker(e.to_string()))?;
        Ok(Worker {
            exe: exe.to_path_buf(),
            helper,
        })
    }

    /// Runs one case on the kernel. A worker that does not answer within 30 s, or that died, is
    /// killed and replaced, and the case reported as a kernel-side failure.
    pub fn run(&mut self, case: &Case) -> Result<Result<CaseObs, String>, CompareError> {
        let answer = self
            .helper
            .send(case)
            .and_then(|()| self.helper.recv::<Result<CaseObs, String>>(CASE_TIMEOUT));
        match answer {
            Ok(obs) => Ok(obs),
            Err(e @ HelperError::Protocol { .. }) => Ok(Err(format!("bad worker answer: {e}"))),
            Err(e) => {
                *self = Worker::spawn(&self.exe)?;
                Ok(Err(format!("the kernel side hung or crashed: {e}")))
            }
        }
    }
}

/// The first difference between two observations of the same case.
fn diff(
    k: &Result<CaseObs, String>,
    m: &CaseObs,
) -> Option<(Option<usize>, serde_json::Value, serde_json::Value)> {
    let k = match k {
        Ok(k) => k,
        Err(e) => {
            return Some((
                None,
                serde_json::json!({ "error": e }),
                serde_json::to_value(m).ok()?,
            ));
        }
    };
    for (i, (a, b)) in k.steps.iter().zip(&m.steps).enumerate() {
        if a != b {
            return Some((
                Some(i),
                serde_json::to_value(a).expect("obs"),
                serde_json::to_value(b).expect("obs"),
            ));
        }
    }
    (k.content != m.content).then(|| {
        (
            None,
            serde_json::json!({ "content": k.content }),
            serde_json::json!({ "content": m.content }),
        )
    })
}

/// Counts the armed write-protects of a case and those the kernel answered with ENOMEM.
fn count_injected(c: &Case, k: &Result<CaseObs, String>, report: &mut CompareReport) {
    if !c.config.fail_alloc {
        return;
    }
    let Ok(k) = k else { return };
    for (op, obs) in c.ops.iter().zip(&k.steps) {
        if matches!(op, Op::ProtectFailing { .. }) {
            report.injected += 1;
            report.injected_enomem += u64::from(obs.result.starts_with("ENOMEM"));
            let answer = obs.result.split(' ').next().unwrap_or_default();
            *report.injected_outcomes.entry(answer.into()).or_default() += 1;
        }
    }
}

/// Runs one case on both sides: the kernel's observations (or why it failed) and the model's.
pub fn replay(
    case: &Case,
    worker: &mut Worker,
) -> Result<(Result<CaseObs, String>, CaseObs), CompareError> {
    Ok((worker.run(case)?, model::run(case)))
}

/// Runs `cases` random cases from `seed` on the kernel (through `worker`) and on the model.
pub fn compare(
    cases: u64,
    seed: u64,
    env: Env,
    worker: &mut Worker,
    mut progress: impl FnMut(u64),
) -> Result<CompareReport, CompareError> {
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = case_strategy(env);
    let mut report = CompareReport {
        swap: env.swap,
        report: env.report,
        semantics: if env.report { "proposed" } else { "linux" },
        cases: 0,
        ops: 0,
        fail_alloc_cases: 0,
        injected: 0,
        injected_enomem: 0,
        injected_outcomes: Default::default(),
        mismatches: 0,
        first_mismatch: None,
    };
    for n in 0..cases {
        let mut tree = strategy
            .new_tree(&mut runner)
            .map_err(|e| CompareError::Generate(e.to_string()))?;
        let case = tree.current();
        report.cases += 1;
        report.ops += case.ops.len() as u64;
        report.fail_alloc_cases += u64::from(case.config.fail_alloc);
        let mismatch = |c: &Case, k: &Result<CaseObs, String>| -> Option<Mismatch> {
            diff(k, &model::run(c)).map(|(step, kernel, model)| Mismatch {
                case: c.clone(),
                step,
                kernel,
                model,
            })
        };
        let check = |w: &mut Worker, c: &Case| -> Result<Option<Mismatch>, CompareError> {
            Ok(mismatch(c, &w.run(c)?))
        };
        let k = worker.run(&case)?;
        count_injected(&case, &k, &mut report);
        if let Some(mut found) = mismatch(&case, &k) {
            report.mismatches += 1;
            if report.first_mismatch.is_none() {
                // Shrink: simplify while it still differs, complicate back when it does not.
                let mut differs = true;
                for _ in 0..2000 {
                    let moved = if differs {
                        tree.simplify()
                    } else {
                        tree.complicate()
                    };
                    if !moved {
                        break;
                    }
                    match check(worker, &tree.current())? {
                        Some(m) => {
                            found = m;
                            differs = true;
                        }
                        None => differs = false,
                    }
                }
                report.first_mismatch = Some(found);
            }
        }
        progress(n + 1);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(pages: &str) -> CaseObs {
        CaseObs {
            steps: vec![StepObs {
                result: "ok".into(),
                faults: vec![],
                scan: None,
                pages: pages.into(),
            }],
            content: vec![-1],
        }
    }

    #[test]
    fn a_difference_is_found_at_its_step() {
        let (step, _, _) = diff(&Ok(obs("P.")), &obs("p.")).expect("differs");
        assert_eq!(step, Some(0));
        assert!(diff(&Ok(obs("P.")), &obs("P.")).is_none());
        let (step, k, _) = diff(&Err("hung".into()), &obs("P.")).expect("kernel failure");
        assert_eq!(step, None);
        assert_eq!(k["error"], "hung");
    }

    /// With the report call (a patched kernel), a protect shows the call's errno, `done` and
    /// `pinned`: the whole range on success, the prefix before an unregistered page.
    #[test]
    fn report_cases_show_the_kernel_report_of_each_protect() {
        let config = CaseConfig {
            async_wp: false,
            unpopulated: true,
            thp: false,
            swap: false,
            report: true,
            fail_alloc: false,
        };
        let ops = vec![
            Op::Map {
                off: 0,
                pages: 16,
                kind: MapKind::Anon,
            },
            Op::Register { off: 0, pages: 8 },
            Op::Protect {
                off: 0,
                pages: 8,
                wp: true,
            },
            Op::Protect {
                off: 0,
                pages: 12,
                wp: true,
            },
        ];
        let o = model::run(&Case { config, ops });
        assert_eq!(o.steps[2].result, "ok done 8 pinned 0");
        assert_eq!(o.steps[3].result, "ENOENT done 8 pinned 0");
        assert!(config.features().contains(Features::WP_REPORT));
    }

    /// In the fresh arena a protect of 16 pages of shmem across the PUD boundary allocates
    /// four tables (a PMD table and a PTE table on each side), in address order; failing each
    /// in turn moves the protected prefix the report call gives, and a fifth never comes.
    #[test]
    fn fail_alloc_cases_fail_the_armed_table_of_a_fresh_arena() {
        let config = CaseConfig {
            async_wp: false,
            unpopulated: false,
            thp: false,
            swap: false,
            report: true,
            fail_alloc: true,
        };
        let below = BELOW_PUD - 8;
        let outcome = |fail_alloc, nth| {
            let ops = vec![
                Op::Map {
                    off: below,
                    pages: 16,
                    kind: MapKind::Shmem,
                },
                Op::Register {
                    off: below,
                    pages: 16,
                },
                Op::ProtectFailing {
                    off: below,
                    pages: 16,
                    nth,
                },
            ];
            let config = CaseConfig {
                fail_alloc,
                ..config
            };
            model::run(&Case { config, ops }).steps[2].result.clone()
        };
        assert_eq!(outcome(true, 1), "ENOMEM done 0 pinned 0");
        assert_eq!(outcome(true, 2), "ENOMEM done 0 pinned 0");
        assert_eq!(outcome(true, 3), "ENOMEM done 8 pinned 0");
        assert_eq!(outcome(true, 4), "ENOMEM done 8 pinned 0");
        assert_eq!(outcome(true, 5), "ok done 16 pinned 0");
        // In the small arena the guard pages keep every table, and nothing is armed: no failure.
        assert_eq!(outcome(false, 1), "ok done 16 pinned 0");
    }

    #[test]
    fn the_model_side_is_deterministic() {
        let mut runner = TestRunner::deterministic();
        for _ in 0..50 {
            let case = case_strategy(Env::default())
                .new_tree(&mut runner)
                .unwrap()
                .current();
            assert_eq!(model::run(&case), model::run(&case));
        }
    }
}

//! A built-in workload with a consistency oracle, for snapshots and dirty tracking.
//!
//! Writer threads rewrite whole pages of a region, each page holding a self-describing record:
//!
//! ```text
//! word 0: version v (1, 2, ... per page; 0 = never written, the page is all zero)
//! word 1: page index p
//! words 2..512: fill(v, p, i), a pure function of (v, p, word index)
//! ```
//!
//! A side table outside the region holds each page's current version. Writers finish every page
//! they start before they park, so at a freeze (the snapshot point) the side table is exactly the
//! region's content. The oracle then checks a captured image page by page: the header must carry
//! the version the page had at the freeze (a later version means a page captured after the
//! snapshot point; an earlier one, a lost write) and the fill must match the header (anything
//! else is a torn copy). For dirty tracking, each writer also records the pages it wrote since
//! the last epoch boundary: the ground truth a tracker's epoch must equal.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::sys::Errno;
use uffd_wp::sys::mem::{Backing, Mapping, Thp};

const WORDS: usize = (PAGE_SIZE / 8) as usize;

/// The fill word `i` of version `v` of page `p`.
pub fn fill(v: u64, p: u64, i: u64) -> u64 {
    let mut x = v
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(p.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        .wrapping_add(i);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// The content of version `v` of page `p`.
pub fn page_image(v: u64, p: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGE_SIZE as usize);
    if v == 0 {
        out.resize(PAGE_SIZE as usize, 0);
        return out;
    }
    out.extend_from_slice(&v.to_ne_bytes());
    out.extend_from_slice(&p.to_ne_bytes());
    for i in 2..WORDS as u64 {
        out.extend_from_slice(&fill(v, p, i).to_ne_bytes());
    }
    out
}

/// What the oracle found wrong with one captured page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageVerdict {
    /// The page holds the version it had at the snapshot point.
    Consistent,
    /// A version other than the one at the snapshot point (captured too late or too early).
    WrongVersion {
        /// Version at the snapshot point.
        expected: u64,
        /// Version found.
        found: u64,
    },
    /// Header and fill disagree, or the page index is wrong: a torn or misplaced copy.
    Torn,
}

/// What [`check_dump`] found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DumpVerdict {
    /// Pages whose content is the version the version table records.
    pub consistent: u64,
    /// Pages caught mid-write: one version ahead of the table, or torn (at most one per writer
    /// at any instant: a writer writes the page, then records its version).
    pub in_flight: u64,
    /// Pages that no single instant explains: behind the table, more than one ahead, or torn
    /// beyond what the writers can have in flight.
    pub inconsistent: u64,
}

/// Checks a capture of a whole workload process against itself: `page(p)` and `version(p)` read
/// page `p` of the region and its entry in the version table (at [`Workload::versions_addr`])
/// from the capture. At one instant every page holds its recorded version, except the page
/// each of the `writers` is writing (one version ahead, or torn).
pub fn check_dump(
    pages: u64,
    writers: u64,
    mut page: impl FnMut(u64) -> Vec<u8>,
    mut version: impl FnMut(u64) -> u64,
) -> DumpVerdict {
    let mut v = DumpVerdict {
        consistent: 0,
        in_flight: 0,
        inconsistent: 0,
    };
    for p in 0..pages {
        let recorded = version(p);
        match check_page(p, recorded, &page(p)) {
            PageVerdict::Consistent => v.consistent += 1,
            PageVerdict::WrongVersion { found, .. } if found == recorded + 1 => v.in_flight += 1,
            PageVerdict::Torn => v.in_flight += 1,
            PageVerdict::WrongVersion { .. } => v.inconsistent += 1,
        }
    }
    if v.in_flight > writers {
        v.inconsistent += v.in_flight - writers;
        v.in_flight = writers;
    }
    v
}

/// Where a workload process keeps its region and its version table, as its helper's first
/// line reports them (`{"pid", "start", "len", "threads", "versions"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    /// The process.
    pub pid: u32,
    /// The region's first page.
    pub start: u64,
    /// Its pages.
    pub pages: u64,
    /// Writer threads.
    pub writers: u64,
    /// The version table: one `u64` per page ([`Workload::versions_addr`]).
    pub versions: u64,
}

impl Layout {
    /// From the helper's first line.
    pub fn from_header(head: &serde_json::Value) -> Result<Layout, String> {
        let field = |k: &str| {
            head[k]
                .as_u64()
                .ok_or_else(|| format!("no {k:?} in the workload's header {head}"))
        };
        Ok(Layout {
            pid: field("pid")? as u32,
            start: field("start")?,
            pages: field("len")? / PAGE_SIZE,
            writers: field("threads")?,
            versions: field("versions")?,
        })
    }

    /// Checks a capture of the process against itself ([`check_dump`]); `read(addr, buf)`
    /// reads the capture (a page it cannot read stays zero, and is found wrong).
    pub fn check(&self, read: impl Fn(u64, &mut [u8])) -> DumpVerdict {
        let page = |p: u64| {
            let mut b = vec![0u8; PAGE_SIZE as usize];
            read(self.start + p * PAGE_SIZE, &mut b);
            b
        };
        let version = |p: u64| {
            let mut b = [0u8; 8];
            read(self.versions + p * 8, &mut b);
            u64::from_ne_bytes(b)
        };
        check_dump(self.pages, self.writers, page, version)
    }
}

/// Checks one captured page against the version it had at the snapshot point.
pub fn check_page(p: u64, expected: u64, data: &[u8]) -> PageVerdict {
    let word = |i: usize| u64::from_ne_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let v = word(0);
    if v == 0 {
        return if data.iter().all(|b| *b == 0) {
            if expected == 0 {
                PageVerdict::Consistent
            } else {
                PageVerdict::WrongVersion { expected, found: 0 }
            }
        } else {
            PageVerdict::Torn
        };
    }
    if word(1) != p || (2..WORDS).any(|i| word(i) != fill(v, p, i as u64)) {
        return PageVerdict::Torn;
    }
    if v == expected {
        PageVerdict::Consistent
    } else {
        PageVerdict::WrongVersion { expected, found: v }
    }
}

/// Shared state of the writers.
#[derive(Debug)]
struct Shared {
    pages: u64,
    base: u64,
    versions: Vec<AtomicU64>,
    /// One bit per page: written since the last epoch boundary.
    dirty: Vec<AtomicU64>,
    pause: AtomicBool,
    /// Writers sleep here while paused (`true`: paused), so a pause leaves the CPUs free.
    gate: Mutex<bool>,
    wake: Condvar,
    /// Signalled by each writer that parks.
    all_parked: Condvar,
    parked: AtomicUsize,
    stop: AtomicBool,
    writes: AtomicU64,
    /// The longest time, ns, between two consecutive page writes of one writer (a writer's
    /// stall: preempted, stopped by a debugger, waiting on a write-protect fault), over all
    /// writers since the last [`Workload::take_max_gap`]. Time parked by [`Workload::pause`]
    /// does not count.
    max_gap_ns: AtomicU64,
}

/// The workload: a region and its writer threads.
#[derive(Debug)]
pub struct Workload {
    mapping: Arc<Mapping>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// How to build a workload.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadConfig {
    /// Region size in bytes.
    pub size: u64,
    /// Writer threads.
    pub threads: usize,
    /// Back the region with transparent huge pages.
    pub thp: bool,
    /// Write every page once before the writers start (so the region is populated).
    pub prefill: bool,
    /// Fraction of the region the writers touch, from its start (1.0: all of it).
    pub hot_fraction: f64,
    /// Seed of the writers' page choices.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            size: 256 << 20,
            threads: 2,
            thp: false,
            prefill: true,
            hot_fraction: 1.0,
            seed: 1,
        }
    }
}

impl Workload {
    /// Maps the region (2 MiB aligned), prefills it if asked, and starts the writers paused.
    pub fn start(cfg: WorkloadConfig) -> Result<Workload, Errno> {
        let thp = if cfg.thp { Thp::Huge } else { Thp::NoHuge };
        let mapping = Arc::new(Mapping::new(cfg.size, 2 << 20, Backing::Anon, thp)?);
        let pages = cfg.size / PAGE_SIZE;
        let shared = Arc::new(Shared {
            pages,
            base: mapping.range().start(),
            versions: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pause: AtomicBool::new(true),
            gate: Mutex::new(true),
            wake: Condvar::new(),
            all_parked: Condvar::new(),
            parked: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            max_gap_ns: AtomicU64::new(0),
        });
        if cfg.prefill {
            for p in 0..pages {
                write_page(&mapping, &shared, p)?;
            }
            shared.writes.store(0, Ordering::Relaxed);
        }
        let hot = ((pages as f64 * cfg.hot_fraction.clamp(0.0, 1.0)) as u64).max(1);
        let n = cfg.threads as u64;
        let threads = (0..cfg.threads)
            .map(|t| {
                let (m, s) = (Arc::clone(&mapping), Arc::clone(&shared));
                let seed = cfg
                    .seed
                    .wrapping_add(t as u64)
                    .wrapping_mul(0x2545_F491_4F6C_DD1D)
                    | 1;
                std::thread::spawn(move || writer(&m, &s, seed, hot, t as u64, n))
            })
            .collect();
        let w = Workload {
            mapping,
            shared,
            threads,
        };
        w.wait_parked();
        Ok(w)
    }

    /// The region.
    pub fn range(&self) -> Range {
        self.mapping.range()
    }

    /// Page count.
    pub fn pages(&self) -> u64 {
        self.shared.pages
    }

    /// Total page writes so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// The longest gap between two consecutive page writes of any writer since the last call
    /// (or the start), and a new period starts: the writers' longest stall in the period.
    pub fn take_max_gap(&self) -> Duration {
        Duration::from_nanos(self.shared.max_gap_ns.swap(0, Ordering::AcqRel))
    }

    /// Waits until every writer is parked: first spinning (yielding the CPU to writers that
    /// still have to reach a page boundary) for up to 1 ms, as a safepoint does, since a
    /// writer parks within one page write and a sleeping waiter would pay a cross-CPU wake-up
    /// (tens of microseconds on these guests) inside the pause; then sleeping (the last writer
    /// to park wakes it).
    fn wait_parked(&self) {
        let n = self.threads.len();
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(1) {
            if self.shared.parked.load(Ordering::Acquire) >= n {
                return;
            }
            std::thread::yield_now();
        }
        let mut g = self.shared.gate.lock().expect("gate");
        while self.shared.parked.load(Ordering::Acquire) < n {
            g = self.shared.all_parked.wait(g).expect("gate");
        }
    }

    /// Stops the writers at page boundaries and waits until all are parked.
    pub fn pause(&self) {
        *self.shared.gate.lock().expect("gate") = true;
        self.shared.pause.store(true, Ordering::Release);
        self.wait_parked();
    }

    /// Lets the writers go on.
    pub fn resume(&self) {
        let mut g = self.shared.gate.lock().expect("gate");
        *g = false;
        self.shared.pause.store(false, Ordering::Release);
        self.shared.wake.notify_all();
    }

    /// Each page's version (only meaningful while paused: the snapshot point).
    /// Where this process keeps the version of each page (one `u64` per page, in the heap, not
    /// in the region): a dump of the process that holds both can be checked against itself
    /// ([`check_dump`]).
    pub fn versions_addr(&self) -> u64 {
        self.shared.versions.as_ptr() as u64
    }

    /// The versions of every page, as this process records them.
    pub fn versions(&self) -> Vec<u64> {
        let mut v = Vec::new();
        self.versions_into(&mut v);
        v
    }

    /// [`Workload::versions`] into `out` (cleared first): with `out` allocated and touched
    /// beforehand, taking the table inside a freeze costs no allocation and no page fault.
    pub fn versions_into(&self, out: &mut Vec<u64>) {
        out.clear();
        out.extend(
            self.shared
                .versions
                .iter()
                .map(|v| v.load(Ordering::Acquire)),
        );
    }

    /// The pages written since the last call, and a new epoch starts (call while paused).
    pub fn take_dirty(&self) -> RangeSet {
        let mut set = RangeSet::new();
        for (w, bits) in self.shared.dirty.iter().enumerate() {
            let mut b = bits.swap(0, Ordering::AcqRel);
            while b != 0 {
                let i = b.trailing_zeros() as u64;
                b &= b - 1;
                let a = self.shared.base + (w as u64 * 64 + i) * PAGE_SIZE;
                set.insert(Range::from_bounds(a, a + PAGE_SIZE));
            }
        }
        set
    }

    /// Oracle: checks an image of the whole region (page `i` at `image[i*4096..]`) against
    /// the versions at the snapshot point. Returns the pages that are not consistent.
    pub fn check_image(
        versions: &[u64],
        image: impl Fn(u64) -> Option<Vec<u8>>,
    ) -> Vec<(u64, PageVerdict)> {
        (0..versions.len() as u64)
            .filter_map(|p| {
                let data = image(p).unwrap_or_else(|| vec![0; PAGE_SIZE as usize]);
                match check_page(p, versions[p as usize], &data) {
                    PageVerdict::Consistent => None,
                    bad => Some((p, bad)),
                }
            })
            .collect()
    }

    /// The mapping (for in-process engines that read it).
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.resume();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn write_page(m: &Mapping, s: &Shared, p: u64) -> Result<(), Errno> {
    let v = s.versions[p as usize].load(Ordering::Relaxed) + 1;
    m.write(s.base + p * PAGE_SIZE, &page_image(v, p))?;
    s.versions[p as usize].store(v, Ordering::Release);
    s.dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel);
    s.writes.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Writer `id` of `n` owns the pages `p` with `p % n == id`, so no two writers ever race on one
/// page (a page's content always matches its version).
fn writer(m: &Mapping, s: &Shared, mut seed: u64, hot: u64, id: u64, n: u64) {
    let mine = (hot.saturating_sub(id)).div_ceil(n).max(1);
    let mut last = Instant::now();
    loop {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        if s.pause.load(Ordering::Acquire) {
            let mut g = s.gate.lock().expect("gate");
            s.parked.fetch_add(1, Ordering::AcqRel);
            s.all_parked.notify_all();
            while *g && !s.stop.load(Ordering::Acquire) {
                g = s.wake.wait(g).expect("gate");
            }
            drop(g);
            s.parked.fetch_sub(1, Ordering::AcqRel);
            last = Instant::now();
            continue;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let p = (seed % mine) * n + id;
        if p >= s.pages || write_page(m, s, p).is_err() {
            continue;
        }
        let now = Instant::now();
        let gap = now.duration_since(last).as_nanos() as u64;
        last = now;
        // Reading first keeps the shared line clean while the maximum stands.
        if gap > s.max_gap_ns.load(Ordering::Relaxed) {
            s.max_gap_ns.fetch_max(gap, Ordering::AcqRel);
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the machine, so that a
/// workload process's reports and its parent's measurements line up.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

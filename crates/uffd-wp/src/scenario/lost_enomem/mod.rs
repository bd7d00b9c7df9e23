//! The `lost-enomem` scenario on the real kernel (memory cgroup + child process).
//!
//! Reproduces shared/kernel-notes.md, "A success can hide a hole": a page-table allocation
//! failure inside `UFFDIO_WRITEPROTECT` is turned into `-ENOMEM` for one 1 GiB PUD by
//! change_pmd_range(), but change_pud_range() *adds* it to the pages changed in the next PUD, so
//! the ioctl returns 0 with the rest of the first GiB left unprotected (mm/mprotect.c).
//!
//! Recipe: a 1 GiB aligned 2 GiB private anonymous mapping, `MADV_NOHUGEPAGE`, registered for WP
//! on a uffd with `WP_UNPOPULATED`; its first page and one page in every 2 MiB slot of its second
//! GiB touched (so those page tables exist); the process moved into a memory cgroup limited to
//! 1 MiB; the whole 2 GiB write-protected; the limit raised through a pre-opened fd right after.
//!
//! # Steps
//! 1. `raw-ioctl`: one raw call over the 2 GiB; the report is an exact read-back.
//! 2. `exact-engine`: [`write_protect`] with [`OnError::Stop`] on a fresh identical set-up in a
//!    fresh cgroup with the same limit. The engine never lets one raw call span a PUD boundary,
//!    so the failure surfaces as ENOMEM on the first GiB's call.
//! 3. `exact-engine-resume`: the same call once the limit is raised protects everything.
//!
//! # How it runs
//! While limited, the task doing the protect must take no user-space page fault: with
//! `oom_kill_disable` (v1) a faulting task sleeps until the limit rises, without it the OOM killer
//! takes it. So the limited part never runs in the caller: [`run`] (the parent) checks that it
//! can run (root, a memory cgroup controller, an executable whose `main` dispatches the
//! [`Kind::LostEnomem`] helper to [`child_main`]), creates two cgroups limited to 1 MiB, and
//! re-executes its own binary as that helper (see [`crate::helper`]). The child sets up both
//! mappings, pre-opens every file, and for each limited phase pre-faults its stack and heap,
//! writes its pid into the cgroup, protects, and raises the limit right after the first raw
//! call. It answers its steps in one line. The parent kills the child after [`CHILD_TIMEOUT`], or (v1) as soon as a cgroup reports `under_oom 1`
//! (the child asleep in a page fault), and always removes the cgroups.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::linux::{Config, LinuxMm};
use crate::engine::protect::{
    FailureKind, OnError, WpError, WpOp, WpOptions, WpReport, write_protect,
};
use crate::features::{self, Features};
use crate::helper::{self, Helper, HelperError, Kind, Parent};
use crate::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range, RangeSet};
use crate::scenario::{ScenarioError, Step};
use crate::seam::prelude::*;
use crate::seam::{Errno, RegisterMode, WpMode, Wrap};
use crate::sys::mem::{Backing, Mapping, Thp};
use crate::sys::pagemap::{Pagemap, bits};
use crate::sys::{errno_name, errno_of};

/// Every cgroup this scenario creates is named `<prefix><parent pid>-<phase>`, directly under
/// the root of the memory controller's hierarchy.
pub const CGROUP_PREFIX: &str = "uffd-wp-lost-enomem-";
/// The memory limit of each cgroup while the child protects.
pub const LIMIT_BYTES: u64 = 1 << 20;
/// How long the parent lets the child run before killing it.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
/// The size of each mapping: two PUDs.
const LEN: u64 = 2 * PUD_SIZE;
/// 2 MiB slots per GiB.
const SLOTS_PER_GIB: u64 = PUD_SIZE / PMD_SIZE;
const SCENARIO: &str = "lost-enomem";

fn unavailable(why: impl Into<String>) -> ScenarioError {
    ScenarioError::Unavailable {
        scenario: SCENARIO.into(),
        backend: "linux".into(),
        why: why.into(),
    }
}

fn setup_io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ScenarioError {
    let what = what.into();
    move |e| ScenarioError::Setup {
        what,
        errno: errno_of(&e),
    }
}

fn child_failed(what: impl Into<String>) -> ScenarioError {
    ScenarioError::Setup {
        what: what.into(),
        errno: Errno::CHILD,
    }
}

// ---------------------------------------------------------------------------------------------
// Memory cgroups.

/// Which cgroup interface holds the memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// cgroup v1: `memory.limit_in_bytes`, `memory.oom_control`.
    V1,
    /// cgroup v2: `memory.max`.
    V2,
}

/// Where the memory controller is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryController {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// The mount point (the hierarchy's root as this process sees it).
    pub root: PathBuf,
}

impl MemoryController {
    fn limit_file(&self) -> &'static str {
        limit_file(self.version)
    }
}

fn limit_file(v: CgroupVersion) -> &'static str {
    match v {
        CgroupVersion::V1 => "memory.limit_in_bytes",
        CgroupVersion::V2 => "memory.max",
    }
}

fn unlimited(v: CgroupVersion) -> &'static str {
    match v {
        CgroupVersion::V1 => "-1",
        CgroupVersion::V2 => "max",
    }
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, d| a * 8 + u32::from(d - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the memory controller: a cgroup v1 hierarchy with `memory`, else a cgroup2 mount with
/// `memory` enabled in its `cgroup.subtree_control` (so a new child cgroup has `memory.max`).
/// The error names what is missing.
pub fn find_memory_controller() -> Result<MemoryController, String> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mut v2 = None;
    let mut v2_why = None;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mnt) = left.split(' ').nth(4) else {
            continue;
        };
        let mnt = PathBuf::from(unescape(mnt));
        let mut r = right.split(' ');
        let (Some(fstype), Some(_), Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        match fstype {
            "cgroup"
                if opts.split(',').any(|o| o == "memory")
                    && mnt.join("memory.limit_in_bytes").exists()
                    && mnt.join("memory.oom_control").exists() =>
            {
                return Ok(MemoryController {
                    version: CgroupVersion::V1,
                    root: mnt,
                });
            }
            "cgroup2" if v2.is_none() => {
                let has = |f: &str| {
                    fs::read_to_string(mnt.join(f))
                        .is_ok_and(|s| s.split_whitespace().any(|c| c == "memory"))
                };
                if has("cgroup.subtree_control") {
                    v2 = Some(MemoryController {
                        version: CgroupVersion::V2,
                        root: mnt,
                    });
                } else if has("cgroup.controllers") {
                    v2_why = Some(format!(
                        "the cgroup2 mount {} offers the memory controller but does not enable \
                         it in cgroup.subtree_control",
                        mnt.display()
                    ));
                }
            }
            _ => {}
        }
    }
    v2.ok_or_else(|| {
        v2_why.unwrap_or_else(|| {
            "no memory cgroup controller: /proc/self/mountinfo shows neither a cgroup v1 \
             hierarchy with the memory controller nor a cgroup2 mount with memory enabled"
                .into()
        })
    })
}

fn write_file(path: &Path, value: &str) -> Result<(), ScenarioError> {
    fs::write(path, value).map_err(setup_io(format!("writing {value:?} to {}", path.display())))
}

/// A cgroup this scenario created; removed by [`Cgroup::remove`], or on drop.
#[derive(Debug)]
struct Cgroup {
    path: Option<PathBuf>,
    version: CgroupVersion,
}

impl Cgroup {
    /// Creates `root/name` limited to [`LIMIT_BYTES`] (v1: OOM killer disabled).
    fn create(ctrl: &MemoryController, name: &str) -> Result<Cgroup, ScenarioError> {
        let path = ctrl.root.join(name);
        match fs::create_dir(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A leftover with our own pid (a reused pid): empty cgroups can be removed.
                rmdir_retry(&path)?;
                fs::create_dir(&path).map_err(setup_io(format!("mkdir {}", path.display())))?;
            }
            r => r.map_err(setup_io(format!("mkdir {}", path.display())))?,
        }
        let cg = Cgroup {
            path: Some(path.clone()),
            version: ctrl.version,
        };
        if ctrl.version == CgroupVersion::V1 {
            write_file(&path.join("memory.oom_control"), "1")?;
        }
        write_file(&path.join(ctrl.limit_file()), &LIMIT_BYTES.to_string())?;
        Ok(cg)
    }

    fn path(&self) -> &Path {
        self.path.as_deref().expect("cgroup not removed yet")
    }

    /// v1: whether a task of the cgroup sleeps in a memcg OOM (a page fault while limited).
    fn under_oom(&self) -> bool {
        self.version == CgroupVersion::V1
            && fs::read_to_string(self.path().join("memory.oom_control"))
                .is_ok_and(|s| s.lines().any(|l| l.trim() == "under_oom 1"))
    }

    fn remove(mut self) -> Result<(), ScenarioError> {
        match self.path.take() {
            Some(p) => rmdir_retry(&p),
            None => Ok(()),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = rmdir_retry(&p);
        }
    }
}

/// `rmdir`, retried for 2 s while the cgroup is busy (a task that just exited can keep it
/// populated for a moment).
fn rmdir_retry(p: &Path) -> Result<(), ScenarioError> {
    let mut last = Errno::BUSY;
    for _ in 0..200 {
        match fs::remove_dir(p) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if errno_of(&e) == Errno::BUSY => {
                last = Errno::BUSY;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                last = errno_of(&e);
                break;
            }
        }
    }
    Err(ScenarioError::Setup {
        what: format!("rmdir {}", p.display()),
        errno: last,
    })
}

/// Removes cgroups left by runs whose process is gone (killed before it could clean up).
fn remove_stale(ctrl: &MemoryController) {
    let Ok(dir) = fs::read_dir(&ctrl.root) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(CGROUP_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir(e.path());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// What the parent tells the child.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChildConfig {
    version: CgroupVersion,
    /// The cgroup of the raw-ioctl phase.
    raw: PathBuf,
    /// The cgroup of the exact-engine phase.
    engine: PathBuf,
}

/// Runs the scenario (see the module docs). Needs root, a memory cgroup controller, and an
/// executable whose `main` serves the [`Kind::LostEnomem`] helper ([`child_main`]).
pub fn run() -> Result<Vec<Step>, ScenarioError> {
    if !helper::serves(Kind::LostEnomem) {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "the current executable".into());
        return Err(unavailable(format!(
            "the limited part runs in a re-executed child, and {exe} does not serve it: its \
             main() must serve the {} helper (uffd_wp::helper::entry; a test harness does not; \
             run the uffd-wp binary)",
            Kind::LostEnomem.name()
        )));
    }
    let euid = rustix::process::geteuid();
    if !euid.is_root() {
        return Err(unavailable(format!(
            "needs root (to create a memory cgroup and move a process into it); running as uid {}",
            euid.as_raw()
        )));
    }
    let offered = features::kernel_features()
        .map_err(|e| unavailable(format!("no userfaultfd: {}", errno_name(e))))?;
    let needed = Features::PAGEFAULT_FLAG_WP.with(Features::WP_UNPOPULATED);
    if !offered.contains(needed) {
        return Err(unavailable(format!(
            "this kernel does not offer userfaultfd feature(s) {}",
            needed.without(offered).names().join(", ")
        )));
    }
    let ctrl = find_memory_controller().map_err(unavailable)?;
    remove_stale(&ctrl);
    let pid = std::process::id();
    let raw = Cgroup::create(&ctrl, &format!("{CGROUP_PREFIX}{pid}-raw"))?;
    let engine = Cgroup::create(&ctrl, &format!("{CGROUP_PREFIX}{pid}-engine"))?;
    let cfg = ChildConfig {
        version: ctrl.version,
        raw: raw.path().to_path_buf(),
        engine: engine.path().to_path_buf(),
    };
    let steps = run_child(&cfg, &[&raw, &engine]);
    // The child has exited (or was killed and reaped): the cgroups are empty.
    let removed = raw.remove().and(engine.remove());
    let steps = steps?;
    removed?;
    Ok(steps)
}

/// Runs the child in `cgroups` (see [`child_main`]) and returns its steps. The child is killed
/// if it takes longer than [`CHILD_TIMEOUT`] or if a limited cgroup goes under OOM (a
/// user-space fault there would wait forever).
fn run_child(cfg: &ChildConfig, cgroups: &[&Cgroup]) -> Result<Vec<Step>, ScenarioError> {
    let exe = Path::new("/proc/self/exe");
    let mut child =
        Helper::spawn(exe, &[], Kind::LostEnomem, cfg).map_err(|e| child_failed(e.to_string()))?;
    let start = Instant::now();
    let outcome = loop {
        match child.recv::<WireOutcome>(Duration::from_millis(5)) {
            Ok(o) => break o,
            Err(HelperError::Timeout { .. }) => {}
            Err(e) => return Err(child_failed(e.to_string())),
        }
        if start.elapsed() > CHILD_TIMEOUT {
            return Err(child_failed(format!(
                "the lost-enomem child did not finish within {} s and was killed",
                CHILD_TIMEOUT.as_secs()
            )));
        }
        if let Some(cg) = cgroups.iter().find(|cg| cg.under_oom()) {
            return Err(child_failed(format!(
                "the lost-enomem child took a user-space page fault while {} was limited \
                 (memory.oom_control: under_oom 1) and was killed",
                cg.path().display()
            )));
        }
    };
    child.kill(); // it exits after its answer; reaped here, so the cgroups are empty
    match outcome {
        WireOutcome::Steps(s) => Ok(s.into_iter().map(WireStep::into_step).collect()),
        WireOutcome::Failed(e) => Err(from_child(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// What the child sends back.

#[derive(Debug, Serialize, Deserialize)]
enum WireOutcome {
    Steps(Vec<WireStep>),
    Failed(ScenarioError),
}

/// A [`Step`] on the wire: its own `Serialize` is the report format (offsets, errno names),
/// which does not round-trip; this is the step's data, errors included as they are.
#[derive(Debug, Serialize, Deserialize)]
struct WireStep {
    label: String,
    #[serde(with = "crate::sys::errno_serde::option")]
    kernel_errno: Option<Errno>,
    op: WpOp,
    requested: Range,
    protected: RangeSet,
    skipped: RangeSet,
    not_protected: RangeSet,
    error: Option<WpError>,
    rolled_back: bool,
    raw_calls: u32,
    read_back_bytes: u64,
    verified: bool,
    note: String,
}

impl WireStep {
    fn of(s: &Step) -> Self {
        let r = s.report.clone();
        WireStep {
            label: s.label.clone(),
            kernel_errno: s.kernel_errno,
            op: r.op,
            requested: r.requested,
            protected: r.protected,
            skipped: r.skipped,
            not_protected: r.not_protected,
            error: r.error,
            rolled_back: r.rolled_back,
            raw_calls: r.raw_calls,
            read_back_bytes: r.read_back_bytes,
            verified: s.verified,
            note: s.note.clone(),
        }
    }

    fn into_step(self) -> Step {
        Step {
            label: self.label,
            kernel_errno: self.kernel_errno,
            injected: false,
            report: WpReport {
                op: self.op,
                requested: self.requested,
                protected: self.protected,
                skipped: self.skipped,
                not_protected: self.not_protected,
                error: self.error,
                rolled_back: self.rolled_back,
                raw_calls: self.raw_calls,
                read_back_bytes: self.read_back_bytes,
                unexplained_pinned_bytes: 0,
            },
            verified: self.verified,
            note: self.note,
            detail: None,
        }
    }
}

/// The child's error, as the parent reports it.
fn from_child(e: ScenarioError) -> ScenarioError {
    match e {
        ScenarioError::Setup { what, errno } => ScenarioError::Setup {
            what: format!("in the lost-enomem child: {what}"),
            errno,
        },
        e => e,
    }
}

// ---------------------------------------------------------------------------------------------
// The child.

/// The child ([`Kind::LostEnomem`]): runs the limited part and answers its steps (or its
/// error) in one line; returns the exit code.
pub fn child_main(_: Kind) -> i32 {
    let (mut parent, cfg) = match Parent::connect::<ChildConfig>() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lost-enomem child: {e}");
            return 2;
        }
    };
    let outcome = match child_run(&cfg) {
        Ok(steps) => WireOutcome::Steps(steps.iter().map(WireStep::of).collect()),
        Err(e) => WireOutcome::Failed(e),
    };
    if parent.send(&outcome) { 0 } else { 1 }
}

/// One cgroup seen from the child: files opened before it is limited.
#[derive(Debug)]
struct Limiter {
    path: PathBuf,
    procs: File,
    limit: File,
    pid: String,
    unlimited: &'static str,
    raised: AtomicBool,
}

fn write_exact(mut f: &File, b: &[u8]) -> Result<(), Errno> {
    match f.write(b) {
        Ok(n) if n == b.len() => Ok(()),
        Ok(_) => Err(Errno::IO),
        Err(e) => Err(errno_of(&e)),
    }
}

impl Limiter {
    fn open(path: &Path, v: CgroupVersion) -> Result<Limiter, ScenarioError> {
        let open = |f: &str| {
            let p = path.join(f);
            OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(setup_io(format!("opening {}", p.display())))
        };
        Ok(Limiter {
            path: path.to_path_buf(),
            procs: open("cgroup.procs")?,
            limit: open(limit_file(v))?,
            pid: std::process::id().to_string(),
            unlimited: unlimited(v),
            raised: AtomicBool::new(false),
        })
    }

    /// Moves this process into the (limited) cgroup. Allocates nothing.
    fn enter(&self) -> Result<(), ScenarioError> {
        write_exact(&self.procs, self.pid.as_bytes()).map_err(|errno| ScenarioError::Setup {
            what: format!("moving the child into {}", self.path.display()),
            errno,
        })
    }

    /// Lifts the limit (once). Allocates nothing.
    fn raise(&self) -> Result<(), ScenarioError> {
        if self.raised.load(Ordering::SeqCst) {
            return Ok(());
        }
        write_exact(&self.limit, self.unlimited.as_bytes()).map_err(|errno| {
            ScenarioError::Setup {
                what: format!("raising the limit of {}", self.path.display()),
                errno,
            }
        })?;
        self.raised.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// A [`LinuxMm`] that logs every raw write-protect result and, when given a [`Limiter`], raises
/// its limit right after the first raw call returns.
struct Watched<'a> {
    inner: &'a LinuxMm,
    raise_after: Option<&'a Limiter>,
    log: Mutex<Vec<Option<Errno>>>,
}

impl<'a> Watched<'a> {
    fn new(inner: &'a LinuxMm, raise_after: Option<&'a Limiter>) -> Self {
        Watched {
            inner,
            raise_after,
            // Room reserved now: the first push happens while limited.
            log: Mutex::new(Vec::with_capacity(64)),
        }
    }

    fn first_errno(&self) -> Option<Errno> {
        self.log.lock().expect("log lock").iter().find_map(|e| *e)
    }
}

impl Wrap for Watched<'_> {
    type Inner = LinuxMm;
    fn inner(&self) -> &LinuxMm {
        self.inner
    }
    fn on_writeprotect(&self, r: Range, mode: WpMode) -> Result<(), Errno> {
        let res = self.inner.writeprotect(r, mode);
        if let Some(l) = self.raise_after {
            // A failure is retried (and reported) by the caller's own `raise()`.
            let _ = l.raise();
        }
        self.log.lock().expect("log lock").push(res.err());
        res
    }
}

/// Faults in 512 KiB of stack below the caller's frame, so the limited phase grows none.
#[inline(never)]
fn prefault_stack() {
    let mut probe = [0u8; 512 * 1024];
    std::hint::black_box(&mut probe);
    for i in (0..probe.len()).step_by(PAGE_SIZE as usize) {
        probe[i] = 1;
    }
    std::hint::black_box(&probe);
}

/// Leaves touched, free memory in the allocator (small chunks in its bins, a written block at
/// the start of the heap's top), so the few small allocations the engine makes before its first
/// raw call fault in no new page.
fn prewarm_heap() {
    let small: Vec<Vec<u64>> = (0..2048).map(|i| vec![i as u64; 1 + i % 64]).collect();
    std::hint::black_box(&small);
    drop(small);
    let block = vec![1u8; 96 * 1024];
    std::hint::black_box(&block);
}

/// Everything the limited phase must not do for the first time.
fn prepare_limited() {
    prewarm_heap();
    prefault_stack();
}

/// The recipe's mapping: 2 GiB, 1 GiB aligned, THP off, registered for WP; its first page and
/// one page per 2 MiB slot of its second GiB touched.
fn recipe_mapping(mm: &LinuxMm) -> Result<Mapping, ScenarioError> {
    let m = Mapping::new(LEN, PUD_SIZE, Backing::Anon, Thp::NoHuge).map_err(
        ScenarioError::setup("mmap 2 GiB, 1 GiB aligned, MADV_NOHUGEPAGE"),
    )?;
    let r = m.range();
    mm.register(r, RegisterMode::WP)
        .map_err(ScenarioError::setup("UFFDIO_REGISTER (WP) of the 2 GiB"))?;
    let page = |a: u64| Range::from_bounds(a, a + PAGE_SIZE);
    m.touch(page(r.start()), 0x5a)
        .map_err(ScenarioError::setup("touching the first page"))?;
    for slot in 0..SLOTS_PER_GIB {
        m.touch(page(r.start() + PUD_SIZE + slot * PMD_SIZE), 0x5a)
            .map_err(ScenarioError::setup("touching the second GiB"))?;
    }
    Ok(m)
}

/// The uffd-wp pages of `r` from `/proc/self/pagemap` bit 57, independently of the engine's
/// read-back (which uses `PAGEMAP_SCAN` when it can).
fn bit57(pm: &Pagemap, r: Range) -> Result<RangeSet, ScenarioError> {
    let e = pm
        .entries(r.start(), r.pages())
        .map_err(ScenarioError::setup("reading /proc/self/pagemap"))?;
    let mut out = Vec::new();
    let mut run = None;
    for (i, x) in e.iter().enumerate() {
        let a = r.start() + i as u64 * PAGE_SIZE;
        match (x & bits::UFFD_WP != 0, run) {
            (true, None) => run = Some(a),
            (false, Some(s)) => {
                out.push(Range::from_bounds(s, a));
                run = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run {
        out.push(Range::from_bounds(s, r.end()));
    }
    Ok(RangeSet::from_ranges(out))
}

/// An offset as a (possibly fractional) number of 2 MiB slots.
fn slot(off: u64) -> String {
    if off % PMD_SIZE == 0 {
        (off / PMD_SIZE).to_string()
    } else {
        format!("{:.4}", off as f64 / PMD_SIZE as f64)
    }
}

/// A set as 2 MiB slot ranges relative to `base`.
fn slots(set: &RangeSet, base: u64) -> String {
    if set.is_empty() {
        return "none".into();
    }
    set.offsets_from(base)
        .iter()
        .map(|[a, b]| format!("[{}, {})", slot(*a), slot(*b)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn mib(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.3} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// The offset `h` where the hole begins when `protected` is exactly `[0, h)` plus the whole
/// second GiB with `h` inside the first GiB.
fn hole_shape(r: Range, protected: &RangeSet) -> Option<u64> {
    let second = Range::from_bounds(r.start() + PUD_SIZE, r.end());
    match protected.as_slice() {
        [a, b] if a.start() == r.start() && a.end() < second.start() && *b == second => {
            Some(a.end() - r.start())
        }
        [b] if *b == second => Some(0),
        _ => None,
    }
}

/// The offset `h` when `protected` is exactly `[0, h)` with `h` inside the first GiB.
fn prefix_shape(r: Range, protected: &RangeSet) -> Option<u64> {
    match protected.as_slice() {
        [] => Some(0),
        [a] if a.start() == r.start() && a.end() < r.start() + PUD_SIZE => {
            Some(a.end() - r.start())
        }
        _ => None,
    }
}

fn result_name(e: Option<Errno>) -> String {
    e.map_or("success".into(), errno_name)
}

fn raw_note(r: Range, raw: Result<(), Errno>, report: &WpReport) -> String {
    let base = r.start();
    let n = report.bytes_not_protected();
    match (raw, hole_shape(r, &report.protected)) {
        (Ok(()), Some(h)) => format!(
            "one raw UFFDIO_WRITEPROTECT over the 2 GiB returned success (0), yet {n} bytes \
             ({}) are NOT protected: a page-table allocation failed at 2 MiB slot {s} of the \
             first GiB, change_pmd_range() skipped the rest of that GiB and the second GiB's \
             pages summed its -ENOMEM away. Protected: slots [0, {s}) and the whole second GiB \
             [512, 1024); hole: slots [{s}, 512)",
            mib(n),
            s = slot(h)
        ),
        (Ok(()), None) if n == 0 => "one raw UFFDIO_WRITEPROTECT over the 2 GiB returned success \
             and every page is protected: no page-table allocation failed, the hole did not \
             reproduce"
            .into(),
        (res, _) => format!(
            "one raw UFFDIO_WRITEPROTECT over the 2 GiB returned {}; {n} bytes ({}) not \
             protected, in 2 MiB slots {}; NOT the expected shape (a protected prefix of the \
             first GiB, a hole to its end, the second GiB protected)",
            result_name(res.err()),
            mib(n),
            slots(&report.not_protected, base)
        ),
    }
}

fn engine_note(r: Range, kernel_errno: Option<Errno>, report: &WpReport) -> String {
    let base = r.start();
    let n = report.bytes_not_protected();
    let err = report.error.as_ref();
    let stopped_at = err.map(|e| slot(e.addr().saturating_sub(base)));
    match (
        kernel_errno,
        err.map(WpError::kind),
        prefix_shape(r, &report.protected),
    ) {
        (Some(Errno::NOMEM), Some(FailureKind::NoMemory), Some(h)) => format!(
            "fresh identical set-up, same {} limit: the engine never lets one raw call span a \
             1 GiB PUD, so its first call (the first GiB alone) failed with ENOMEM, which one \
             PUD cannot sum away; stopped there: protected slots [0, {s}), not protected \
             [{s}, 1024) ({n} bytes, {}), error NoMemory at slot {}",
            mib(LIMIT_BYTES),
            mib(n),
            stopped_at.unwrap_or_default(),
            s = slot(h)
        ),
        (e, kind, _) => format!(
            "fresh identical set-up, same {} limit: first raw error {}, report error {}, \
             protected slots {}, not protected slots {} ({n} bytes); NOT the expected ENOMEM on \
             the first GiB's call with a protected prefix",
            mib(LIMIT_BYTES),
            result_name(e),
            kind.map_or("none".into(), |k| format!(
                "{k} at slot {}",
                stopped_at.unwrap_or_default()
            )),
            slots(&report.protected, base),
            slots(&report.not_protected, base)
        ),
    }
}

/// The step of one engine call, its report (or, after `Err`, the state read back) verified
/// against pagemap bit 57.
fn engine_step(
    mm: &Watched<'_>,
    pm: &Pagemap,
    label: &str,
    r: Range,
    res: Result<WpReport, WpError>,
    note: impl FnOnce(Option<Errno>, &WpReport) -> String,
) -> Result<Step, ScenarioError> {
    let report = match res {
        Ok(rep) => rep,
        Err(e) => {
            let protected = mm.wp_pages(r).map_err(ScenarioError::setup(
                "reading back the state after a failed call",
            ))?;
            WpReport {
                op: WpOp::Protect,
                requested: r,
                not_protected: protected.complement_in(r),
                protected,
                skipped: RangeSet::new(),
                error: Some(e),
                rolled_back: false,
                raw_calls: mm.log.lock().expect("log lock").len() as u32,
                read_back_bytes: r.len(),
                unexplained_pinned_bytes: 0,
            }
        }
    };
    let kernel_errno = mm.first_errno();
    Ok(Step {
        label: label.into(),
        kernel_errno,
        injected: false,
        verified: bit57(pm, r)? == report.protected,
        note: note(kernel_errno, &report),
        detail: None,
        report,
    })
}

fn child_run(cfg: &ChildConfig) -> Result<Vec<Step>, ScenarioError> {
    let d = Config::default();
    let mm = LinuxMm::open_with(Config {
        required: d.required.with(Features::WP_UNPOPULATED),
        ..d
    })
    .map_err(|e| unavailable(e.to_string()))?;
    let pm = Pagemap::open_self().map_err(ScenarioError::setup("opening /proc/self/pagemap"))?;
    let raw_cg = Limiter::open(&cfg.raw, cfg.version)?;
    let eng_cg = Limiter::open(&cfg.engine, cfg.version)?;
    if cfg.version == CgroupVersion::V2 {
        // No oom_kill_disable on v2: make the OOM killer find no victim, so the charge fails.
        write_file(Path::new("/proc/self/oom_score_adj"), "-1000")?;
    }
    let a = recipe_mapping(&mm)?;
    let b = recipe_mapping(&mm)?;
    let (ra, rb) = (a.range(), b.range());

    // Step 1: one raw call while limited. No allocation, no first touch until the limit rises.
    prepare_limited();
    raw_cg.enter()?;
    let raw = mm.writeprotect(ra, WpMode::Protect);
    raw_cg.raise()?;
    let protected = mm
        .wp_pages(ra)
        .map_err(ScenarioError::setup("reading back the raw call's result"))?;
    let not_protected = protected.complement_in(ra);
    let report = WpReport {
        op: WpOp::Protect,
        requested: ra,
        error: raw.err().map(|errno| WpError::Kernel {
            op: WpOp::Protect,
            kind: FailureKind::of(errno),
            errno,
            addr: not_protected.first_addr().unwrap_or(ra.start()),
        }),
        protected,
        not_protected,
        skipped: RangeSet::new(),
        rolled_back: false,
        raw_calls: 1,
        read_back_bytes: ra.len(),
        unexplained_pinned_bytes: 0,
    };
    let step1 = Step {
        label: "raw-ioctl".into(),
        kernel_errno: raw.err(),
        injected: false,
        verified: bit57(&pm, ra)? == report.protected,
        note: raw_note(ra, raw, &report),
        detail: None,
        report,
    };

    // Step 2: the exact engine on the fresh mapping, in a fresh cgroup with the same limit; the
    // limit rises right after its first raw call.
    let stop = WpOptions {
        skip_pinned: false,
        on_error: OnError::Stop,
    };
    let watched = Watched::new(&mm, Some(&eng_cg));
    prepare_limited();
    eng_cg.enter()?;
    let res = write_protect(&watched, rb, &stop);
    eng_cg.raise()?;
    let step2 = engine_step(&watched, &pm, "exact-engine", rb, res, |e, rep| {
        engine_note(rb, e, rep)
    })?;

    // Step 3: the limit is raised; the same call again.
    let watched = Watched::new(&mm, None);
    let res = write_protect(&watched, rb, &stop);
    let step3 = engine_step(&watched, &pm, "exact-engine-resume", rb, res, |e, rep| {
        format!(
            "limit raised: the same write_protect again; raw result {}, {} raw calls, {} bytes \
             not protected{}",
            result_name(e),
            rep.raw_calls,
            rep.bytes_not_protected(),
            if rep.complete() && rep.error.is_none() {
                ": all 2 GiB protected"
            } else {
                ""
            }
        )
    })?;
    // Close the uffd before the mappings go (as the labs do).
    drop(mm);
    drop((a, b));
    Ok(vec![step1, step2, step3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/trail\04"), r"/trail\04");
    }

    #[test]
    fn shapes() {
        let r = Range::new(PUD_SIZE * 8, LEN).unwrap();
        let b = r.start();
        let set = |v: &[(u64, u64)]| {
            RangeSet::from_ranges(v.iter().map(|&(s, e)| Range::from_bounds(b + s, b + e)))
        };
        let h = 257 * PMD_SIZE;
        assert_eq!(hole_shape(r, &set(&[(0, h), (PUD_SIZE, LEN)])), Some(h));
        assert_eq!(hole_shape(r, &set(&[(0, LEN)])), None);
        assert_eq!(hole_shape(r, &set(&[(0, h)])), None);
        assert_eq!(prefix_shape(r, &set(&[(0, h)])), Some(h));
        assert_eq!(prefix_shape(r, &set(&[(0, h), (PUD_SIZE, LEN)])), None);
        assert_eq!(slot(h), "257");
        assert_eq!(slots(&set(&[(h, PUD_SIZE)]), b), "[257, 512)");
    }

    #[test]
    fn unavailable_outside_a_serving_binary() {
        // The test harness serves no helper.
        match run() {
            Err(ScenarioError::Unavailable { why, .. }) => {
                assert!(why.contains("serve the lost-enomem helper"), "{why}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn wire_round_trip() {
        let r = Range::new(PUD_SIZE, LEN).unwrap();
        let p = Range::from_bounds(r.start(), r.start() + 257 * PMD_SIZE);
        let step = Step {
            label: "x".into(),
            kernel_errno: Some(Errno::NOMEM),
            injected: false,
            report: WpReport {
                op: WpOp::Protect,
                requested: r,
                protected: RangeSet::single(p),
                skipped: RangeSet::new(),
                not_protected: RangeSet::single(p).complement_in(r),
                error: Some(WpError::Kernel {
                    op: WpOp::Protect,
                    kind: FailureKind::NoMemory,
                    errno: Errno::NOMEM,
                    addr: p.end(),
                }),
                rolled_back: false,
                raw_calls: 1,
                read_back_bytes: LEN,
                unexplained_pinned_bytes: 0,
            },
            verified: true,
            note: "n".into(),
            detail: None,
        };
        let wire = serde_json::to_string(&WireStep::of(&step)).unwrap();
        let back = serde_json::from_str::<WireStep>(&wire).unwrap().into_step();
        assert_eq!(back.report, step.report);
        assert_eq!(back.kernel_errno, step.kernel_errno);
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&step).unwrap()
        );
        // Every error variant crosses whole, its errno included.
        let errors = [
            WpError::InvalidRange {
                op: WpOp::Unprotect,
                start: 1,
                len: 2,
                source: Range::new(1, 2).unwrap_err(),
            },
            WpError::Unsupported {
                op: WpOp::Protect,
                addr: p.start(),
                missing: Features::WP_UNPOPULATED,
            },
            WpError::ReadBack {
                op: WpOp::Protect,
                range: p,
                errno: Errno::FAULT,
            },
        ];
        for e in errors {
            let back: WpError = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
            assert_eq!(back, e);
        }
        let e = ScenarioError::setup("limiting")(Errno::NOMEM);
        let back: ScenarioError =
            serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        // A range that is not one is refused, not built.
        assert!(serde_json::from_str::<Range>("[8192, 4096]").is_err());
        assert!(serde_json::from_str::<Range>("[4097, 8192]").is_err());
    }
}

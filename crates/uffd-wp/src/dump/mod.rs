//! Whole-process dumps: the memory and threads of another process at one instant, taken while
//! it runs, as an ELF core ([`core_file`], laid out as the kernel's own core dumps so that gdb
//! reads it as it reads those).
//!
//! 1. Read the target from /proc before touching it ([`target`]): refuse what cannot be
//!    dumped (no process, a zombie, a kernel thread), and plan each mapping by the kernel's
//!    core-dump rules ([`plan`]).
//! 2. Attach (a uffd created inside the target) and try registering each mapping to
//!    write-protect; one the kernel refuses is copied inside the freeze instead (small) or
//!    skipped with the errno (large).
//! 3. Take a live snapshot of the write-protected part ([`crate::engine::snapshot::take`]),
//!    whose freeze ([`capture::DumpQuiesce`]) also records every thread's registers and copies
//!    the other mappings: one instant for all of it.
//!
//! This layer stands above the engines: it composes the remote backend with the snapshot
//! engine for one job.

pub mod capture;
pub mod core_file;
pub mod plan;
pub mod precopy;
pub mod target;
pub mod tracked;
mod write;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::linux::remote::{NoObserver, Observer, read_remote};
use crate::backend::linux::{AttachError, Config, LinuxMm, RemoteQuiesce};
use crate::backend::procfs::{self, MapEntry};
use crate::engine::snapshot::{
    self, Image, ProcessRanges, SnapshotError, SnapshotOptions, SnapshotReport, Source,
};
use crate::features::Features;
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, Quiesce, RegisterMode};
use crate::sys::errno_name;

use capture::{DumpQuiesce, FreezeCopy, ThreadRegs};
use plan::{Method, Planned};
use target::ProcessInfo;
pub use write::write_core;

/// Mappings the kernel refuses to write-protect are copied inside the freeze up to this size
/// each; a larger one is skipped (with the errno) rather than lengthen the pause.
pub const IN_FREEZE_LIMIT: u64 = 64 << 20;

/// Written private file mappings this large or more are pre-copied with their writes tracked
/// ([`plan::Method::PreCopiedTracked`]); smaller ones are copied inside the freeze, which
/// costs less than tracking them.
pub const TRACK_MIN: u64 = 1 << 20;

/// Why a dump failed. Nothing is left behind in the target in any case: the freeze resumes it
/// and closing the uffd un-protects everything.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// There is no such process.
    #[error("no process {pid}")]
    NoProcess {
        /// The pid.
        pid: i32,
    },
    /// The process has exited and waits to be reaped: it has no memory left.
    #[error("process {pid} is a zombie (exited, not yet reaped): nothing to dump")]
    Zombie {
        /// The pid.
        pid: i32,
    },
    /// A kernel thread has no user memory.
    #[error("process {pid} is a kernel thread: it has no user memory to dump")]
    KernelThread {
        /// The pid.
        pid: i32,
    },
    /// Reading the target's /proc files failed.
    #[error("reading /proc/{pid}/{what}: {}", errno_name(*errno))]
    Proc {
        /// The pid.
        pid: i32,
        /// The file.
        what: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// Attaching (creating the uffd inside the target) failed.
    #[error("attaching: {0}")]
    Attach(#[from] AttachError),
    /// Freezing the target failed (it runs on).
    #[error("freezing the target: {}", .0.as_ref().map_or("no thread could be stopped".to_string(), |e| e.to_string()))]
    Freeze(Option<AttachError>),
    /// Reading a stopped thread's registers failed.
    #[error("reading the registers of thread {tid}: {}", errno_name(*errno))]
    Registers {
        /// The thread.
        tid: i32,
        /// The errno.
        errno: Errno,
    },
    /// Copying a mapping inside the freeze failed.
    #[error("copying {len:#x} bytes at {addr:#x} inside the freeze: {}", errno_name(*errno))]
    Copy {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
        /// The errno.
        errno: Errno,
    },
    /// The snapshot of the write-protected part failed.
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    /// Writing the core failed.
    #[error("writing the core: {0}")]
    Core(#[from] core_file::CoreError),
    /// The memory the dump holds while it runs (its image of everything it captures) is more
    /// than the system has available: checked before the target is touched.
    #[error(
        "the dump would hold {need} bytes in memory and {available} are available \
         (MemAvailable); narrow it with --range or --filter"
    )]
    NoRoom {
        /// Bytes the dump would hold.
        need: u64,
        /// `MemAvailable` of /proc/meminfo, in bytes.
        available: u64,
    },
}

impl DumpError {
    /// The errno that best explains it.
    pub fn errno(&self) -> Errno {
        match self {
            DumpError::NoProcess { .. } | DumpError::Zombie { .. } => Errno::SRCH,
            DumpError::KernelThread { .. } => Errno::PERM,
            DumpError::Proc { errno, .. }
            | DumpError::Registers { errno, .. }
            | DumpError::Copy { errno, .. } => *errno,
            DumpError::Attach(e) | DumpError::Freeze(Some(e)) => e.errno(),
            DumpError::Freeze(None) => Errno::SRCH,
            DumpError::Snapshot(e) => e.errno(),
            DumpError::Core(e) => e.errno(),
            DumpError::NoRoom { .. } => Errno::NOMEM,
        }
    }
}

/// What to dump and how.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// The coredump filter (core(5)); `None`: the target's own `/proc/PID/coredump_filter`.
    pub filter: Option<u32>,
    /// Only these ranges (mappings outside them are in the core with no bytes).
    pub only: Option<RangeSet>,
    /// The snapshot engine's options for the write-protected part.
    pub snapshot: SnapshotOptions,
    /// Called at every step of the attach and of the freeze
    /// ([`crate::backend::linux::remote::Step`]); `Err(Cancel)` there ends that step cleanly
    /// (the target resumed) and the dump fails with [`DumpError::Attach`] or
    /// [`DumpError::Freeze`] holding [`AttachError::Cancelled`]. A command line stopped by a
    /// signal cancels here. `None`: never cancels.
    pub observer: Option<Arc<dyn Observer>>,
}

/// One mapping in the report.
#[derive(Debug, Clone, Serialize)]
pub struct MappingReport {
    /// Start address.
    pub start: u64,
    /// End address.
    pub end: u64,
    /// `rwxp`.
    pub perms: String,
    /// Path or pseudo-name.
    pub name: String,
    /// How it was captured (and why not, when it was not).
    #[serde(flatten)]
    pub method: Method,
    /// Bytes it puts in the core.
    pub bytes: u64,
    /// Other processes that mapped the same shared memory when the dump began. They are not
    /// stopped (nor are they by gcore or the kernel's own core dump), so what they write
    /// during the copy lands in the core as it comes, not as of the freeze.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<i32>,
}

/// What a dump did.
#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    /// The target.
    pub pid: i32,
    /// Its threads, all captured at the freeze.
    pub threads: usize,
    /// How long the target was stopped, microseconds.
    pub pause_us: f64,
    /// Of which: stopping every thread, recording registers, copying inside the freeze.
    pub freeze_us: f64,
    /// Of which: recording registers and copying inside the freeze.
    pub capture_in_freeze_us: f64,
    /// Bytes copied inside the freeze.
    pub in_freeze_bytes: u64,
    /// Bytes of read-only file memory copied before the freeze and found unchanged in it.
    pub pre_copied_bytes: u64,
    /// Mappings copied before the freeze but changed by it, copied again inside it.
    pub pre_copies_redone: usize,
    /// Bytes of written private file memory copied before the freeze with its writes tracked
    /// (`pre-copied-tracked`).
    pub tracked_bytes: u64,
    /// Of which copied again inside the freeze (written since, or changed; counted in
    /// `in_freeze_bytes` too).
    pub tracked_recopied_bytes: u64,
    /// Bytes write-protected in the pause and copied after it.
    pub write_protected_bytes: u64,
    /// Bytes the target unmapped after they were planned and before the freeze: not part of
    /// the process at the snapshot instant (zero in the core).
    pub gone_before_freeze_bytes: u64,
    /// Every mapping of the target, in address order.
    pub mappings: Vec<MappingReport>,
    /// The snapshot engine's report for the write-protected part (faults served, copy rate).
    pub snapshot: Option<SnapshotReport>,
    /// What the target's threads did while the dump ran, from attach to release.
    pub target_cpu: Option<TargetCpu>,
    /// How the userfaultfd was created inside the target.
    pub attach: Option<crate::backend::linux::remote::AttachReport>,
}

/// The target's threads over the dump (`/proc/PID/task/*/schedstat`): time on a CPU, and
/// time ready to run but waiting for one, which is how much the dump's threads (the copier
/// above all) crowded it out. Time stopped in the pause or in a write-protect fault is
/// neither. `None` in the report where the kernel has no schedstat.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TargetCpu {
    /// Wall-clock time of the dump, ms.
    pub wall_ms: f64,
    /// The target's threads on a CPU, summed, ms.
    pub on_cpu_ms: f64,
    /// The target's threads runnable but waiting for a CPU, summed, ms.
    pub runqueue_wait_ms: f64,
}

/// Samples the target's CPU time to report [`TargetCpu`] over a span.
struct CpuWatch {
    pid: i32,
    t0: Instant,
    start: Option<(u64, u64)>,
}

impl CpuWatch {
    fn start(pid: i32) -> CpuWatch {
        CpuWatch {
            pid,
            t0: Instant::now(),
            start: procfs::cpu_and_wait_ns(pid).ok(),
        }
    }

    fn stop(self) -> Option<TargetCpu> {
        let (c0, w0) = self.start?;
        let (c1, w1) = procfs::cpu_and_wait_ns(self.pid).ok()?;
        Some(TargetCpu {
            wall_ms: self.t0.elapsed().as_secs_f64() * 1e3,
            on_cpu_ms: c1.saturating_sub(c0) as f64 / 1e6,
            runqueue_wait_ms: w1.saturating_sub(w0) as f64 / 1e6,
        })
    }
}

/// A captured process, ready to be written as a core.
#[derive(Debug)]
pub struct Captured {
    /// Its identity.
    pub process: ProcessInfo,
    /// Every thread's registers at the freeze, the main thread first.
    pub threads: Vec<ThreadRegs>,
    /// Every mapping and how it was captured.
    pub plan: Vec<Planned>,
    /// Its auxiliary vector.
    pub auxv: Vec<u8>,
    /// What was done.
    pub report: DumpReport,
    image: Option<Image>,
    copies: Vec<(Range, Vec<u8>)>,
}

impl Captured {
    /// Reads captured bytes at `addr` (inside one captured mapping).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let end = addr + buf.len() as u64;
        if let Some((r, bytes)) = self
            .copies
            .iter()
            .find(|(r, _)| r.start() <= addr && end <= r.end())
        {
            let off = (addr - r.start()) as usize;
            buf.copy_from_slice(&bytes[off..off + buf.len()]);
            return Ok(());
        }
        self.image.as_ref().ok_or(Errno::FAULT)?.read(addr, buf)
    }

    /// The parts of `r` (inside one captured mapping) that may hold bytes other than zero.
    pub fn data_in(&self, r: Range) -> RangeSet {
        let copied = self
            .copies
            .iter()
            .any(|(c, _)| c.start() <= r.start() && r.end() <= c.end());
        match &self.image {
            Some(img) if !copied && img.slot(r.start()).is_some() => img.data_in(r),
            _ => RangeSet::single(r),
        }
    }
}

/// Captures process `pid` (see the module docs); `progress(done, total)` counts pages copied
/// after the pause.
pub fn capture(
    pid: u32,
    opts: &DumpOptions,
    progress: impl FnMut(u64, u64),
) -> Result<Captured, DumpError> {
    let p = pid as i32;
    let process = target::process_info(p)?;
    let auxv = target::auxv(p)?;
    let mut plan = plan_target(p, opts)?;
    if let Some(available) = target::mem_available() {
        check_room(&plan, available)?;
    }
    let sharers = sharers_of(p, &plan);
    let watch = CpuWatch::start(p);
    let obs = opts
        .observer
        .clone()
        .unwrap_or_else(|| Arc::new(NoObserver) as Arc<dyn Observer>);
    let (mm, attach) = LinuxMm::attach_observed(pid, None, event_config(), &*obs)?;
    refuse_unregistrable(&mm, &mut plan);
    let tracked = track_and_copy(pid, &mut plan, &*obs)?;
    let rq = RemoteQuiesce::with_observer(pid, obs);
    let pre = precopy::pre_copy(p, &planned_maps(&plan, &Method::PreCopied));
    let dq = DumpQuiesce::new(&rq, p, in_freeze_ranges(&plan), (pre, tracked));
    let wp = ranges_where(&plan, |x| x.method.write_protected());
    let (image, snap, pause_us) = if wp.is_empty() {
        let t0 = Instant::now();
        dq.freeze();
        dq.resume();
        (None, None, t0.elapsed().as_secs_f64() * 1e6)
    } else {
        // The target may unmap anything at any time: what goes is reported, not fatal.
        let so = SnapshotOptions {
            tolerate_vanishing: true,
            ..opts.snapshot
        };
        let all = ProcessRanges {
            ranges: wp.clone(),
            shared: ranges_where(&plan, Planned::shared_wp),
            sparse: ranges_where(&plan, |x| {
                matches!(x.method, Method::WriteProtectPopulated(_))
            }),
        };
        let (img, rep) = snapshot::take_process(&mm, &all, Source::Mm, &dq, &so, progress)?;
        let pause = rep.pause_us;
        (Some(img), Some(rep), pause)
    };
    drop(mm); // closes the target's uffd: nothing of it stays registered
    let target_cpu = watch.stop();
    let (mut frozen, pre, tracked) = dq.into_parts();
    if let Some(e) = frozen.error {
        return Err(e);
    }
    let pre_copies_redone = frozen.pre_valid.iter().filter(|ok| !**ok).count();
    // Their trackers disarmed, and the second uffd closed with the last of them.
    for t in tracked {
        let r = t.range();
        frozen.copies.push((r, t.bytes));
    }
    let mut pre_copied_bytes = 0;
    for (p, _) in pre
        .into_iter()
        .zip(&frozen.pre_valid)
        .filter(|(_, ok)| **ok)
    {
        pre_copied_bytes += p.range().len();
        let r = p.range();
        frozen
            .copies
            .push((r, p.bytes.expect("a valid copy has its bytes")));
    }
    let report = DumpReport {
        pid: p,
        threads: frozen.threads.len(),
        pause_us,
        freeze_us: snap.as_ref().map_or(pause_us, |s| s.freeze_us),
        capture_in_freeze_us: frozen.capture_us,
        in_freeze_bytes: frozen.copied_bytes,
        pre_copied_bytes,
        pre_copies_redone,
        tracked_bytes: frozen.tracked_bytes.0,
        tracked_recopied_bytes: frozen.tracked_bytes.1,
        write_protected_bytes: wp.bytes(),
        gone_before_freeze_bytes: frozen.gone.bytes(),
        mappings: plan.iter().map(|x| mapping_report(x, &sharers)).collect(),
        snapshot: snap,
        target_cpu,
        attach: Some(attach),
    };
    Ok(Captured {
        process,
        threads: frozen.threads,
        plan,
        auxv,
        report,
        image,
        copies: frozen.copies,
    })
}

/// The dump's uffd: the default, plus the REMOVE, UNMAP and REMAP events, which say what the
/// target unmaps, drops or moves during the copy (so that it is reported lost, or copied from
/// where it went, never copied from whatever is mapped there later: see
/// [`crate::engine::snapshot`]'s events). Not FORK: a child's copy of the memory is not the
/// target's, and the event would stop every `fork()` until read.
fn event_config() -> Config {
    let d = Config::default();
    Config {
        wanted: d
            .wanted
            .with(Features::EVENT_REMOVE)
            .with(Features::EVENT_UNMAP)
            .with(Features::EVENT_REMAP)
            .with(Features::EVENT_FORK),
        ..d
    }
}

/// Reads the target's mappings and plans each by the kernel's core-dump rules (nothing is
/// touched yet).
fn plan_target(p: i32, opts: &DumpOptions) -> Result<Vec<Planned>, DumpError> {
    let filter = match opts.filter {
        Some(f) => f,
        None => target::coredump_filter(p)?,
    };
    let smaps = target::smaps(p)?;
    let maps = procfs::read_maps(p).map_err(|errno| DumpError::Proc {
        pid: p,
        what: "maps",
        errno,
    })?;
    Ok(plan::plan(
        &maps,
        filter,
        opts.only.as_ref(),
        &TargetFacts { pid: p, smaps },
    ))
}

/// [`plan::MapFacts`] of a live target: its smaps, and its memory for ELF headers.
struct TargetFacts {
    pid: i32,
    smaps: target::Smaps,
}

impl plan::MapFacts for TargetFacts {
    fn written(&self, m: &MapEntry) -> bool {
        self.smaps.written.contains(&m.start)
    }

    fn elf(&self, m: &MapEntry) -> bool {
        let mut b = [0u8; 4];
        m.offset == 0 && read_remote(self.pid, m.start, &mut b).is_ok() && &b == b"\x7fELF"
    }

    fn own_uffd(&self, m: &MapEntry) -> Option<u64> {
        self.smaps.own_uffd.get(&m.start).copied()
    }

    fn dont_dump(&self, m: &MapEntry) -> bool {
        self.smaps.dont_dump.contains(&m.start)
    }

    fn populated(&self, m: &MapEntry) -> u64 {
        // Not in smaps (mapped since it was read): as if all of it.
        self.smaps
            .populated
            .get(&m.start)
            .copied()
            .unwrap_or(m.end - m.start)
    }
}

/// The ranges of the mappings `pick` chooses.
fn ranges_where(plan: &[Planned], pick: impl Fn(&Planned) -> bool) -> RangeSet {
    plan.iter()
        .filter(|x| pick(x))
        .map(Planned::range)
        .collect::<Vec<_>>()
        .into()
}

/// Copies the mappings planned `pre-copied-tracked` with their writes tracked by a second,
/// async-WP uffd of the target's ([`tracked`]); those it cannot track (no `WP_ASYNC`, a
/// refused registration) are copied inside the freeze instead. Fails only when the observer
/// cancelled the attach (a stop signal): the dump ends there, as at the first attach.
fn track_and_copy(
    pid: u32,
    plan: &mut [Planned],
    obs: &dyn Observer,
) -> Result<Vec<tracked::Tracked>, DumpError> {
    let maps = planned_maps(plan, &Method::PreCopiedTracked);
    if maps.is_empty() {
        return Ok(Vec::new());
    }
    let (done, failed) = match LinuxMm::attach_observed(pid, None, Config::async_wp(), obs) {
        Ok((mm, _)) => tracked::pre_copy(pid as i32, &Arc::new(mm), &maps),
        Err(e @ AttachError::Cancelled { .. }) => return Err(e.into()),
        Err(_) => (Vec::new(), maps),
    };
    for p in plan.iter_mut() {
        if failed.contains(&p.map) {
            p.method = Method::InFreeze;
        }
    }
    Ok(done)
}

/// Tries registering each mapping planned for write-protection; one the kernel refuses is
/// copied inside the freeze when small, else skipped with the errno.
fn refuse_unregistrable(mm: &LinuxMm, plan: &mut [Planned]) {
    for p in plan.iter_mut().filter(|p| p.method.write_protected()) {
        let r = p.range();
        match mm.register(r, RegisterMode::WP) {
            Ok(_) => {
                let _ = mm.unregister(r);
            }
            Err(_) if r.len() <= IN_FREEZE_LIMIT => p.method = Method::InFreeze,
            Err(errno) => {
                p.method = Method::Skipped(format!(
                    "UFFDIO_REGISTER(WP) refused it ({}) and it is larger than {} MiB",
                    errno_name(errno),
                    IN_FREEZE_LIMIT >> 20
                ))
            }
        }
    }
}

/// What the freeze copies: whole mappings, the populated pages of those the target registered
/// with its own userfaultfd, and the first page of ELF file mappings.
fn in_freeze_ranges(plan: &[Planned]) -> Vec<FreezeCopy> {
    let copy = |range, populated_only| FreezeCopy {
        range,
        populated_only,
    };
    plan.iter()
        .filter_map(|p| match p.method {
            Method::InFreeze => Some(copy(p.range(), false)),
            Method::InFreezePopulated(_) => Some(copy(p.range(), true)),
            Method::ElfHeader => Some(copy(
                Range::from_bounds(p.map.start, p.map.start + PAGE_SIZE),
                false,
            )),
            _ => None,
        })
        .collect()
}

/// The dump holds every byte it captures in memory until the core is written: refuses when
/// that is more than `available` (pushing the OOM killer onto this process, or the target).
/// Sparse memory counts what is populated; mappings left out count nothing.
fn check_room(plan: &[Planned], available: u64) -> Result<(), DumpError> {
    let need: u64 = plan.iter().map(|p| p.held).sum();
    if need > available {
        return Err(DumpError::NoRoom { need, available });
    }
    Ok(())
}

/// The mappings planned with `method`.
fn planned_maps(plan: &[Planned], method: &Method) -> Vec<MapEntry> {
    plan.iter()
        .filter(|x| x.method == *method)
        .map(|x| x.map.clone())
        .collect()
}

/// The other processes mapping each shared mapping the dump write-protects
/// ([`procfs::sharers`]), read before the target is touched.
fn sharers_of(p: i32, plan: &[Planned]) -> BTreeMap<(String, u64), Vec<i32>> {
    let wanted = plan
        .iter()
        .filter(|x| x.shared_wp())
        .map(|x| (x.map.dev.clone(), x.map.inode))
        .collect();
    procfs::sharers(p, &wanted)
}

fn mapping_report(p: &Planned, sharers: &BTreeMap<(String, u64), Vec<i32>>) -> MappingReport {
    let key = (p.map.dev.clone(), p.map.inode);
    MappingReport {
        shared_with: if p.shared_wp() {
            sharers.get(&key).cloned().unwrap_or_default()
        } else {
            Vec::new()
        },
        start: p.map.start,
        end: p.map.end,
        perms: p.map.perms.clone(),
        name: p.map.name.clone(),
        method: p.method.clone(),
        bytes: p.dump_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::procfs::parse_maps;

    /// Dense mappings: populated as much as they are long; `sparse`: one page.
    struct Facts {
        sparse: u64,
    }

    impl plan::MapFacts for Facts {
        fn written(&self, _: &MapEntry) -> bool {
            false
        }
        fn elf(&self, _: &MapEntry) -> bool {
            false
        }
        fn own_uffd(&self, _: &MapEntry) -> Option<u64> {
            None
        }
        fn dont_dump(&self, _: &MapEntry) -> bool {
            false
        }
        fn populated(&self, m: &MapEntry) -> u64 {
            if m.start == self.sparse {
                PAGE_SIZE
            } else {
                m.end - m.start
            }
        }
    }

    #[test]
    fn the_room_check_counts_what_the_dump_holds_and_nothing_left_out() {
        let maps = parse_maps(
            "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\n\
             7f0000400000-7f0000800000 rw-p 00000000 00:00 0\n\
             7f1000000000-7f2000000000 rw-p 00000000 00:00 0\n",
        );
        let facts = Facts {
            sparse: 0x7f1000000000,
        };
        let plan = plan::plan(&maps, plan::filter::DEFAULT, None, &facts);
        // 8 MiB and their page states, one page of the 64 GiB mapping and its page states.
        let need = (8 << 20) + 2048 + PAGE_SIZE + (16 << 20);
        assert!(
            check_room(&plan, need).is_ok(),
            "{need} bytes fit in as many"
        );
        let e = check_room(&plan, need - 1).unwrap_err();
        assert!(
            matches!(e, DumpError::NoRoom { need: n, .. } if n == need),
            "{e}"
        );
        assert_eq!(e.errno(), Errno::NOMEM);
        let only = RangeSet::single(Range::from_bounds(0x7f0000000000, 0x7f0000400000));
        let plan = plan::plan(&maps, plan::filter::DEFAULT, Some(&only), &facts);
        assert!(
            check_room(&plan, (4 << 20) + 1024).is_ok(),
            "what is left out holds nothing"
        );
    }
}

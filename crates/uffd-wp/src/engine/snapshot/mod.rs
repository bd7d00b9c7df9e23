//! Live copy-on-write snapshots, generic over [`Mm`].
//!
//! 1. Register the ranges for WP and populate the image buffer (before the pause).
//! 2. **Pause**: freeze the writers (a [`Quiesce`] callback), exact-write-protect everything
//!    (split over threads where that shortens the pause), copy at once whatever could not be
//!    protected (or report it, per [`Unprotected`]), resume.
//! 3. **Copy**: walk the pages in address order. A writer that touches a page not yet copied
//!    takes a WP fault; the fault is served first: copy the old page, un-protect it, wake the
//!    writer. The copier un-protects each chunk right after copying it, so a page faults at
//!    most once and the writers run free behind the copier.
//! 4. Pinned pages (which a device or io_uring can write without any fault) are never trusted:
//!    they are left unprotected, copied last, and counted as possibly torn.
//!
//! Each page moves PENDING -> COPYING -> DONE exactly once (an atomic per page), whoever gets
//! there first, copier or fault handler; only a DONE page is ever un-protected (a pinned page
//! waits in LAST, which neither copies, until everything else is copied). Any failure or
//! early return un-protects and unregisters everything and resumes the writers (a drop guard).

mod events;
mod image;
mod prearm;
mod session;
mod shared;
mod sparse;

use std::time::Duration;

use serde::Serialize;

pub use events::EventCounts;
pub use image::{Image, ImageError};
use prearm::Prearm;
use session::Session;

use crate::engine::protect::{OnError, WpError};
use crate::range::{Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, Quiesce};
use crate::sys::errno_name;
use crate::sys::mem::Mapping;

/// Where page contents are read from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A mapping of this process: copied with memcpy.
    Mapping(&'a Mapping),
    /// Through [`Mm::read_memory`] (the model, or another process).
    Mm,
}

/// How WP faults are served during the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HandlerMode {
    /// The copier itself polls the uffd (non-blocking) between chunks of `chunk_pages` pages:
    /// no cross-CPU wake-up of a sleeping handler, at the cost of up to one chunk's copy time.
    Inline {
        /// Pages copied between two polls.
        chunk_pages: u32,
    },
    /// A dedicated thread sleeps in poll(2) on the uffd and serves each fault.
    Thread,
    /// Both: a handler thread sleeps in poll(2), and the copier also reads the uffd
    /// (non-blocking) between chunks of `chunk_pages` pages; whichever runs first serves the
    /// fault. A writer on an idle CPU wakes the thread there; a writer sharing the copier's CPU
    /// is served by the copier without waiting for the thread to be scheduled.
    Hybrid {
        /// Pages copied between two polls by the copier.
        chunk_pages: u32,
    },
}

impl HandlerMode {
    /// The copier's chunk between two polls, if the copier polls.
    fn inline_chunk(self) -> Option<u64> {
        match self {
            HandlerMode::Inline { chunk_pages } | HandlerMode::Hybrid { chunk_pages } => {
                Some(u64::from(chunk_pages.max(1)))
            }
            HandlerMode::Thread => None,
        }
    }

    /// Whether a handler thread serves faults.
    fn has_thread(self) -> bool {
        !matches!(self, HandlerMode::Inline { .. })
    }
}

/// How the bulk copy competes with the target for CPU. Faults are always served at the
/// caller's priority (the handler thread keeps it): only the copier yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Copier {
    /// The copier runs at the caller's priority: the shortest copy.
    #[default]
    Normal,
    /// The copier runs in a thread of its own at nice 19 and takes the CPU the target leaves:
    /// the target's throughput during the copy is closest to undisturbed, the copy takes as
    /// long as the target keeps the CPUs busy. The handler must have a thread
    /// ([`HandlerMode::Thread`] or [`HandlerMode::Hybrid`]), or faults would wait for it.
    Background,
}

/// What to do with pages that could not be write-protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unprotected {
    /// Copy them while the writers are still frozen (consistent; the pause grows).
    CopyInFreeze,
    /// Leave them out and list them in `not_captured`.
    Report,
    /// Give up: clean up and return the error.
    Abort,
}

/// Options of [`take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Threads that write-protect in parallel during the pause (1: the caller alone).
    pub protect_threads: usize,
    /// How faults are served.
    pub handler: HandlerMode,
    /// Pages that could not be protected.
    pub unprotected: Unprotected,
    /// Failure policy of the write-protect.
    pub on_error: OnError,
    /// Write-protect everything *before* the pause while the writers run (a handler thread
    /// un-protects and records each page they write meanwhile), then, frozen, re-protect only
    /// those pages. Shortens the pause when protecting the whole range costs more than the
    /// pages written during it (4 KiB pages); pointless with THP, where protecting is cheap.
    pub prearm: bool,
    /// Memory the target unmaps (or moves) while the snapshot is taken is not an error: its
    /// pages not yet copied are reported in `not_captured` (their content at the snapshot
    /// point is lost) and the rest goes on. For another process, which changes its mappings
    /// at will; off for this process's own ranges, where it means a bug.
    pub tolerate_vanishing: bool,
    /// How the bulk copy competes with the target for CPU.
    pub copier: Copier,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            protect_threads: 1,
            // Measured (docs/benchmarks.md, Snapshots): with nothing pinned to a CPU, a sleeping
            // handler thread is woken on the faulting writer's idle CPU, while the busy inline
            // copier needs a cross-CPU wake-up (p50 30-34 us against 40-50 for inline; the
            // thread alone 28-32); the copier's own polls serve the faults the thread is too
            // slow for (p99 with the handler on the copier's CPU 0.2-0.6 ms against 2.1-3.1 ms
            // for the thread alone). Five runs, session 3.
            handler: HandlerMode::Hybrid { chunk_pages: 32 },
            unprotected: Unprotected::CopyInFreeze,
            on_error: OnError::Retry {
                attempts: 3,
                backoff: Duration::from_micros(100),
            },
            prearm: true,
            tolerate_vanishing: false,
            copier: Copier::Normal,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of a sample in nanoseconds (empty: all zero).
    pub fn of_ns(mut ns: Vec<u64>) -> Percentiles {
        if ns.is_empty() {
            return Percentiles::default();
        }
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Percentiles {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// What a snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// Set by the caller's oracle, if it has one.
    pub consistent: Option<bool>,
    /// Writers frozen, in microseconds.
    pub pause_us: f64,
    /// Of which stopping the writers (the [`Quiesce::freeze`] callback).
    pub freeze_us: f64,
    /// Of which write-protecting.
    pub protect_us: f64,
    /// Pages written during the last pre-arm pass (re-protected in the pause); 0 without
    /// `prearm`.
    pub prearm_dirty_pages: u64,
    /// Pre-arm passes before the pause: the first protects everything, each later one what
    /// was written during the one before (0 without `prearm`).
    pub prearm_passes: u32,
    /// Pages captured.
    pub pages: u64,
    /// Bytes captured.
    pub bytes: u64,
    /// WP faults served first (copy before the write).
    pub faults_served: u64,
    /// Fault service time in the engine (message read to wake), microseconds.
    pub fault_service_us: Percentiles,
    /// Pinned pages: left unprotected, copied last, possibly torn.
    pub pinned_pages: u64,
    /// Long-term pinned bytes of the process that no known source explains: non-zero means
    /// a page the image holds as consistent may have been written by a device after the
    /// snapshot point ([`Mm::unexplained_pinned_bytes`]).
    pub unexplained_pinned_bytes: u64,
    /// Pages copied during the freeze because they could not be protected.
    pub copied_in_freeze_pages: u64,
    /// Pages not captured (offsets are absolute addresses), with why.
    pub not_captured: Vec<NotCaptured>,
    /// Copy phase duration in milliseconds.
    pub copy_ms: f64,
    /// Copy throughput, MB/s (10^6 bytes).
    pub copy_mb_s: f64,
    /// Raw write-protect calls during the pause.
    pub protect_raw_calls: u32,
    /// The first write-protect failure, if any.
    pub protect_error: Option<String>,
    /// How faults were served.
    pub handler: HandlerMode,
    /// How the copier competed with the target for CPU.
    pub copier: Copier,
    /// The target's own mapping changes read during the copy (with a backend that delivers
    /// REMOVE, UNMAP and REMAP events: a dump's).
    pub events: EventCounts,
    /// Pages of sparse ranges ([`ProcessRanges::sparse`]) with nothing mapped at the snapshot
    /// point: zero in the image, never protected nor copied (those in a 2 MiB block with a
    /// populated page were protected and found empty by the copier).
    pub unpopulated_pages: u64,
}

/// A range left out of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotCaptured {
    /// [start, end) addresses.
    pub range: [u64; 2],
    /// Why.
    pub why: String,
}

/// Why a snapshot failed. Whatever happened, nothing is left protected or registered and the
/// writers run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The ranges are empty or overlap nothing.
    #[error("nothing to snapshot")]
    Empty,
    /// Allocating the image failed.
    #[error("allocating a {bytes}-byte image: {}", errno_name(*errno))]
    Image {
        /// Size.
        bytes: u64,
        /// errno.
        errno: Errno,
    },
    /// Registering a range for WP failed.
    #[error("UFFDIO_REGISTER(WP) of {range}: {}", errno_name(*errno))]
    Register {
        /// The range.
        range: Range,
        /// errno.
        errno: Errno,
    },
    /// Write-protecting failed and the policy is `Abort` (or nothing could be protected).
    #[error("write-protecting the snapshot: {0}")]
    Protect(#[from] WpError),
    /// Copying a page failed.
    #[error("copying {len} bytes at {addr:#x}: {}", errno_name(*errno))]
    Copy {
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
        /// errno.
        errno: Errno,
    },
    /// Serving a fault or un-protecting failed.
    #[error("{op} at {addr:#x}: {}", errno_name(*errno))]
    Uffd {
        /// What.
        op: &'static str,
        /// Address.
        addr: u64,
        /// errno.
        errno: Errno,
    },
}

impl SnapshotError {
    /// The errno behind the failure (EINVAL for an empty snapshot).
    pub fn errno(&self) -> Errno {
        match self {
            SnapshotError::Empty => Errno::INVAL,
            SnapshotError::Protect(e) => e.errno(),
            SnapshotError::Image { errno, .. }
            | SnapshotError::Register { errno, .. }
            | SnapshotError::Copy { errno, .. }
            | SnapshotError::Uffd { errno, .. } => *errno,
        }
    }

    /// The address the failure is about, when there is one.
    pub fn addr(&self) -> Option<u64> {
        match self {
            SnapshotError::Empty | SnapshotError::Image { .. } => None,
            SnapshotError::Protect(e) => Some(e.addr()),
            SnapshotError::Register { range, .. } => Some(range.start()),
            SnapshotError::Copy { addr, .. } | SnapshotError::Uffd { addr, .. } => Some(*addr),
        }
    }
}

/// Bytes un-protected at once by the copier (one TLB flush each).
pub const RELEASE_BATCH: u64 = 2 << 20;

/// Takes a live snapshot of `ranges`. See the module docs.
pub fn take<M: Mm + ?Sized>(
    mm: &M,
    ranges: &RangeSet,
    source: Source<'_>,
    quiesce: &dyn Quiesce,
    opts: &SnapshotOptions,
    progress: impl FnMut(u64, u64),
) -> Result<(Image, SnapshotReport), SnapshotError> {
    let all = ProcessRanges {
        ranges: ranges.clone(),
        ..ProcessRanges::default()
    };
    take_process(mm, &all, source, quiesce, opts, progress)
}

/// The memory of a whole process for [`take_process`]: what to capture, and what of it needs
/// more than [`take`] gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessRanges {
    /// Everything captured.
    pub ranges: RangeSet,
    /// Its `MAP_SHARED` part, which children forked during the copy share: with
    /// `UFFD_FEATURE_EVENT_FORK` on the uffd, a child's page tables keep the uffd-wp bits on a
    /// uffd of its own, so its first write to a shared page waits; the fork event has every
    /// shared page not copied yet copied, then the child's uffd closed (`EventCounts::fork`).
    /// A fork before the freeze only has the child's uffd closed
    /// (`EventCounts::fork_before_freeze`).
    pub shared: RangeSet,
    /// Its sparse private anonymous part (stacks, reservations): only the 2 MiB blocks with a
    /// populated page are protected and copied, the rest is zero in the image
    /// (`sparse.rs`; `SnapshotReport::unpopulated_pages`). Never shared or file memory: a
    /// page of those can hold data with nothing mapped.
    pub sparse: RangeSet,
}

/// [`take`] of a whole process's memory (see [`ProcessRanges`]).
pub fn take_process<M: Mm + ?Sized>(
    mm: &M,
    all: &ProcessRanges,
    source: Source<'_>,
    quiesce: &dyn Quiesce,
    opts: &SnapshotOptions,
    progress: impl FnMut(u64, u64),
) -> Result<(Image, SnapshotReport), SnapshotError> {
    let ranges = &all.ranges;
    if ranges.is_empty() {
        return Err(SnapshotError::Empty);
    }
    let sparse = all.sparse.intersection(ranges);
    let image = Image::with_lazy(ranges, &sparse).map_err(|errno| SnapshotError::Image {
        bytes: ranges.bytes(),
        errno,
    })?;
    // The scope outlives the pause, so the pre-arm handler is joined after it.
    let prearm = Prearm::default();
    let report = std::thread::scope(|scope| {
        Session::arm(
            mm,
            ranges,
            (source, &image),
            quiesce,
            (opts.tolerate_vanishing, &all.shared.intersection(ranges)),
            sparse,
        )?
        .run(scope, &prearm, ranges, opts, progress)
    })?;
    Ok((image, report))
}

/// Bytes of state the engine keeps per captured page (besides the image).
pub const STATE_BYTES_PER_PAGE: u64 = 1;

//! What the tracker reports and takes: [`Epoch`], [`TrackError`] (with its [`Phase`]) and
//! [`TrackOptions`].

use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeMap;

use super::Method;
use crate::backend::linux::OpenError;
use crate::engine::protect::{OnError, WpError};
use crate::range::{Range, RangeSet};
use crate::seam::Errno;
use crate::sys::errno_name;

/// Which write-protection step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Arming the range when the tracker starts.
    Arm,
    /// Re-protecting an epoch's dirty pages (sync WP).
    Reprotect,
    /// Un-protecting the range when the tracker is disarmed.
    Disarm,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Arm => "arming",
            Phase::Reprotect => "re-protecting the dirty pages of",
            Phase::Disarm => "un-protecting",
        })
    }
}

/// Why tracking failed. Every variant names the operation, the errno and the address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    /// The method cannot work here: the kernel or the uffd lacks a feature.
    #[error("dirty tracking with {method}: needs {what}")]
    Unsupported {
        /// The method.
        method: Method,
        /// What is missing.
        what: &'static str,
    },
    /// The userfaultfd backend could not be opened.
    #[error("opening the userfaultfd backend: {0}")]
    Open(OpenError),
    /// `UFFDIO_REGISTER` (mode WP) of the range failed.
    #[error("UFFDIO_REGISTER(WP) of {range}: {}", errno_name(*errno))]
    Register {
        /// The range.
        range: Range,
        /// The kernel's errno.
        errno: Errno,
    },
    /// Write-protecting (or un-protecting) left part of a range in the wrong state.
    #[error("{phase} {range}: page {addr:#x} and {bytes} bytes in all left in the wrong state{}",
        .source.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Protect {
        /// Which step.
        phase: Phase,
        /// The request.
        range: Range,
        /// The first page left in the wrong state.
        addr: u64,
        /// Bytes left in the wrong state.
        bytes: u64,
        /// The engine's error, when there was one (none when, for example, unpopulated pages
        /// cannot be protected without `WP_UNPOPULATED`).
        source: Option<WpError>,
    },
    /// Asking the backend for the pinned pages failed.
    #[error("reading the pinned pages of {range}: {}", errno_name(*errno))]
    Pinned {
        /// The range.
        range: Range,
        /// The errno.
        errno: Errno,
    },
    /// `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` failed. The kernel may already have
    /// re-protected part of the range, so that epoch's dirty pages are lost.
    #[error("PAGEMAP_SCAN(WP_MATCHING|CHECK_WPASYNC) of {range}: {}", errno_name(*errno))]
    Scan {
        /// The range scanned.
        range: Range,
        /// The kernel's errno (EPERM: a VMA of the range is not registered for async WP).
        errno: Errno,
    },
    /// `PAGEMAP_SCAN` stopped before the end of the range without an error.
    #[error("PAGEMAP_SCAN of {range} stopped at {walk_end:#x}")]
    ScanIncomplete {
        /// The range scanned.
        range: Range,
        /// Where the walk stopped.
        walk_end: u64,
    },
    /// The sync fault handler could not un-protect (or wake) a faulting page.
    #[error("serving the WP fault at {addr:#x}: UFFDIO_WRITEPROTECT(unprotect)/UFFDIO_WAKE: {}",
        errno_name(*errno))]
    Fault {
        /// The faulting page.
        addr: u64,
        /// The errno.
        errno: Errno,
    },
    /// Waiting for or reading uffd events failed.
    #[error("reading userfaultfd events: {}", errno_name(*errno))]
    Events {
        /// The errno.
        errno: Errno,
    },
    /// The sync fault-handler thread could not be started.
    #[error("starting the fault-handler thread: {}", errno_name(*errno))]
    Spawn {
        /// The errno.
        errno: Errno,
    },
    /// A soft-dirty step failed (`clear_refs` 4, or reading pagemap bit 55).
    #[error("soft-dirty {op} at {addr:#x}: {}", errno_name(*errno))]
    SoftDirty {
        /// `"clear_refs"` or `"pagemap read"`.
        op: &'static str,
        /// The range's start.
        addr: u64,
        /// The errno (EOPNOTSUPP: the backend has no soft-dirty).
        errno: Errno,
    },
    /// `UFFDIO_UNREGISTER` of the range failed when disarming.
    #[error("UFFDIO_UNREGISTER of {range}: {}", errno_name(*errno))]
    Unregister {
        /// The range.
        range: Range,
        /// The errno.
        errno: Errno,
    },
    /// An earlier error disarmed the tracker.
    #[error("the tracker of {range} was disarmed by an earlier error")]
    Disarmed {
        /// The tracked range.
        range: Range,
    },
    /// An error, and then disarming after it failed too.
    #[error("{first}; then disarming failed: {cleanup}")]
    Cleanup {
        /// The error that caused the disarm.
        first: Box<TrackError>,
        /// The disarm's failure.
        cleanup: Box<TrackError>,
    },
}

impl TrackError {
    /// The errno behind the error (EOPNOTSUPP for a missing feature).
    pub fn errno(&self) -> Errno {
        match self {
            TrackError::Unsupported { .. } => Errno::OPNOTSUPP,
            TrackError::Open(OpenError::Unsupported { .. }) => Errno::OPNOTSUPP,
            TrackError::Open(
                OpenError::Create(e)
                | OpenError::Api { errno: e, .. }
                | OpenError::Proc { errno: e, .. },
            ) => *e,
            TrackError::Register { errno, .. }
            | TrackError::Pinned { errno, .. }
            | TrackError::Scan { errno, .. }
            | TrackError::Fault { errno, .. }
            | TrackError::Events { errno }
            | TrackError::Spawn { errno }
            | TrackError::SoftDirty { errno, .. }
            | TrackError::Unregister { errno, .. } => *errno,
            TrackError::Protect { source, .. } => {
                source.as_ref().map_or(Errno::FAULT, WpError::errno)
            }
            TrackError::ScanIncomplete { .. } => Errno::IO,
            TrackError::Disarmed { .. } => Errno::BADF,
            TrackError::Cleanup { first, .. } => first.errno(),
        }
    }
}

/// Options of a [`Tracker`](super::Tracker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackOptions {
    /// Failure policy of the write-protect calls (arming, sync re-protection, disarming).
    pub on_error: OnError,
    /// How long the sync handler waits for a fault before checking whether to stop (ms).
    pub poll_ms: i32,
}

impl Default for TrackOptions {
    /// Retry EAGAIN/ENOMEM 3 times from 1 ms; the sync handler polls every 20 ms.
    fn default() -> Self {
        TrackOptions {
            on_error: OnError::Retry {
                attempts: 3,
                backoff: Duration::from_millis(1),
            },
            poll_ms: 20,
        }
    }
}

/// The pages written during one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    /// 0 for the first epoch after arming.
    pub index: u64,
    /// How the pages were found.
    pub method: Method,
    /// The tracked range.
    pub range: Range,
    /// Pages written since the previous epoch (pinned pages excluded).
    pub dirty: RangeSet,
    /// Pages pinned at the boundary: dirty whatever the page tables say (a pin can write them
    /// without any fault).
    pub pinned: RangeSet,
    /// Long-term pinned bytes of the process that no known source explains, at the boundary
    /// ([`Mm::unexplained_pinned_bytes`]): non-zero means some written page may be missing
    /// from `dirty` and `pinned` (a device may write under a pin nobody can place).
    ///
    /// [`Mm::unexplained_pinned_bytes`]: crate::seam::Pins::unexplained_pinned_bytes
    pub unexplained_pinned_bytes: u64,
    /// Time the epoch boundary took (scan and re-arm).
    pub elapsed: Duration,
    /// Sync WP: faults the handler served during the epoch (0 for the other methods).
    pub faults: u64,
}

impl Epoch {
    /// `dirty` and `pinned` together: every page that may have changed.
    pub fn all_dirty(&self) -> RangeSet {
        self.dirty.union(&self.pinned)
    }
}

impl Serialize for Epoch {
    /// Offsets relative to the range's start, as in the write-protect reports.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let base = self.range.start();
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("index", &self.index)?;
        m.serialize_entry("method", &self.method)?;
        m.serialize_entry("dirty_pages", &self.dirty.pages())?;
        m.serialize_entry("pinned_pages", &self.pinned.pages())?;
        m.serialize_entry("dirty", &self.dirty.offsets_from(base))?;
        m.serialize_entry("pinned", &self.pinned.offsets_from(base))?;
        m.serialize_entry("unexplained_pinned_bytes", &self.unexplained_pinned_bytes)?;
        m.serialize_entry("elapsed_us", &(self.elapsed.as_secs_f64() * 1e6))?;
        m.serialize_entry("faults", &self.faults)?;
        m.end()
    }
}

//! The exact write-protect engine.
//!
//! [`write_protect`] protects a range and returns a [`WpReport`] that says, verified, which
//! pages are protected, which were deliberately skipped (pinned), and which are not protected,
//! with the first failure and the policy's outcome (stop, retry, rollback).
//!
//! # Why the report is exact, and why that is cheap
//! The kernel's `UFFDIO_WRITEPROTECT` has no output field, stops at the first failing VMA, skips
//! gaps silently, leaves unpopulated anonymous pages unprotected without `WP_UNPOPULATED`, and
//! on 6.18 can even return 0 after a page-table allocation failure: change_pmd_range() returns
//! -ENOMEM for one PUD, but change_pud_range() *adds* that to the pages changed in the following
//! PUDs, so a positive sum hides it (mm/mprotect.c; DESIGN.md, "Exactness by construction").
//!
//! The engine makes a clean return trustworthy by construction instead of reading everything
//! back:
//! - **One raw call never spans a 1 GiB PUD boundary.** Within one PUD entry the -ENOMEM of
//!   change_pmd_range() is the whole sum, so an allocation failure always surfaces as ENOMEM.
//!   Costs one extra ioctl per GiB.
//! - **Gaps are detected with `msync(MS_ASYNC)`** (a VMA walk, no page tables): a chunk with a
//!   gap is read back.
//! - **Unpopulated pages** are only trusted when the uffd has `WP_UNPOPULATED` (PTE markers);
//!   otherwise the chunk is read back.
//!
//! After any failure, only the failed chunk and the part never attempted are read back
//! (`PAGEMAP_SCAN`, or pagemap bit 57), since their state (including protection set before this
//! call) is unknown.
//!
//! # With the kernel's report (`UFFD_FEATURE_WP_REPORT`, kernel/README.md)
//! A kernel that offers `UFFDIO_WRITEPROTECT_REPORT` says itself how far the protection got:
//! `done` bytes from the start are in the requested state (always a prefix, written even on
//! failure) and `pinned` of them were left writable because they may be DMA-pinned
//! (`MODE_SKIP_PINNED`). The engine then issues one call per target range (no PUD split: such
//! a kernel reports every allocation failure), trusts the prefix as it trusts a clean return
//! today (gaps and unpopulated pages without markers still read back), retries from
//! `start + done`, and after a failure reads back only `[start + done, end)`, whose earlier
//! state it cannot know. [`WpReport::provenance`] says which path answered
//! ([`Exactness`]) and, for skipped pages, which source named them.

use std::fmt;
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

use crate::features::Features;
use crate::range::{PUD_SIZE, Range, RangeError, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, KernelReport, WpMode, pages_where};
use crate::sys::errno_name;

/// What to do when a raw call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Report what is protected and return.
    Stop,
    /// Retry a chunk that failed with EAGAIN or ENOMEM up to `attempts` more times, sleeping
    /// `backoff`, doubled after each attempt; then behave as `Stop`.
    Retry {
        /// Extra attempts per chunk.
        attempts: u32,
        /// First sleep between attempts.
        backoff: Duration,
    },
    /// All or nothing: un-protect every page this call protected, then report.
    Rollback,
}

/// Options of [`write_protect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpOptions {
    /// Leave pinned pages writable and report them as `skipped` (counted as success).
    pub skip_pinned: bool,
    /// The failure policy.
    pub on_error: OnError,
}

impl Default for WpOptions {
    fn default() -> Self {
        WpOptions {
            skip_pinned: false,
            on_error: OnError::Stop,
        }
    }
}

/// Which operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WpOp {
    /// Setting write protection.
    Protect,
    /// Clearing it.
    Unprotect,
}

impl fmt::Display for WpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WpOp::Protect => "UFFDIO_WRITEPROTECT(protect)",
            WpOp::Unprotect => "UFFDIO_WRITEPROTECT(unprotect)",
        })
    }
}

/// What a failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureKind {
    /// ENOMEM: a page-table allocation failed. Retrying may succeed.
    NoMemory,
    /// EAGAIN: a non-cooperative event (fork, mremap, munmap, ...) is in flight; nothing was
    /// done by that call. Retrying after reading the events succeeds.
    Busy,
    /// ENOENT: part of the range is not mapped or not registered for WP. The prefix before it
    /// stays protected.
    NotRegistered,
    /// EINVAL: a malformed request (alignment, length, mode, range past the task size).
    Invalid,
    /// ESRCH: the monitored address space is gone.
    ProcessGone,
    /// The kernel or the uffd lacks a needed feature.
    Unsupported,
    /// EFAULT: the kernel could not access an argument.
    Fault,
    /// Any other errno.
    Other,
}

impl FailureKind {
    /// The kind of a raw errno of `UFFDIO_WRITEPROTECT`.
    pub fn of(e: Errno) -> FailureKind {
        match e {
            Errno::NOMEM => FailureKind::NoMemory,
            Errno::AGAIN => FailureKind::Busy,
            Errno::NOENT => FailureKind::NotRegistered,
            Errno::INVAL => FailureKind::Invalid,
            Errno::SRCH => FailureKind::ProcessGone,
            Errno::NOSYS | Errno::NOTTY | Errno::OPNOTSUPP => FailureKind::Unsupported,
            Errno::FAULT => FailureKind::Fault,
            _ => FailureKind::Other,
        }
    }

    /// Whether the policy `Retry` retries it.
    pub fn retryable(self) -> bool {
        matches!(self, FailureKind::NoMemory | FailureKind::Busy)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a write-protect or un-protect failed, with the errno, the address and the operation.
/// Serializable (errnos as numbers), so a helper process can send it whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum WpError {
    /// The request is malformed; nothing was done.
    #[error("{op} of {len:#x} bytes at {start:#x}: {source} (EINVAL)")]
    InvalidRange {
        /// The operation.
        op: WpOp,
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
        /// What is wrong.
        source: RangeError,
    },
    /// The feature the request needs is not available on this uffd.
    #[error("{op} at {addr:#x}: needs userfaultfd feature(s) {}", .missing.names().join(", "))]
    Unsupported {
        /// The operation.
        op: WpOp,
        /// The request's start.
        addr: u64,
        /// What is missing.
        missing: Features,
    },
    /// A raw kernel call failed.
    #[error("{op} at {addr:#x}: {kind} ({})", errno_name(*errno))]
    Kernel {
        /// The operation.
        op: WpOp,
        /// What it means.
        kind: FailureKind,
        /// The kernel's errno.
        #[serde(with = "crate::sys::errno_serde")]
        errno: Errno,
        /// The first page of the failed call that is not in the requested state (the start of
        /// the failed call when none is).
        addr: u64,
    },
    /// Reading the page state back failed, so the state of `range` is unknown.
    #[error("reading back the state of {range} after {op}: {}", errno_name(*errno))]
    ReadBack {
        /// The operation.
        op: WpOp,
        /// What could not be read.
        range: Range,
        /// The errno of the read.
        #[serde(with = "crate::sys::errno_serde")]
        errno: Errno,
    },
}

impl WpError {
    /// The failure kind.
    pub fn kind(&self) -> FailureKind {
        match self {
            WpError::InvalidRange { .. } => FailureKind::Invalid,
            WpError::Unsupported { .. } => FailureKind::Unsupported,
            WpError::Kernel { kind, .. } => *kind,
            WpError::ReadBack { errno, .. } => FailureKind::of(*errno),
        }
    }
    /// The errno.
    pub fn errno(&self) -> Errno {
        match self {
            WpError::InvalidRange { .. } => Errno::INVAL,
            WpError::Unsupported { .. } => Errno::OPNOTSUPP,
            WpError::Kernel { errno, .. } | WpError::ReadBack { errno, .. } => *errno,
        }
    }
    /// The address the failure is about.
    pub fn addr(&self) -> u64 {
        match self {
            WpError::InvalidRange { start, .. } => *start,
            WpError::Unsupported { addr, .. } | WpError::Kernel { addr, .. } => *addr,
            WpError::ReadBack { range, .. } => range.start(),
        }
    }
}

/// What a write-protect (or un-protect) call left behind: `protected`, `skipped` and
/// `not_protected` partition `requested` and are true when the call returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WpReport {
    /// The operation.
    pub op: WpOp,
    /// The request.
    pub requested: Range,
    /// Pages write-protected when the call returned.
    pub protected: RangeSet,
    /// Pinned pages deliberately left writable (`skip_pinned`).
    pub skipped: RangeSet,
    /// Every other page of the request.
    pub not_protected: RangeSet,
    /// The first failure, if any.
    pub error: Option<WpError>,
    /// Whether the rollback policy undid this call's protection.
    pub rolled_back: bool,
    /// Raw `UFFDIO_WRITEPROTECT` calls issued (retries and rollback included).
    pub raw_calls: u32,
    /// Bytes whose state was read back from the page tables.
    pub read_back_bytes: u64,
    /// With `skip_pinned`: long-term pinned bytes of the monitored process that no known source
    /// explains ([`Mm::unexplained_pinned_bytes`]), plus pinned bytes the kernel reported that
    /// the engine could not place (none, with a kernel that counts only the pages it left
    /// without the bit, as the patch series does: kept as a guard). Non-zero
    /// means `skipped` may be incomplete: some pinned page of the request may be reported
    /// protected although a device can write it.
    pub unexplained_pinned_bytes: u64,
    /// Which path made the report exact, the kernel's own figures, and which source named
    /// each skipped page.
    pub provenance: Provenance,
}

/// Which path made a [`WpReport`] exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exactness {
    /// Kernels without the report (every released one): one raw `UFFDIO_WRITEPROTECT` per
    /// 1 GiB PUD, a clean return trusted only where it is exact by construction, the rest read
    /// back.
    #[default]
    ReadBack,
    /// `UFFDIO_WRITEPROTECT_REPORT`: the kernel's `done` prefix (read back only where a clean
    /// return could not be trusted either, and after a failure past the prefix).
    KernelReport,
}

/// What `UFFDIO_WRITEPROTECT_REPORT` answered over a whole [`write_protect`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFigures {
    /// Report calls issued (retries included).
    pub calls: u32,
    /// Bytes the kernel said are protected (sum of `done` over the calls).
    pub done: u64,
    /// Pinned bytes the kernel left writable (sum of `pinned`).
    pub pinned: u64,
    /// The errno of the call that failed last, if any.
    #[serde(with = "crate::sys::errno_serde::option")]
    pub errno: Option<Errno>,
    /// Where that call said the protection stopped (`start + done`).
    pub stop: Option<u64>,
}

/// How a [`WpReport`] was obtained.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The path.
    pub exactness: Exactness,
    /// With [`Exactness::KernelReport`]: the kernel's figures.
    pub kernel: Option<KernelFigures>,
    /// Skipped pages the application declared pinned ([`Pins::declared_pinned`]).
    pub skipped_declared: RangeSet,
    /// Skipped pages the backend found pinned by itself (io_uring buffers on Linux, the true
    /// pin counts in the model).
    pub skipped_discovered: RangeSet,
    /// Skipped pages the kernel left writable (`MODE_SKIP_PINNED`).
    pub skipped_kernel: RangeSet,
}

impl WpReport {
    /// The seed's figure: bytes of the request not write-protected, skipped pages counting as
    /// protected.
    pub fn bytes_not_protected(&self) -> u64 {
        self.not_protected.bytes()
    }

    /// Whether every page of the request is protected or skipped.
    pub fn complete(&self) -> bool {
        self.not_protected.is_empty()
    }

    /// The report JSON of shared/design.md: offsets relative to the request's start.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("report serializes")
    }
}

impl Serialize for WpReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let base = self.requested.start();
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("op", &self.op)?;
        m.serialize_entry("requested", &[0, self.requested.len()])?;
        m.serialize_entry("protected", &self.protected.offsets_from(base))?;
        m.serialize_entry("skipped", &self.skipped.offsets_from(base))?;
        m.serialize_entry("not_protected", &self.not_protected.offsets_from(base))?;
        m.serialize_entry("bytes_not_protected", &self.bytes_not_protected())?;
        let err = self.error.as_ref().map(|e| {
            serde_json::json!({
                "kind": e.kind(),
                "errno": errno_name(e.errno()),
                "offset": e.addr().saturating_sub(base),
                "message": e.to_string(),
            })
        });
        m.serialize_entry("error", &err)?;
        m.serialize_entry("rolled_back", &self.rolled_back)?;
        m.serialize_entry("raw_calls", &self.raw_calls)?;
        m.serialize_entry("read_back_bytes", &self.read_back_bytes)?;
        m.serialize_entry("unexplained_pinned_bytes", &self.unexplained_pinned_bytes)?;
        let p = &self.provenance;
        m.serialize_entry("exactness", &p.exactness)?;
        m.serialize_entry(
            "kernel",
            &p.kernel.map(|k| {
                serde_json::json!({
                    "call": "UFFDIO_WRITEPROTECT_REPORT",
                    "calls": k.calls,
                    "done": k.done,
                    "pinned": k.pinned,
                    "errno": k.errno.map(errno_name),
                    "stop_offset": k.stop.map(|a| a.saturating_sub(base)),
                })
            }),
        )?;
        m.serialize_entry(
            "skipped_by",
            &serde_json::json!({
                "declared": p.skipped_declared.offsets_from(base),
                "discovered": p.skipped_discovered.offsets_from(base),
                "kernel": p.skipped_kernel.offsets_from(base),
            }),
        )?;
        m.end()
    }
}

/// Validates a `(start, len)` request into a [`Range`].
pub fn check_range(op: WpOp, start: u64, len: u64) -> Result<Range, WpError> {
    Range::new(start, len).map_err(|source| WpError::InvalidRange {
        op,
        start,
        len,
        source,
    })
}

/// State shared by the protect and un-protect walks.
struct Walk<'a, M: Mm + ?Sized> {
    mm: &'a M,
    op: WpOp,
    raw_calls: u32,
    read_back_bytes: u64,
    /// With the kernel's report: its figures so far.
    kernel: Option<KernelFigures>,
    /// Pages the kernel left writable because pinned (located by reading the prefix back).
    kernel_skipped: RangeSet,
    /// Pinned bytes the kernel reported that were not found left writable.
    kernel_unlocated: u64,
}

/// What [`write_protect`] decided before its first raw call.
struct Plan {
    /// Pinned pages left writable (`skip_pinned`), declared or discovered.
    skipped: RangeSet,
    /// The declared part of `skipped`.
    skipped_declared: RangeSet,
    /// With `skip_pinned`: [`Mm::unexplained_pinned_bytes`] after reading the pins.
    unexplained_pinned_bytes: u64,
    /// Rollback policy: the protected pages of the targets before this call.
    before: Option<RangeSet>,
    /// The pages to protect, one raw call each: cut at every PUD boundary, or whole when the
    /// kernel reports.
    chunks: Vec<Range>,
    /// Which path.
    exactness: Exactness,
    /// Ask the kernel to skip pinned pages too (`MODE_SKIP_PINNED`).
    kernel_skip_pinned: bool,
}

impl<'a, M: Mm + ?Sized> Walk<'a, M> {
    fn new(mm: &'a M, op: WpOp) -> Self {
        Walk {
            mm,
            op,
            raw_calls: 0,
            read_back_bytes: 0,
            kernel: None,
            kernel_skipped: RangeSet::new(),
            kernel_unlocated: 0,
        }
    }

    fn raw(&mut self, r: Range, mode: WpMode) -> Result<(), Errno> {
        self.raw_calls += 1;
        self.mm.writeprotect(r, mode)
    }

    /// One `UFFDIO_WRITEPROTECT_REPORT` protect call, its figures added up.
    fn raw_report(&mut self, r: Range, skip_pinned: bool) -> KernelReport {
        self.raw_calls += 1;
        let ans = self.mm.writeprotect_report(r, WpMode::Protect, skip_pinned);
        let k = self.kernel.get_or_insert_with(KernelFigures::default);
        k.calls += 1;
        k.done += ans.done;
        k.pinned += ans.pinned;
        if let Err(e) = ans.result {
            k.errno = Some(e);
            k.stop = Some(ans.stop(r));
        }
        ans
    }

    /// The protected pages of `r`, read from the page tables.
    fn read_back(&mut self, r: Range) -> Result<RangeSet, WpError> {
        self.read_back_bytes += r.len();
        self.mm.wp_pages(r).map_err(|errno| WpError::ReadBack {
            op: self.op,
            range: r,
            errno,
        })
    }

    fn read_back_set(&mut self, set: &RangeSet) -> Result<RangeSet, WpError> {
        let mut out = RangeSet::new();
        for r in set.iter() {
            out.extend(&self.read_back(*r)?);
        }
        Ok(out)
    }

    /// Whether a clean return over `chunk` (within one PUD, or a prefix the kernel reported)
    /// means every page is protected.
    fn clean_return_is_exact(&self, chunk: Range) -> bool {
        self.mm.features().contains(Features::WP_UNPOPULATED)
            && self.mm.fully_mapped(chunk).unwrap_or(false)
    }

    /// Protect, phase 1: checks that the uffd can write-protect, then plans the pinned pages
    /// to skip, the prior state a rollback needs, the path and the chunks.
    fn plan(&mut self, range: Range, opts: &WpOptions) -> Result<Plan, WpError> {
        let op = self.op;
        let features = self.mm.features();
        if !features.contains(Features::PAGEFAULT_FLAG_WP) {
            return Err(WpError::Unsupported {
                op,
                addr: range.start(),
                missing: Features::PAGEFAULT_FLAG_WP,
            });
        }
        let (skipped, unexplained_pinned_bytes) = if opts.skip_pinned {
            let pinned =
                self.mm
                    .pinned(range)
                    .map_err(|errno| WpError::ReadBack { op, range, errno })?;
            (pinned, self.mm.unexplained_pinned_bytes())
        } else {
            (RangeSet::new(), 0)
        };
        let targets = RangeSet::single(range).difference(&skipped);
        let before = match opts.on_error {
            OnError::Rollback => Some(self.read_back_set(&targets)?),
            _ => None,
        };
        let (exactness, chunks) = if features.contains(Features::WP_REPORT) {
            self.kernel = Some(KernelFigures::default());
            (Exactness::KernelReport, targets.iter().copied().collect())
        } else {
            let split = targets.iter().flat_map(|t| t.split_at_multiples(PUD_SIZE));
            (Exactness::ReadBack, split.collect())
        };
        Ok(Plan {
            skipped_declared: self.mm.declared_pinned(range).intersection(&skipped),
            skipped,
            unexplained_pinned_bytes,
            before,
            chunks,
            exactness,
            kernel_skip_pinned: opts.skip_pinned && features.contains(Features::WP_SKIP_PINNED),
        })
    }

    /// Protect, phase 2: one raw call per chunk (with the retry policy) until one fails.
    /// Returns the pages protected, verified, the first failure, and how many chunks were
    /// attempted.
    fn protect_chunks(
        &mut self,
        plan: &Plan,
        policy: OnError,
    ) -> Result<(RangeSet, Option<WpError>, usize), WpError> {
        let mut protected = RangeSet::new();
        for (i, &chunk) in plan.chunks.iter().enumerate() {
            let (now, error) = match plan.exactness {
                Exactness::ReadBack => self.protect_chunk(chunk, policy)?,
                Exactness::KernelReport => {
                    self.protect_reported(chunk, policy, plan.kernel_skip_pinned)?
                }
            };
            protected.extend(&now);
            if error.is_some() {
                return Ok((protected, error, i + 1));
            }
        }
        Ok((protected, None, plan.chunks.len()))
    }

    /// One chunk (within one PUD) through `UFFDIO_WRITEPROTECT`: a clean return is trusted
    /// only where it is exact by construction, otherwise the chunk is read back.
    fn protect_chunk(
        &mut self,
        chunk: Range,
        policy: OnError,
    ) -> Result<(RangeSet, Option<WpError>), WpError> {
        match with_retry(policy, || self.raw(chunk, WpMode::Protect)) {
            Ok(()) if self.clean_return_is_exact(chunk) => Ok((RangeSet::single(chunk), None)),
            Ok(()) => Ok((self.read_back(chunk)?, None)),
            Err(errno) => {
                let (now, error) = self.read_back_failed(chunk, errno)?;
                Ok((now, Some(error)))
            }
        }
    }

    /// One chunk through `UFFDIO_WRITEPROTECT_REPORT`: the reported prefix is taken as the
    /// kernel says ([`Walk::accept_prefix`]); a retry resumes at `start + done`; after a
    /// failure only the part past the prefix is read back.
    fn protect_reported(
        &mut self,
        chunk: Range,
        policy: OnError,
        skip_pinned: bool,
    ) -> Result<(RangeSet, Option<WpError>), WpError> {
        let (mut left, mut backoff) = retry_budget(policy);
        let mut protected = RangeSet::new();
        let mut cur = chunk;
        loop {
            let ans = self.raw_report(cur, skip_pinned);
            if let Some(p) = ans.prefix(cur) {
                protected.extend(&self.accept_prefix(p, ans.pinned)?);
            }
            match (ans.result, ans.rest(cur)) {
                (Ok(()), None) => return Ok((protected, None)),
                // Success covers the whole range; a kernel that says less is read back.
                (Ok(()), Some(rest)) => {
                    protected.extend(&self.read_back(rest)?);
                    return Ok((protected, None));
                }
                (Err(e), Some(rest)) if left > 0 && FailureKind::of(e).retryable() => {
                    left -= 1;
                    std::thread::sleep(backoff);
                    backoff = backoff.saturating_mul(2);
                    cur = rest;
                }
                (Err(errno), Some(rest)) => {
                    let (now, error) = self.read_back_failed(rest, errno)?;
                    protected.extend(&now);
                    return Ok((protected, Some(error)));
                }
                (Err(errno), None) => {
                    return Ok((protected, Some(self.kernel_error(errno, cur.end()))));
                }
            }
        }
    }

    /// The protected pages of a `prefix` the kernel reported done, with `pinned` bytes of it
    /// left writable: the prefix itself when a clean return there is exact and nothing was
    /// skipped; otherwise read back, the present pages without the bit being the ones the
    /// kernel skipped as pinned.
    fn accept_prefix(&mut self, prefix: Range, pinned: u64) -> Result<RangeSet, WpError> {
        if pinned == 0 {
            return if self.clean_return_is_exact(prefix) {
                Ok(RangeSet::single(prefix))
            } else {
                self.read_back(prefix)
            };
        }
        self.read_back_bytes += prefix.len();
        let op = self.op;
        let states = self
            .mm
            .page_states(prefix)
            .map_err(|errno| WpError::ReadBack {
                op,
                range: prefix,
                errno,
            })?;
        let writable = pages_where(prefix, &states, |s| s.present && !s.uffd_wp);
        self.kernel_unlocated += pinned.saturating_sub(writable.bytes());
        self.kernel_skipped.extend(&writable);
        Ok(pages_where(prefix, &states, |s| s.uffd_wp))
    }

    fn kernel_error(&self, errno: Errno, addr: u64) -> WpError {
        WpError::Kernel {
            op: self.op,
            kind: FailureKind::of(errno),
            errno,
            addr,
        }
    }

    /// Protect, phase 2, when the raw call over `chunk` failed with `errno`: the chunk's
    /// protected pages, read back, and the error at its first page left unprotected.
    fn read_back_failed(
        &mut self,
        chunk: Range,
        errno: Errno,
    ) -> Result<(RangeSet, WpError), WpError> {
        // If the state cannot even be read (a range past the task size, a dead process), the
        // kernel's own error is the one that explains it.
        let now = self
            .read_back(chunk)
            .map_err(|_| self.kernel_error(errno, chunk.start()))?;
        let addr = now
            .complement_in(chunk)
            .first_addr()
            .unwrap_or(chunk.start());
        Ok((now, self.kernel_error(errno, addr)))
    }

    /// Protect, phase 4 (rollback policy, after a failure): un-protects every page this call
    /// protected (`protected` but not `before`), one raw call per PUD at most. Returns what is
    /// still protected.
    fn roll_back(
        &mut self,
        mut protected: RangeSet,
        before: &RangeSet,
    ) -> Result<RangeSet, WpError> {
        let ours = protected.difference(before);
        for r in ours.iter() {
            for part in r.split_at_multiples(PUD_SIZE) {
                if self
                    .raw(part, WpMode::Unprotect { dontwake: false })
                    .is_err()
                {
                    // Un-protecting never allocates; if it still fails, the state is read back.
                    let still = self.read_back(part)?;
                    protected = protected.difference(&RangeSet::single(part)).union(&still);
                    continue;
                }
                protected = protected.difference(&RangeSet::single(part));
            }
        }
        Ok(protected)
    }
}

/// The retry policy's extra attempts and first sleep (none for the other policies).
fn retry_budget(policy: OnError) -> (u32, Duration) {
    match policy {
        OnError::Retry { attempts, backoff } => (attempts, backoff),
        _ => (0, Duration::ZERO),
    }
}

/// Runs `call` with the retry policy; returns the last error if it never succeeded.
fn with_retry(policy: OnError, mut call: impl FnMut() -> Result<(), Errno>) -> Result<(), Errno> {
    let (mut left, mut backoff) = retry_budget(policy);
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(e) if left > 0 && FailureKind::of(e).retryable() => {
                left -= 1;
                std::thread::sleep(backoff);
                backoff = backoff.saturating_mul(2);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Write-protects `range` and reports exactly what is protected. See the module docs.
///
/// Returns `Err` only when nothing at all is protected or skipped and something failed;
/// otherwise `Ok` with `error` naming the first failure.
pub fn write_protect<M: Mm + ?Sized>(
    mm: &M,
    range: Range,
    opts: &WpOptions,
) -> Result<WpReport, WpError> {
    let op = WpOp::Protect;
    let mut w = Walk::new(mm, op);
    let plan = w.plan(range, opts)?;
    let (mut protected, error, attempted) = w.protect_chunks(&plan, opts.on_error)?;
    // Phase 3: chunks never attempted keep whatever state they had: read it.
    let rest = RangeSet::from_ranges(plan.chunks[attempted..].iter().copied());
    protected.extend(&w.read_back_set(&rest)?);
    let mut rolled_back = false;
    if let (Some(before), Some(_)) = (&plan.before, &error) {
        protected = w.roll_back(protected, before)?;
        rolled_back = true;
    }

    let skipped = plan.skipped.union(&w.kernel_skipped);
    let not_protected = RangeSet::single(range)
        .difference(&protected)
        .difference(&skipped);
    let provenance = Provenance {
        exactness: plan.exactness,
        kernel: w.kernel,
        skipped_discovered: plan.skipped.difference(&plan.skipped_declared),
        skipped_declared: plan.skipped_declared,
        skipped_kernel: w.kernel_skipped,
    };
    let report = WpReport {
        op,
        requested: range,
        protected,
        skipped,
        not_protected,
        error,
        rolled_back,
        raw_calls: w.raw_calls,
        read_back_bytes: w.read_back_bytes,
        unexplained_pinned_bytes: plan.unexplained_pinned_bytes + w.kernel_unlocated,
        provenance,
    };
    match &report.error {
        Some(e) if report.protected.is_empty() && report.skipped.is_empty() => Err(e.clone()),
        _ => Ok(report),
    }
}

/// Clears write protection on `range` and wakes threads blocked on it. Same report shape as
/// [`write_protect`]: on success `protected` is empty. Un-protecting never allocates page tables,
/// so a clean return is trusted; after a failure the failed chunk and the rest are read back.
pub fn unprotect<M: Mm + ?Sized>(
    mm: &M,
    range: Range,
    on_error: OnError,
) -> Result<WpReport, WpError> {
    let op = WpOp::Unprotect;
    let mut w = Walk::new(mm, op);
    let chunks: Vec<Range> = range.split_at_multiples(PUD_SIZE).collect();
    let mut protected = RangeSet::new();
    let mut error = None;
    let mut done = 0;
    for (i, &chunk) in chunks.iter().enumerate() {
        done = i + 1;
        let res = with_retry(on_error, || {
            w.raw(chunk, WpMode::Unprotect { dontwake: false })
        });
        if let Err(errno) = res {
            let failed = WpError::Kernel {
                op,
                kind: FailureKind::of(errno),
                errno,
                addr: chunk.start(),
            };
            let still = w.read_back(chunk).map_err(|_| failed)?;
            let addr = still.first_addr().unwrap_or(chunk.start());
            protected.extend(&still);
            error = Some(WpError::Kernel {
                op,
                kind: FailureKind::of(errno),
                errno,
                addr,
            });
            break;
        }
    }
    let rest = RangeSet::from_ranges(chunks[done..].iter().copied());
    protected.extend(&w.read_back_set(&rest)?);
    let not_protected = RangeSet::single(range).difference(&protected);
    let report = WpReport {
        op,
        requested: range,
        protected,
        skipped: RangeSet::new(),
        not_protected,
        error,
        rolled_back: false,
        raw_calls: w.raw_calls,
        read_back_bytes: w.read_back_bytes,
        unexplained_pinned_bytes: 0,
        provenance: Provenance::default(),
    };
    match &report.error {
        // Nothing un-protected at all: the whole request is still protected.
        Some(e) if report.not_protected.is_empty() => Err(e.clone()),
        _ => Ok(report),
    }
}

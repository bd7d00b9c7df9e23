//! Built-in scenarios: small, reproducible situations that show what the exact engine reports
//! where the raw ioctl says little or nothing, run on any backend through a [`Lab`].
//!
//! A [`Lab`] is a backend plus the few set-up operations scenarios need (map, punch a hole,
//! touch pages) and an independent read-back of the uffd-wp bit used to verify every report.
//! Each step's result carries what the raw kernel calls returned beside the exact report.

mod builtin;

use serde::Serialize;
use serde::ser::SerializeMap;

pub use builtin::{PINNED_BUFFER, PINNED_PAGES, PINNED_WRITE_PAGE, SCENARIOS, Scenario, find};

use crate::inject::{InjectMm, Rule};
use crate::mm::{Errno, Mm};
use crate::protect::{WpError, WpOp, WpReport};
use crate::range::{Range, RangeSet};
use crate::sys::errno_name;

/// What backs a lab mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Private anonymous memory, THP off (4 KiB pages).
    Anon,
    /// Private anonymous memory with `MADV_HUGEPAGE`.
    AnonThp,
    /// A shared memfd (shmem).
    Memfd,
}

/// How to open a lab's uffd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabConfig {
    /// Negotiate `WP_UNPOPULATED` (markers for unpopulated pages).
    pub wp_unpopulated: bool,
    /// Negotiate `WP_ASYNC` too (dirty tracking): the kernel resolves WP faults itself.
    pub async_wp: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            wp_unpopulated: true,
            async_wp: false,
        }
    }
}

/// Why a scenario could not run or failed outside what it measures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScenarioError {
    /// No scenario has this name.
    #[error("unknown scenario {name:?}; `uffd-wp scenario --list` lists them")]
    Unknown {
        /// The name given.
        name: String,
    },
    /// The backend cannot run it (missing kernel feature, not root, ...).
    #[error("scenario {scenario} cannot run on {backend}: {why}")]
    Unavailable {
        /// Scenario.
        scenario: String,
        /// Backend.
        backend: String,
        /// The reason, naming what is missing.
        why: String,
    },
    /// A set-up operation failed.
    #[error("scenario set-up: {what}: {}", errno_name(*errno))]
    Setup {
        /// What was being done.
        what: String,
        /// The errno.
        errno: Errno,
    },
}

impl ScenarioError {
    /// A set-up error.
    pub fn setup(what: impl Into<String>) -> impl FnOnce(Errno) -> ScenarioError {
        let what = what.into();
        move |errno| ScenarioError::Setup { what, errno }
    }
}

/// A backend plus set-up operations, for scenarios. Its [`Mm`] is wrapped in an [`InjectMm`]
/// so that scenarios can inject failures and see every raw call.
pub trait Lab {
    /// The backend, behind the injection wrapper.
    fn mm(&self) -> &dyn Mm;
    /// The same backend as a shared handle, for engines that keep it (the dirty tracker's
    /// handler thread).
    fn mm_arc(&self) -> std::sync::Arc<dyn Mm>;
    /// Adds an injection rule.
    fn inject(&self, rule: Rule);
    /// Removes all injection rules and forgets the call log.
    fn reset_injection(&self);
    /// The raw write-protect calls since the last reset: (errno or None, injected).
    fn raw_results(&self) -> Vec<(Option<Errno>, bool)>;
    /// Maps `len` bytes aligned to `align`.
    fn map(&mut self, len: u64, align: u64, kind: MapKind) -> Result<Range, ScenarioError>;
    /// Unmaps part of a mapping, leaving a hole.
    fn punch(&mut self, r: Range) -> Result<(), ScenarioError>;
    /// Writes every page of `r` (populates it).
    fn touch(&mut self, r: Range) -> Result<(), ScenarioError>;
    /// The uffd-wp pages of `r`, read by a path independent of the engine's read-back
    /// (on Linux: `/proc/self/pagemap` bit 57, even where the engine uses `PAGEMAP_SCAN`).
    fn verify_wp(&self, r: Range) -> Result<RangeSet, ScenarioError>;

    /// Pins `r` (inside one lab mapping) the way an application's io_uring fixed buffer is:
    /// a long-term, writable pin (`FOLL_WRITE | FOLL_LONGTERM`, on Linux
    /// `IORING_REGISTER_BUFFERS`), held until the lab is dropped. The backend's
    /// [`Mm::pinned`] must find it by itself (on Linux: in `/proc/self/fdinfo`), as it would
    /// an application's.
    fn pin_fixed_buffer(&mut self, r: Range) -> Result<(), ScenarioError> {
        let _ = r;
        Err(self.no_pins())
    }

    /// Writes `data` at `addr`, inside a buffer pinned with [`Lab::pin_fixed_buffer`], through
    /// the pin the way the kernel or a device does (on Linux: `IORING_OP_READ_FIXED` from a
    /// file), never through the page tables; serves any uffd-wp fault it raises.
    fn write_through_pin(&mut self, addr: u64, data: &[u8]) -> Result<PinWrite, ScenarioError> {
        let _ = (addr, data);
        Err(self.no_pins())
    }

    /// The error of a lab without pins.
    fn no_pins(&self) -> ScenarioError {
        ScenarioError::Unavailable {
            scenario: "pinned-io-uring".into(),
            backend: self.mm().backend().into(),
            why: "this lab cannot pin memory (Lab::pin_fixed_buffer)".into(),
        }
    }
}

/// What a write through a pin did ([`Lab::write_through_pin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinWrite {
    /// Bytes the I/O reported written into memory.
    pub bytes: u64,
    /// Whether memory now holds the data written.
    pub landed: bool,
    /// uffd-wp faults raised by the write (each was served so the write could finish).
    pub wp_faults: u32,
}

/// Opens labs on one backend.
pub trait LabFactory {
    /// `"linux"` or `"model"`.
    fn backend(&self) -> &'static str;
    /// The model's semantics (`"linux"` or `"proposed"`), or `None` for the real kernel.
    fn semantics(&self) -> Option<&'static str> {
        None
    }
    /// A fresh lab.
    fn open(&self, cfg: LabConfig) -> Result<Box<dyn Lab>, ScenarioError>;

    /// The `lost-enomem` scenario: the kernel returns success from `UFFDIO_WRITEPROTECT` after a
    /// page-table allocation failure (mm/mprotect.c sums the -ENOMEM of one PUD with the pages
    /// changed in the next). It needs what a plain lab cannot give (on Linux: a memory cgroup and
    /// a child process; on the model: a page-table allocation budget), so each backend runs it
    /// its own way.
    fn lost_enomem(&self) -> Result<Vec<Step>, ScenarioError> {
        Err(ScenarioError::Unavailable {
            scenario: "lost-enomem".into(),
            backend: self.backend().into(),
            why: "not implemented for this backend".into(),
        })
    }
}

/// One step of a scenario.
#[derive(Debug, Clone)]
pub struct Step {
    /// Its label.
    pub label: String,
    /// The first failing raw call's errno (None if every raw call succeeded).
    pub kernel_errno: Option<Errno>,
    /// Whether that errno was injected.
    pub injected: bool,
    /// The exact report (for a call that returned `Err`, the state read back after it).
    pub report: WpReport,
    /// The report's `protected` equals the independent read-back.
    pub verified: bool,
    /// What the step shows, for people.
    pub note: String,
    /// Engine-specific results beyond the protection report (a snapshot's report, ...).
    pub detail: Option<serde_json::Value>,
}

impl Serialize for Step {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("step", &self.label)?;
        m.serialize_entry("kernel_errno", &self.kernel_errno.map(errno_name))?;
        m.serialize_entry("injected", &self.injected)?;
        m.serialize_entry("report", &self.report)?;
        m.serialize_entry("verified", &self.verified)?;
        m.serialize_entry("note", &self.note)?;
        if let Some(d) = &self.detail {
            m.serialize_entry("detail", d)?;
        }
        m.end()
    }
}

/// A scenario's full result.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Scenario name.
    pub scenario: String,
    /// `"linux"` or `"model"`.
    pub backend: String,
    /// Model semantics, when the backend is the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semantics: Option<String>,
    /// Page size.
    pub page_size: u64,
    /// The steps.
    pub results: Vec<Step>,
}

impl Outcome {
    /// Whether every step verified.
    pub fn all_verified(&self) -> bool {
        self.results.iter().all(|s| s.verified)
    }
}

/// Runs an engine call in a lab and turns its result into a verified [`Step`].
pub fn step(
    lab: &dyn Lab,
    label: &str,
    note: &str,
    range: Range,
    op: WpOp,
    result: Result<WpReport, WpError>,
) -> Result<Step, ScenarioError> {
    let raw = lab.raw_results();
    let first_err = raw.iter().find(|(e, _)| e.is_some()).copied();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let protected = lab.mm().wp_pages(range).map_err(ScenarioError::setup(
                "reading back the state after a failed call",
            ))?;
            WpReport {
                op,
                requested: range,
                not_protected: protected.complement_in(range),
                protected,
                skipped: RangeSet::new(),
                error: Some(e),
                rolled_back: false,
                raw_calls: raw.len() as u32,
                read_back_bytes: range.len(),
                unexplained_pinned_bytes: 0,
            }
        }
    };
    let truth = lab.verify_wp(range)?;
    lab.reset_injection();
    Ok(Step {
        label: label.to_string(),
        kernel_errno: first_err.and_then(|(e, _)| e),
        injected: first_err.is_some_and(|(_, i)| i),
        verified: truth == report.protected,
        report,
        note: note.to_string(),
        detail: None,
    })
}

/// Runs the scenario `name` on `factory`'s backend.
pub fn run(name: &str, factory: &dyn LabFactory) -> Result<Outcome, ScenarioError> {
    let sc = find(name).ok_or_else(|| ScenarioError::Unknown {
        name: name.to_string(),
    })?;
    let results = (sc.run)(factory)?;
    Ok(Outcome {
        scenario: name.to_string(),
        backend: factory.backend().to_string(),
        semantics: factory.semantics().map(str::to_string),
        page_size: crate::range::PAGE_SIZE,
        results,
    })
}

/// The raw results in an [`InjectMm`]'s log, for [`Lab::raw_results`].
pub fn raw_results_of<M: Mm>(mm: &InjectMm<M>) -> Vec<(Option<Errno>, bool)> {
    mm.calls()
        .iter()
        .map(|c| (c.result.err(), c.injected))
        .collect()
}

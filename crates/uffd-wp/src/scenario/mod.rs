//! Built-in scenarios: small, reproducible situations that show what the exact engine reports
//! where the raw ioctl says little or nothing, run on any backend through a [`Lab`].
//!
//! A [`Lab`] is a backend plus the few set-up operations scenarios need (map, punch a hole,
//! touch pages) and an independent read-back of the uffd-wp bit used to verify every report.
//! Each step's result carries what the raw kernel calls returned beside the exact report.

mod builtin;
pub mod limited;
pub mod lost_enomem;
pub mod raw;

use serde::Serialize;
use serde::ser::SerializeMap;

pub use builtin::{PINNED_BUFFER, PINNED_PAGES, PINNED_WRITE_PAGE, SCENARIOS, Scenario, find};

use crate::backend::linux::fail_nth::FailNth;
use crate::backend::linux::lab::LinuxLab;
use crate::engine::protect::{WpError, WpOp, WpReport};
use crate::range::{Range, RangeSet};
use crate::seam::Errno;
pub use crate::seam::lab::{Lab, LabConfig, LabError, MapKind, PinWrite};
use crate::sys::errno_name;

/// Why a scenario could not run or failed outside what it measures. Serializable, so a helper
/// process can send it whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, serde::Deserialize)]
pub enum ScenarioError {
    /// No scenario has this name.
    #[error("unknown scenario {name:?}; `uffd-wp scenario --list` lists them")]
    Unknown {
        /// The name given.
        name: String,
    },
    /// Its lab could not run it or failed to set it up.
    #[error(transparent)]
    Lab(#[from] LabError),
}

impl ScenarioError {
    /// A set-up error.
    pub fn setup(what: impl Into<String>) -> impl FnOnce(Errno) -> ScenarioError {
        let what = what.into();
        move |errno| LabError::Setup { what, errno }.into()
    }

    /// The backend cannot run `scenario`, for `why`.
    pub fn unavailable(scenario: &str, backend: &str, why: impl Into<String>) -> ScenarioError {
        LabError::Unavailable {
            scenario: scenario.into(),
            backend: backend.into(),
            why: why.into(),
        }
        .into()
    }
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

    /// Runs `s`, a scenario with [`Scenario::page_table_limits`], this backend's own way, or
    /// `None` to run it on [`LabFactory::open`]'s labs in this process (the default). The Linux
    /// labs can limit page-table allocations only in a process of their own ([`limited`]).
    fn run_limited(&self, s: &Scenario) -> Option<Result<Vec<Step>, ScenarioError>> {
        let _ = s;
        None
    }
}

/// Labs on the real kernel, in this process.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxLabs;

impl LabFactory for LinuxLabs {
    fn backend(&self) -> &'static str {
        "linux"
    }

    fn open(&self, cfg: LabConfig) -> Result<Box<dyn Lab>, ScenarioError> {
        Ok(Box::new(LinuxLab::open(cfg)?))
    }

    /// With the kernel's fault injection the limit is this thread's alone
    /// ([`crate::backend::linux::fail_nth`]): the scenario runs here; otherwise in a helper
    /// process inside a memory cgroup.
    fn run_limited(&self, s: &Scenario) -> Option<Result<Vec<Step>, ScenarioError>> {
        if FailNth::available() {
            return None;
        }
        Some(limited::run_in_helper(s))
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
                provenance: Default::default(),
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
    let own_way = (sc.page_table_limits > 0)
        .then(|| factory.run_limited(sc))
        .flatten();
    let results = match own_way {
        Some(r) => r?,
        None => (sc.run)(factory)?,
    };
    Ok(Outcome {
        scenario: name.to_string(),
        backend: factory.backend().to_string(),
        semantics: factory.semantics().map(str::to_string),
        page_size: crate::range::PAGE_SIZE,
        results,
    })
}

//! Scenarios that limit page-table allocations ([`Lab::limit_next_writeprotect`]), on Linux.
//!
//! A memory cgroup limits the whole process it holds, and a limited process that takes a
//! user-space page fault sleeps (v1, `oom_kill_disable`) or is OOM-killed. So the Linux labs
//! never limit the caller: [`run_in_helper`] checks that the scenario can run (root, the kernel
//! features, a memory cgroup controller, an executable serving the helper), creates one cgroup
//! per limited call the scenario makes ([`Scenario::page_table_limits`]), and re-executes its
//! own binary as a [`Kind::LimitedScenario`] helper. The helper ([`helper_main`]) runs the
//! scenario on [`LimitedLabs`], whose labs each take one of the cgroups, and answers its steps.
//! The parent kills the helper after [`HELPER_TIMEOUT`], or (v1) as soon as a cgroup reports
//! `under_oom 1` (the helper asleep in a page fault), and always removes the cgroups.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::linux::lab::LinuxLab;
use crate::backend::linux::memcg::{
    CGROUP_PREFIX, Cgroup, CgroupVersion, Limiter, MemoryController, find_memory_controller,
    remove_stale, shield_from_oom_killer,
};
use crate::engine::protect::{Provenance, WpError, WpOp, WpReport};
use crate::features::{self, Features};
use crate::helper::{self, Helper, HelperError, Kind, Parent};
use crate::range::{Range, RangeSet};
use crate::scenario::{Lab, LabConfig, LabFactory, Scenario, ScenarioError, Step, find};
use crate::seam::Errno;
use crate::seam::lab::LabError;
use crate::sys::errno_name;

/// How long the parent lets the helper run before killing it.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// What the parent tells the helper.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HelperConfig {
    /// The scenario to run.
    scenario: String,
    version: CgroupVersion,
    /// One cgroup per limited call, in the order the scenario's labs are opened.
    cgroups: Vec<PathBuf>,
}

fn unavailable(s: &Scenario, why: impl Into<String>) -> ScenarioError {
    ScenarioError::unavailable(s.name, "linux", why)
}

fn helper_failed(what: impl Into<String>) -> ScenarioError {
    ScenarioError::setup(what)(Errno::CHILD)
}

/// Runs `s` in a limited helper process (see the module docs).
pub fn run_in_helper(s: &Scenario) -> Result<Vec<Step>, ScenarioError> {
    let ctrl = check(s)?;
    remove_stale(&ctrl);
    let pid = std::process::id();
    let cgroups = (0..s.page_table_limits)
        .map(|i| Cgroup::create(&ctrl, &format!("{CGROUP_PREFIX}{pid}-{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = HelperConfig {
        scenario: s.name.into(),
        version: ctrl.version,
        cgroups: cgroups.iter().map(|c| c.path().to_path_buf()).collect(),
    };
    let steps = run_helper(&cfg, &cgroups);
    // The helper has exited (or was killed and reaped): the cgroups are empty.
    let removed = cgroups.into_iter().try_for_each(Cgroup::remove);
    let steps = steps?;
    removed?;
    Ok(steps)
}

/// Everything that can be checked before a cgroup is created: the memory controller found.
fn check(s: &Scenario) -> Result<MemoryController, ScenarioError> {
    if !helper::serves(Kind::LimitedScenario) {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "the current executable".into());
        return Err(unavailable(
            s,
            format!(
                "the limited part runs in a re-executed helper, and {exe} does not serve it: \
                 its main() must serve the {} helper (uffd_wp::helper::entry; a test harness \
                 does not; run the uffd-wp binary)",
                Kind::LimitedScenario.name()
            ),
        ));
    }
    let euid = rustix::process::geteuid();
    if !euid.is_root() {
        return Err(unavailable(
            s,
            format!(
                "needs root (to create a memory cgroup and move a process into it); running as \
                 uid {}",
                euid.as_raw()
            ),
        ));
    }
    let offered = features::kernel_features()
        .map_err(|e| unavailable(s, format!("no userfaultfd: {}", errno_name(e))))?;
    let needed = Features::PAGEFAULT_FLAG_WP.with(Features::WP_UNPOPULATED);
    if !offered.contains(needed) {
        return Err(unavailable(
            s,
            format!(
                "this kernel does not offer userfaultfd feature(s) {}",
                needed.without(offered).names().join(", ")
            ),
        ));
    }
    find_memory_controller().map_err(|why| unavailable(s, why))
}

/// Runs the helper and returns its steps. It is killed if it takes longer than
/// [`HELPER_TIMEOUT`] or if a limited cgroup goes under OOM (a user-space fault there would
/// wait forever).
fn run_helper(cfg: &HelperConfig, cgroups: &[Cgroup]) -> Result<Vec<Step>, ScenarioError> {
    let exe = Path::new("/proc/self/exe");
    let mut child = Helper::spawn(exe, &[], Kind::LimitedScenario, cfg)
        .map_err(|e| helper_failed(e.to_string()))?;
    let start = Instant::now();
    let outcome = loop {
        match child.recv::<Outcome>(Duration::from_millis(5)) {
            Ok(o) => break o,
            Err(HelperError::Timeout { .. }) => {}
            Err(e) => return Err(helper_failed(e.to_string())),
        }
        if start.elapsed() > HELPER_TIMEOUT {
            return Err(helper_failed(format!(
                "the {} helper did not finish within {} s and was killed",
                cfg.scenario,
                HELPER_TIMEOUT.as_secs()
            )));
        }
        if let Some(cg) = cgroups.iter().find(|cg| cg.under_oom()) {
            return Err(helper_failed(format!(
                "the {} helper took a user-space page fault while {} was limited \
                 (memory.oom_control: under_oom 1) and was killed",
                cfg.scenario,
                cg.path().display()
            )));
        }
    };
    child.kill(); // it exits after its answer; reaped here, so the cgroups are empty
    match outcome {
        Outcome::Steps(s) => Ok(s.into_iter().map(WireStep::into_step).collect()),
        Outcome::Failed(e) => Err(from_helper(e)),
    }
}

/// The helper's error, as the parent reports it.
fn from_helper(e: ScenarioError) -> ScenarioError {
    match e {
        ScenarioError::Lab(LabError::Setup { what, errno }) => {
            ScenarioError::setup(format!("in the limited helper: {what}"))(errno)
        }
        e => e,
    }
}

// ---------------------------------------------------------------------------------------------
// The helper.

/// Linux labs each able to limit page-table allocations through a cgroup of their own (the
/// next one of the helper's, in the order labs are opened).
#[derive(Debug)]
pub struct LimitedLabs {
    limiters: Mutex<Vec<Limiter>>,
}

impl LabFactory for LimitedLabs {
    fn backend(&self) -> &'static str {
        "linux"
    }

    fn open(&self, cfg: LabConfig) -> Result<Box<dyn Lab>, ScenarioError> {
        let lab = LinuxLab::open(cfg)?;
        let next = {
            let mut l = self.limiters.lock().expect("limiters");
            (!l.is_empty()).then(|| l.remove(0))
        };
        Ok(Box::new(match next {
            Some(l) => lab.with_limiter(l),
            None => lab,
        }))
    }
}

/// The helper ([`Kind::LimitedScenario`]): runs the scenario its parent names on
/// [`LimitedLabs`] and answers its steps (or its error) in one line; returns the exit code.
pub fn helper_main() -> i32 {
    let (mut parent, cfg) = match Parent::connect::<HelperConfig>() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("limited scenario helper: {e}");
            return 2;
        }
    };
    let outcome = match run_limited(&cfg) {
        Ok(steps) => Outcome::Steps(steps.iter().map(WireStep::of).collect()),
        Err(e) => Outcome::Failed(e),
    };
    if parent.send(&outcome) { 0 } else { 1 }
}

fn run_limited(cfg: &HelperConfig) -> Result<Vec<Step>, ScenarioError> {
    let s = find(&cfg.scenario).ok_or_else(|| ScenarioError::Unknown {
        name: cfg.scenario.clone(),
    })?;
    let limiters = cfg
        .cgroups
        .iter()
        .map(|p| Limiter::open(p, cfg.version))
        .collect::<Result<Vec<_>, _>>()?;
    if cfg.version == CgroupVersion::V2 {
        // No oom_kill_disable on v2: make the OOM killer find no victim, so the charge fails.
        shield_from_oom_killer()?;
    }
    let labs = LimitedLabs {
        limiters: Mutex::new(limiters),
    };
    (s.run)(&labs)
}

// ---------------------------------------------------------------------------------------------
// What the helper sends back.

#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
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
    injected: bool,
    op: WpOp,
    requested: Range,
    protected: RangeSet,
    skipped: RangeSet,
    not_protected: RangeSet,
    error: Option<WpError>,
    rolled_back: bool,
    raw_calls: u32,
    read_back_bytes: u64,
    unexplained_pinned_bytes: u64,
    provenance: Provenance,
    verified: bool,
    note: String,
    detail: Option<serde_json::Value>,
}

impl WireStep {
    fn of(s: &Step) -> Self {
        let r = s.report.clone();
        WireStep {
            label: s.label.clone(),
            kernel_errno: s.kernel_errno,
            injected: s.injected,
            op: r.op,
            requested: r.requested,
            protected: r.protected,
            skipped: r.skipped,
            not_protected: r.not_protected,
            error: r.error,
            rolled_back: r.rolled_back,
            raw_calls: r.raw_calls,
            read_back_bytes: r.read_back_bytes,
            unexplained_pinned_bytes: r.unexplained_pinned_bytes,
            provenance: r.provenance,
            verified: s.verified,
            note: s.note.clone(),
            detail: s.detail.clone(),
        }
    }

    fn into_step(self) -> Step {
        Step {
            label: self.label,
            kernel_errno: self.kernel_errno,
            injected: self.injected,
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
                unexplained_pinned_bytes: self.unexplained_pinned_bytes,
                provenance: self.provenance,
            },
            verified: self.verified,
            note: self.note,
            detail: self.detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protect::FailureKind;
    use crate::range::{PMD_SIZE, PUD_SIZE};

    #[test]
    fn unavailable_outside_a_serving_binary() {
        // The test harness serves no helper.
        let s = find("lost-enomem").expect("lost-enomem is a built-in scenario");
        match run_in_helper(s) {
            Err(ScenarioError::Lab(LabError::Unavailable { why, .. })) => {
                assert!(why.contains("serve the limited-scenario helper"), "{why}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn wire_round_trip() {
        let r = Range::new(PUD_SIZE, 2 * PUD_SIZE).unwrap();
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
                read_back_bytes: r.len(),
                unexplained_pinned_bytes: 0,
                provenance: Default::default(),
            },
            verified: true,
            note: "n".into(),
            detail: Some(serde_json::json!({"kernel_returned": {"errno": null}})),
        };
        let wire = serde_json::to_string(&WireStep::of(&step)).unwrap();
        let back = serde_json::from_str::<WireStep>(&wire).unwrap().into_step();
        assert_eq!(back.report, step.report);
        assert_eq!(back.kernel_errno, step.kernel_errno);
        assert_eq!(back.detail, step.detail);
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

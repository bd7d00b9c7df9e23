//! The model side of a case: the driver on a [`ModelLab`].

use uffd_wp::engine::protect::{OnError, WpOptions, write_protect};
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::seam::lab::Lab;
use uffd_wp_model::lab::ModelLab;
use uffd_wp_model::{ModelConfig, Semantics, ThpSysfs, UffdConfig};

use crate::arena::surroundings;
use crate::{Case, CaseObs};

/// A fresh model process with the kernel worker's surroundings (linux semantics, or proposed
/// where the case uses the report call; swap as the
/// case says, THP on madvise: this project's machines) and the case's features; the base of
/// the case's arena.
fn fresh(config: crate::CaseConfig) -> (ModelLab, u64) {
    let cfg = ModelConfig {
        semantics: if config.report {
            Semantics::Proposed
        } else {
            Semantics::Linux
        },
        swap: config.swap,
        thp: ThpSysfs::Madvise,
        thp_zero_page: true,
        soft_dirty: false,
    };
    let uffd = UffdConfig {
        features: config.features(),
        user_mode_only: false,
    };
    let mut lab = ModelLab::with_config(cfg, uffd).expect("the model offers every feature");
    let arenas = surroundings(&mut lab).expect("the model maps the surroundings");
    (lab, arenas.base(config))
}

/// Runs `case` on `lab` (arena at `base`), checking the model's invariants after every
/// operation.
fn run_on(lab: &mut ModelLab, base: u64, case: &Case) -> CaseObs {
    let model = lab.model().clone();
    crate::driver::run_case(lab, base, case, &mut || {
        if let Err(e) = model.check_invariants() {
            panic!("model invariant violated: {e}");
        }
    })
}

/// Runs a case on a fresh model process.
pub(crate) fn run(case: &Case) -> CaseObs {
    let (mut lab, base) = fresh(case.config);
    run_on(&mut lab, base, case)
}

/// The fuzz check: run the case (invariants checked after every operation), then the exact
/// engine over the whole arena.
pub(crate) fn fuzz(case: &Case, policy: u8) -> Result<(), String> {
    let (mut lab, base) = fresh(case.config);
    run_on(&mut lab, base, case);
    let arena = Range::from_bounds(base, base + crate::arena_pages(case.config.thp) * PAGE_SIZE);
    let opts = WpOptions {
        skip_pinned: policy & 1 != 0,
        on_error: match policy / 2 % 3 {
            0 => OnError::Stop,
            1 => OnError::Retry {
                attempts: 1,
                backoff: std::time::Duration::ZERO,
            },
            _ => OnError::Rollback,
        },
    };
    let truth_after = |lab: &ModelLab| lab.verify_wp(arena).expect("the model's page tables");
    match write_protect(lab.mm(), arena, &opts) {
        Ok(rep) => {
            let all = rep.protected.union(&rep.skipped).union(&rep.not_protected);
            if all != RangeSet::single(arena)
                || !rep.protected.intersection(&rep.not_protected).is_empty()
                || !rep.skipped.intersection(&rep.protected).is_empty()
            {
                return Err(format!("the report does not partition the arena: {rep:?}"));
            }
            let truth = truth_after(&lab);
            if rep.protected != truth {
                return Err(format!(
                    "report {:?} != page tables {truth:?}",
                    rep.protected
                ));
            }
        }
        Err(e) => {
            if !truth_after(&lab).is_empty() && matches!(opts.on_error, OnError::Rollback) {
                return Err(format!(
                    "Err({e}) after a rollback, yet pages are protected"
                ));
            }
        }
    }
    lab.model().check_invariants()
}

//! The `lost-enomem` scenario on the real kernel (memory cgroup + child process).

use crate::scenario::{ScenarioError, Step};

/// Runs it. See shared/kernel-notes.md, "A success can hide a hole".
pub fn run() -> Result<Vec<Step>, ScenarioError> {
    Err(ScenarioError::Unavailable {
        scenario: "lost-enomem".into(),
        backend: "linux".into(),
        why: "not built yet".into(),
    })
}

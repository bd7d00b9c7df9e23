//! Stopping the writers of the monitored address space at a consistent point.

/// Freezes and resumes the writers of the memory being captured.
pub trait Quiesce: Sync {
    /// Stops every writer at a consistent point; returns when they are stopped.
    fn freeze(&self);
    /// Lets them go on.
    fn resume(&self);
}

/// A [`Quiesce`] made of two closures.
pub struct FnQuiesce<F: Fn() + Sync, G: Fn() + Sync>(pub F, pub G);

impl<F: Fn() + Sync, G: Fn() + Sync> Quiesce for FnQuiesce<F, G> {
    fn freeze(&self) {
        (self.0)()
    }
    fn resume(&self) {
        (self.1)()
    }
}

impl<F: Fn() + Sync, G: Fn() + Sync> std::fmt::Debug for FnQuiesce<F, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnQuiesce")
    }
}

//! An error-injecting [`Mm`] wrapper, and a log of every raw write-protect call.
//!
//! The real kernel will not fail a page-table allocation on demand (a tight memory cgroup
//! OOM-kills or hangs the caller), so the failure policies are tested by wrapping the real
//! backend: a rule makes a chosen `UFFDIO_WRITEPROTECT` call really protect a chosen prefix of
//! its range (through the real kernel) and then return a chosen errno, exactly as a kernel that
//! failed part-way would. Everything else passes through untouched.

use std::sync::Mutex;

use crate::range::Range;
pub use crate::seam::lab::{Rule, Trigger};
use crate::seam::prelude::*;
use crate::seam::{Errno, KernelReport, WpMode, Wrap};

/// One raw write-protect call as seen by the wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// Its range.
    pub range: Range,
    /// Its mode.
    pub mode: WpMode,
    /// What it returned.
    pub result: Result<(), Errno>,
    /// Whether the result was injected.
    pub injected: bool,
    /// For a `UFFDIO_WRITEPROTECT_REPORT` call, its `(done, pinned)` (`None`: the old call).
    pub report: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<(Rule, u64, u32)>, // rule, matching calls seen, times fired
    calls: Vec<Call>,
    before_next: Option<Hook>,
    after_next: Option<Hook>,
}

/// What runs right before or right after the next raw call
/// ([`InjectMm::before_next_writeprotect`], [`InjectMm::after_next_writeprotect`]).
struct Hook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// [`Mm`] that forwards to `inner`, failing the calls its rules select.
#[derive(Debug)]
pub struct InjectMm<M> {
    inner: M,
    state: Mutex<State>,
}

impl<M: Mm> InjectMm<M> {
    /// Wraps a backend with no rule (a pure call log).
    pub fn new(inner: M) -> Self {
        InjectMm {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    /// Adds a rule.
    pub fn add_rule(&self, rule: Rule) {
        self.state
            .lock()
            .expect("inject lock")
            .rules
            .push((rule, 0, 0));
    }

    /// Runs `f` once, right before the next raw write-protect call enters the kernel, with
    /// nothing in between that allocates: how a lab arms a fault injection that counts the
    /// calling thread's allocations.
    pub fn before_next_writeprotect(&self, f: Box<dyn FnOnce() + Send>) {
        self.state.lock().expect("inject lock").before_next = Some(Hook(f));
    }

    /// Runs `f` once, right after the next raw write-protect call returns and before anything
    /// else (the call is logged after it): how a lab lifts a limit it put on that one call.
    pub fn after_next_writeprotect(&self, f: Box<dyn FnOnce() + Send>) {
        self.state.lock().expect("inject lock").after_next = Some(Hook(f));
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.state.lock().expect("inject lock").rules.clear();
    }

    /// The calls made so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().expect("inject lock").calls.clone()
    }

    /// Forgets the call log.
    pub fn clear_calls(&self) {
        self.state.lock().expect("inject lock").calls.clear();
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The raw results in the call log: (errno or None, injected), for
    /// [`crate::seam::lab::Lab::raw_results`].
    pub fn raw_results(&self) -> Vec<(Option<Errno>, bool)> {
        self.calls()
            .iter()
            .map(|c| (c.result.err(), c.injected))
            .collect()
    }

    /// The prefix of `r` to protect for real and the errno, if a rule fires for this call.
    fn fire(&self, st: &mut State, r: Range, mode: WpMode) -> Option<(Option<Range>, Errno)> {
        for (rule, seen, fired) in st.rules.iter_mut() {
            if rule.protect != mode.is_protect() || (rule.times != 0 && *fired >= rule.times) {
                continue;
            }
            *seen += 1;
            let hit = match rule.trigger {
                Trigger::Nth(n) => *seen == n,
                Trigger::Covers(a) => r.contains(a),
            };
            if !hit {
                continue;
            }
            *fired += 1;
            let prefix_end = match (rule.real_prefix, rule.trigger) {
                (Some(p), _) => r.start().saturating_add(p).min(r.end()),
                (None, Trigger::Covers(a)) => a & !(crate::range::PAGE_SIZE - 1),
                (None, Trigger::Nth(_)) => r.start(),
            };
            let prefix =
                (prefix_end > r.start()).then(|| Range::from_bounds(r.start(), prefix_end));
            return Some((prefix, rule.errno));
        }
        None
    }
}

impl<M: Mm> InjectMm<M> {
    /// One raw call of either kind through the rules: `call` is the inner backend's call
    /// (returning a [`KernelReport`]; the old ioctl's has no `done`), `report` whether the
    /// caller sees `done` and `pinned`. A firing rule has the inner backend really do the
    /// rule's prefix, then answers with the rule's errno and that prefix as `done`.
    fn raw_call(
        &self,
        r: Range,
        mode: WpMode,
        report: bool,
        call: impl Fn(Range) -> KernelReport,
    ) -> KernelReport {
        let mut st = self.state.lock().expect("inject lock");
        let fired = self.fire(&mut st, r, mode);
        if let Some(Hook(f)) = st.before_next.take() {
            f();
        }
        let (answer, injected) = match fired {
            Some((prefix, errno)) => {
                let real = prefix.map(&call).unwrap_or(KernelReport {
                    result: Ok(()),
                    done: 0,
                    pinned: 0,
                });
                // The real kernel does the part before the failure; if even that fails, the
                // real answer wins.
                match real.result {
                    Err(_) => (real, false),
                    Ok(()) => (
                        KernelReport {
                            result: Err(errno),
                            ..real
                        },
                        true,
                    ),
                }
            }
            None => (call(r), false),
        };
        if let Some(Hook(f)) = st.after_next.take() {
            f();
        }
        st.calls.push(Call {
            range: r,
            mode,
            result: answer.result,
            injected,
            report: report.then_some((answer.done, answer.pinned)),
        });
        answer
    }
}

impl<M: Mm> Wrap for InjectMm<M> {
    type Inner = M;
    fn inner(&self) -> &M {
        &self.inner
    }
    fn on_writeprotect(&self, r: Range, mode: WpMode) -> Result<(), Errno> {
        let old = |p: Range| KernelReport {
            result: self.inner.writeprotect(p, mode),
            done: 0,
            pinned: 0,
        };
        self.raw_call(r, mode, false, old).result
    }
    fn on_writeprotect_report(&self, r: Range, mode: WpMode, skip_pinned: bool) -> KernelReport {
        self.raw_call(r, mode, true, |p| {
            self.inner.writeprotect_report(p, mode, skip_pinned)
        })
    }
}

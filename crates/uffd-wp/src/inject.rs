//! An error-injecting [`Mm`] wrapper, and a log of every raw write-protect call.
//!
//! The real kernel will not fail a page-table allocation on demand (a tight memory cgroup
//! OOM-kills or hangs the caller), so the failure policies are tested by wrapping the real
//! backend: a rule makes a chosen `UFFDIO_WRITEPROTECT` call really protect a chosen prefix of
//! its range (through the real kernel) and then return a chosen errno, exactly as a kernel that
//! failed part-way would. Everything else passes through untouched.

use std::sync::Mutex;

use crate::features::Features;
use crate::mm::{Errno, Event, Mm, PageState, RegisterMode, ScanRequest, ScanResult, WpMode};
use crate::range::{Range, RangeSet};
use crate::sys::mem::Mapping;

/// Which raw call a rule fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The Nth write-protect call (1-based) of the matching mode, counted from the rule's
    /// creation.
    Nth(u64),
    /// Every call of the matching mode whose range contains this address.
    Covers(u64),
}

/// One injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Which call.
    pub trigger: Trigger,
    /// Only calls that set protection (true) or only calls that clear it (false).
    pub protect: bool,
    /// The errno returned.
    pub errno: Errno,
    /// Bytes of the call's range, from its start (or, with `Covers`, up to the covered address
    /// when `None`) that the real kernel protects before the failure is returned.
    pub real_prefix: Option<u64>,
    /// How many times the rule fires before it retires (for retry tests); 0 means forever.
    pub times: u32,
}

impl Rule {
    /// Fails the `n`th protect call with `errno` after really protecting its first
    /// `real_prefix` bytes.
    pub fn nth(n: u64, errno: Errno, real_prefix: u64) -> Rule {
        Rule {
            trigger: Trigger::Nth(n),
            protect: true,
            errno,
            real_prefix: Some(real_prefix),
            times: 1,
        }
    }

    /// Fails every protect call covering `addr` with `errno`, after really protecting the
    /// call's range up to `addr` (as the kernel does when it meets a failing VMA at `addr`).
    pub fn covering(addr: u64, errno: Errno) -> Rule {
        Rule {
            trigger: Trigger::Covers(addr),
            protect: true,
            errno,
            real_prefix: None,
            times: 0,
        }
    }

    /// The same rule, firing `times` times (0: forever).
    pub fn times(self, times: u32) -> Rule {
        Rule { times, ..self }
    }
}

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
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<(Rule, u64, u32)>, // rule, matching calls seen, times fired
    calls: Vec<Call>,
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

impl<M: Mm> Mm for InjectMm<M> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn features(&self) -> Features {
        self.inner.features()
    }
    fn register(&self, r: Range, mode: RegisterMode) -> Result<u64, Errno> {
        self.inner.register(r, mode)
    }
    fn unregister(&self, r: Range) -> Result<(), Errno> {
        self.inner.unregister(r)
    }
    fn writeprotect(&self, r: Range, mode: WpMode) -> Result<(), Errno> {
        let mut st = self.state.lock().expect("inject lock");
        let (result, injected) = match self.fire(&mut st, r, mode) {
            Some((prefix, errno)) => {
                if let Some(p) = prefix {
                    // The real kernel does the part before the failure; if even that fails, the
                    // real errno wins.
                    if let Err(e) = self.inner.writeprotect(p, mode) {
                        st.calls.push(Call {
                            range: r,
                            mode,
                            result: Err(e),
                            injected: false,
                        });
                        return Err(e);
                    }
                }
                (Err(errno), true)
            }
            None => (self.inner.writeprotect(r, mode), false),
        };
        st.calls.push(Call {
            range: r,
            mode,
            result,
            injected,
        });
        result
    }
    fn wake(&self, r: Range) -> Result<(), Errno> {
        self.inner.wake(r)
    }
    fn page_states(&self, r: Range) -> Result<Vec<PageState>, Errno> {
        self.inner.page_states(r)
    }
    fn wp_pages(&self, r: Range) -> Result<RangeSet, Errno> {
        self.inner.wp_pages(r)
    }
    fn scan(&self, req: &ScanRequest) -> Result<ScanResult, Errno> {
        self.inner.scan(req)
    }
    fn fully_mapped(&self, r: Range) -> Result<bool, Errno> {
        self.inner.fully_mapped(r)
    }
    fn pinned(&self, r: Range) -> Result<RangeSet, Errno> {
        self.inner.pinned(r)
    }
    fn unexplained_pinned_bytes(&self) -> u64 {
        self.inner.unexplained_pinned_bytes()
    }
    fn read_events(&self, max: usize) -> Result<Vec<Event>, Errno> {
        self.inner.read_events(max)
    }
    fn wait_event(&self, timeout_ms: i32) -> Result<bool, Errno> {
        self.inner.wait_event(timeout_ms)
    }
    fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.inner.read_memory(addr, buf)
    }
    fn read_memory_into(
        &self,
        addr: u64,
        dst: &Mapping,
        dst_addr: u64,
        len: u64,
    ) -> Result<(), Errno> {
        self.inner.read_memory_into(addr, dst, dst_addr, len)
    }
    fn clear_soft_dirty(&self) -> Result<(), Errno> {
        self.inner.clear_soft_dirty()
    }
}

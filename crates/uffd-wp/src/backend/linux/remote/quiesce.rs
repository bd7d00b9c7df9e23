//! Freezing the target for a snapshot's pause: [`RemoteQuiesce`], the [`Quiesce`] of another
//! process.
//!
//! Every thread listed in /proc/PID/task is seized and interrupted, the listing repeated until
//! a pass finds no new thread (a thread not yet stopped may create one), and each stop awaited.
//! Resuming detaches them all. A ptrace stop is undone by the kernel when the tracer dies,
//! which is what makes a monitor killed mid-snapshot leave the target running.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AttachError, NoObserver, Observer, Step};
use crate::backend::procfs::thread_ids;
use crate::seam::{Errno, Quiesce};
use crate::sys::ptrace::{self, WaitStatus};

/// How a [`RemoteQuiesce::try_freeze`] went.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct FreezeStats {
    /// Threads stopped.
    pub threads: usize,
    /// Passes over /proc/PID/task (more than 2 when threads were being created).
    pub passes: usize,
    /// Time to stop them all, microseconds.
    pub freeze_us: f64,
}

#[derive(Debug, Default)]
struct Frozen {
    /// The tracer thread (ptrace requests are only accepted from it).
    tracer: i32,
    /// Stopped threads, each with the signal to deliver when detaching it (0: none).
    threads: Vec<(i32, i32)>,
}

/// Freezes every thread of another process with ptrace (see the remote module docs). Must be
/// resumed from the thread that froze it ([`crate::engine::snapshot::take`] does both on its caller's
/// thread). Dropping it resumes a frozen target.
#[derive(Debug)]
pub struct RemoteQuiesce {
    pid: i32,
    frozen: Mutex<Option<Frozen>>,
    last_error: Mutex<Option<AttachError>>,
    last_stats: Mutex<FreezeStats>,
    obs: Arc<dyn Observer>,
}

/// Passes over /proc/PID/task before a freeze gives up (threads created without end).
const MAX_PASSES: usize = 1000;
/// How long one thread may take to stop (a thread in uninterruptible sleep stops only when it
/// leaves it).
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Waits for `tid`'s stop, leaving it unconsumed (a signal-delivery stop then keeps its
/// signal if this process dies: `ptrace::peek`); the stop's signal to pass on when detaching
/// (0: none); `Ok(None)` if the thread exited (reaped); `Err` if it did not stop in time.
fn await_stop(pid: i32, tid: i32) -> Result<Option<i32>, AttachError> {
    let until = Instant::now() + STOP_WAIT;
    loop {
        match ptrace::peek(tid, false) {
            Ok(Some(WaitStatus::Signal(s))) => return Ok(Some(s)),
            Ok(Some(WaitStatus::Event { .. })) => {
                // An epoll wait interrupted by the freeze would return EINTR: rewind it.
                if let Ok(r0) = ptrace::get_regs(tid) {
                    let _ = super::restart::rewind_eintr(pid, tid, &r0);
                }
                return Ok(Some(0));
            }
            Ok(Some(WaitStatus::SyscallStop)) => return Ok(Some(0)),
            Ok(Some(WaitStatus::Exited(_) | WaitStatus::Killed(_))) | Err(Errno::CHILD) => {
                let _ = ptrace::wait(tid);
                return Ok(None);
            }
            Ok(Some(WaitStatus::Other(_))) => {}
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_micros(20)),
            Ok(None) => return Err(AttachError::Timeout { pid, tid }),
            Err(e) => return Err(AttachError::from_errno(pid, tid, "waitid", e)),
        }
    }
}

/// Seizes and interrupts each of `new`; the threads seized (to await even on error), and the
/// first error. Zombies (the leader exited while other threads run) go to `zombies`.
fn seize_batch(
    pid: i32,
    new: Vec<i32>,
    zombies: &mut Vec<i32>,
) -> (Vec<i32>, Result<(), AttachError>) {
    let mut seized = Vec::new();
    for tid in new {
        match ptrace::seize(tid, 0) {
            Ok(()) => {}
            Err(Errno::SRCH) => continue, // the thread exited
            Err(Errno::PERM) if is_zombie(pid, tid) => {
                zombies.push(tid);
                continue;
            }
            Err(e) => {
                return (
                    seized,
                    Err(AttachError::from_errno(pid, tid, "PTRACE_SEIZE", e)),
                );
            }
        }
        match ptrace::interrupt(tid) {
            Ok(()) => seized.push(tid),
            Err(Errno::SRCH) => {}
            Err(e) => {
                let _ = ptrace::detach(tid, 0);
                return (
                    seized,
                    Err(AttachError::from_errno(pid, tid, "PTRACE_INTERRUPT", e)),
                );
            }
        }
    }
    (seized, Ok(()))
}

/// Whether thread `tid` has exited (zombie or gone).
fn is_zombie(pid: i32, tid: i32) -> bool {
    !matches!(crate::backend::procfs::thread_state(pid, tid), Some(s) if s != 'Z' && s != 'X')
}

/// Waits for every thread of `seized` to stop, recording it in `f`.
fn await_all(pid: i32, seized: Vec<i32>, f: &mut Frozen) -> Result<(), AttachError> {
    let mut res = Ok(());
    for tid in seized {
        match await_stop(pid, tid) {
            Ok(Some(sig)) => f.threads.push((tid, sig)),
            Ok(None) => {}
            Err(e) => res = res.and(Err(e)),
        }
    }
    res
}

impl RemoteQuiesce {
    /// A quiesce for process `pid` (nothing is done until [`Quiesce::freeze`]).
    pub fn new(pid: u32) -> RemoteQuiesce {
        Self::with_observer(pid, Arc::new(NoObserver))
    }

    /// A quiesce that calls `obs` at [`Step::Freezing`] (the first threads seized and
    /// interrupted) and [`Step::Frozen`] (all stopped); a cancel there resumes the target and
    /// the freeze fails with [`AttachError::Cancelled`].
    pub fn with_observer(pid: u32, obs: Arc<dyn Observer>) -> RemoteQuiesce {
        RemoteQuiesce {
            pid: pid as i32,
            frozen: Mutex::new(None),
            last_error: Mutex::new(None),
            last_stats: Mutex::new(FreezeStats::default()),
            obs,
        }
    }

    fn step(&self, s: Step) -> Result<(), AttachError> {
        self.obs.at(s).map_err(|_| AttachError::Cancelled {
            pid: self.pid,
            step: s,
        })
    }

    /// The error of the last [`Quiesce::freeze`] or [`Quiesce::resume`], if any (the trait's
    /// methods cannot return one; a failed freeze leaves the target running).
    pub fn last_error(&self) -> Option<AttachError> {
        self.last_error.lock().expect("quiesce lock").clone()
    }

    /// Statistics of the last successful freeze.
    pub fn last_stats(&self) -> FreezeStats {
        *self.last_stats.lock().expect("quiesce lock")
    }

    /// The threads stopped by the current freeze (none when not frozen), in the order they
    /// were stopped.
    pub fn frozen_threads(&self) -> Vec<i32> {
        self.frozen
            .lock()
            .expect("quiesce lock")
            .as_ref()
            .map_or_else(Vec::new, |f| f.threads.iter().map(|(t, _)| *t).collect())
    }

    /// Whether the target is frozen by this quiesce.
    pub fn is_frozen(&self) -> bool {
        self.frozen.lock().expect("quiesce lock").is_some()
    }

    /// Stops every thread of the target; on error, resumes what was stopped.
    pub fn try_freeze(&self) -> Result<FreezeStats, AttachError> {
        self.try_freeze_except(None)
    }

    /// Stops every thread of the target but `except` (none left is fine then); on error,
    /// resumes what was stopped.
    pub fn try_freeze_except(&self, except: Option<i32>) -> Result<FreezeStats, AttachError> {
        let mut g = self.frozen.lock().expect("quiesce lock");
        if g.is_some() {
            return Ok(self.last_stats());
        }
        let t0 = Instant::now();
        let mut f = Frozen {
            tracer: ptrace::gettid(),
            threads: Vec::new(),
        };
        let mut passes = 0;
        let mut zombies = Vec::new();
        let res = loop {
            passes += 1;
            match self.freeze_pass(except, passes, &mut f, &mut zombies) {
                Ok(true) => break Ok(()),
                Ok(false) if passes < MAX_PASSES => {}
                Ok(false) => {
                    break Err(AttachError::Timeout {
                        pid: self.pid,
                        tid: self.pid,
                    });
                }
                Err(e) => break Err(e),
            }
        };
        match res.and_then(|()| self.step(Step::Frozen)) {
            Ok(()) => {
                let stats = FreezeStats {
                    threads: f.threads.len(),
                    passes,
                    freeze_us: t0.elapsed().as_secs_f64() * 1e6,
                };
                *self.last_stats.lock().expect("quiesce lock") = stats;
                *g = Some(f);
                Ok(stats)
            }
            Err(e) => {
                detach_all(&f);
                Err(e)
            }
        }
    }

    /// One pass over /proc/PID/task: seizes and interrupts every thread not stopped yet (the
    /// whole batch first, so that they stop in parallel), then waits for their stops. `true`
    /// when there was none left.
    fn freeze_pass(
        &self,
        except: Option<i32>,
        pass: usize,
        f: &mut Frozen,
        zombies: &mut Vec<i32>,
    ) -> Result<bool, AttachError> {
        let pid = self.pid;
        let tids = thread_ids(pid).map_err(|_| AttachError::NoSuchProcess { pid })?;
        let new: Vec<i32> = tids
            .into_iter()
            .filter(|t| {
                !f.threads.iter().any(|(s, _)| s == t) && Some(*t) != except && !zombies.contains(t)
            })
            .collect();
        if new.is_empty() {
            if f.threads.is_empty() && except.is_none() {
                return Err(AttachError::NoSuchProcess { pid });
            }
            return Ok(true);
        }
        let (seized, seizing) = seize_batch(pid, new, zombies);
        // A cancel or error here still waits for the stops: only a stopped thread can be
        // detached.
        let cancel = if pass == 1 {
            self.step(Step::Freezing)
        } else {
            Ok(())
        };
        await_all(pid, seized, f)?;
        seizing.and(cancel).map(|()| false)
    }

    /// Detaches every stopped thread (they go on). A no-op when not frozen.
    pub fn try_resume(&self) -> Result<(), AttachError> {
        let Some(f) = self.frozen.lock().expect("quiesce lock").take() else {
            return Ok(());
        };
        if f.tracer != ptrace::gettid() {
            // Only the tracer thread may detach; its exit (or this process's) would.
            let tid = f.tracer;
            *self.frozen.lock().expect("quiesce lock") = Some(f);
            return Err(AttachError::Os {
                op: "resuming from a thread other than the one that froze",
                tid,
                errno: Errno::PERM,
            });
        }
        detach_all(&f);
        Ok(())
    }
}

fn detach_all(f: &Frozen) {
    for &(tid, sig) in &f.threads {
        // ESRCH: the thread was killed meanwhile; nothing else can fail for a stopped tracee.
        let _ = ptrace::detach(tid, sig);
    }
}

impl Quiesce for RemoteQuiesce {
    fn freeze(&self) {
        let r = self.try_freeze();
        *self.last_error.lock().expect("quiesce lock") = r.err();
    }

    fn resume(&self) {
        if let Err(e) = self.try_resume() {
            *self.last_error.lock().expect("quiesce lock") = Some(e);
        }
    }
}

impl Drop for RemoteQuiesce {
    fn drop(&mut self) {
        let _ = self.try_resume();
    }
}

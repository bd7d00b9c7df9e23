//! The ptrace injection: one thread of the target runs userfaultfd(2), this process takes the
//! new descriptor with pidfd_getfd(2), the thread closes its copy. The only code of the remote
//! backend that changes a thread's registers. Designed so that this process may die (SIGKILL)
//! at any instant without harming the target (docs/notes/issue9-ptrace-protocol.md).
//!
//! # Invariants
//!
//! - No single-step, ever: a dead tracer's single-step state survives it (`exit_ptrace()`
//!   never calls `ptrace_disable()`) and kills the target with SIGTRAP. Only
//!   `PTRACE_SYSCALL` stops, with `PTRACE_O_TRACESYSGOOD` (a syscall stop left by a dead
//!   tracer sends `SIGTRAP | 0x80`, which `send_sig_info()` rejects).
//! - Every stop is observed with `waitid(WNOWAIT)` ([`ptrace::peek`]): its `exit_code` stays,
//!   so an abandoned signal-delivery stop still delivers its signal (`ptrace_signal()`).
//! - Signals are passed through at once, never held back or re-sent.
//! - Injected registers are live only while a frame of the [safety net](super::net) on the
//!   thread's stack restores the thread's own state: if this process dies, the thread runs the
//!   injected call, returns to a `ret` that pops the restorer, and `rt_sigreturn(2)` restores
//!   it. Each register write is one `PTRACE_SETREGS` on a frozen tracee (atomic for it).
//!
//! # Steps ([`Step`])
//!
//! 0. Every other thread of the target is frozen ([`RemoteQuiesce`]): the fd table cannot
//!    change (so the fd userfaultfd(2) will return is the lowest free one), and no fork(2) can
//!    copy the injected fd.
//! 1. `PTRACE_SEIZE` (nothing queued), `PTRACE_INTERRUPT`, the `PTRACE_EVENT_STOP` in
//!    `get_signal()`: registers R0.
//! 2. a. R0 inside a system call that the kernel restarts (`-ERESTART*`) or that returned
//!    `-EINTR`: **ride** it: `PTRACE_SYSCALL` with R0 untouched, so the kernel's restart logic
//!    (and the restoring of a ppoll/pselect temporary signal mask) runs as for any signal, and
//!    the thread re-enters its call: a syscall-entry stop E at its own `syscall` S. An
//!    `epoll_wait` with no timeout that returned `-EINTR` because of the interrupt alone is
//!    first rewound to its `syscall` (`rip -= 2`, one SETREGS), so it never sees the EINTR.
//!    b. Otherwise (user code, or a call that completed): the state C = R0 (with `orig_rax`
//!    = -1) is one user code can be in; write the frame for C and point the thread at the
//!    restorer (one SETREGS): it enters `rt_sigreturn`, a syscall-entry stop E of our making.
//! 3. At E: the frame (if not written yet) restores C = "about to run its own call again"
//!    (`rip` = S, `rax` = the call; for `restart_syscall` the frame re-runs the original call,
//!    since rt_sigreturn resets the restart block); below it the chain `pop %rdi` (fd) /
//!    `pop %rax` (3) / `syscall` / `ret` into the restorer. One SETREGS substitutes
//!    `userfaultfd(flags)` for the call, returning into the chain.
//! 4. Its exit stop: the fd. `pidfd_getfd`. `PTRACE_SYSCALL`: the chain's close(fd), entry and
//!    exit stops.
//! 5. Close's exit stop: SETREGS(C) (so the restorer never runs on the normal path and the
//!    restart block stays intact), `PTRACE_DETACH`; the other threads are resumed.
//!
//! Errors and cancellation release the thread at its current stop: where the injected
//! registers are live and no fd is waiting to be closed, SETREGS(C) first; elsewhere the
//! thread's registers are its own (or a signal handler's, or the chain's, which lead back
//! into the net) and it is only detached.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::net::{Frame, Net};
use super::restart as kernel_restart;
use super::{AttachError, AttachReport, Observer, RemoteQuiesce, Step};
use crate::backend::procfs::{self, thread_ids, thread_state};
use crate::seam::Errno;
use crate::sys::ptrace::{self, Regs, SyscallInfo, WaitStatus, nr, restart};

/// How the injected calls reached a syscall-entry stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SyscallSite {
    /// The thread's own next system call (it was in a system call when interrupted).
    Ridden,
    /// The restorer's `rt_sigreturn`, the thread sent there from user code.
    Restorer,
}

/// How long a thread in a restartable call has to re-enter it before it is interrupted again.
const RIDE_WAIT: Duration = Duration::from_millis(20);
/// How long one thread may take to reach a usable stop at all.
const THREAD_WAIT: Duration = Duration::from_secs(2);
/// How long a release waits for the thread to stop.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Where the thread is, as far as this tracer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Resumed; no stop observed since.
    Running,
    /// At this (unconsumed) stop.
    Stopped(WaitStatus),
    /// It exited (reaped).
    Gone,
    /// Detached.
    Detached,
}

/// What step 2 found: the entry stop to substitute at.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The registers at the entry stop.
    regs: Regs,
    /// The thread's own state to restore (C).
    restore: Regs,
    /// The frame, when already written (step 2b).
    frame: Option<Frame>,
    /// For a `restart_syscall` entry: the original call, which the frame runs instead.
    net_call: Option<u64>,
    /// How the entry stop was reached.
    site: SyscallSite,
}

/// A thread seized by this thread; dropping it releases it (see the module docs).
#[derive(Debug)]
struct Tracee<'a> {
    pid: i32,
    tid: i32,
    state: State,
    net: Net,
    mem: &'a File,
    obs: &'a dyn Observer,
    /// The thread's own state, once injected registers may be live.
    restore: Option<Regs>,
    /// The frame, once written.
    frame: Option<Frame>,
    /// The fd the chain closes (predicted: the lowest free one).
    fd: i32,
    /// The injected fd exists in the target and the chain has not closed it yet.
    fd_pending: bool,
}

impl<'a> Tracee<'a> {
    /// Step 1: seizes and interrupts `tid`.
    fn seize(
        pid: i32,
        tid: i32,
        options: u32,
        net: Net,
        mem: &'a File,
        obs: &'a dyn Observer,
    ) -> Result<Tracee<'a>, AttachError> {
        ptrace::seize(tid, ptrace::O_TRACESYSGOOD | options)
            .map_err(|e| AttachError::from_errno(pid, tid, "PTRACE_SEIZE", e))?;
        let mut t = Tracee {
            pid,
            tid,
            state: State::Running,
            net,
            mem,
            obs,
            restore: None,
            frame: None,
            fd: -1,
            fd_pending: false,
        };
        t.step(Step::Seized)?;
        ptrace::interrupt(tid).map_err(|e| t.err("PTRACE_INTERRUPT", e))?;
        t.step(Step::Interrupted)?;
        Ok(t)
    }

    fn step(&self, s: Step) -> Result<(), AttachError> {
        self.obs.at(s).map_err(|_| AttachError::Cancelled {
            pid: self.pid,
            step: s,
        })
    }

    fn err(&mut self, op: &'static str, e: Errno) -> AttachError {
        AttachError::from_errno(self.pid, self.tid, op, e)
    }

    /// Waits until `until` for the thread's next stop (left unconsumed); `None` on timeout.
    /// An exit is consumed and is an error.
    fn wait(&mut self, until: Instant) -> Result<Option<WaitStatus>, AttachError> {
        if let State::Stopped(s) = self.state {
            return Ok(Some(s));
        }
        let mut spins = 0u32;
        loop {
            match ptrace::peek(self.tid, false).map_err(|e| self.err("waitid", e))? {
                Some(WaitStatus::Exited(_) | WaitStatus::Killed(_)) => {
                    let _ = ptrace::wait(self.tid);
                    self.state = State::Gone;
                    return Err(AttachError::Exited {
                        pid: self.pid,
                        op: "the injection",
                    });
                }
                Some(WaitStatus::Other(_)) => {}
                Some(s) => {
                    self.state = State::Stopped(s);
                    return Ok(Some(s));
                }
                None if Instant::now() >= until => return Ok(None),
                None if spins < 200 => std::thread::yield_now(),
                None => std::thread::sleep(Duration::from_micros(20)),
            }
            spins += 1;
        }
    }

    /// `PTRACE_SYSCALL` from the current stop, passing a signal-delivery stop's signal on.
    fn resume(&mut self) -> Result<(), AttachError> {
        let sig = match self.state {
            State::Stopped(WaitStatus::Signal(s)) => s,
            _ => 0,
        };
        ptrace::syscall(self.tid, sig).map_err(|e| self.err("PTRACE_SYSCALL", e))?;
        self.state = State::Running;
        Ok(())
    }

    fn regs(&mut self) -> Result<Regs, AttachError> {
        ptrace::get_regs(self.tid).map_err(|e| self.err("PTRACE_GETREGS", e))
    }

    fn set_regs(&mut self, r: &Regs) -> Result<(), AttachError> {
        ptrace::set_regs(self.tid, r).map_err(|e| self.err("PTRACE_SETREGS", e))
    }

    /// Step 2: drives the thread to an entry stop where a call may be substituted.
    fn reach_entry(&mut self) -> Result<Entry, AttachError> {
        let give_up = Instant::now() + THREAD_WAIT;
        let mut ride: Option<(Regs, Instant)> = None;
        let mut interrupted = true;
        loop {
            let until = ride.map_or(give_up, |(_, t)| t.min(give_up));
            let Some(st) = self.wait(until)? else {
                if Instant::now() >= give_up {
                    return Err(AttachError::Timeout {
                        pid: self.pid,
                        tid: self.tid,
                    });
                }
                if !interrupted {
                    ptrace::interrupt(self.tid).map_err(|e| self.err("PTRACE_INTERRUPT", e))?;
                    interrupted = true;
                }
                ride = ride.map(|(r, _)| (r, give_up));
                continue;
            };
            match st {
                WaitStatus::Event { .. } => {
                    interrupted = false;
                    let r0 = self.at_event_stop()?;
                    if !kernel_restart::in_restartable_call(&r0) {
                        return self.manufacture_entry(r0);
                    }
                    ride = Some((r0, Instant::now() + RIDE_WAIT));
                    self.step(Step::Riding)?;
                }
                WaitStatus::SyscallStop => {
                    if let Some((r0, _)) = ride
                        && let Some(e) = self.usable_entry(&r0)?
                    {
                        return Ok(e);
                    }
                }
                _ => {}
            }
            self.resume()?;
        }
    }

    /// At an event stop: R0, after the checks and the EINTR rewind.
    fn at_event_stop(&mut self) -> Result<Regs, AttachError> {
        let r0 = self.regs()?;
        if r0.cs() != ptrace::USER_CS_64 {
            return Err(AttachError::UnsupportedArch {
                why: format!(
                    "thread {} runs with code segment {:#x}, not 64-bit user mode",
                    self.tid,
                    r0.cs()
                ),
            });
        }
        self.step(Step::EventStop)?;
        if !kernel_restart::rewind_eintr(self.pid, self.tid, &r0)
            .map_err(|e| self.err("PTRACE_SETREGS", e))?
        {
            return Ok(r0);
        }
        self.step(Step::Rewound)?;
        // Still "in a restartable call" for the ride: its mask may be a temporary one.
        Ok(r0.with_rax(restart::NOINTR as u64))
    }

    /// Whether the two bytes before `ip` are a `syscall` instruction.
    fn syscall_at(&self, ip: u64) -> bool {
        let mut b = [0u8; 2];
        ip >= 2 && self.mem.read_exact_at(&mut b, ip - 2).is_ok() && b == [0x0f, 0x05]
    }

    /// At a syscall stop while riding: the entry to substitute, if this is a usable one.
    fn usable_entry(&mut self, r0: &Regs) -> Result<Option<Entry>, AttachError> {
        let info = ptrace::syscall_info(self.tid).map_err(|e| self.err("GET_SYSCALL_INFO", e))?;
        let SyscallInfo::Entry { arch, nr: x } = info else {
            return Ok(None);
        };
        let e = self.regs()?;
        if arch != ptrace::AUDIT_ARCH_X86_64
            || x & ptrace::X32_SYSCALL_BIT != 0
            || x == nr::EXIT
            || x == nr::EXIT_GROUP
            || !self.syscall_at(e.ip())
        {
            return Ok(None);
        }
        self.step(Step::EntryStop)?;
        let restore = e.with_ip(e.ip() - 2).with_rax(x).with_orig_rax(u64::MAX);
        Ok(Some(
            Entry {
                regs: e,
                restore,
                frame: None,
                net_call: None,
                site: SyscallSite::Ridden,
            }
            .with_original_call(r0),
        ))
    }

    /// Step 2b: writes the frame restoring R0 and sends the thread into the restorer; returns
    /// its entry stop.
    fn manufacture_entry(&mut self, r0: Regs) -> Result<Entry, AttachError> {
        let restore = r0.with_orig_rax(u64::MAX);
        let mask = ptrace::get_sigmask(self.tid).map_err(|e| self.err("PTRACE_GETSIGMASK", e))?;
        self.fd = self.lowest_free_fd()?;
        let frame = self
            .net
            .write_frame(self.pid, self.tid, &restore, r0.sp(), mask, self.fd)?;
        self.step(Step::FrameWritten)?;
        let to_restorer = restore
            .with_ip(self.net.restorer)
            .with_sp(frame.after_ret());
        self.restore = Some(restore);
        self.frame = Some(frame);
        self.set_regs(&to_restorer)?;
        self.step(Step::Manufactured)?;
        self.resume()?;
        let regs = self.restorer_entry()?;
        self.step(Step::EntryStop)?;
        Ok(Entry {
            regs,
            restore,
            frame: Some(frame),
            net_call: None,
            site: SyscallSite::Restorer,
        })
    }

    /// Runs the thread (passing signals and foreign syscall stops on) to the restorer's entry
    /// stop; returns the registers there.
    fn restorer_entry(&mut self) -> Result<Regs, AttachError> {
        let give_up = Instant::now() + THREAD_WAIT;
        loop {
            let info = self.syscall_stop_before(give_up)?;
            let r = self.regs()?;
            if matches!(
                info,
                SyscallInfo::Entry {
                    nr: nr::RT_SIGRETURN,
                    ..
                }
            ) && r.ip() == self.net.restorer_entry
                && Some(r.sp()) == self.frame.map(|f| f.after_ret())
            {
                return Ok(r);
            }
            self.resume()?;
        }
    }

    /// The lowest fd number free in the thread's table: what userfaultfd(2) will return,
    /// every other thread being frozen.
    fn lowest_free_fd(&self) -> Result<i32, AttachError> {
        let fds = procfs::fd_numbers(self.pid, self.tid).map_err(|e| {
            AttachError::from_errno(self.pid, self.tid, "listing /proc/PID/task/TID/fd", e)
        })?;
        Ok((0..).find(|n| fds.binary_search(n).is_err()).unwrap_or(0))
    }

    /// Waits (bounded) for the next syscall stop, passing anything else on.
    fn next_syscall_stop(&mut self) -> Result<SyscallInfo, AttachError> {
        self.syscall_stop_before(Instant::now() + THREAD_WAIT)
    }

    /// Waits for the next syscall stop until `give_up`, passing anything else on.
    fn syscall_stop_before(&mut self, give_up: Instant) -> Result<SyscallInfo, AttachError> {
        loop {
            let Some(st) = self.wait(give_up)? else {
                return Err(AttachError::Timeout {
                    pid: self.pid,
                    tid: self.tid,
                });
            };
            if st == WaitStatus::SyscallStop {
                return ptrace::syscall_info(self.tid).map_err(|e| self.err("GET_SYSCALL_INFO", e));
            }
            self.resume()?;
        }
    }

    /// Steps 3-4: at entry stop `e`, substitutes userfaultfd(`flags`) returning into the
    /// chain, and runs it to its exit stop; returns its result (negative: -errno), the chain
    /// set to close the fd it got.
    fn substitute(&mut self, e: &Regs, flags: u64) -> Result<i64, AttachError> {
        let frame = self.frame.expect("frame written before a substitution");
        let subst = e
            .with_orig_rax(nr::USERFAULTFD)
            .with_args([flags, 0, 0, 0, 0, 0])
            .with_ip(self.net.pop_rdi)
            .with_sp(frame.chain);
        self.set_regs(&subst)?;
        self.step(Step::Substituted)?;
        self.resume()?;
        // Nothing else can stop a thread between a call's entry and its exit.
        let rval = match self.next_syscall_stop()? {
            SyscallInfo::Exit { rval } => rval,
            other => {
                return Err(AttachError::Os {
                    op: match other {
                        SyscallInfo::Entry { .. } => "an entry stop after userfaultfd's entry",
                        _ => "a stop other than userfaultfd's exit",
                    },
                    tid: self.tid,
                    errno: Errno::PROTO,
                });
            }
        };
        self.fd_pending = rval >= 0;
        if rval >= 0 && rval != i64::from(self.fd) {
            // Another fd than predicted (a table shared with another process): aim the chain
            // at it.
            self.net
                .retarget(self.tid, &frame, rval as i32)
                .map_err(|e| self.err("writing the frame", e))?;
        }
        self.step(Step::UffdExitStop)?;
        Ok(rval)
    }

    /// Step 4: lets the chain close the target's copy (entry and exit stops of its close);
    /// returns close's result.
    fn close_in_chain(&mut self) -> Result<i64, AttachError> {
        self.resume()?;
        let at = self.net.syscall_ret + 2;
        loop {
            let info = self.next_syscall_stop()?;
            let ip = self.regs()?.ip();
            if matches!(info, SyscallInfo::Entry { nr: nr::CLOSE, .. }) && ip == at {
                break;
            }
            self.resume()?;
        }
        self.step(Step::CloseEntryStop)?;
        self.resume()?;
        let SyscallInfo::Exit { rval } = self.next_syscall_stop()? else {
            return Err(AttachError::Os {
                op: "a stop other than close's exit",
                tid: self.tid,
                errno: Errno::PROTO,
            });
        };
        self.fd_pending = false;
        self.step(Step::CloseExitStop)?;
        Ok(rval)
    }

    /// Step 3 for a ridden entry: the frame, written now that the mask is the real one.
    fn arm(&mut self, entry: &Entry) -> Result<(), AttachError> {
        if entry.frame.is_some() {
            return Ok(());
        }
        let net_regs = entry.net_regs();
        let mask = ptrace::get_sigmask(self.tid).map_err(|e| self.err("PTRACE_GETSIGMASK", e))?;
        self.fd = self.lowest_free_fd()?;
        let frame = self.net.write_frame(
            self.pid,
            self.tid,
            &net_regs,
            entry.regs.sp(),
            mask,
            self.fd,
        )?;
        self.restore = Some(entry.restore);
        self.frame = Some(frame);
        self.step(Step::FrameWritten)
    }

    /// Whether the registers now are injected ones (RIP at a gadget, RSP in the chain).
    fn injected(&mut self) -> Result<bool, AttachError> {
        let Some(f) = self.frame else {
            return Ok(false);
        };
        let r = self.regs()?;
        Ok(self.net.holds(r.ip()) && f.holds(r.sp()))
    }

    /// Brings the thread to a stop, puts its own state back where injected registers are
    /// live (unless the chain still has to close the injected fd: then the chain and the
    /// restorer do it), and detaches it (passing a signal-delivery stop's signal on).
    fn release(&mut self) -> Result<(), AttachError> {
        match self.state {
            State::Gone | State::Detached => return Ok(()),
            State::Stopped(_) => {}
            State::Running => {
                ptrace::interrupt(self.tid).map_err(|e| self.err("PTRACE_INTERRUPT", e))?;
                if self.wait(Instant::now() + RELEASE_WAIT)?.is_none() {
                    return Err(AttachError::Timeout {
                        pid: self.pid,
                        tid: self.tid,
                    });
                }
            }
        }
        if let Some(c) = self.restore
            && !self.fd_pending
            && self.injected()?
        {
            self.set_regs(&c)?;
        }
        let sig = match self.state {
            State::Stopped(WaitStatus::Signal(s)) => s,
            _ => 0,
        };
        ptrace::detach(self.tid, sig).map_err(|e| self.err("PTRACE_DETACH", e))?;
        self.state = State::Detached;
        Ok(())
    }
}

impl Drop for Tracee<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

impl Entry {
    /// For a `restart_syscall` entry right after R0's `-ERESTART_RESTARTBLOCK`: the frame
    /// re-runs R0's original call instead (rt_sigreturn resets the restart block).
    fn with_original_call(mut self, r0: &Regs) -> Entry {
        self.net_call = (self.regs.orig_rax() == nr::RESTART_SYSCALL
            && r0.rax() as i64 == restart::RESTARTBLOCK
            && r0.ip() == self.regs.ip())
        .then(|| r0.orig_rax());
        self
    }

    /// The registers the frame restores.
    fn net_regs(&self) -> Regs {
        match self.net_call {
            Some(call) => self.restore.with_rax(call),
            None => self.restore,
        }
    }
}

/// The threads to try, best first: those blocked in a system call (they re-enter it at once),
/// then the others; zombies left out.
fn pick_threads(pid: i32) -> Result<Vec<i32>, AttachError> {
    let tids = thread_ids(pid).map_err(|_| AttachError::NoSuchProcess { pid })?;
    let mut live: Vec<(bool, i32)> = tids
        .into_iter()
        .filter(|t| matches!(thread_state(pid, *t), Some(s) if s != 'Z' && s != 'X'))
        .map(|t| {
            let sc = procfs::read(&procfs::path(pid, &format!("task/{t}/syscall")));
            let in_call = sc.is_ok_and(|s| !s.starts_with("running") && !s.starts_with('-'));
            (!in_call, t)
        })
        .collect();
    live.sort();
    if live.is_empty() {
        return Err(AttachError::NoSuchProcess { pid });
    }
    Ok(live.into_iter().map(|(_, t)| t).collect())
}

/// The seccomp mode of thread `tid` (0 none, 1 strict, 2 filter).
fn seccomp_mode(pid: i32, tid: i32) -> u32 {
    procfs::read(&procfs::path(pid, &format!("task/{tid}/status")))
        .ok()
        .and_then(|s| procfs::status_field(&s, "Seccomp")?.trim().parse().ok())
        .unwrap_or(0)
}

/// What one thread's injection produced.
struct Injected {
    fd: Result<OwnedFd, AttachError>,
    target_fd: i32,
    site: SyscallSite,
}

/// Steps 1-5 on thread `tid`, every other thread frozen meanwhile.
fn inject(
    pid: i32,
    tid: i32,
    pidfd: &OwnedFd,
    mem: &File,
    net: Net,
    flags: u64,
    obs: &dyn Observer,
) -> Result<Injected, AttachError> {
    Net::check_thread(pid, tid)?;
    let options = match seccomp_mode(pid, tid) {
        0 => 0,
        2 => ptrace::O_SUSPEND_SECCOMP,
        _ => return Err(AttachError::Seccomp { pid, tid }),
    };
    let others = RemoteQuiesce::new(pid as u32);
    others.try_freeze_except(Some(tid))?;
    obs.at(Step::OthersFrozen)
        .map_err(|_| AttachError::Cancelled {
            pid,
            step: Step::OthersFrozen,
        })?;
    let mut t = Tracee::seize(pid, tid, options, net, mem, obs)?;
    let entry = t.reach_entry()?;
    t.arm(&entry)?;
    let fd = t.substitute(&entry.regs, flags)?;
    let got = (fd >= 0).then(|| {
        // Through the thread's own pidfd where the kernel has them: the leader's files are
        // gone once it exited.
        match ptrace::pidfd_open_thread(tid) {
            Ok(thread) => ptrace::pidfd_getfd(&thread, fd as i32),
            Err(_) => ptrace::pidfd_getfd(pidfd, fd as i32),
        }
        .map_err(|e| AttachError::from_errno(pid, pid, "pidfd_getfd", e))
    });
    if fd >= 0 {
        t.step(Step::FdTaken)?;
    }
    let closed = if fd >= 0 { t.close_in_chain()? } else { 0 };
    t.set_regs(&entry.restore)?;
    t.step(Step::Restored)?;
    t.release()?;
    drop(others);
    t.step(Step::Detached)?;
    let Some(got) = got else {
        return Err(userfaultfd_failed(pid, fd));
    };
    if closed < 0 {
        return Err(AttachError::TargetSyscall {
            pid,
            call: "close(2)",
            errno: Errno::from_raw_os_error(-closed as i32),
        });
    }
    Ok(Injected {
        fd: got,
        target_fd: fd as i32,
        site: entry.site,
    })
}

fn userfaultfd_failed(pid: i32, rval: i64) -> AttachError {
    let errno = Errno::from_raw_os_error(-rval as i32);
    match errno {
        Errno::PERM | Errno::ACCESS => AttachError::Permission {
            pid,
            op: "userfaultfd(2) in the target",
            errno,
        },
        _ => AttachError::TargetSyscall {
            pid,
            call: "userfaultfd(2)",
            errno,
        },
    }
}

/// Creates a userfaultfd inside process `pid` and returns this process's copy of it; see the
/// module docs. `tid`: the thread to use (default: the best of them, trying the next on a
/// timeout).
pub(super) fn steal_uffd(
    pid: i32,
    tid: Option<i32>,
    flags: u64,
    obs: &dyn Observer,
) -> Result<(OwnedFd, AttachReport), AttachError> {
    let t0 = Instant::now();
    let pidfd =
        ptrace::pidfd_open(pid).map_err(|e| AttachError::from_errno(pid, pid, "pidfd_open", e))?;
    let mem = File::open(format!("{}/mem", procfs::mm_dir(pid))).map_err(|e| {
        AttachError::from_errno(pid, pid, "opening /proc/PID/mem", crate::sys::errno_of(&e))
    })?;
    let net = Net::find(pid, &mem)?;
    let tids = match tid {
        Some(t) => vec![t],
        None => pick_threads(pid)?,
    };
    let mut last = AttachError::NoSuchProcess { pid };
    for tid in tids.into_iter().take(4) {
        let t_stop = Instant::now();
        match inject(pid, tid, &pidfd, &mem, net, flags, obs) {
            Ok(done) => {
                let stopped_us = t_stop.elapsed().as_secs_f64() * 1e6;
                let report = AttachReport {
                    pid,
                    tid,
                    site: done.site,
                    target_fd: done.target_fd,
                    stopped_us,
                    total_us: t0.elapsed().as_secs_f64() * 1e6,
                    raised_unprivileged_userfaultfd: false,
                };
                return Ok((done.fd?, report));
            }
            Err(e @ AttachError::Timeout { .. }) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

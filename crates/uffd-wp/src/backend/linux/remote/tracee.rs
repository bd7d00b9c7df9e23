//! The ptrace injection: one thread of the target runs userfaultfd(2), and this process takes
//! the new descriptor with pidfd_getfd(2). The only code of the remote backend that stops a
//! thread to change its registers (issue #9 replaces this protocol, see
//! docs/notes/issue9-ptrace-protocol.md).
//!
//! # How a uffd is obtained in the target ([`LinuxMm::attach`](crate::backend::linux::LinuxMm::attach))
//!
//! userfaultfd(2) binds the new context to the mm of the *caller*, so the target itself must
//! make the call. One thread of the target is made to do it:
//!
//! 1. `PTRACE_SEIZE` + `PTRACE_INTERRUPT` the thread (the thread-group leader unless it is a
//!    zombie) and wait for its `PTRACE_EVENT_STOP`. The stop happens in `get_signal()`, on the
//!    way back to user space: if the thread was blocked in a system call, that call has
//!    returned `-ERESTART*` and the kernel's restart logic (`arch_do_signal_or_restart`) runs
//!    *after* this stop, from the registers as they are then.
//! 2. Save the registers.
//! 3. Find a `syscall` instruction (`0f 05`), in this order: the two bytes just before RIP
//!    when the thread stopped inside a system call (`orig_rax >= 0`: it entered the kernel
//!    through that very instruction, so it is executable and exactly there); else the
//!    `[vdso]` (always mapped, and its clock_gettime/getrandom fallbacks contain `syscall`);
//!    else any other executable mapping. Any `0f 05` byte pair in an executable mapping will
//!    do, even inside a longer instruction: the CPU decodes from where RIP points, and the
//!    thread is stopped at the system call's exit, before the bytes after it run.
//! 4. Set RIP to it, `rax` = the call number, the arguments, `orig_rax` = -1 (so the restart
//!    logic leaves these registers alone), then `PTRACE_SINGLESTEP`: the thread executes the
//!    `syscall` and, because x86 arms `SYSCALL_EXIT_TRAP` with the step, traps at the call's
//!    exit before any user instruction: a `SIGTRAP` signal-delivery stop, in `get_signal()`
//!    again, with the result in `rax` and RIP = site + 2 (which tells this trap from a foreign
//!    SIGTRAP). First `userfaultfd(O_CLOEXEC | O_NONBLOCK)`.
//! 5. `pidfd_open` + `pidfd_getfd` copy the new descriptor into this process; then the thread
//!    runs `close(fd)` the same way, so this process holds the only reference: when it closes
//!    its copy (or dies), the kernel releases the context and un-protects everything.
//! 6. Restore the saved registers at that `get_signal()` stop and detach suppressing the
//!    SIGTRAP: an interrupted blocking call is restarted exactly as if the thread had only been
//!    interrupted. (Restoring them at a syscall-exit stop instead, as with `PTRACE_SYSCALL`,
//!    would let `-ERESTARTSYS` leak to user space when no signal is pending.) Three stops in
//!    all, each a scheduling round trip of the target's thread: `PTRACE_SYSCALL` would take
//!    six (entry and exit of each call, and an interrupt to get back to `get_signal()`).
//!
//! Signals that arrive while the thread is traced are suppressed at their signal-delivery stop
//! and re-sent with tgkill(2) right after the detach. Every error path restores the registers
//! and detaches ([`Tracee`]'s drop). The hazards that remain (this process SIGKILLed between
//! writing the injected registers and restoring them; a fork(2) by another thread between the
//! injected userfaultfd(2) and close(2)) are stated in the remote module's docs (`mod.rs`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use super::{AttachError, AttachReport};
use crate::backend::procfs::{self, MapEntry, process_alive, read_maps, thread_ids, thread_state};
use crate::seam::Errno;
use crate::sys::ptrace::{self, WaitStatus};

/// Where the injected system calls ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SyscallSite {
    /// The `syscall` instruction just before RIP (the thread was stopped in a system call).
    Interrupted,
    /// A `syscall` byte pair in the `[vdso]`.
    Vdso,
    /// A `syscall` byte pair in another executable mapping.
    Mapping,
}

/// Where the thread is, as far as this tracer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TraceeState {
    /// Resumed; no stop awaited yet.
    Running,
    /// Stopped in `get_signal()` (an interrupt/group-stop event or a signal-delivery stop):
    /// registers written here are what the restart logic and user space see.
    SignalPath,
    /// It exited.
    Gone,
    /// Detached.
    Detached,
}

/// A thread seized by this thread. Dropping it restores the registers (if they were changed)
/// at a signal-path stop and detaches.
#[derive(Debug)]
struct Tracee {
    pid: i32,
    tid: i32,
    state: TraceeState,
    /// The registers at the first stop, once they have been changed.
    #[cfg(target_arch = "x86_64")]
    saved: Option<ptrace::Regs>,
    /// Signals suppressed at signal-delivery stops, re-sent after the detach.
    signals: Vec<i32>,
}

impl Tracee {
    /// Seizes `tid` and waits until it is stopped in `get_signal()`.
    fn seize(pid: i32, tid: i32) -> Result<Tracee, AttachError> {
        ptrace::seize(tid, ptrace::O_TRACESYSGOOD)
            .map_err(|e| AttachError::from_errno(pid, tid, "PTRACE_SEIZE", e))?;
        let mut t = Tracee {
            pid,
            tid,
            state: TraceeState::Running,
            #[cfg(target_arch = "x86_64")]
            saved: None,
            signals: Vec::new(),
        };
        ptrace::interrupt(tid).map_err(|e| t.err("PTRACE_INTERRUPT", e))?;
        t.wait_signal_path("stopping the thread")?;
        Ok(t)
    }

    fn err(&mut self, op: &'static str, e: Errno) -> AttachError {
        if e == Errno::SRCH && !process_alive(self.pid) {
            self.state = TraceeState::Gone;
        }
        AttachError::from_errno(self.pid, self.tid, op, e)
    }

    fn gone(&mut self, op: &'static str) -> AttachError {
        self.state = TraceeState::Gone;
        AttachError::Exited { pid: self.pid, op }
    }

    /// Waits (the thread running or on its way to an interrupt) for a stop in `get_signal()`,
    /// letting syscall stops go on.
    fn wait_signal_path(&mut self, op: &'static str) -> Result<(), AttachError> {
        loop {
            match ptrace::wait(self.tid).map_err(|e| self.err("waitpid", e))? {
                WaitStatus::Event { .. } => break,
                WaitStatus::Signal(s) => {
                    self.signals.push(s);
                    break;
                }
                WaitStatus::SyscallStop => {
                    ptrace::cont(self.tid, 0).map_err(|e| self.err("PTRACE_CONT", e))?
                }
                WaitStatus::Exited(_) | WaitStatus::Killed(_) => return Err(self.gone(op)),
                WaitStatus::Other(_) => {}
            }
        }
        self.state = TraceeState::SignalPath;
        Ok(())
    }

    /// Runs system call `nr(args)` in the thread at the `syscall` instruction `site`; returns
    /// the kernel's result (negative: -errno). The thread is left at the SIGTRAP stop that
    /// follows the call's exit (in `get_signal()`).
    #[cfg(target_arch = "x86_64")]
    fn run_syscall(
        &mut self,
        site: u64,
        nr: u64,
        args: [u64; 6],
        call: &'static str,
    ) -> Result<i64, AttachError> {
        let base = match self.saved {
            Some(r) => r,
            None => {
                let r = ptrace::get_regs(self.tid).map_err(|e| self.err("PTRACE_GETREGS", e))?;
                self.saved = Some(r);
                r
            }
        };
        ptrace::set_regs(self.tid, &base.for_syscall(site, nr, args))
            .map_err(|e| self.err("PTRACE_SETREGS", e))?;
        loop {
            ptrace::singlestep(self.tid, 0).map_err(|e| self.err("PTRACE_SINGLESTEP", e))?;
            self.state = TraceeState::Running;
            match ptrace::wait(self.tid).map_err(|e| self.err("waitpid", e))? {
                WaitStatus::Signal(ptrace::SIGTRAP) => {
                    self.state = TraceeState::SignalPath;
                    let r =
                        ptrace::get_regs(self.tid).map_err(|e| self.err("PTRACE_GETREGS", e))?;
                    if r.ip() == site + 2 {
                        return Ok(r.rax() as i64);
                    }
                    // A SIGTRAP from elsewhere, before the call ran: keep it for later.
                    self.signals.push(ptrace::SIGTRAP);
                }
                // A signal pending before the call ran (suppressed, re-sent after the detach),
                // or an event stop (a group-stop): the registers are still ours, go on.
                WaitStatus::Signal(s) => {
                    self.state = TraceeState::SignalPath;
                    self.signals.push(s);
                }
                WaitStatus::Event { .. } | WaitStatus::SyscallStop | WaitStatus::Other(_) => {
                    self.state = TraceeState::SignalPath;
                }
                WaitStatus::Exited(_) | WaitStatus::Killed(_) => return Err(self.gone(call)),
            }
        }
    }

    /// Brings the thread back to a `get_signal()` stop, restores its registers, detaches it
    /// and re-sends the signals it received meanwhile.
    fn release(&mut self) -> Result<(), AttachError> {
        match self.state {
            TraceeState::Gone | TraceeState::Detached => return Ok(()),
            TraceeState::SignalPath => {}
            TraceeState::Running => {
                ptrace::interrupt(self.tid).map_err(|e| self.err("PTRACE_INTERRUPT", e))?;
                self.wait_signal_path("restoring the thread")?;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(r) = self.saved {
            ptrace::set_regs(self.tid, &r).map_err(|e| self.err("PTRACE_SETREGS", e))?;
        }
        ptrace::detach(self.tid, 0).map_err(|e| self.err("PTRACE_DETACH", e))?;
        self.state = TraceeState::Detached;
        for s in self.signals.drain(..) {
            let _ = ptrace::tgkill(self.pid, self.tid, s);
        }
        Ok(())
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// The `syscall` instruction to use in the stopped thread; see the module docs.
#[cfg(target_arch = "x86_64")]
fn find_syscall_site(pid: i32, tid: i32, mem: &File) -> Result<(u64, SyscallSite), AttachError> {
    let regs = ptrace::get_regs(tid)
        .map_err(|e| AttachError::from_errno(pid, tid, "PTRACE_GETREGS", e))?;
    if regs.cs() != ptrace::USER_CS_64 {
        return Err(AttachError::UnsupportedArch {
            why: format!(
                "thread {tid} runs with code segment {:#x}, not 64-bit user mode",
                regs.cs()
            ),
        });
    }
    const SYSCALL: [u8; 2] = [0x0f, 0x05];
    if (regs.orig_rax() as i64) >= 0 && regs.ip() >= 2 {
        let mut b = [0u8; 2];
        if mem.read_exact_at(&mut b, regs.ip() - 2).is_ok() && b == SYSCALL {
            return Ok((regs.ip() - 2, SyscallSite::Interrupted));
        }
    }
    let maps = read_maps(pid)
        .map_err(|e| AttachError::from_errno(pid, tid, "reading /proc/PID/maps", e))?;
    let exec: Vec<&MapEntry> = maps.iter().filter(|m| m.perms.contains('x')).collect();
    let ordered = exec.iter().filter(|m| m.name == "[vdso]").chain(
        exec.iter()
            .filter(|m| m.name != "[vdso]" && m.name != "[vsyscall]"),
    );
    for m in ordered {
        let len = (m.end - m.start).min(4 << 20) as usize;
        let mut buf = vec![0u8; len];
        if mem.read_exact_at(&mut buf, m.start).is_err() {
            continue;
        }
        if let Some(i) = buf.windows(2).position(|w| w == SYSCALL) {
            let kind = if m.name == "[vdso]" {
                SyscallSite::Vdso
            } else {
                SyscallSite::Mapping
            };
            return Ok((m.start + i as u64, kind));
        }
    }
    Err(AttachError::NoSyscallSite { pid })
}

/// The thread to run the injected calls: the leader unless it is a zombie (it called
/// pthread_exit while other threads run), then the first live one.
fn pick_thread(pid: i32) -> Result<i32, AttachError> {
    let tids = thread_ids(pid).map_err(|_| AttachError::NoSuchProcess { pid })?;
    let live = |t: &i32| matches!(thread_state(pid, *t), Some(s) if s != 'Z' && s != 'X');
    if live(&pid) {
        return Ok(pid);
    }
    tids.into_iter()
        .find(live)
        .ok_or(AttachError::NoSuchProcess { pid })
}

/// Creates a userfaultfd inside process `pid` and returns this process's copy of it; see the
/// module docs.
#[cfg(target_arch = "x86_64")]
pub(super) fn steal_uffd(
    pid: i32,
    tid: Option<i32>,
    flags: u64,
) -> Result<(std::os::fd::OwnedFd, AttachReport), AttachError> {
    let t0 = Instant::now();
    let tid = match tid {
        Some(t) => t,
        None => pick_thread(pid)?,
    };
    let pidfd =
        ptrace::pidfd_open(pid).map_err(|e| AttachError::from_errno(pid, pid, "pidfd_open", e))?;
    let mem = File::open(procfs::path(pid, "mem")).map_err(|e| {
        AttachError::from_errno(pid, pid, "opening /proc/PID/mem", crate::sys::errno_of(&e))
    })?;
    let t_stop = Instant::now();
    let mut t = Tracee::seize(pid, tid)?;
    let (site, kind) = find_syscall_site(pid, tid, &mem)?;
    let fd = t.run_syscall(
        site,
        ptrace::nr::USERFAULTFD,
        [flags, 0, 0, 0, 0, 0],
        "userfaultfd(2)",
    )?;
    if fd < 0 {
        let errno = Errno::from_raw_os_error(-fd as i32);
        return Err(match errno {
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
        });
    }
    let fd = fd as i32;
    let got = ptrace::pidfd_getfd(&pidfd, fd);
    // Close the target's copy whatever pidfd_getfd said.
    let closed = t.run_syscall(
        site,
        ptrace::nr::CLOSE,
        [fd as u64, 0, 0, 0, 0, 0],
        "close(2)",
    )?;
    t.release()?;
    let stopped_us = t_stop.elapsed().as_secs_f64() * 1e6;
    let owned = got.map_err(|e| AttachError::from_errno(pid, pid, "pidfd_getfd", e))?;
    if closed < 0 {
        return Err(AttachError::TargetSyscall {
            pid,
            call: "close(2)",
            errno: Errno::from_raw_os_error(-closed as i32),
        });
    }
    Ok((
        owned,
        AttachReport {
            pid,
            tid,
            site: kind,
            target_fd: fd,
            stopped_us,
            total_us: t0.elapsed().as_secs_f64() * 1e6,
        },
    ))
}

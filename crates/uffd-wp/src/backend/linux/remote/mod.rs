//! The remote backend: a userfaultfd living in *another* process's mm, driven from here.
//!
//! # How a uffd is obtained in the target ([`LinuxMm::attach`])
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
//! and detaches ([`Tracee`]'s drop), and a target is never left stopped: if this process dies,
//! the kernel detaches its tracees itself. The one window that cannot be covered is this
//! process being SIGKILLed during the ~100 us between writing the injected registers and
//! restoring them: the thread would then resume at the `syscall` with the injected registers.
//!
//! Another hazard the kernel gives no way around: a fork(2) by another thread of the target
//! between the injected userfaultfd(2) and close(2) would give the child a copy of the
//! descriptor (O_CLOEXEC only helps across exec).
//!
//! # Reading the target's memory
//!
//! `process_vm_readv(2)`, chosen against `pread` of /proc/PID/mem by measuring both on the same
//! frozen 256 MiB in 1 MiB reads (`remote_read_throughput` in the CLI's kernel tests): 5.4 to
//! 6.0 GB/s against 2.5 to 3.4 GB/s once the destination is populated. Both go through the
//! kernel's remote GUP; process_vm_readv copies straight into the caller's buffer, while
//! /proc/PID/mem copies each page through a kernel bounce page.
//!
//! # Freezing the target ([`RemoteQuiesce`])
//!
//! Every thread listed in /proc/PID/task is seized and interrupted, the listing repeated until
//! a pass finds no new thread (a thread not yet stopped may create one), and each stop awaited.
//! Resuming detaches them all. A ptrace stop is undone by the kernel when the tracer dies,
//! which is what makes a monitor killed mid-snapshot leave the target running.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::Instant;

use super::{Config, LinuxMm, OpenError, Target};
use crate::backend::procfs::{self, process_alive};
use crate::features::{self, Features};
use crate::seam::Errno;
use crate::seam::Quiesce;
use crate::sys::errno_name;
use crate::sys::ptrace::{self, WaitStatus};
use crate::sys::uffd::Uffd;

pub use crate::backend::procfs::{
    MapEntry, fully_mapped, maps_cover, parse_maps, read_maps, stat_state, thread_ids, thread_state,
};

/// Why attaching to (or freezing) another process failed. Whatever the error, the target is
/// left running and detached, with its registers as they were.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// There is no such process (or it is a zombie).
    #[error("no process {pid}")]
    NoSuchProcess {
        /// The pid.
        pid: i32,
    },
    /// The kernel refused (EPERM/EACCES): no CAP_SYS_PTRACE over the target, Yama, another
    /// tracer already attached, or userfaultfd(2) refused inside the target.
    #[error("{op} on process {pid}: permission denied ({})", errno_name(*errno))]
    Permission {
        /// The pid.
        pid: i32,
        /// What was refused.
        op: &'static str,
        /// EPERM or EACCES.
        errno: Errno,
    },
    /// The target (or the thread used) exited while it was being worked on.
    #[error("process {pid} exited during {op}")]
    Exited {
        /// The pid.
        pid: i32,
        /// What was being done.
        op: &'static str,
    },
    /// Remote attach needs an x86_64 monitor and a 64-bit x86_64 target.
    #[error("remote attach is not supported here: {why}")]
    UnsupportedArch {
        /// What is unsupported.
        why: String,
    },
    /// No `syscall` instruction could be found in the target's executable mappings.
    #[error("no syscall instruction found in process {pid}")]
    NoSyscallSite {
        /// The pid.
        pid: i32,
    },
    /// A system call run inside the target failed.
    #[error("{call} in process {pid} failed: {}", errno_name(*errno))]
    TargetSyscall {
        /// The pid.
        pid: i32,
        /// The call.
        call: &'static str,
        /// Its errno.
        errno: Errno,
    },
    /// A ptrace, waitpid, pidfd or /proc operation failed in an unexpected way.
    #[error("{op} on thread {tid}: {}", errno_name(*errno))]
    Os {
        /// The operation.
        op: &'static str,
        /// The thread (or process) id.
        tid: i32,
        /// The errno.
        errno: Errno,
    },
    /// The uffd was obtained but the backend could not be set up on it.
    #[error(transparent)]
    Open(#[from] OpenError),
}

impl AttachError {
    /// The errno behind the failure (ESRCH for a process that is gone, ENOTSUP for an
    /// unsupported architecture, ENOEXEC without a syscall instruction).
    pub fn errno(&self) -> Errno {
        match self {
            AttachError::NoSuchProcess { .. } | AttachError::Exited { .. } => Errno::SRCH,
            AttachError::Permission { errno, .. }
            | AttachError::TargetSyscall { errno, .. }
            | AttachError::Os { errno, .. } => *errno,
            AttachError::UnsupportedArch { .. } => Errno::NOTSUP,
            AttachError::NoSyscallSite { .. } => Errno::NOEXEC,
            AttachError::Open(e) => e.errno(),
        }
    }

    /// Classifies an errno of an operation on `pid`.
    fn from_errno(pid: i32, tid: i32, op: &'static str, errno: Errno) -> AttachError {
        match errno {
            Errno::SRCH | Errno::NOENT => {
                if process_alive(pid) {
                    AttachError::Exited { pid, op }
                } else {
                    AttachError::NoSuchProcess { pid }
                }
            }
            Errno::PERM | Errno::ACCESS => AttachError::Permission { pid, op, errno },
            _ => AttachError::Os { op, tid, errno },
        }
    }
}

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

/// What [`LinuxMm::attach_with_report`] did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AttachReport {
    /// The target process.
    pub pid: i32,
    /// The thread that ran the injected calls.
    pub tid: i32,
    /// Where the `syscall` instruction was found.
    pub site: SyscallSite,
    /// The userfaultfd's number in the target (closed there before detaching).
    pub target_fd: i32,
    /// How long the thread was stopped (interrupt to detach), microseconds.
    pub stopped_us: f64,
    /// Whole attach including the `UFFDIO_API` handshake, microseconds.
    pub total_us: f64,
}

/// Reads `buf.len()` bytes at `addr` of process `pid` with process_vm_readv (looping over
/// short reads); EFAULT when the range runs into unmapped memory.
pub fn read_remote(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        match ptrace::process_vm_read(pid, addr + done as u64, &mut buf[done..])? {
            0 => return Err(Errno::FAULT),
            n => done += n,
        }
    }
    Ok(())
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
fn steal_uffd(
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

impl LinuxMm {
    /// A backend on the address space of process `pid` (x86_64; root or CAP_SYS_PTRACE over
    /// it), negotiating `cfg`. See the module docs for how the uffd is obtained.
    pub fn attach(pid: u32, cfg: Config) -> Result<LinuxMm, AttachError> {
        Self::attach_with_report(pid, cfg).map(|(mm, _)| mm)
    }

    /// [`LinuxMm::attach`], with what it did and how long it took.
    pub fn attach_with_report(
        pid: u32,
        cfg: Config,
    ) -> Result<(LinuxMm, AttachReport), AttachError> {
        Self::attach_thread(pid, None, cfg)
    }

    /// [`LinuxMm::attach_with_report`], making thread `tid` of the target (default: the
    /// leader) run the injected system calls.
    pub fn attach_thread(
        pid: u32,
        tid: Option<u32>,
        cfg: Config,
    ) -> Result<(LinuxMm, AttachReport), AttachError> {
        let pid_i = i32::try_from(pid).map_err(|_| AttachError::NoSuchProcess { pid: -1 })?;
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (cfg, tid);
            Err(AttachError::UnsupportedArch {
                why: format!("the monitor is built for {}", std::env::consts::ARCH),
            })
        }
        #[cfg(target_arch = "x86_64")]
        {
            let t0 = Instant::now();
            if !process_alive(pid_i) {
                return Err(AttachError::NoSuchProcess { pid: pid_i });
            }
            let offered = features::kernel_features().map_err(OpenError::Create)?;
            let missing = cfg.required.without(offered);
            if missing != Features::empty() {
                return Err(OpenError::Unsupported { missing }.into());
            }
            let mut flags = u64::from(linux_raw_sys::general::O_CLOEXEC)
                | u64::from(linux_raw_sys::general::O_NONBLOCK);
            if cfg.user_mode_only {
                flags |= u64::from(crate::sys::uffd::USER_MODE_ONLY);
            }
            let tid = tid.map(|t| t as i32);
            if let Some(t) = tid
                && thread_state(pid_i, t).is_none()
            {
                return Err(AttachError::NoSuchProcess { pid: t });
            }
            let (fd, mut report) = steal_uffd(pid_i, tid, flags)?;
            let mm = LinuxMm::from_uffd(Uffd::from_remote(fd), cfg, offered, Target::Pid(pid))?;
            report.total_us = t0.elapsed().as_secs_f64() * 1e6;
            Ok((mm, report))
        }
    }
}

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

/// Freezes every thread of another process with ptrace (see the module docs). Must be
/// resumed from the thread that froze it ([`crate::engine::snapshot::take`] does both on its caller's
/// thread). Dropping it resumes a frozen target.
#[derive(Debug)]
pub struct RemoteQuiesce {
    pid: i32,
    frozen: Mutex<Option<Frozen>>,
    last_error: Mutex<Option<AttachError>>,
    last_stats: Mutex<FreezeStats>,
}

impl RemoteQuiesce {
    /// A quiesce for process `pid` (nothing is done until [`Quiesce::freeze`]).
    pub fn new(pid: u32) -> RemoteQuiesce {
        RemoteQuiesce {
            pid: pid as i32,
            frozen: Mutex::new(None),
            last_error: Mutex::new(None),
            last_stats: Mutex::new(FreezeStats::default()),
        }
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

    /// Whether the target is frozen by this quiesce.
    pub fn is_frozen(&self) -> bool {
        self.frozen.lock().expect("quiesce lock").is_some()
    }

    /// Stops every thread of the target; on error, resumes what was stopped.
    pub fn try_freeze(&self) -> Result<FreezeStats, AttachError> {
        let mut g = self.frozen.lock().expect("quiesce lock");
        if g.is_some() {
            return Ok(self.last_stats());
        }
        let t0 = Instant::now();
        let pid = self.pid;
        let mut f = Frozen {
            tracer: ptrace::gettid(),
            threads: Vec::new(),
        };
        let mut passes = 0;
        let res = (|| -> Result<(), AttachError> {
            loop {
                passes += 1;
                let tids = thread_ids(pid).map_err(|_| AttachError::NoSuchProcess { pid })?;
                let new: Vec<i32> = tids
                    .into_iter()
                    .filter(|t| !f.threads.iter().any(|(s, _)| s == t))
                    .collect();
                if new.is_empty() {
                    if f.threads.is_empty() {
                        return Err(AttachError::NoSuchProcess { pid });
                    }
                    return Ok(());
                }
                // Seize and interrupt the whole batch first, so the threads stop in parallel.
                let mut seized = Vec::new();
                for tid in new {
                    match ptrace::seize(tid, 0) {
                        Ok(()) => {}
                        Err(Errno::SRCH) => continue, // the thread exited
                        Err(e) => return Err(AttachError::from_errno(pid, tid, "PTRACE_SEIZE", e)),
                    }
                    match ptrace::interrupt(tid) {
                        Ok(()) => seized.push(tid),
                        Err(Errno::SRCH) => {}
                        Err(e) => {
                            let _ = ptrace::detach(tid, 0);
                            return Err(AttachError::from_errno(pid, tid, "PTRACE_INTERRUPT", e));
                        }
                    }
                }
                for tid in seized {
                    loop {
                        match ptrace::wait(tid) {
                            Ok(WaitStatus::Event { .. } | WaitStatus::SyscallStop) => {
                                f.threads.push((tid, 0));
                                break;
                            }
                            Ok(WaitStatus::Signal(s)) => {
                                f.threads.push((tid, s));
                                break;
                            }
                            Ok(WaitStatus::Exited(_) | WaitStatus::Killed(_)) | Err(_) => break,
                            Ok(WaitStatus::Other(_)) => {}
                        }
                    }
                }
            }
        })();
        match res {
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

/// Reads target memory for [`LinuxMm::read_memory`] on a [`Target::Pid`].
pub(super) fn read_memory(pid: u32, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    read_remote(pid as i32, addr, buf)
}

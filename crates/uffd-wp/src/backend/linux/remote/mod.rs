//! The remote backend: a userfaultfd living in *another* process's mm, driven from here.
//!
//! [`LinuxMm::attach`] makes one thread of the target create a userfaultfd and takes it with
//! pidfd_getfd(2); the result is a [`LinuxMm`] on [`Target::Pid`], whose memory is read with
//! process_vm_readv(2) and whose pagemap and mappings are read in `/proc/PID`.
//! [`RemoteQuiesce`] freezes the target's threads for a snapshot's pause.
//!
//! One file per job:
//! - this one: the public API ([`LinuxMm::attach`] and its variants, [`AttachError`],
//!   [`AttachReport`]) and reading the target's memory;
//! - `tracee.rs`: the ptrace injection that makes a thread of the target run userfaultfd(2)
//!   and close(2) ([`SyscallSite`]), step by step in its docs;
//! - `quiesce.rs`: [`RemoteQuiesce`], freezing and resuming every thread;
//! - what is read in `/proc` (threads, their states, maps) is [`crate::backend::procfs`],
//!   shared with pin discovery; its public items are re-exported here.
//!
//! # Attaching ([`LinuxMm::attach`])
//!
//! First every check that can fail ([`preflight`]: the process, a kernel thread, another
//! tracer, Yama, ownership, seccomp, pidfd_getfd; the kernel's userfaultfd features), then,
//! with every other thread frozen, one thread of the target (one in a system call if there is
//! one) is made to run `userfaultfd(O_CLOEXEC | O_NONBLOCK)` and `close(fd)`, after this
//! process took a copy of the descriptor: this process holds the only reference, and when it
//! closes it (or dies) the kernel releases the context and un-protects everything.
//!
//! The protocol (tracee.rs) is built so that this process may be SIGKILLed at any instant
//! without harming the target: no single-step (whose state would survive the tracer and kill
//! the target with SIGTRAP), stops observed without consuming them, signals passed through
//! at once, and injected registers live only while a sigreturn frame on the thread's own stack
//! (net.rs) both closes the injected fd and restores the thread. Every step calls an
//! [`Observer`], which can cancel (the target is released first) or, in tests, stop there to
//! be killed. The kill tests (crates/uffd-wp-cli/tests/remote_kill.rs) kill the monitor at
//! each step and at random instants. What remains is stated in
//! docs/notes/issue9-ptrace-protocol.md (a shadow-stack or libc-less target is refused).
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

mod net;
mod preflight;
mod quiesce;
mod restart;
mod tracee;

#[cfg(target_arch = "x86_64")]
use std::time::Instant;

use super::{Config, LinuxMm, OpenError, Target};
use crate::backend::procfs::process_alive;
#[cfg(target_arch = "x86_64")]
use crate::features::{self, Features};
use crate::seam::Errno;
use crate::sys::errno_name;
use crate::sys::ptrace;
#[cfg(target_arch = "x86_64")]
use crate::sys::uffd::Uffd;

pub use crate::backend::procfs::{
    MapEntry, fully_mapped, maps_cover, parse_maps, read_maps, stat_state, thread_ids, thread_state,
};
pub use preflight::preflight;
pub mod sysctl;
pub use quiesce::{FreezeStats, RemoteQuiesce};
pub use tracee::SyscallSite;

/// A named point of the attach and freeze protocols, where an [`Observer`] is called (to
/// cancel, or, in tests, to stop there and be killed). The attach steps are those of the
/// injection (tracee.rs module docs); a thread in a system call goes `Riding`, one in user
/// code `Manufactured`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Step {
    /// Every other thread of the target frozen (so the fd table cannot change and no fork
    /// can copy the injected fd); the thread not seized yet.
    OthersFrozen,
    /// The thread is seized, not yet interrupted.
    Seized,
    /// `PTRACE_INTERRUPT` sent, the stop not yet seen.
    Interrupted,
    /// At the interrupt's event stop, registers read.
    EventStop,
    /// An epoll wait that returned EINTR because of the interrupt was rewound to its `syscall`.
    Rewound,
    /// About to resume a thread in a system call so that it re-enters it.
    Riding,
    /// At the syscall-entry stop where a call will be substituted.
    EntryStop,
    /// The safety net's frame written on the thread's stack.
    FrameWritten,
    /// The thread sent into the restorer (injected registers live, net armed).
    Manufactured,
    /// userfaultfd(2) substituted at the entry stop (not run yet).
    Substituted,
    /// At userfaultfd's exit stop: the fd exists in the target.
    UffdExitStop,
    /// This process has its copy of the fd.
    FdTaken,
    /// At the entry stop of the chain's close(2) of the target's copy.
    CloseEntryStop,
    /// At close's exit stop.
    CloseExitStop,
    /// The thread's own registers written back.
    Restored,
    /// The thread detached: the attach is done.
    Detached,
    /// Freezing: some threads seized and interrupted, not all stopped.
    Freezing,
    /// Every thread stopped.
    Frozen,
}

impl Step {
    /// Every step, in protocol order.
    pub const ALL: [Step; 18] = [
        Step::OthersFrozen,
        Step::Seized,
        Step::Interrupted,
        Step::EventStop,
        Step::Rewound,
        Step::Riding,
        Step::EntryStop,
        Step::FrameWritten,
        Step::Manufactured,
        Step::Substituted,
        Step::UffdExitStop,
        Step::FdTaken,
        Step::CloseEntryStop,
        Step::CloseExitStop,
        Step::Restored,
        Step::Detached,
        Step::Freezing,
        Step::Frozen,
    ];

    /// Its name on the command line (`--stall-at`): kebab-case.
    pub fn name(&self) -> &'static str {
        match self {
            Step::OthersFrozen => "others-frozen",
            Step::Seized => "seized",
            Step::Interrupted => "interrupted",
            Step::EventStop => "event-stop",
            Step::Rewound => "rewound",
            Step::Riding => "riding",
            Step::EntryStop => "entry-stop",
            Step::FrameWritten => "frame-written",
            Step::Manufactured => "manufactured",
            Step::Substituted => "substituted",
            Step::UffdExitStop => "uffd-exit-stop",
            Step::FdTaken => "fd-taken",
            Step::CloseEntryStop => "close-entry-stop",
            Step::CloseExitStop => "close-exit-stop",
            Step::Restored => "restored",
            Step::Detached => "detached",
            Step::Freezing => "freezing",
            Step::Frozen => "frozen",
        }
    }
}

/// An [`Observer`]'s request to stop: the attach (or freeze) releases the target and fails
/// with [`AttachError::Cancelled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancel;

/// Called at every [`Step`] with the target in that state.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// `Err(Cancel)` ends the operation cleanly.
    fn at(&self, step: Step) -> Result<(), Cancel>;
}

/// The observer that never cancels.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn at(&self, _: Step) -> Result<(), Cancel> {
        Ok(())
    }
}

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
    /// An [`Observer`] cancelled (the target was released first).
    #[error("cancelled at step {} while attaching to process {pid}", step.name())]
    Cancelled {
        /// The pid.
        pid: i32,
        /// Where.
        step: Step,
    },
    /// A thread never reached a usable stop in time (blocked uninterruptibly, say); it was
    /// released.
    #[error("thread {tid} of process {pid} did not reach a usable stop in time")]
    Timeout {
        /// The pid.
        pid: i32,
        /// The thread.
        tid: i32,
    },
    /// The injection's safety net cannot be used, so injecting could harm the target if this
    /// process died at the wrong instant: refused before touching it.
    #[error("process {pid}: refusing to inject without a safety net: {why}")]
    NoSafetyNet {
        /// The pid.
        pid: i32,
        /// What is missing.
        why: String,
    },
    /// A thread runs under strict seccomp (mode 1): an injected call would kill it.
    #[error("thread {tid} of process {pid} runs under strict seccomp: injecting would kill it")]
    Seccomp {
        /// The pid.
        pid: i32,
        /// The thread.
        tid: i32,
    },
    /// Another tracer (a debugger, strace) holds a thread of the target.
    #[error("process {pid} is already traced by process {tracer} ({tracer_name}): detach it first")]
    AlreadyTraced {
        /// The pid.
        pid: i32,
        /// The tracer's pid.
        tracer: i32,
        /// The tracer's command name.
        tracer_name: String,
    },
    /// The pid is a kernel thread: it has no user memory.
    #[error("process {pid} ({name}) is a kernel thread: it has no user memory to snapshot")]
    KernelThread {
        /// The pid.
        pid: i32,
        /// Its name.
        name: String,
    },
    /// The pid is this process.
    #[error("process {pid} is uffd-wp itself")]
    Itself {
        /// The pid.
        pid: i32,
    },
    /// A check before the attach found it would be refused.
    #[error("process {pid}: not permitted: {why}")]
    NotPermitted {
        /// The pid.
        pid: i32,
        /// Why.
        why: String,
    },
    /// The kernel lacks something the attach needs.
    #[error("remote attach needs {what}, which this kernel lacks")]
    KernelFeature {
        /// What is missing.
        what: &'static str,
    },
}

impl AttachError {
    /// The errno behind the failure (ESRCH for a process that is gone, ENOTSUP for an
    /// unsupported architecture or no safety net, EPERM for what checks refuse).
    pub fn errno(&self) -> Errno {
        match self {
            AttachError::NoSuchProcess { .. } | AttachError::Exited { .. } => Errno::SRCH,
            AttachError::Permission { errno, .. }
            | AttachError::TargetSyscall { errno, .. }
            | AttachError::Os { errno, .. } => *errno,
            AttachError::UnsupportedArch { .. } | AttachError::NoSafetyNet { .. } => Errno::NOTSUP,
            AttachError::Open(e) => e.errno(),
            AttachError::Cancelled { .. } => Errno::INTR,
            AttachError::Timeout { .. } => Errno::TIMEDOUT,
            AttachError::Seccomp { .. }
            | AttachError::AlreadyTraced { .. }
            | AttachError::KernelThread { .. }
            | AttachError::NotPermitted { .. } => Errno::PERM,
            AttachError::Itself { .. } => Errno::INVAL,
            AttachError::KernelFeature { .. } => Errno::NOSYS,
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
    /// `vm.unprivileged_userfaultfd` was raised to 1 for the instant of the injected call
    /// (the target lacks `CAP_SYS_PTRACE`; [`sysctl`]), and set back.
    pub raised_unprivileged_userfaultfd: bool,
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

impl LinuxMm {
    /// A backend on the address space of process `pid` (x86_64; root or CAP_SYS_PTRACE over
    /// it), negotiating `cfg`. See the module docs for what it does to the target.
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
    /// best placed one) run the injected system calls.
    pub fn attach_thread(
        pid: u32,
        tid: Option<u32>,
        cfg: Config,
    ) -> Result<(LinuxMm, AttachReport), AttachError> {
        Self::attach_observed(pid, tid, cfg, &NoObserver)
    }

    /// [`LinuxMm::attach_thread`], calling `obs` at every [`Step`] (it may cancel). Every
    /// check that can fail ([`preflight`], kernel features) runs before the target is touched.
    pub fn attach_observed(
        pid: u32,
        tid: Option<u32>,
        cfg: Config,
        obs: &dyn Observer,
    ) -> Result<(LinuxMm, AttachReport), AttachError> {
        let pid_i = i32::try_from(pid).map_err(|_| AttachError::NoSuchProcess { pid: -1 })?;
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (cfg, tid, obs);
            Err(AttachError::UnsupportedArch {
                why: format!("the monitor is built for {}", std::env::consts::ARCH),
            })
        }
        #[cfg(target_arch = "x86_64")]
        {
            let t0 = Instant::now();
            preflight(pid_i)?;
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
                && !matches!(thread_state(pid_i, t), Some(s) if s != 'Z' && s != 'X')
            {
                return Err(AttachError::NoSuchProcess { pid: t });
            }
            let raised = if cfg.user_mode_only {
                None
            } else {
                sysctl::raise_for(pid_i)?
            };
            let stolen = tracee::steal_uffd(pid_i, tid, flags, obs);
            let raised_sysctl = raised.is_some();
            drop(raised);
            let (fd, mut report) = stolen?;
            report.raised_unprivileged_userfaultfd = raised_sysctl;
            let mm = LinuxMm::from_uffd(Uffd::from_remote(fd), cfg, offered, Target::Pid(pid))?;
            report.total_us = t0.elapsed().as_secs_f64() * 1e6;
            Ok((mm, report))
        }
    }
}

/// Reads target memory for [`LinuxMm::read_memory`] on a [`Target::Pid`].
pub(super) fn read_memory(pid: u32, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    match read_remote(pid as i32, addr, buf) {
        // The leader exited (other threads run): read through a live thread.
        Err(Errno::SRCH) => read_remote(crate::backend::procfs::mm_tid(pid as i32), addr, buf),
        r => r,
    }
}

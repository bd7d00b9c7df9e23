//! The checks made before a target is touched ([`preflight`]): everything that would make the
//! attach fail, found while the target has not been seized yet.

use super::AttachError;
use crate::backend::procfs::{self, process_alive, status_field, thread_ids};
use crate::sys::ptrace;

/// `CAP_SYS_PTRACE`.
const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_SYS_ADMIN` (needed to suspend a target's seccomp filters while injecting).
const CAP_SYS_ADMIN: u32 = 21;

/// Checks, without touching process `pid`, that it can be attached: it exists with a live
/// thread, is not this process nor a kernel thread, no other tracer holds a thread of it,
/// ptrace is permitted (Yama, capabilities, ownership), its seccomp mode allows the
/// injection, and the kernel has pidfd_getfd(2).
pub fn preflight(pid: i32) -> Result<(), AttachError> {
    if pid == std::process::id() as i32 {
        return Err(AttachError::Itself { pid });
    }
    let status = procfs::read(&procfs::path(pid, "status"))
        .map_err(|_| AttachError::NoSuchProcess { pid })?;
    let name = status_field(&status, "Name")
        .unwrap_or("")
        .trim()
        .to_string();
    if status_field(&status, "Kthread").map(str::trim) == Some("1") || is_kthread(pid) {
        return Err(AttachError::KernelThread { pid, name });
    }
    if !process_alive(pid) {
        return Err(AttachError::NoSuchProcess { pid });
    }
    check_tracers(pid)?;
    check_permission(pid, &status)?;
    check_seccomp(pid)?;
    check_pidfd_getfd()
}

/// A kernel thread has no `mm`: its stat's flags carry PF_KTHREAD (kernels before Kthread:).
fn is_kthread(pid: i32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(stat) = procfs::read(&procfs::path(pid, "stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    // After the name: state ppid pgrp session tty_nr tpgid flags.
    rest.split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|f| f & PF_KTHREAD != 0)
}

/// Fails when a thread of `pid` already has a tracer (a debugger, strace), naming it.
fn check_tracers(pid: i32) -> Result<(), AttachError> {
    for tid in thread_ids(pid).unwrap_or_default() {
        let Ok(s) = procfs::read(&procfs::path(pid, &format!("task/{tid}/status"))) else {
            continue;
        };
        let tracer: i32 = status_field(&s, "TracerPid")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if tracer != 0 {
            // TracerPid is the tracing thread: name its process.
            let tracer = procfs::read(&procfs::path(tracer, "status"))
                .ok()
                .and_then(|t| status_field(&t, "Tgid")?.trim().parse().ok())
                .unwrap_or(tracer);
            let tracer_name = procfs::read(&procfs::path(tracer, "comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(AttachError::AlreadyTraced {
                pid,
                tracer,
                tracer_name,
            });
        }
    }
    Ok(())
}

/// The capability bits this process has in effect.
fn own_caps() -> u64 {
    procfs::read("/proc/self/status")
        .ok()
        .and_then(|s| u64::from_str_radix(status_field(&s, "CapEff")?.trim(), 16).ok())
        .unwrap_or(0)
}

/// The first (real) uid of a status text's `Uid:` line, and this process's effective uid.
fn uids(status: &str) -> (Option<u32>, Option<u32>) {
    let field = |s: &str, i: usize| {
        status_field(s, "Uid")?
            .split_whitespace()
            .nth(i)?
            .parse()
            .ok()
    };
    let me = procfs::read("/proc/self/status").ok();
    (field(status, 0), me.and_then(|m| field(&m, 1)))
}

/// Yama's ptrace_scope and ptrace access: refused attaches are named before the attach.
fn check_permission(pid: i32, status: &str) -> Result<(), AttachError> {
    let has_ptrace = own_caps() & (1 << CAP_SYS_PTRACE) != 0;
    let scope: Option<u32> = procfs::read("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let why = match scope {
        Some(3) => Some("Yama's ptrace_scope is 3 (no process may be traced)".to_string()),
        Some(s @ (1 | 2)) if !has_ptrace => Some(format!(
            "Yama's ptrace_scope is {s} and this process lacks CAP_SYS_PTRACE (run as root)"
        )),
        _ => None,
    };
    if let Some(why) = why {
        return Err(AttachError::NotPermitted { pid, why });
    }
    match uids(status) {
        (Some(theirs), Some(mine)) if theirs != mine && !has_ptrace => {
            Err(AttachError::NotPermitted {
                pid,
                why: format!(
                    "it belongs to uid {theirs}, this process runs as uid {mine} without CAP_SYS_PTRACE"
                ),
            })
        }
        _ => Ok(()),
    }
}

/// Strict seccomp kills an injected call; filters are suspended while traced, which needs
/// CAP_SYS_ADMIN.
fn check_seccomp(pid: i32) -> Result<(), AttachError> {
    for tid in thread_ids(pid).unwrap_or_default() {
        let Ok(s) = procfs::read(&procfs::path(pid, &format!("task/{tid}/status"))) else {
            continue;
        };
        match status_field(&s, "Seccomp").map(str::trim) {
            Some("1") => return Err(AttachError::Seccomp { pid, tid }),
            Some("2") if own_caps() & (1 << CAP_SYS_ADMIN) == 0 => {
                return Err(AttachError::NotPermitted {
                    pid,
                    why: "it runs under a seccomp filter, which only CAP_SYS_ADMIN can suspend"
                        .into(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// pidfd_getfd(2) (5.6+), tried on this process's own stdin-or-whatever fd 0.
fn check_pidfd_getfd() -> Result<(), AttachError> {
    let me =
        ptrace::pidfd_open(std::process::id() as i32).map_err(|_| AttachError::KernelFeature {
            what: "pidfd_open(2) (Linux 5.3)",
        })?;
    match ptrace::pidfd_getfd(&me, me_fd(&me)) {
        Err(crate::seam::Errno::NOSYS) => Err(AttachError::KernelFeature {
            what: "pidfd_getfd(2) (Linux 5.6)",
        }),
        _ => Ok(()),
    }
}

fn me_fd(fd: &std::os::fd::OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

//! The kernel's restart of an interrupted system call, as seen at a `PTRACE_EVENT_STOP`
//! (arch/x86/kernel/signal.c `arch_do_signal_or_restart`, run after the stop), and the one
//! case it does not cover: an epoll wait, which returns -EINTR when interrupted even without
//! a signal (fs/eventpoll.c `ep_poll`). Used by the injection and by the freeze, so that
//! neither makes a program see EINTR.

use super::read_remote;
use crate::backend::procfs;
use crate::seam::Errno;
use crate::sys::ptrace::{self, Regs, nr, restart};

/// Whether R0 (at an event stop) is inside a system call whose end the kernel has not
/// settled yet: a restart code, or -EINTR (the call may have a temporary signal mask that
/// the kernel restores only on the way out).
pub(super) fn in_restartable_call(r0: &Regs) -> bool {
    let rax = r0.rax() as i64;
    (r0.orig_rax() as i64) >= 0
        && (matches!(
            rax,
            restart::SYS | restart::NOINTR | restart::NOHAND | restart::RESTARTBLOCK
        ) || rax == -(Errno::INTR.raw_os_error() as i64))
}

/// If thread `tid`, stopped at an event stop with registers `r0`, is an epoll wait without
/// timeout that returned -EINTR only because of the interrupt (no signal pending and
/// unblocked), at a `syscall` instruction: rewinds it to that instruction (`rip -= 2`, `rax`
/// = the call, `orig_rax` = -1; one SETREGS, a state "about to call epoll_wait" that is safe
/// to be left in) and returns true. A signal arriving later is then seen just before the
/// call, a legal interleaving.
pub(super) fn rewind_eintr(pid: i32, tid: i32, r0: &Regs) -> Result<bool, Errno> {
    let infinite = match r0.orig_rax() {
        nr::EPOLL_WAIT | nr::EPOLL_PWAIT => r0.arg(3) as i32 == -1,
        nr::EPOLL_PWAIT2 => r0.arg(3) == 0,
        _ => false,
    };
    let mut code = [0u8; 2];
    let eligible = infinite
        && r0.rax() as i64 == -(Errno::INTR.raw_os_error() as i64)
        && r0.ip() >= 2
        && read_remote(tid, r0.ip() - 2, &mut code).is_ok()
        && code == [0x0f, 0x05]
        && !signal_deliverable(pid, tid);
    if !eligible {
        return Ok(false);
    }
    let rewound = r0
        .with_ip(r0.ip() - 2)
        .with_rax(r0.orig_rax())
        .with_orig_rax(u64::MAX);
    ptrace::set_regs(tid, &rewound)?;
    Ok(true)
}

/// Whether a signal is pending for thread `tid` and not blocked (`/proc/.../status`); true
/// when it cannot be read.
fn signal_deliverable(pid: i32, tid: i32) -> bool {
    let Ok(s) = procfs::read(&procfs::path(pid, &format!("task/{tid}/status"))) else {
        return true;
    };
    let hex =
        |k: &str| procfs::status_field(&s, k).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    match (hex("SigPnd"), hex("ShdPnd"), hex("SigBlk")) {
        (Some(p), Some(sh), Some(b)) => (p | sh) & !b != 0,
        _ => true,
    }
}

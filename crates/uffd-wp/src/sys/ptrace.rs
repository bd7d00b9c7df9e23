//! Working on another process: ptrace(2), waitpid(2) on tracees, process_vm_readv(2),
//! pidfd_open(2)/pidfd_getfd(2), tgkill(2).
//!
//! One function per kernel call, the kernel's errno unchanged, no policy: the state machine
//! that seizes a thread, makes it run a system call and always detaches it lives in
//! `linux::remote`. See [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html),
//! [process_vm_readv(2)](https://man7.org/linux/man-pages/man2/process_vm_readv.2.html),
//! [pidfd_getfd(2)](https://man7.org/linux/man-pages/man2/pidfd_getfd.2.html).

use std::os::fd::{AsFd, OwnedFd};

use super::Errno;

/// `PTRACE_O_TRACESYSGOOD`: syscall stops report `SIGTRAP | 0x80`.
pub const O_TRACESYSGOOD: u32 = libc::PTRACE_O_TRACESYSGOOD as u32;
/// `PTRACE_EVENT_STOP`: the event of a `PTRACE_INTERRUPT` trap or a group-stop of a seized
/// tracee.
pub const EVENT_STOP: u32 = libc::PTRACE_EVENT_STOP as u32;
/// `PTRACE_O_SUSPEND_SECCOMP`: the tracee's seccomp filters are not applied while it is traced
/// by this tracer (CAP_SYS_ADMIN; lives in the ptrace link, so it ends with the tracer).
pub const O_SUSPEND_SECCOMP: u32 = 0x0020_0000;
/// `SIGTRAP`.
pub const SIGTRAP: i32 = libc::SIGTRAP;
/// `AUDIT_ARCH_X86_64`: the `arch` of a 64-bit system call in [`SyscallInfo`].
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// The x32 bit of a system call number.
pub const X32_SYSCALL_BIT: u64 = 0x4000_0000;

/// x86_64 system call numbers this crate injects.
pub mod nr {
    /// `close(2)`.
    pub const CLOSE: u64 = 3;
    /// `userfaultfd(2)`.
    pub const USERFAULTFD: u64 = 323;
    /// `rt_sigreturn(2)`.
    pub const RT_SIGRETURN: u64 = 15;
    /// `restart_syscall(2)`.
    pub const RESTART_SYSCALL: u64 = 219;
    /// `exit(2)`.
    pub const EXIT: u64 = 60;
    /// `exit_group(2)`.
    pub const EXIT_GROUP: u64 = 231;
    /// `epoll_wait(2)`.
    pub const EPOLL_WAIT: u64 = 232;
    /// `epoll_pwait(2)`.
    pub const EPOLL_PWAIT: u64 = 281;
    /// `epoll_pwait2(2)`.
    pub const EPOLL_PWAIT2: u64 = 441;
}

/// The kernel-internal restart codes a system call interrupted by a signal (or a ptrace
/// interrupt) leaves in `rax` at a stop inside `get_signal()` (include/linux/errno.h).
pub mod restart {
    /// `-ERESTARTSYS`.
    pub const SYS: i64 = -512;
    /// `-ERESTARTNOINTR`.
    pub const NOINTR: i64 = -513;
    /// `-ERESTARTNOHAND`.
    pub const NOHAND: i64 = -514;
    /// `-ERESTART_RESTARTBLOCK`.
    pub const RESTARTBLOCK: i64 = -516;
}

/// `__USER_CS` on x86_64: the code segment of a 64-bit user process (a 32-bit one runs with
/// `__USER32_CS` = 0x23 and would take `syscall` into the wrong table).
pub const USER_CS_64: u64 = 0x33;

fn check(rc: libc::c_long) -> Result<libc::c_long, Errno> {
    if rc == -1 {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    } else {
        Ok(rc)
    }
}

/// A ptrace request with integer `addr` and `data` (no memory passed).
fn request(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> Result<(), Errno> {
    // SAFETY: the requests sent through this helper (SEIZE, INTERRUPT, CONT, SYSCALL, DETACH)
    // take integers in `addr`/`data` (options, a signal number) and never dereference them.
    let rc = unsafe {
        libc::ptrace(
            req as _,
            tid as libc::pid_t,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    check(rc).map(drop)
}

/// `PTRACE_SEIZE`: become the tracer of thread `tid` without stopping it.
pub fn seize(tid: i32, options: u32) -> Result<(), Errno> {
    request(libc::PTRACE_SEIZE as _, tid, 0, options as usize)
}

/// `PTRACE_INTERRUPT`: make a seized thread stop (`PTRACE_EVENT_STOP`), also out of a
/// blocking system call (which the kernel restarts when the thread goes on).
pub fn interrupt(tid: i32) -> Result<(), Errno> {
    request(libc::PTRACE_INTERRUPT as _, tid, 0, 0)
}

/// `PTRACE_CONT`, delivering `sig` (0: none) when the stop is a signal-delivery stop.
pub fn cont(tid: i32, sig: i32) -> Result<(), Errno> {
    request(libc::PTRACE_CONT as _, tid, 0, sig as usize)
}

/// `PTRACE_SYSCALL`: continue until the next system call entry or exit.
pub fn syscall(tid: i32, sig: i32) -> Result<(), Errno> {
    request(libc::PTRACE_SYSCALL as _, tid, 0, sig as usize)
}

/// `PTRACE_DETACH`: stop tracing (the thread goes on), delivering `sig` (0: none) when the stop
/// is a signal-delivery stop.
pub fn detach(tid: i32, sig: i32) -> Result<(), Errno> {
    request(libc::PTRACE_DETACH as _, tid, 0, sig as usize)
}

/// `tgkill(2)`: sends `sig` to thread `tid` of process `pid`.
pub fn tgkill(pid: i32, tid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: tgkill takes three integers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            pid as libc::c_long,
            tid as libc::c_long,
            sig as libc::c_long,
        )
    };
    check(rc).map(drop)
}

/// The general-purpose registers of a stopped tracee (`struct user_regs_struct`).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Regs(libc::user_regs_struct);

#[cfg(target_arch = "x86_64")]
impl std::fmt::Debug for Regs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regs")
            .field("rip", &format_args!("{:#x}", self.0.rip))
            .field("rax", &(self.0.rax as i64))
            .field("orig_rax", &(self.0.orig_rax as i64))
            .field("cs", &format_args!("{:#x}", self.0.cs))
            .finish()
    }
}

#[cfg(target_arch = "x86_64")]
impl Regs {
    /// Instruction pointer.
    pub fn ip(&self) -> u64 {
        self.0.rip
    }
    /// `rax`: the system call number on entry, its result on exit.
    pub fn rax(&self) -> u64 {
        self.0.rax
    }
    /// `orig_rax`: the number of the system call the thread is in, or -1.
    pub fn orig_rax(&self) -> u64 {
        self.0.orig_rax
    }
    /// Code segment selector.
    pub fn cs(&self) -> u64 {
        self.0.cs
    }
    /// Stack pointer.
    pub fn sp(&self) -> u64 {
        self.0.rsp
    }
    /// System call argument `i` (0..6: rdi, rsi, rdx, r10, r8, r9).
    pub fn arg(&self, i: usize) -> u64 {
        [
            self.0.rdi, self.0.rsi, self.0.rdx, self.0.r10, self.0.r8, self.0.r9,
        ][i]
    }
    /// These registers with RIP = `ip`.
    pub fn with_ip(mut self, ip: u64) -> Regs {
        self.0.rip = ip;
        self
    }
    /// These registers with RSP = `sp`.
    pub fn with_sp(mut self, sp: u64) -> Regs {
        self.0.rsp = sp;
        self
    }
    /// These registers with `rax` = `v`.
    pub fn with_rax(mut self, v: u64) -> Regs {
        self.0.rax = v;
        self
    }
    /// These registers with `orig_rax` = `v` (-1: not in a system call, so the kernel's
    /// restart logic leaves them alone; at a syscall-entry stop: the call the kernel runs).
    pub fn with_orig_rax(mut self, v: u64) -> Regs {
        self.0.orig_rax = v;
        self
    }
    /// These registers with the six system call arguments `args`.
    pub fn with_args(mut self, args: [u64; 6]) -> Regs {
        let r = &mut self.0;
        [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9] = args;
        self
    }
    /// The kernel's `struct rt_sigframe` (x86_64, without its siginfo, which rt_sigreturn
    /// never reads) whose `rt_sigreturn(2)` restores exactly these registers, the signal mask
    /// `mask` and the FPU/xstate image at `fpstate` (see [`fpstate_for_sigframe`]):
    /// `pretcode` = `restorer`, `uc_flags` = `UC_FP_XSTATE | UC_SIGCONTEXT_SS |
    /// UC_STRICT_RESTORE_SS`, and an alternate stack of an invalid mode (`ss_flags` 0x7777), which
    /// `restore_altstack()` refuses silently, so the thread's own alternate stack is kept.
    pub fn sigframe(&self, restorer: u64, fpstate: u64, mask: u64) -> [u64; SIGFRAME_WORDS] {
        let r = &self.0;
        let mut f = [0u64; SIGFRAME_WORDS];
        f[0] = restorer;
        f[1] = 1 | 2 | 4; // uc_flags
        f[4] = 0x7777; // uc_stack.ss_flags (int) and its padding; ss_sp = ss_size = 0
        let mc = [
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx,
            r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags,
        ];
        f[6..24].copy_from_slice(&mc);
        // cs, gs, fs, ss as four u16 in one word.
        f[24] = (r.cs & 0xffff) | (r.ss & 0xffff) << 48;
        // err, trapno, oldmask, cr2 = 0 (f[25..29]); fpstate; reserved1[8] = 0.
        f[29] = fpstate;
        f[38] = mask; // uc_sigmask
        f
    }
}

/// 8-byte words of [`Regs::sigframe`]: pretcode, uc_flags, uc_link, uc_stack (3 words), the
/// 256-byte sigcontext and uc_sigmask.
#[cfg(target_arch = "x86_64")]
pub const SIGFRAME_WORDS: usize = 39;

/// `PTRACE_GETREGS` of a stopped tracee.
#[cfg(target_arch = "x86_64")]
pub fn get_regs(tid: i32) -> Result<Regs, Errno> {
    let mut r = std::mem::MaybeUninit::<libc::user_regs_struct>::zeroed();
    // SAFETY: PTRACE_GETREGS writes one `struct user_regs_struct` at `data`, which points to
    // a live, writable value of exactly that type.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS as _,
            tid as libc::pid_t,
            std::ptr::null_mut::<libc::c_void>(),
            r.as_mut_ptr().cast::<libc::c_void>(),
        )
    };
    check(rc)?;
    // SAFETY: zero-initialised plain integers, overwritten by the kernel on success.
    Ok(Regs(unsafe { r.assume_init() }))
}

/// `PTRACE_SETREGS` of a stopped tracee.
#[cfg(target_arch = "x86_64")]
pub fn set_regs(tid: i32, regs: &Regs) -> Result<(), Errno> {
    let mut r = regs.0;
    // SAFETY: PTRACE_SETREGS reads one `struct user_regs_struct` at `data`, which points to a
    // live value of exactly that type.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGS as _,
            tid as libc::pid_t,
            std::ptr::null_mut::<libc::c_void>(),
            (&mut r as *mut libc::user_regs_struct).cast::<libc::c_void>(),
        )
    };
    check(rc).map(drop)
}

/// Register set note types for [`get_regset`] (the `n_type` of the core-file note that holds
/// the same bytes).
pub mod nt {
    /// `NT_PRSTATUS`: `struct user_regs_struct` (216 bytes on x86_64).
    pub const PRSTATUS: u32 = 1;
    /// `NT_PRFPREG`: `struct user_fpregs_struct` (512 bytes on x86_64).
    pub const PRFPREG: u32 = 2;
    /// `NT_X86_XSTATE`: the XSAVE area (its size depends on the CPU's enabled features).
    pub const X86_XSTATE: u32 = 0x202;
}

/// `PTRACE_GETREGSET` of a stopped tracee: the register set `nt_type` (see [`nt`]) into
/// `buf`. Returns the bytes the kernel wrote, at most `buf.len()` (it shortens the iovec to
/// the set's size; a shorter `buf` gets a prefix). ENODEV when the CPU lacks the set (no
/// XSAVE), EINVAL for an unknown type.
pub fn get_regset(tid: i32, nt_type: u32, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: PTRACE_GETREGSET takes the set's type in `addr` (an integer) and a `struct
    // iovec` at `data`: `iov` is a live local, and it describes `buf`, live and writable for
    // the call; the kernel writes at most `iov_len` bytes there and stores the count written
    // back into `iov.iov_len`.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET as _,
            tid as libc::pid_t,
            nt_type as usize as *mut libc::c_void,
            (&mut iov as *mut libc::iovec).cast::<libc::c_void>(),
        )
    };
    check(rc)?;
    Ok(iov.iov_len)
}

/// What `waitpid` reported about a traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Killed(i32),
    /// A system call entry or exit stop (`SIGTRAP | 0x80` with `PTRACE_O_TRACESYSGOOD`).
    SyscallStop,
    /// A `PTRACE_EVENT_*` stop (`PTRACE_EVENT_STOP` for an interrupt or a group-stop, with the
    /// stopping signal in `sig`).
    Event {
        /// The event.
        event: u32,
        /// `WSTOPSIG`.
        sig: i32,
    },
    /// A signal-delivery stop: `sig` is about to be delivered unless the tracer suppresses it.
    Signal(i32),
    /// Anything else (`WIFCONTINUED`).
    Other(i32),
}

/// `waitpid(tid, __WALL)`: waits for the next state change of a traced thread (any thread,
/// not only a child) and consumes it. Retries on EINTR.
pub fn wait(tid: i32) -> Result<WaitStatus, Errno> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid writes one int at `&mut status`, a live local.
        let rc = unsafe { libc::waitpid(tid as libc::pid_t, &mut status, libc::__WALL) };
        match check(rc as libc::c_long) {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    let s = status;
    Ok(if libc::WIFEXITED(s) {
        WaitStatus::Exited(libc::WEXITSTATUS(s))
    } else if libc::WIFSIGNALED(s) {
        WaitStatus::Killed(libc::WTERMSIG(s))
    } else if libc::WIFSTOPPED(s) {
        stop_status(s >> 8)
    } else {
        WaitStatus::Other(s)
    })
}

/// Classifies a stop's `exit_code` (`WSTOPSIG | event << 8`).
fn stop_status(code: i32) -> WaitStatus {
    let sig = code & 0xff;
    let event = ((code >> 8) & 0xffff) as u32;
    if sig == (libc::SIGTRAP | 0x80) {
        WaitStatus::SyscallStop
    } else if event != 0 {
        WaitStatus::Event { event, sig }
    } else {
        WaitStatus::Signal(sig)
    }
}

/// `waitid(P_PID, tid, WSTOPPED | WEXITED | __WALL | WNOWAIT [| WNOHANG])`: the current state
/// change of a traced thread, **left unconsumed**: the stop keeps its `exit_code`, so if this
/// tracer dies the kernel treats the stop as never seen (a signal-delivery stop delivers its
/// signal, kernel/signal.c `ptrace_signal`). `None` when `block` is false and nothing is
/// pending. Retries on EINTR. An exit must then be consumed with [`wait`].
pub fn peek(tid: i32, block: bool) -> Result<Option<WaitStatus>, Errno> {
    // siginfo_t as 32 ints: si_code at [2]; for SIGCHLD si_pid at [4], si_status at [6].
    let mut si = [0i32; 32];
    let flags = libc::WSTOPPED
        | libc::WEXITED
        | libc::__WALL
        | libc::WNOWAIT
        | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: waitid writes one siginfo_t (128 bytes) at its third argument, which points
        // to a live, writable, zeroed array of exactly that size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_waitid,
                libc::P_PID as libc::c_long,
                tid as libc::c_long,
                si.as_mut_ptr(),
                flags as libc::c_long,
                0 as libc::c_long,
            )
        };
        match check(rc) {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    if si[4] == 0 {
        return Ok(None);
    }
    Ok(Some(match si[2] {
        libc::CLD_EXITED => WaitStatus::Exited(si[6]),
        libc::CLD_KILLED | libc::CLD_DUMPED => WaitStatus::Killed(si[6]),
        libc::CLD_TRAPPED | libc::CLD_STOPPED => stop_status(si[6]),
        code => WaitStatus::Other(code),
    }))
}

/// What `PTRACE_GET_SYSCALL_INFO` says about a syscall stop (5.3+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallInfo {
    /// A syscall-entry stop: the call has not run yet.
    Entry {
        /// `AUDIT_ARCH_*` of the call ([`AUDIT_ARCH_X86_64`] for `syscall`, another for
        /// `int 0x80`).
        arch: u32,
        /// The call number.
        nr: u64,
    },
    /// A syscall-exit stop, with the call's return value (negative: -errno).
    Exit {
        /// The return value.
        rval: i64,
    },
    /// Not a syscall stop (or a seccomp stop).
    Other,
}

/// `PTRACE_GET_SYSCALL_INFO` of a stopped tracee.
pub fn syscall_info(tid: i32) -> Result<SyscallInfo, Errno> {
    // struct ptrace_syscall_info: op (u8), 3 bytes, arch (u32), ip, sp, then the union.
    let mut raw = [0u64; 11];
    // SAFETY: PTRACE_GET_SYSCALL_INFO writes at most `addr` (the size) bytes at `data`, which
    // points to a live, writable buffer of exactly that size.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GET_SYSCALL_INFO as _,
            tid as libc::pid_t,
            std::mem::size_of_val(&raw) as *mut libc::c_void,
            raw.as_mut_ptr().cast::<libc::c_void>(),
        )
    };
    check(rc)?;
    let op = (raw[0] & 0xff) as u8;
    let arch = (raw[0] >> 32) as u32;
    Ok(match op {
        libc::PTRACE_SYSCALL_INFO_ENTRY => SyscallInfo::Entry { arch, nr: raw[3] },
        libc::PTRACE_SYSCALL_INFO_EXIT => SyscallInfo::Exit {
            rval: raw[3] as i64,
        },
        _ => SyscallInfo::Other,
    })
}

/// `PTRACE_GETSIGMASK`: the blocked-signal mask of a stopped tracee.
pub fn get_sigmask(tid: i32) -> Result<u64, Errno> {
    let mut mask = 0u64;
    // SAFETY: PTRACE_GETSIGMASK writes `addr` (8, the kernel's sigset size) bytes at `data`,
    // a live u64.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK as _,
            tid as libc::pid_t,
            8usize as *mut libc::c_void,
            (&mut mask as *mut u64).cast::<libc::c_void>(),
        )
    };
    check(rc).map(|_| mask)
}

/// `NT_X86_XSTATE`.
#[cfg(target_arch = "x86_64")]
const NT_X86_XSTATE: usize = 0x202;

/// `PTRACE_GETREGSET(NT_X86_XSTATE)`: the extended FPU state of a stopped tracee in the
/// standard (non-compacted) XSAVE format, as long as the kernel's user ABI size for it.
#[cfg(target_arch = "x86_64")]
pub fn get_xstate(tid: i32) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; 64 << 10];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: PTRACE_GETREGSET writes at most `iov.iov_len` bytes at `iov.iov_base` (`buf`,
    // live and writable) and stores the length written back in `iov`, a live local.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET as _,
            tid as libc::pid_t,
            NT_X86_XSTATE as *mut libc::c_void,
            (&mut iov as *mut libc::iovec).cast::<libc::c_void>(),
        )
    };
    check(rc)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Offset and size of XSAVE component `i` in the standard format (CPUID leaf 0xD, sub-leaf i:
/// EBX, EAX).
#[cfg(target_arch = "x86_64")]
fn xsave_component(i: u32) -> (u32, u32) {
    // SAFETY: CPUID is available on every x86_64 CPU and only reads CPU information.
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid_count(0xd, i) };
    (r.ebx, r.eax)
}

/// The FPU image a signal frame carries (`fpstate`, to place 64-byte aligned), built from an
/// [`get_xstate`] image: the XSAVE area up to the end of the last component present in its
/// `XSTATE_BV`, `sw_reserved` filled as the kernel's `save_sw_bytes()` would (magic1,
/// extended size, the features present, the size), and magic2 after it. Components left out
/// of `XSTATE_BV` are in their initial state, so `XRSTOR` with that mask restores the same
/// state (arch/x86/kernel/fpu/signal.c `check_xstate_in_sigframe`).
#[cfg(target_arch = "x86_64")]
pub fn fpstate_for_sigframe(xstate: &[u8]) -> Option<Vec<u8>> {
    let bv = u64::from_le_bytes(xstate.get(512..520)?.try_into().ok()?);
    let mut size = 576u32;
    for i in 2..63 {
        if bv & (1 << i) != 0 {
            let (off, len) = xsave_component(i);
            size = size.max(off + len);
        }
    }
    let size_u = size as usize;
    let mut img = xstate.get(..size_u)?.to_vec();
    img[464..512].fill(0);
    img[464..468].copy_from_slice(&0x4650_5853u32.to_le_bytes()); // FP_XSTATE_MAGIC1
    img[468..472].copy_from_slice(&(size + 4).to_le_bytes()); // extended_size
    img[472..480].copy_from_slice(&(bv | 3).to_le_bytes()); // xfeatures
    img[480..484].copy_from_slice(&size.to_le_bytes()); // xstate_size
    img.extend_from_slice(&0x4650_5845u32.to_le_bytes()); // FP_XSTATE_MAGIC2
    Some(img)
}

/// `process_vm_writev(2)` of `buf` at `addr` in process `pid`, one iovec each side. Returns the
/// bytes written (short when the range runs into unmapped or read-only memory).
pub fn process_vm_write(pid: i32, addr: u64, buf: &[u8]) -> Result<usize, Errno> {
    let local = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec describes `buf`, live for the call and only read; the remote
    // iovec is only an address in the other process, checked by the kernel.
    let rc = unsafe { libc::process_vm_writev(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    check(rc as libc::c_long).map(|n| n as usize)
}

/// `process_vm_readv(2)` of `buf.len()` bytes at `addr` in process `pid`, one iovec each side.
/// Returns the bytes read (short when the range runs into unmapped memory).
pub fn process_vm_read(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec describes `buf`, live and writable for the call; the remote
    // iovec is only an address in the other process, checked by the kernel.
    let rc = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    check(rc as libc::c_long).map(|n| n as usize)
}

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or(Errno::SRCH)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
}

/// `pidfd_open(tid, PIDFD_THREAD)` (6.9+): a pidfd for one thread, whose pidfd_getfd(2) reads
/// that thread's fd table (the process's pidfd fails with ESRCH once the leader exited).
pub fn pidfd_open_thread(tid: i32) -> Result<OwnedFd, Errno> {
    const PIDFD_THREAD: libc::c_long = libc::O_EXCL as libc::c_long;
    // SAFETY: pidfd_open takes two integers and returns a new descriptor, owned from here.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, tid as libc::c_long, PIDFD_THREAD) };
    let fd = check(rc)? as std::os::fd::RawFd;
    // SAFETY: `fd` was just returned by the kernel, open and owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `pidfd_getfd(2)`: a duplicate of descriptor `fd` of the process behind `pidfd`, in this
/// process (`O_CLOEXEC`, the kernel's default for it).
pub fn pidfd_getfd(pidfd: impl AsFd, fd: i32) -> Result<OwnedFd, Errno> {
    rustix::process::pidfd_getfd(pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
}

/// This thread's id (`gettid(2)`).
pub fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// One VMA as `PROCMAP_QUERY` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// Start address.
    pub start: u64,
    /// End address.
    pub end: u64,
}

/// `PROCMAP_QUERY` (6.11+) on an open `/proc/PID/maps`: the VMA covering `addr`, or else the
/// first one after it (`PROCMAP_QUERY_COVERING_OR_NEXT_VMA`); `None` when there is none (the
/// kernel's ENOENT). ENOTTY on older kernels.
pub fn procmap_query(maps: &std::fs::File, addr: u64) -> Result<Option<Vma>, Errno> {
    use linux_raw_sys::general as g;
    let mut q = g::procmap_query {
        size: std::mem::size_of::<g::procmap_query>() as u64,
        query_flags: g::procmap_query_flags::PROCMAP_QUERY_COVERING_OR_NEXT_VMA as u64,
        query_addr: addr,
        vma_start: 0,
        vma_end: 0,
        vma_flags: 0,
        vma_page_size: 0,
        vma_offset: 0,
        inode: 0,
        dev_major: 0,
        dev_minor: 0,
        vma_name_size: 0,
        build_id_size: 0,
        vma_name_addr: 0,
        build_id_addr: 0,
    };
    const PROCMAP_QUERY: u32 =
        rustix::ioctl::opcode::read_write::<g::procmap_query>(g::PROCFS_IOCTL_MAGIC, 17);
    // SAFETY: PROCMAP_QUERY takes a `struct procmap_query` (size set to its size), read and
    // written back; name and build-id sizes are 0, so the kernel writes no other memory.
    match unsafe { super::ioctl_with(maps, PROCMAP_QUERY, &mut q) } {
        Ok(_) => Ok(Some(Vma {
            start: q.vma_start,
            end: q.vma_end,
        })),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

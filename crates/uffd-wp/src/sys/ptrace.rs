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
/// `SIGTRAP`.
pub const SIGTRAP: i32 = libc::SIGTRAP;

/// x86_64 system call numbers this crate injects.
pub mod nr {
    /// `close(2)`.
    pub const CLOSE: u64 = 3;
    /// `userfaultfd(2)`.
    pub const USERFAULTFD: u64 = 323;
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

/// `PTRACE_SINGLESTEP`: execute one instruction and stop; a `syscall` instruction traps at the
/// system call's exit, before any user instruction (x86 sets `SYSCALL_EXIT_TRAP` with the step),
/// as a `SIGTRAP` signal-delivery stop.
pub fn singlestep(tid: i32, sig: i32) -> Result<(), Errno> {
    request(libc::PTRACE_SINGLESTEP as _, tid, 0, sig as usize)
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
    /// These registers set up to execute system call `nr(args)` at the `syscall` instruction
    /// at `site`: `orig_rax` = -1 so the kernel's restart logic leaves them alone on the way
    /// out of the current stop.
    pub fn for_syscall(&self, site: u64, nr: u64, args: [u64; 6]) -> Regs {
        let mut r = self.0;
        r.rip = site;
        r.rax = nr;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        Regs(r)
    }
}

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
/// not only a child). Retries on EINTR.
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
        let sig = libc::WSTOPSIG(s);
        let event = ((s >> 16) & 0xffff) as u32;
        if sig == (libc::SIGTRAP | 0x80) {
            WaitStatus::SyscallStop
        } else if event != 0 {
            WaitStatus::Event { event, sig }
        } else {
            WaitStatus::Signal(sig)
        }
    } else {
        WaitStatus::Other(s)
    })
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

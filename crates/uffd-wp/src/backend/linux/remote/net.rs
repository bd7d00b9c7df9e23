//! The safety net of the injection (docs/notes/issue9-ptrace-protocol.md, sec. 5): a signal
//! frame written on the thread's own stack whose `rt_sigreturn(2)` restores the thread's
//! state, so that while injected registers are live a dead tracer leaves a thread that runs
//! the injected call, then restores itself.
//!
//! Gadgets, found in the target's executable mappings (libc first), none written there:
//! `pop %rdi; ret`, `pop %rax; ret`, `syscall; ret`, and the restorer (`mov $15, %rax;
//! syscall` or `mov $15, %eax; syscall`, libc's `__restore_rt`: every libc has one, x86_64
//! signal delivery needs `SA_RESTORER`). An injected userfaultfd(2) returns into a chain on
//! the stack: `pop %rdi` (the fd it will get: the lowest free one, predictable because every
//! other thread is frozen), `pop %rax` (3), `syscall` (close), then `ret` into the restorer,
//! whose rt_sigreturn(2) restores the thread. So a dead tracer leaves no descriptor behind.
//!
//! The frame is placed below the 128-byte red zone, 64-byte aligned for its XSAVE image, where
//! a signal delivery would put its own (`get_sigframe()`): memory the ABI leaves free.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::AttachError;
use crate::backend::procfs::{self, MapEntry, read_maps};
use crate::sys::ptrace::{self, Regs};

/// `mov $15, %rax; syscall` and `mov $15, %eax; syscall`.
const RESTORERS: [&[u8]; 2] = [
    &[0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
    &[0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
];
/// `pop %rdi; ret`, `pop %rax; ret`, `syscall; ret`.
const POP_RDI: &[u8] = &[0x5f, 0xc3];
const POP_RAX: &[u8] = &[0x58, 0xc3];
const SYSCALL_RET: &[u8] = &[0x0f, 0x05, 0xc3];
/// Stack the frame must leave free below it inside the stack's mapping.
const HEADROOM: u64 = 16 << 10;
/// Longest stretch of one mapping searched for a gadget.
const SEARCH_MAX: u64 = 64 << 20;

/// The gadgets of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Net {
    /// `pop %rdi; ret`: where an injected userfaultfd(2) returns to.
    pub pop_rdi: u64,
    /// `pop %rax; ret`.
    pub pop_rax: u64,
    /// `syscall; ret`: the chain's close(2).
    pub syscall_ret: u64,
    /// The restorer's first instruction.
    pub restorer: u64,
    /// RIP at the restorer's syscall-entry stop (after its `syscall`).
    pub restorer_entry: u64,
}

/// Where a frame and its chain were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Frame {
    /// The frame's first word (`pretcode`, the restorer).
    pub base: u64,
    /// The chain's first word (the fd to close): RSP for an injected call.
    pub chain: u64,
}

impl Frame {
    /// RSP once `ret` popped `pretcode`: where the restorer's rt_sigreturn finds the frame.
    pub fn after_ret(&self) -> u64 {
        self.base + 8
    }

    /// Whether `sp` points into the chain or the frame.
    pub fn holds(&self, sp: u64) -> bool {
        (self.chain..=self.after_ret()).contains(&sp)
    }
}

fn no_net(pid: i32, why: String) -> AttachError {
    AttachError::NoSafetyNet { pid, why }
}

impl Net {
    /// Finds the gadgets in process `pid` (read through its `/proc/PID/mem`, `mem`), each
    /// mapping read once, libc's first.
    pub fn find(pid: i32, mem: &File) -> Result<Net, AttachError> {
        let maps = read_maps(pid)
            .map_err(|e| AttachError::from_errno(pid, pid, "reading /proc/PID/maps", e))?;
        let exec = maps
            .iter()
            .filter(|m| m.perms.starts_with("r-x") && m.name != "[vsyscall]");
        let (libc, rest): (Vec<&MapEntry>, Vec<&MapEntry>) =
            exec.partition(|m| m.name.contains("libc"));
        let pats: [&[u8]; 5] = [POP_RDI, POP_RAX, SYSCALL_RET, RESTORERS[0], RESTORERS[1]];
        let mut found: [Option<u64>; 5] = [None; 5];
        for m in libc.into_iter().chain(rest) {
            let Some(text) = read_text(mem, m) else {
                continue;
            };
            for (pat, slot) in pats.iter().zip(found.iter_mut()) {
                if slot.is_none() {
                    *slot = text
                        .windows(pat.len())
                        .position(|w| w == *pat)
                        .map(|i| m.start + i as u64);
                }
            }
            if found[..3].iter().all(Option::is_some) && (found[3].is_some() || found[4].is_some())
            {
                break;
            }
        }
        let need = |i: usize, what: &str| {
            found[i].ok_or_else(|| no_net(pid, format!("no {what} in its code")))
        };
        let (restorer, len) = match (found[3], found[4]) {
            (Some(a), _) => (a, RESTORERS[0].len()),
            (None, Some(a)) => (a, RESTORERS[1].len()),
            (None, None) => {
                need(3, "rt_sigreturn restorer (libc's __restore_rt)").map(|a| (a, 0))?
            }
        };
        Ok(Net {
            pop_rdi: need(0, "`pop %rdi; ret`")?,
            pop_rax: need(1, "`pop %rax; ret`")?,
            syscall_ret: need(2, "`syscall; ret`")?,
            restorer,
            restorer_entry: restorer + len as u64,
        })
    }

    /// Whether `ip` is one of the gadgets (or just after the chain's `syscall`).
    pub fn holds(&self, ip: u64) -> bool {
        [
            self.pop_rdi,
            self.pop_rax,
            self.syscall_ret,
            self.syscall_ret + 2,
            self.restorer,
            self.restorer_entry,
        ]
        .contains(&ip)
    }

    /// Checks thread `tid` can take a frame: no user shadow stack (a forged `ret` would fault).
    pub fn check_thread(pid: i32, tid: i32) -> Result<(), AttachError> {
        let status = procfs::read(&procfs::path(pid, &format!("task/{tid}/status")))
            .map_err(|e| AttachError::from_errno(pid, tid, "reading its status", e))?;
        match procfs::status_field(&status, "x86_Thread_features") {
            Some(f) if f.split_whitespace().any(|w| w == "shstk") => Err(no_net(
                pid,
                format!("thread {tid} runs with a shadow stack (shstk)"),
            )),
            _ => Ok(()),
        }
    }

    /// Writes, below `sp` on the stack of stopped thread `tid`, a frame whose rt_sigreturn
    /// restores `restore` (registers), the signal mask `mask` and the thread's current FPU
    /// state, and below it the chain that closes `fd` first. Fails (writing nothing) unless
    /// `sp` lies in a mapping with room below the frame.
    pub fn write_frame(
        &self,
        pid: i32,
        tid: i32,
        restore: &Regs,
        sp: u64,
        mask: u64,
        fd: i32,
    ) -> Result<Frame, AttachError> {
        let os = |op: &'static str| move |e| AttachError::from_errno(pid, tid, op, e);
        let xs = ptrace::get_xstate(tid).map_err(os("PTRACE_GETREGSET(NT_X86_XSTATE)"))?;
        let fp_img = ptrace::fpstate_for_sigframe(&xs)
            .ok_or_else(|| no_net(pid, format!("unexpected xstate of {} bytes", xs.len())))?;
        let fp = (sp - 128 - fp_img.len() as u64) & !63;
        let words = restore.sigframe(self.restorer, fp, mask);
        let base = ((fp - (words.len() * 8) as u64) & !15) - 8;
        let chain = base - 32;
        let maps = read_maps(pid).map_err(os("reading /proc/PID/maps"))?;
        let fits = maps
            .iter()
            .any(|m| m.start + HEADROOM <= chain && sp <= m.end && m.perms.starts_with("rw"));
        if !fits {
            return Err(no_net(
                pid,
                format!("thread {tid}'s stack at {sp:#x} has no room below it for a frame"),
            ));
        }
        let links = [fd as u64, self.pop_rax, 3, self.syscall_ret];
        let bytes: Vec<u8> = links
            .iter()
            .chain(&words)
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        // Through the thread's own id: the leader's has no mm once it exited.
        write_all(tid, fp, &fp_img).map_err(os("writing the frame"))?;
        write_all(tid, chain, &bytes).map_err(os("writing the frame"))?;
        Ok(Frame { base, chain })
    }

    /// Rewrites the fd the chain of `frame` (on thread `tid`'s stack) closes (the injected
    /// call returned another one).
    pub fn retarget(&self, tid: i32, frame: &Frame, fd: i32) -> Result<(), crate::seam::Errno> {
        write_all(tid, frame.chain, &(fd as u64).to_ne_bytes())
    }
}

/// The bytes of mapping `m` (at most [`SEARCH_MAX`]), read through `mem`.
fn read_text(mem: &File, m: &MapEntry) -> Option<Vec<u8>> {
    let len = (m.end - m.start).min(SEARCH_MAX) as usize;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, m.start).ok()?;
    Some(buf)
}

fn write_all(pid: i32, addr: u64, buf: &[u8]) -> Result<(), crate::seam::Errno> {
    match ptrace::process_vm_write(pid, addr, buf)? {
        n if n == buf.len() => Ok(()),
        _ => Err(crate::seam::Errno::FAULT),
    }
}

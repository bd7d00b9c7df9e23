//! The safety net of the injection (docs/notes/issue9-ptrace-protocol.md, sec. 5): a signal
//! frame written on the thread's own stack whose `rt_sigreturn(2)` restores the thread's
//! state, so that while injected registers are live a dead tracer leaves a thread that runs
//! the injected call, then restores itself.
//!
//! Two gadgets, both found in the target's executable mappings, none written there:
//! - `ret` (a `c3` byte, in the `[vdso]`): where an injected call returns to; it pops the
//!   frame's `pretcode`;
//! - the restorer (`mov $15, %rax; syscall` or `mov $15, %eax; syscall`, libc's
//!   `__restore_rt`: every libc has one, x86_64 signal delivery needs `SA_RESTORER`): runs
//!   `rt_sigreturn(2)` on the frame.
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
/// Stack the frame must leave free below it inside the stack's mapping.
const HEADROOM: u64 = 16 << 10;
/// Longest stretch of one mapping searched for a gadget.
const SEARCH_MAX: u64 = 64 << 20;

/// The gadgets of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Net {
    /// A `ret` instruction.
    pub ret: u64,
    /// The restorer's first instruction.
    pub restorer: u64,
    /// RIP at the restorer's syscall-entry stop (after its `syscall`).
    pub restorer_entry: u64,
}

/// Where a frame was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Frame {
    /// The frame's first word (`pretcode`): RSP for an injected call that returns to `ret`.
    pub base: u64,
}

impl Frame {
    /// RSP once `ret` popped `pretcode`: where the restorer's rt_sigreturn finds the frame.
    pub fn after_ret(&self) -> u64 {
        self.base + 8
    }
}

fn no_net(pid: i32, why: String) -> AttachError {
    AttachError::NoSafetyNet { pid, why }
}

impl Net {
    /// Finds both gadgets in process `pid` (read through its `/proc/PID/mem`, `mem`).
    pub fn find(pid: i32, mem: &File) -> Result<Net, AttachError> {
        let maps = read_maps(pid)
            .map_err(|e| AttachError::from_errno(pid, pid, "reading /proc/PID/maps", e))?;
        let exec: Vec<&MapEntry> = maps
            .iter()
            .filter(|m| m.perms.starts_with("r-x") && m.name != "[vsyscall]")
            .collect();
        let vdso_first = exec
            .iter()
            .filter(|m| m.name == "[vdso]")
            .chain(exec.iter().filter(|m| m.name != "[vdso]"));
        let ret = vdso_first
            .into_iter()
            .find_map(|m| search(mem, m, &[0xc3]))
            .ok_or_else(|| no_net(pid, "no `ret` instruction in its code".into()))?;
        let libc_first = exec
            .iter()
            .filter(|m| m.name.contains("libc"))
            .chain(exec.iter().filter(|m| !m.name.contains("libc")));
        for m in libc_first {
            for pat in RESTORERS {
                if let Some(at) = search(mem, m, pat) {
                    return Ok(Net {
                        ret,
                        restorer: at,
                        restorer_entry: at + pat.len() as u64,
                    });
                }
            }
        }
        Err(no_net(
            pid,
            "no rt_sigreturn restorer (libc's __restore_rt) in its code".into(),
        ))
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
    /// state. Fails (writing nothing) unless `sp` lies in a mapping with room below the frame.
    pub fn write_frame(
        &self,
        pid: i32,
        tid: i32,
        restore: &Regs,
        sp: u64,
        mask: u64,
    ) -> Result<Frame, AttachError> {
        let os = |op: &'static str| move |e| AttachError::from_errno(pid, tid, op, e);
        let xs = ptrace::get_xstate(tid).map_err(os("PTRACE_GETREGSET(NT_X86_XSTATE)"))?;
        let fp_img = ptrace::fpstate_for_sigframe(&xs)
            .ok_or_else(|| no_net(pid, format!("unexpected xstate of {} bytes", xs.len())))?;
        let fp = (sp - 128 - fp_img.len() as u64) & !63;
        let words = restore.sigframe(self.restorer, fp, mask);
        let base = ((fp - (words.len() * 8) as u64) & !15) - 8;
        let maps = read_maps(pid).map_err(os("reading /proc/PID/maps"))?;
        let fits = maps
            .iter()
            .any(|m| m.start + HEADROOM <= base && sp <= m.end && m.perms.starts_with("rw"));
        if !fits {
            return Err(no_net(
                pid,
                format!("thread {tid}'s stack at {sp:#x} has no room below it for a frame"),
            ));
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        write_all(pid, fp, &fp_img).map_err(os("writing the frame"))?;
        write_all(pid, base, &bytes).map_err(os("writing the frame"))?;
        Ok(Frame { base })
    }
}

/// The first address of `pat` in mapping `m`, read through `mem`.
fn search(mem: &File, m: &MapEntry, pat: &[u8]) -> Option<u64> {
    let len = (m.end - m.start).min(SEARCH_MAX) as usize;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, m.start).ok()?;
    let i = buf.windows(pat.len()).position(|w| w == pat)?;
    Some(m.start + i as u64)
}

fn write_all(pid: i32, addr: u64, buf: &[u8]) -> Result<(), crate::seam::Errno> {
    match ptrace::process_vm_write(pid, addr, buf)? {
        n if n == buf.len() => Ok(()),
        _ => Err(crate::seam::Errno::FAULT),
    }
}

//! Threads whose registers are known at every instant: the register oracle of the dump tests.
//!
//! [`spin`] loads chosen values into the callee-saved registers `rbx`, `r12`-`r15`, records
//! where its loop starts and ends and its stack pointer, then loops without touching any of
//! them until told to stop: whatever instant a freeze catches the thread at, those registers
//! hold the chosen values, `rip` is inside the loop and `rsp` is the recorded value. Two
//! loops: [`Loop::Spin`] (`pause`, compare, jump: always in user mode) and [`Loop::Sleep`]
//! (a `nanosleep(2)` of 1 ms per round: mostly inside a system call, which clobbers only
//! `rax`, `rcx` and `r11`).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Errno;

/// The loop a spinner runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// `pause; cmp; je`: never leaves user mode.
    Spin,
    /// `nanosleep(1 ms)` per round: mostly blocked in the kernel.
    Sleep,
}

/// What a spinner records before its loop (written by the loop's own code, then `ready`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct Recorded {
    /// The first instruction of the loop.
    pub loop_start: AtomicU64,
    /// The first instruction after it (`rip` stays in `loop_start..loop_end`).
    pub loop_end: AtomicU64,
    /// The stack pointer in the loop.
    pub rsp: AtomicU64,
    /// 1 once the fields above are written and the registers loaded.
    pub ready: AtomicU64,
}

/// `struct timespec` of the sleeping loop: 1 ms.
#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
const ROUND: Timespec = Timespec {
    sec: 0,
    nsec: 1_000_000,
};

/// Runs the loop with `rbx`, `r12`, `r13`, `r14`, `r15` = `regs` until `stop` is non-zero;
/// `rec` is filled (then `rec.ready` set) as the loop begins. On another architecture than
/// x86_64: `ENOSYS` at once.
pub fn spin(regs: [u64; 5], how: Loop, rec: &Recorded, stop: &AtomicU64) -> Result<(), Errno> {
    #[cfg(target_arch = "x86_64")]
    {
        match how {
            Loop::Spin => spin_in_user_mode(regs, rec, stop),
            Loop::Sleep => spin_in_nanosleep(regs, rec, stop),
        }
        // The loop ended: what it recorded is stale.
        rec.ready.store(0, Ordering::SeqCst);
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (regs, how, rec, stop);
        Err(Errno::NOSYS)
    }
}

/// [`Loop::Spin`]: fills `rec`, then spins until `stop` is non-zero.
#[cfg(target_arch = "x86_64")]
fn spin_in_user_mode(regs: [u64; 5], rec: &Recorded, stop: &AtomicU64) {
    let out = rec as *const Recorded as u64;
    let stop = stop.as_ptr() as u64;
    // SAFETY: the block writes only `rec`'s four words (through `out`, a live
    // `#[repr(C)]` struct of AtomicU64s, which the caller reads atomically) and reads
    // `stop` (a live AtomicU64); every register it changes is an operand (`rbx`, which
    // LLVM reserves, is swapped with a scratch operand and swapped back before the end);
    // it pushes nothing and leaves `rsp` as it was.
    unsafe {
        std::arch::asm!(
            "lea {t}, [rip + 2f]",
            "mov [{out}], {t}",
            "lea {t}, [rip + 3f]",
            "mov [{out} + 8], {t}",
            "mov [{out} + 16], rsp",
            "xchg {b}, rbx",
            "mov qword ptr [{out} + 24], 1",
            "2:",
            "pause",
            "cmp qword ptr [{stop}], 0",
            "je 2b",
            "3:",
            "xchg {b}, rbx",
            out = in(reg) out,
            stop = in(reg) stop,
            t = out(reg) _,
            b = inout(reg) regs[0] => _,
            in("r12") regs[1],
            in("r13") regs[2],
            in("r14") regs[3],
            in("r15") regs[4],
            options(nostack),
        );
    }
}

/// [`Loop::Sleep`]: as [`spin_in_user_mode`], each round 1 ms in nanosleep(2).
#[cfg(target_arch = "x86_64")]
fn spin_in_nanosleep(regs: [u64; 5], rec: &Recorded, stop: &AtomicU64) {
    let out = rec as *const Recorded as u64;
    let stop = stop.as_ptr() as u64;
    // SAFETY: as in `spin_in_user_mode`; the loop's system call is nanosleep(2) with a pointer to a
    // constant timespec and no remainder pointer: it writes no memory, and the kernel
    // changes only `rax`, `rcx` and `r11`, all three operands.
    unsafe {
        std::arch::asm!(
            "lea {t}, [rip + 2f]",
            "mov [{out}], {t}",
            "lea {t}, [rip + 3f]",
            "mov [{out} + 8], {t}",
            "mov [{out} + 16], rsp",
            "xchg {b}, rbx",
            "mov qword ptr [{out} + 24], 1",
            "2:",
            "mov eax, 35",
            "syscall",
            "cmp qword ptr [{stop}], 0",
            "je 2b",
            "3:",
            "xchg {b}, rbx",
            out = in(reg) out,
            stop = in(reg) stop,
            t = out(reg) _,
            b = inout(reg) regs[0] => _,
            in("r12") regs[1],
            in("r13") regs[2],
            in("r14") regs[3],
            in("r15") regs[4],
            in("rdi") &ROUND as *const Timespec,
            in("rsi") 0u64,
            out("rax") _,
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
}

//! `fork(2)`: the baseline the snapshot benchmark measures its pause against (a fork-based
//! snapshot, as Redis or a `gcore` of a forked copy take one, stops the process for the
//! `fork()` call, which copies the page tables and write-protects every private page).
//!
//! After `fork()` in a multi-threaded process, the child has one thread and a copy of memory
//! whose locks (the allocator's, stdio's, ...) may be held by threads that do not exist in it:
//! it may call only async-signal-safe functions. The children made here call `_exit(2)` at
//! once, or sleep in `pause(2)` until killed, and nothing else: no allocation, no Rust code that
//! could take a lock. `fork` and `_exit` come from `libc` (rustix offers only the raw clone,
//! without the C library's fork handlers, unsafe to mix with it).

use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions, kill_process, waitpid};

use super::Errno;

/// Forks; the child `_exit(0)`s at once. Returns how long the `fork()` call took in the parent
/// (the child is reaped afterwards, outside the timed part).
pub fn time_fork() -> Result<Duration, Errno> {
    let t = Instant::now();
    // SAFETY: fork(2) itself has no memory-safety preconditions. In the child (return value 0)
    // only `_exit`, which is async-signal-safe, is called, so the child never touches state that
    // the parent's other threads may have left locked or half-updated; `_exit` skips atexit
    // handlers and destructors, so nothing of the parent's Rust state runs twice.
    let pid = unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(0);
        }
        pid
    };
    let took = t.elapsed();
    if pid < 0 {
        return Err(uffd_wp::sys::errno_of(&std::io::Error::last_os_error()));
    }
    reap(pid)?;
    Ok(took)
}

/// Forks a child that writes `byte` over `[addr, addr+len)` of its copy of this process's
/// memory, then `_exit(0)`s; waits for it (bounded by `patience`: killed then). Private memory
/// is copy-on-write: the parent's is not touched; shared memory is the parent's too (the
/// zoo's `fork-write-shared` means that). Returns the child's pid.
pub fn fork_write_exit(
    m: &uffd_wp::sys::mem::Mapping,
    addr: u64,
    len: u64,
    byte: u8,
    patience: Duration,
) -> Result<i32, Errno> {
    if !m.range().contains(addr) || addr + len > m.range().end() {
        return Err(Errno::INVAL);
    }
    // SAFETY: fork(2) has no memory-safety preconditions. The child only stores bytes into
    // [addr, addr+len), which the check above puts inside a mapping this process owns (its
    // copy in the child is as valid), with volatile writes (no allocation, no lock), then calls
    // `_exit`, which is async-signal-safe and runs no Rust destructor.
    let pid = unsafe {
        let pid = libc::fork();
        if pid == 0 {
            for a in addr..addr + len {
                std::ptr::write_volatile(a as *mut u8, byte);
            }
            libc::_exit(0);
        }
        pid
    };
    if pid < 0 {
        return Err(uffd_wp::sys::errno_of(&std::io::Error::last_os_error()));
    }
    let t0 = Instant::now();
    let p = Pid::from_raw(pid).ok_or(Errno::SRCH)?;
    loop {
        match waitpid(Some(p), WaitOptions::NOHANG) {
            Ok(Some(_)) | Err(Errno::CHILD) => return Ok(pid),
            Ok(None) | Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
        if t0.elapsed() > patience {
            let _ = kill_process(p, Signal::KILL);
            reap(pid)?;
            return Err(Errno::TIMEDOUT);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for the child `pid`. ECHILD (another thread's `waitpid(-1)` reaped it first) means it
/// is gone too.
fn reap(pid: i32) -> Result<(), Errno> {
    let pid = Pid::from_raw(pid).ok_or(Errno::SRCH)?;
    loop {
        match waitpid(Some(pid), WaitOptions::empty()) {
            Ok(_) | Err(Errno::CHILD) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A forked copy of this process that sleeps until dropped (then it is killed and reaped):
/// a target holding the same memory as this process, for tools such as `gcore`.
#[derive(Debug)]
pub struct SleepingChild {
    pid: i32,
}

impl SleepingChild {
    /// Forks; the child sleeps in `pause(2)` forever.
    pub fn fork() -> Result<SleepingChild, Errno> {
        // SAFETY: as in `time_fork`: the child only calls `pause` (async-signal-safe) in a
        // loop; it leaves only by being killed, so it never returns into Rust code.
        let pid = unsafe {
            let pid = libc::fork();
            if pid == 0 {
                loop {
                    libc::pause();
                }
            }
            pid
        };
        if pid < 0 {
            return Err(uffd_wp::sys::errno_of(&std::io::Error::last_os_error()));
        }
        Ok(SleepingChild { pid })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }
}

impl Drop for SleepingChild {
    fn drop(&mut self) {
        if let Some(pid) = Pid::from_raw(self.pid) {
            let _ = kill_process(pid, Signal::KILL);
        }
        let _ = reap(self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_returns_and_reaps() {
        let d = time_fork().expect("fork");
        assert!(d > Duration::ZERO);
    }

    #[test]
    fn sleeping_child_lives_until_dropped() {
        let c = SleepingChild::fork().expect("fork");
        let pid = c.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        assert!(
            status.contains(&format!("PPid:\t{}", std::process::id())),
            "{status}"
        );
        drop(c);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}

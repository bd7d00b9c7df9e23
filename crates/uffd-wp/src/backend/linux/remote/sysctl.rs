//! A target without `CAP_SYS_PTRACE` (any program running as an ordinary user: a database,
//! a web server) may create only a userfaultfd limited to its user-mode faults while
//! `vm.unprivileged_userfaultfd` is 0, the default (fs/userfaultfd.c,
//! `userfaultfd_syscall_allowed()`). Such a uffd fails the kernel's own accesses to a
//! protected page with EFAULT (`handle_userfault()`: `VM_FAULT_SIGBUS` for a fault without
//! `FAULT_FLAG_USER`), so a `read(2)` into the target's buffer during the copy would fail: it
//! would harm the target. The check is made once, at creation, against the creating task's
//! credentials; `UFFDIO_API` (made here, by this process) checks this process's.
//!
//! So for such a target the sysctl is raised to 1 for the instant of the injected
//! `userfaultfd(2)` ([`Raised`]), and set back to what it was right after. Set back even if
//! this process is killed meanwhile: a guardian (`sh`, in a process group of its own so that
//! a terminal's signals do not reach it) waits for its standard input to close, which happens
//! when this process exits in any way, and then writes the old value. One raise at a time on
//! the machine: an exclusive `flock(2)` on a lock file, held by this process and by the
//! guardian (its standard output is the lock file), so the lock is free only once the old
//! value is back.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::AttachError;
use crate::backend::procfs;
use crate::seam::Errno;

/// The sysctl.
const SYSCTL: &str = "/proc/sys/vm/unprivileged_userfaultfd";
/// The lock that serializes raises (any uffd-wp on the machine).
const LOCK: &str = "/run/uffd-wp-unprivileged-userfaultfd.lock";
/// How long a raise waits for another one to end.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// `CAP_SYS_PTRACE`.
const CAP_SYS_PTRACE: u32 = 19;

/// `vm.unprivileged_userfaultfd` raised to 1 until dropped (then set back to 0).
#[derive(Debug)]
pub struct Raised {
    guardian: Child,
    _lock: File,
}

/// Whether process `pid` may create a uffd that takes kernel-mode faults by itself: it has
/// `CAP_SYS_PTRACE` in effect, or the sysctl allows it.
fn may_create(pid: i32) -> bool {
    let caps = procfs::read(&procfs::path(pid, "status"))
        .ok()
        .and_then(|s| {
            let v = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(v.trim(), 16).ok()
        })
        .unwrap_or(0);
    caps & (1 << CAP_SYS_PTRACE) != 0 || sysctl() != Some(0)
}

fn sysctl() -> Option<u32> {
    procfs::read(SYSCTL).ok()?.trim().parse().ok()
}

fn write_sysctl(v: u32) -> Result<(), Errno> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(SYSCTL)
        .map_err(|e| crate::sys::errno_of(&e))?;
    f.write_all(format!("{v}\n").as_bytes())
        .map_err(|e| crate::sys::errno_of(&e))
}

/// Raises the sysctl for target `pid` if it needs it (see the module docs); `None` if not.
pub fn raise_for(pid: i32) -> Result<Option<Raised>, AttachError> {
    if may_create(pid) {
        return Ok(None);
    }
    let refused = |errno: Errno, what: &str| AttachError::NotPermitted {
        pid,
        why: format!(
            "it lacks CAP_SYS_PTRACE, so it may create only a user-mode userfaultfd while \
             vm.unprivileged_userfaultfd is 0, and {what} failed ({}); set the sysctl to 1 \
             for the dump",
            crate::sys::errno_name(errno)
        ),
    };
    let lock = lock().map_err(|e| refused(e, &format!("locking {LOCK}")))?;
    // Raised by someone else meanwhile (not by a uffd-wp: it holds the lock until it is back).
    if sysctl() != Some(0) {
        return Ok(None);
    }
    let guardian = spawn_guardian(&lock).map_err(|e| refused(e, "starting its guardian"))?;
    let mut raised = Raised {
        guardian,
        _lock: lock,
    };
    if let Err(e) = write_sysctl(1) {
        raised.restore();
        return Err(refused(e, "raising it"));
    }
    Ok(Some(raised))
}

/// The lock file, locked exclusively (waiting up to [`LOCK_WAIT`] for another raise).
fn lock() -> Result<File, Errno> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .map_err(|e| crate::sys::errno_of(&e))?;
    let t0 = Instant::now();
    loop {
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(f),
            Err(Errno::WOULDBLOCK) if t0.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e),
        }
    }
}

/// The guardian: sets the sysctl back to 0 once its standard input closes, whatever becomes
/// of this process; it holds `lock` (its standard output) until then.
fn spawn_guardian(lock: &File) -> Result<Child, Errno> {
    let out = lock.try_clone().map_err(|e| crate::sys::errno_of(&e))?;
    Command::new("sh")
        .args([
            "-c",
            &format!("trap '' INT TERM HUP QUIT; cat >/dev/null; echo 0 >{SYSCTL}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out))
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| crate::sys::errno_of(&e))
}

impl Raised {
    /// Sets the sysctl back now, and lets the guardian end (waiting for it up to a second:
    /// it ends on its own).
    fn restore(&mut self) {
        let _ = write_sysctl(0);
        self.abandon();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(1) {
            if !matches!(self.guardian.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Closes the guardian's standard input, as this process's death would.
    fn abandon(&mut self) {
        drop(self.guardian.stdin.take());
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root: where the sysctl is 0, raised for a target without the capability, set
    /// back when dropped, and set back by the guardian alone when this process "dies" (its
    /// end of the pipe closed, the value not written back); where it is not, nothing to raise.
    #[test]
    fn the_sysctl_is_raised_for_an_unprivileged_target_and_always_set_back() {
        if !rustix::process::geteuid().is_root() {
            if std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1") {
                panic!("needs root (UFFD_WP_REQUIRE_KERNEL=1)");
            }
            return eprintln!("SKIPPED: needs root");
        }
        let mut child = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sleep",
                "30",
            ])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let t0 = Instant::now();
        while procfs::read(&procfs::path(pid, "status")).is_ok_and(|s| !s.contains("Uid:\t65534")) {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            may_create(std::process::id() as i32),
            "root has CAP_SYS_PTRACE"
        );
        if sysctl() != Some(0) {
            assert!(may_create(pid), "the sysctl lets anyone");
            assert!(raise_for(pid).unwrap().is_none(), "nothing to raise");
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        }
        assert!(!may_create(pid));
        let raised = raise_for(pid).unwrap().expect("raised");
        assert_eq!(sysctl(), Some(1));
        drop(raised);
        assert_eq!(sysctl(), Some(0), "set back on drop");
        let mut raised = raise_for(pid).unwrap().expect("raised again");
        raised.abandon();
        let t0 = Instant::now();
        while sysctl() != Some(0) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the guardian set it back"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(raised);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

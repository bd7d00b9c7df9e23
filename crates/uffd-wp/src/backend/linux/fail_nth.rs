//! Real page-allocation failures on demand, through the kernel's fault injection
//! (Documentation/fault-injection/fault-injection.rst): `/proc/thread-self/fail-nth` makes the
//! Nth fault-injection check of the calling thread fail, and with `fail_page_alloc` set to see
//! order-0 sleeping allocations, every page-table allocation is such a check.
//!
//! Unlike a memory cgroup limit ([`super::memcg`]), this needs no helper process and cannot
//! hang or OOM-kill the caller; it needs a kernel built with `FAULT_INJECTION`,
//! `FAIL_PAGE_ALLOC` and `FAULT_INJECTION_DEBUG_FS` (the test kernels of kernel/run are; the
//! distribution kernels of these machines are not). `fail_page_alloc`'s own random failures
//! stay off (probability 0): only the armed thread's Nth allocation fails.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use crate::seam::lab::LabError;
use crate::sys::errno_of;

/// Where debugfs puts `fail_page_alloc`.
const FAIL_PAGE_ALLOC: &str = "/sys/kernel/debug/fail_page_alloc";

/// The settings that make page-table allocations (order 0, `GFP_KERNEL`, which may sleep)
/// visible to fault injection, with no random failure of its own.
const SETTINGS: [(&str, &str); 5] = [
    ("probability", "0"),
    ("min-order", "0"),
    ("ignore-gfp-wait", "N"),
    ("ignore-gfp-highmem", "N"),
    ("verbose", "0"),
];

fn setup_err(what: String) -> impl FnOnce(std::io::Error) -> LabError {
    move |e| LabError::Setup {
        what,
        errno: errno_of(&e),
    }
}

/// Fails one page allocation of the thread that opened it, on demand.
///
/// `/proc/PID/task/TID/fail-nth` cannot seek (ESPIPE): its write ignores the file position, so
/// one descriptor serves every write; a read must start at 0, so each arming opens a fresh
/// descriptor for the one read that follows. Arming is split in two: [`FailNth::prepare`]
/// does everything that allocates (the descriptor, the number's text), [`FailNth::fire`] only
/// the one `write(2)`, so a caller can fire right before the call under test and nothing of
/// its own takes the armed failure.
#[derive(Debug)]
pub struct FailNth {
    /// For writes, kept open: arming must not allocate.
    write: File,
    /// For the one read after the armed call.
    read: File,
    /// What [`FailNth::fire`] writes: the prepared count, as text.
    armed: Vec<u8>,
}

const FAIL_NTH: &str = "/proc/thread-self/fail-nth";

fn open_fail_nth(write: bool) -> Result<File, LabError> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .open(FAIL_NTH)
        .map_err(setup_err(format!("opening {FAIL_NTH}")))
}

impl FailNth {
    /// Whether this kernel can do it (debugfs mounted, `fail_page_alloc` present).
    pub fn available() -> bool {
        Path::new(FAIL_PAGE_ALLOC).join("min-order").exists() && Path::new(FAIL_NTH).exists()
    }

    /// Sets `fail_page_alloc` up ([`SETTINGS`]) and opens the calling thread's `fail-nth`:
    /// only this thread can arm it.
    pub fn open() -> Result<FailNth, LabError> {
        for (name, value) in SETTINGS {
            let path = Path::new(FAIL_PAGE_ALLOC).join(name);
            std::fs::write(&path, value)
                .map_err(setup_err(format!("writing {value} to {}", path.display())))?;
        }
        Ok(FailNth {
            write: open_fail_nth(true)?,
            read: open_fail_nth(false)?,
            armed: Vec::new(),
        })
    }

    /// Lets `allowed` more page allocations of this thread succeed and fails the next one:
    /// [`FailNth::prepare`] then [`FailNth::fire`].
    pub fn arm(&mut self, allowed: u64) -> Result<(), LabError> {
        self.prepare(allowed)?;
        self.fire()
    }

    /// Everything of an arming that allocates, for `allowed` allocations then a failure.
    pub fn prepare(&mut self, allowed: u64) -> Result<(), LabError> {
        self.read = open_fail_nth(false)?;
        self.armed = (allowed + 1).to_string().into_bytes();
        Ok(())
    }

    /// Arms what [`FailNth::prepare`] prepared: one `write(2)`, which allocates nothing.
    pub fn fire(&mut self) -> Result<(), LabError> {
        let text = std::mem::take(&mut self.armed);
        let res = self.write.write_all(&text);
        self.armed = text;
        res.map_err(setup_err(format!("arming {FAIL_NTH}")))
    }

    /// Disarms it; whether the armed failure happened.
    pub fn disarm(&mut self) -> Result<bool, LabError> {
        let mut buf = [0u8; 24];
        let n = self
            .read
            .read(&mut buf)
            .map_err(setup_err(format!("reading {FAIL_NTH}")))?;
        self.set(0)?;
        let left = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok(left == 0)
    }

    fn set(&mut self, n: u64) -> Result<(), LabError> {
        self.write
            .write_all(n.to_string().as_bytes())
            .map_err(setup_err(format!("writing {n} to {FAIL_NTH}")))
    }
}

impl Drop for FailNth {
    fn drop(&mut self) {
        let _ = self.set(0);
    }
}

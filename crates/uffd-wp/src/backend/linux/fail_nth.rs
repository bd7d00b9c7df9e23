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
use std::io::{Read, Seek, Write};
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
#[derive(Debug)]
pub struct FailNth {
    /// `/proc/thread-self/fail-nth` of the opening thread, kept open: arming must not
    /// allocate (opening a file does).
    file: File,
}

impl FailNth {
    /// Whether this kernel can do it (debugfs mounted, `fail_page_alloc` present).
    pub fn available() -> bool {
        Path::new(FAIL_PAGE_ALLOC).join("min-order").exists()
            && Path::new("/proc/thread-self/fail-nth").exists()
    }

    /// Sets `fail_page_alloc` up ([`SETTINGS`]) and opens the calling thread's `fail-nth`:
    /// only this thread can arm it.
    pub fn open() -> Result<FailNth, LabError> {
        for (name, value) in SETTINGS {
            let path = Path::new(FAIL_PAGE_ALLOC).join(name);
            std::fs::write(&path, value)
                .map_err(setup_err(format!("writing {value} to {}", path.display())))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/thread-self/fail-nth")
            .map_err(setup_err("opening /proc/thread-self/fail-nth".into()))?;
        Ok(FailNth { file })
    }

    /// Lets `allowed` more page allocations of this thread succeed and fails the next one.
    pub fn arm(&mut self, allowed: u64) -> Result<(), LabError> {
        self.set(allowed + 1)
    }

    /// Disarms it; whether the armed failure happened.
    pub fn disarm(&mut self) -> Result<bool, LabError> {
        let left = self.get()?;
        self.set(0)?;
        Ok(left == 0)
    }

    fn set(&mut self, n: u64) -> Result<(), LabError> {
        let what = || format!("writing {n} to /proc/thread-self/fail-nth");
        self.file.rewind().map_err(setup_err(what()))?;
        self.file
            .write_all(n.to_string().as_bytes())
            .map_err(setup_err(what()))
    }

    fn get(&mut self) -> Result<u64, LabError> {
        let what = || "reading /proc/thread-self/fail-nth".to_string();
        let mut s = String::new();
        self.file.rewind().map_err(setup_err(what()))?;
        self.file
            .read_to_string(&mut s)
            .map_err(setup_err(what()))?;
        Ok(s.trim().parse().unwrap_or(0))
    }
}

impl Drop for FailNth {
    fn drop(&mut self) {
        let _ = self.set(0);
    }
}

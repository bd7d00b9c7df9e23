//! Memory cgroups that limit page-table allocations: how the Linux lab makes a raw
//! `UFFDIO_WRITEPROTECT` fail to allocate page tables, which no kernel does on demand.
//!
//! While limited, the task doing the call must take no user-space page fault: with
//! `oom_kill_disable` (v1) a faulting task sleeps until the limit rises, without it the OOM
//! killer takes it. So the limited task pre-opens every file ([`Limiter`]), pre-faults its stack
//! and warms its heap ([`prepare_limited`]) before it enters the cgroup, and raises the limit
//! right after its one limited call; the parent creates and removes the cgroups ([`Cgroup`]),
//! watches `under_oom`, and kills the task if it hangs anyway.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::range::PAGE_SIZE;
use crate::seam::Errno;
use crate::seam::lab::LabError;
use crate::sys::errno_of;

/// Every cgroup the limited scenarios create is named `<prefix><parent pid>-<n>`, directly
/// under the root of the memory controller's hierarchy.
pub const CGROUP_PREFIX: &str = "uffd-wp-limited-";
/// The memory limit of each cgroup while its task makes its limited call.
pub const LIMIT_BYTES: u64 = 1 << 20;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |e| LabError::Setup {
        what,
        errno: errno_of(&e),
    }
}

/// Which cgroup interface holds the memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// cgroup v1: `memory.limit_in_bytes`, `memory.oom_control`.
    V1,
    /// cgroup v2: `memory.max`.
    V2,
}

/// Where the memory controller is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryController {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// The mount point (the hierarchy's root as this process sees it).
    pub root: PathBuf,
}

impl MemoryController {
    fn limit_file(&self) -> &'static str {
        limit_file(self.version)
    }
}

fn limit_file(v: CgroupVersion) -> &'static str {
    match v {
        CgroupVersion::V1 => "memory.limit_in_bytes",
        CgroupVersion::V2 => "memory.max",
    }
}

fn unlimited(v: CgroupVersion) -> &'static str {
    match v {
        CgroupVersion::V1 => "-1",
        CgroupVersion::V2 => "max",
    }
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, d| a * 8 + u32::from(d - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the memory controller: a cgroup v1 hierarchy with `memory`, else a cgroup2 mount with
/// `memory` enabled in its `cgroup.subtree_control` (so a new child cgroup has `memory.max`).
/// The error names what is missing.
pub fn find_memory_controller() -> Result<MemoryController, String> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mut v2 = None;
    let mut v2_why = None;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mnt) = left.split(' ').nth(4) else {
            continue;
        };
        let mnt = PathBuf::from(unescape(mnt));
        let mut r = right.split(' ');
        let (Some(fstype), Some(_), Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        match fstype {
            "cgroup"
                if opts.split(',').any(|o| o == "memory")
                    && mnt.join("memory.limit_in_bytes").exists()
                    && mnt.join("memory.oom_control").exists() =>
            {
                return Ok(MemoryController {
                    version: CgroupVersion::V1,
                    root: mnt,
                });
            }
            "cgroup2" if v2.is_none() => {
                let has = |f: &str| {
                    fs::read_to_string(mnt.join(f))
                        .is_ok_and(|s| s.split_whitespace().any(|c| c == "memory"))
                };
                if has("cgroup.subtree_control") {
                    v2 = Some(MemoryController {
                        version: CgroupVersion::V2,
                        root: mnt,
                    });
                } else if has("cgroup.controllers") {
                    v2_why = Some(format!(
                        "the cgroup2 mount {} offers the memory controller but does not enable \
                         it in cgroup.subtree_control",
                        mnt.display()
                    ));
                }
            }
            _ => {}
        }
    }
    v2.ok_or_else(|| {
        v2_why.unwrap_or_else(|| {
            "no memory cgroup controller: /proc/self/mountinfo shows neither a cgroup v1 \
             hierarchy with the memory controller nor a cgroup2 mount with memory enabled"
                .into()
        })
    })
}

fn write_file(path: &Path, value: &str) -> Result<(), LabError> {
    fs::write(path, value).map_err(io_err(format!("writing {value:?} to {}", path.display())))
}

/// A cgroup this scenario created; removed by [`Cgroup::remove`], or on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: Option<PathBuf>,
    version: CgroupVersion,
}

impl Cgroup {
    /// Creates `root/name` limited to [`LIMIT_BYTES`] (v1: OOM killer disabled).
    pub fn create(ctrl: &MemoryController, name: &str) -> Result<Cgroup, LabError> {
        let path = ctrl.root.join(name);
        match fs::create_dir(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A leftover with our own pid (a reused pid): empty cgroups can be removed.
                rmdir_retry(&path)?;
                fs::create_dir(&path).map_err(io_err(format!("mkdir {}", path.display())))?;
            }
            r => r.map_err(io_err(format!("mkdir {}", path.display())))?,
        }
        let cg = Cgroup {
            path: Some(path.clone()),
            version: ctrl.version,
        };
        if ctrl.version == CgroupVersion::V1 {
            write_file(&path.join("memory.oom_control"), "1")?;
        }
        write_file(&path.join(ctrl.limit_file()), &LIMIT_BYTES.to_string())?;
        Ok(cg)
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("cgroup not removed yet")
    }

    /// v1: whether a task of the cgroup sleeps in a memcg OOM (a page fault while limited).
    pub fn under_oom(&self) -> bool {
        self.version == CgroupVersion::V1
            && fs::read_to_string(self.path().join("memory.oom_control"))
                .is_ok_and(|s| s.lines().any(|l| l.trim() == "under_oom 1"))
    }

    /// Removes it (retrying while a task that just left keeps it busy).
    pub fn remove(mut self) -> Result<(), LabError> {
        match self.path.take() {
            Some(p) => rmdir_retry(&p),
            None => Ok(()),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = rmdir_retry(&p);
        }
    }
}

/// `rmdir`, retried for 2 s while the cgroup is busy (a task that just exited can keep it
/// populated for a moment).
fn rmdir_retry(p: &Path) -> Result<(), LabError> {
    let mut last = Errno::BUSY;
    for _ in 0..200 {
        match fs::remove_dir(p) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if errno_of(&e) == Errno::BUSY => {
                last = Errno::BUSY;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                last = errno_of(&e);
                break;
            }
        }
    }
    Err(LabError::Setup {
        what: format!("rmdir {}", p.display()),
        errno: last,
    })
}

/// Removes cgroups left by runs whose process is gone (killed before it could clean up).
pub fn remove_stale(ctrl: &MemoryController) {
    let Ok(dir) = fs::read_dir(&ctrl.root) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(CGROUP_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// One cgroup seen from the child: files opened before it is limited.
#[derive(Debug)]
pub struct Limiter {
    path: PathBuf,
    procs: File,
    limit: File,
    pid: String,
    unlimited: &'static str,
    raised: AtomicBool,
}

fn write_exact(mut f: &File, b: &[u8]) -> Result<(), Errno> {
    match f.write(b) {
        Ok(n) if n == b.len() => Ok(()),
        Ok(_) => Err(Errno::IO),
        Err(e) => Err(errno_of(&e)),
    }
}

impl Limiter {
    /// Opens the cgroup at `path` for this process (its files stay open: entering and raising
    /// need no allocation).
    pub fn open(path: &Path, v: CgroupVersion) -> Result<Limiter, LabError> {
        let open = |f: &str| {
            let p = path.join(f);
            OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(io_err(format!("opening {}", p.display())))
        };
        Ok(Limiter {
            path: path.to_path_buf(),
            procs: open("cgroup.procs")?,
            limit: open(limit_file(v))?,
            pid: std::process::id().to_string(),
            unlimited: unlimited(v),
            raised: AtomicBool::new(false),
        })
    }

    /// Moves this process into the (limited) cgroup. Allocates nothing.
    pub fn enter(&self) -> Result<(), LabError> {
        write_exact(&self.procs, self.pid.as_bytes()).map_err(|errno| LabError::Setup {
            what: format!("moving the child into {}", self.path.display()),
            errno,
        })
    }

    /// Lifts the limit (once). Allocates nothing.
    pub fn raise(&self) -> Result<(), LabError> {
        if self.raised.load(Ordering::SeqCst) {
            return Ok(());
        }
        write_exact(&self.limit, self.unlimited.as_bytes()).map_err(|errno| LabError::Setup {
            what: format!("raising the limit of {}", self.path.display()),
            errno,
        })?;
        self.raised.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Faults in 512 KiB of stack below the caller's frame, so the limited phase grows none.
#[inline(never)]
fn prefault_stack() {
    let mut probe = [0u8; 512 * 1024];
    std::hint::black_box(&mut probe);
    for i in (0..probe.len()).step_by(PAGE_SIZE as usize) {
        probe[i] = 1;
    }
    std::hint::black_box(&probe);
}

/// Leaves touched, free memory in the allocator (small chunks in its bins, a written block at
/// the start of the heap's top), so the few small allocations the engine makes before its first
/// raw call fault in no new page.
fn prewarm_heap() {
    let small: Vec<Vec<u64>> = (0..2048).map(|i| vec![i as u64; 1 + i % 64]).collect();
    std::hint::black_box(&small);
    drop(small);
    let block = vec![1u8; 96 * 1024];
    std::hint::black_box(&block);
}

/// Makes this process no victim of the OOM killer (cgroup v2 has no `oom_kill_disable`), so
/// that a limited allocation fails instead of killing the process.
pub fn shield_from_oom_killer() -> Result<(), LabError> {
    write_file(Path::new("/proc/self/oom_score_adj"), "-1000")
}

/// Everything the limited phase must not do for the first time.
pub fn prepare_limited() {
    prewarm_heap();
    prefault_stack();
}

//! Discovering the long-term pins of a process from `/proc`.
//!
//! The only per-buffer source user space has is io_uring: `/proc/PID/fdinfo/FD` of every fd
//! whose link reads `anon_inode:[io_uring]` lists the ring's registered buffers. The total of
//! long-term pins is `VmPin` in `/proc/PID/status` (io_uring, RDMA, ... add to `mm->pinned_vm`;
//! transient O_DIRECT pins do not). The scan cross-checks the two:
//! `unexplained_bytes = VmPin - what io_uring accounts for the buffers found`.
//!
//! How io_uring accounts (io_uring/rsrc.c, `io_buffer_account_pin`): one page per small page of
//! each buffer, counted again for every buffer that covers it; a huge folio is counted whole
//! (`page_size(head)`), once per ring. The scan reproduces this, detecting PMD-mapped huge pages
//! with `PAGEMAP_SCAN` (`PAGE_IS_HUGE`) when the 4 KiB count leaves bytes unexplained. A large
//! folio mapped by PTEs (mTHP) cannot be seen from user space: its extra pages stay unexplained.
//!
//! Every file is opened relative to one `/proc/PID` directory fd ([`ProcDir`], from
//! [`crate::backend::procfs`], which the remote backend reads `/proc` with too), taken first, so
//! a pid reused by a new process is never read: once the process is gone every lookup fails
//! with ENOENT or ESRCH ([`PinScanError::ProcessGone`]). A scan changes nothing, in the target
//! or here.

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use rustix::fs::OFlags;

use super::fdinfo::{FdinfoError, RingInfo, parse_io_uring_fdinfo, parse_vm_pin};
use super::{Pin, PinKind, PinSource};
use crate::backend::linux::scan_once;
use crate::backend::procfs::ProcDir;
use crate::range::{PAGE_SIZE, PMD_SIZE, Range};
use crate::seam::{ScanRequest, category, scan_all};
use crate::sys::pagemap::Pagemap;
use crate::sys::{Errno, errno_name};

/// The link text of an io_uring fd in `/proc/PID/fd`.
pub const IO_URING_LINK: &str = "anon_inode:[io_uring]";

/// Why the pins of a process could not be discovered. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinScanError {
    /// The process does not exist, or exited during the scan (ENOENT or ESRCH on a `/proc`
    /// file, or a `status` without `VmPin`: a zombie).
    #[error("no such process {pid} (or it exited during the scan): {path}: {}", errno_name(*errno))]
    ProcessGone {
        /// The process.
        pid: u32,
        /// The file that said so.
        path: String,
        /// ENOENT or ESRCH.
        errno: Errno,
    },
    /// Not allowed to read the process's fds (EACCES/EPERM: it needs ptrace read access, as
    /// `/proc/PID/fd` does).
    #[error("no permission to read {path} of process {pid}: {}", errno_name(*errno))]
    NoPermission {
        /// The process.
        pid: u32,
        /// The file refused.
        path: String,
        /// EACCES or EPERM.
        errno: Errno,
    },
    /// Any other error reading a `/proc` file.
    #[error("reading {path} of process {pid}: {}", errno_name(*errno))]
    Io {
        /// The process.
        pid: u32,
        /// The file.
        path: String,
        /// The errno.
        errno: Errno,
    },
    /// A `/proc` text this parser does not understand, or a busy ring whose buffers never got
    /// listed in all attempts.
    #[error("{path} of process {pid}: {source}")]
    Malformed {
        /// The process.
        pid: u32,
        /// The file.
        path: String,
        /// What is wrong.
        source: FdinfoError,
    },
    /// A ring's lock was held during every read of its fdinfo, so its buffers could not be
    /// listed (on 6.18 the kernel prints the io_uring part of fdinfo only when a trylock of
    /// `uring_lock` succeeds).
    #[error("{path} of process {pid}: the ring stayed busy during {attempts} reads")]
    RingBusy {
        /// The process.
        pid: u32,
        /// The fdinfo file.
        path: String,
        /// Reads tried.
        attempts: u32,
    },
    /// The strict option: long-term pinned bytes that no known source explains.
    #[error(
        "process {pid}: {unexplained_bytes} of {vm_pin_bytes} long-term pinned bytes (VmPin) \
         are explained by no io_uring buffer or declared pin (strict)"
    )]
    Unexplained {
        /// The process.
        pid: u32,
        /// `VmPin` in bytes.
        vm_pin_bytes: u64,
        /// The part no source explains.
        unexplained_bytes: u64,
    },
}

impl PinScanError {
    /// The errno that best stands for it (for interfaces that only carry an errno):
    /// ESRCH, EACCES/EPERM, the I/O errno, EIO (malformed), EAGAIN (ring busy), EBUSY
    /// (unexplained pins under the strict option).
    pub fn errno(&self) -> Errno {
        match self {
            PinScanError::ProcessGone { .. } => Errno::SRCH,
            PinScanError::NoPermission { errno, .. } | PinScanError::Io { errno, .. } => *errno,
            PinScanError::Malformed { .. } => Errno::IO,
            PinScanError::RingBusy { .. } => Errno::AGAIN,
            PinScanError::Unexplained { .. } => Errno::BUSY,
        }
    }

    /// The process.
    pub fn pid(&self) -> u32 {
        match self {
            PinScanError::ProcessGone { pid, .. }
            | PinScanError::NoPermission { pid, .. }
            | PinScanError::Io { pid, .. }
            | PinScanError::Malformed { pid, .. }
            | PinScanError::RingBusy { pid, .. }
            | PinScanError::Unexplained { pid, .. } => *pid,
        }
    }
}

/// How to scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOptions {
    /// When `VmPin` is 0, skip the fd walk: the process holds no long-term pin in its own
    /// address space. (A ring it inherited from another process may still list buffers: those
    /// are the other process's pins, accounted there.) Makes a scan of a process without pins
    /// one read of `status`.
    pub skip_without_vm_pin: bool,
    /// Reads of one fdinfo while the ring is busy (its buffers not listed) before giving up
    /// ([`PinScanError::RingBusy`]). The first few retry at once, later ones after a pause of
    /// 100 us, so a ring busy for a while (a large registration pinning its pages) is waited
    /// for up to about `fdinfo_attempts` x 100 us.
    pub fdinfo_attempts: u32,
    /// Whole scans tried while `VmPin` changes under them (pins registered or released during
    /// the scan); the last one is kept, flagged [`Discovery::vm_pin_changed`].
    pub attempts: u32,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            skip_without_vm_pin: false,
            fdinfo_attempts: 200,
            attempts: 4,
        }
    }
}

/// Where a scan is, for an observer (tools and tests that act between the steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanPoint<'a> {
    /// `/proc/PID` is open and `VmPin` read.
    Opened {
        /// `VmPin` in bytes.
        vm_pin_bytes: u64,
    },
    /// The fds were listed; these are the io_uring ones, about to be read.
    Listed {
        /// Their numbers.
        io_uring_fds: &'a [i32],
    },
}

/// One io_uring ring found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingFound {
    /// The fd it was found under (the first, when several fds share the ring).
    pub fd: i32,
    /// What its fdinfo says.
    pub info: RingInfo,
    /// Pages io_uring accounts for its buffers in `VmPin` (as io_buffer_account_pin does).
    pub accounted_pages: u64,
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The process.
    pub pid: u32,
    /// `VmPin` of the process in bytes.
    pub vm_pin_bytes: u64,
    /// The pinned pages of every io_uring buffer, one entry per (fd, buffer), sorted by start.
    pub pins: Vec<Pin>,
    /// The distinct rings (by inode).
    pub rings: Vec<RingFound>,
    /// Bytes of `VmPin` the buffers found account for.
    pub explained_bytes: u64,
    /// `VmPin` minus `explained_bytes` (0 when the buffers account for more: a ring shared
    /// with, and accounted to, another process).
    pub unexplained_bytes: u64,
    /// The fd walk was skipped because `VmPin` was 0 ([`ScanOptions::skip_without_vm_pin`]).
    pub fd_walk_skipped: bool,
    /// `VmPin` changed during every attempt: pins came or went while the fds were read, so
    /// the cross-check (`unexplained_bytes`, against the last `VmPin`) may be off by them.
    pub vm_pin_changed: bool,
}

/// The error for `errno` on `path`.
fn classify(pid: u32, path: String, errno: Errno) -> PinScanError {
    match errno {
        Errno::NOENT | Errno::SRCH => PinScanError::ProcessGone { pid, path, errno },
        Errno::ACCESS | Errno::PERM => PinScanError::NoPermission { pid, path, errno },
        _ => PinScanError::Io { pid, path, errno },
    }
}

/// The scan's `/proc/PID` (a [`ProcDir`]: a reused pid is never read), its errors classified
/// as [`PinScanError`].
struct PinDir(ProcDir);

impl PinDir {
    fn path(&self, rel: &str) -> String {
        self.0.path(rel)
    }

    fn err(&self, rel: &str, errno: Errno) -> PinScanError {
        classify(self.0.pid(), self.path(rel), errno)
    }

    fn open(pid: u32) -> Result<PinDir, PinScanError> {
        ProcDir::open(pid)
            .map(PinDir)
            .map_err(|errno| classify(pid, format!("/proc/{pid}"), errno))
    }

    /// `VmPin` in bytes; `ProcessGone` when the process has no address space any more.
    fn vm_pin(&self) -> Result<u64, PinScanError> {
        let status = self.0.read("status").map_err(|e| self.err("status", e))?;
        match parse_vm_pin(&status) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(PinScanError::ProcessGone {
                pid: self.0.pid(),
                path: self.path("status"),
                errno: Errno::SRCH,
            }),
            Err(source) => Err(PinScanError::Malformed {
                pid: self.0.pid(),
                path: self.path("status"),
                source,
            }),
        }
    }

    /// Whether fd `n` is an io_uring fd; `None` if it was closed meanwhile.
    fn is_io_uring(&self, fd_dir: &OwnedFd, name: &str) -> Result<Option<bool>, PinScanError> {
        match rustix::fs::readlinkat(fd_dir, name, Vec::new()) {
            Ok(link) => Ok(Some(link.to_bytes() == IO_URING_LINK.as_bytes())),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.err(&format!("fd/{name}"), e)),
        }
    }

    /// The io_uring fds, ascending.
    fn io_uring_fds(&self) -> Result<Vec<i32>, PinScanError> {
        let fd_dir = self.fd_dir()?;
        let mut out = Vec::new();
        for n in self
            .0
            .numeric_entries("fd")
            .map_err(|e| self.err("fd", e))?
        {
            if self.is_io_uring(&fd_dir, &n.to_string())? == Some(true) {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// `/proc/PID/fd`, opened for `readlinkat`.
    fn fd_dir(&self) -> Result<OwnedFd, PinScanError> {
        self.0
            .open_at("fd", OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(|e| self.err("fd", e))
    }

    /// The fdinfo of ring fd `fd`, read again while the ring is busy; `None` if the fd was
    /// closed (or reused for something else) meanwhile.
    fn ring(&self, fd: i32, opts: &ScanOptions) -> Result<Option<RingInfo>, PinScanError> {
        let rel = format!("fdinfo/{fd}");
        let attempts = opts.fdinfo_attempts.max(1);
        for attempt in 0..attempts {
            if attempt >= 16 {
                std::thread::sleep(std::time::Duration::from_micros(100));
            } else if attempt > 0 {
                std::thread::yield_now();
            }
            let text = match self.0.read(&rel) {
                Ok(t) => t,
                Err(Errno::NOENT) => {
                    // The fd was closed, or the whole process is gone: status tells which.
                    self.vm_pin().map_err(|e| match e {
                        PinScanError::ProcessGone { pid, errno, .. } => PinScanError::ProcessGone {
                            pid,
                            path: self.path(&rel),
                            errno,
                        },
                        other => other,
                    })?;
                    return Ok(None);
                }
                Err(e) => return Err(self.err(&rel, e)),
            };
            match parse_io_uring_fdinfo(&text) {
                Ok(info) => return Ok(Some(info)),
                // Busy: 6.18 prints no io_uring lines at all when its trylock fails, older
                // kernels the count without the entries.
                Err(FdinfoError::Truncated { .. } | FdinfoError::CutShort { .. }) => {}
                Err(FdinfoError::NoUserBufs) => {
                    // Or the fd number was reused by another file since the listing.
                    if self.is_io_uring(&self.fd_dir()?, &fd.to_string())? != Some(true) {
                        return Ok(None);
                    }
                }
                Err(source) => {
                    return Err(PinScanError::Malformed {
                        pid: self.0.pid(),
                        path: self.path(&rel),
                        source,
                    });
                }
            }
        }
        Err(PinScanError::RingBusy {
            pid: self.0.pid(),
            path: self.path(&rel),
            attempts,
        })
    }
}

/// The pages `[addr, addr + len)` touches (what `io_pin_pages` pins).
pub fn pinned_pages(addr: u64, len: u64) -> Option<Range> {
    let start = addr & !(PAGE_SIZE - 1);
    let end = addr.checked_add(len)?.checked_next_multiple_of(PAGE_SIZE)?;
    (end > start).then(|| Range::from_bounds(start, end))
}

/// Pages io_uring accounts for one ring's buffers, given the PMD-mapped huge parts of the
/// address space (`huge`, 2 MiB aligned blocks; empty when unknown).
fn accounted_pages(bufs: &[Range], huge: &crate::range::RangeSet) -> u64 {
    let mut blocks = HashSet::new();
    let mut pages = 0;
    for b in bufs {
        let small = crate::range::RangeSet::single(*b).difference(huge);
        pages += small.pages();
        for h in huge.clip(*b).iter() {
            let mut a = h.start() & !(PMD_SIZE - 1);
            while a < h.end() {
                if blocks.insert(a) {
                    pages += PMD_SIZE / PAGE_SIZE;
                }
                a += PMD_SIZE;
            }
        }
    }
    pages
}

/// The PMD-mapped huge pages among `ranges`, rounded out to 2 MiB blocks.
fn huge_blocks(pid: u32, ranges: &[Range]) -> Option<crate::range::RangeSet> {
    let pm = Pagemap::open_pid(pid).ok()?;
    let mut out = crate::range::RangeSet::new();
    for r in ranges {
        let req = ScanRequest {
            start: r.start(),
            end: r.end(),
            category_mask: category::HUGE,
            return_mask: category::HUGE,
            ..Default::default()
        };
        for g in scan_all(&req, |q, n| scan_once(&pm, q, n)).ok()?.regions {
            let a = g.start & !(PMD_SIZE - 1);
            let b = g.end.checked_next_multiple_of(PMD_SIZE)?;
            out.insert(Range::from_bounds(a, b));
        }
    }
    Some(out)
}

/// Scans process `pid` with default options (the full fd walk).
pub fn discover(pid: u32) -> Result<Discovery, PinScanError> {
    discover_with(pid, &ScanOptions::default(), &mut |_| {})
}

/// Scans process `pid`, calling `observer` between the steps.
pub fn discover_with(
    pid: u32,
    opts: &ScanOptions,
    observer: &mut dyn FnMut(ScanPoint<'_>),
) -> Result<Discovery, PinScanError> {
    let dir = PinDir::open(pid)?;
    let attempts = opts.attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let vm1 = dir.vm_pin()?;
        observer(ScanPoint::Opened { vm_pin_bytes: vm1 });
        if opts.skip_without_vm_pin && vm1 == 0 {
            return Ok(Discovery {
                pid,
                vm_pin_bytes: 0,
                pins: Vec::new(),
                rings: Vec::new(),
                explained_bytes: 0,
                unexplained_bytes: 0,
                fd_walk_skipped: true,
                vm_pin_changed: false,
            });
        }
        let fds = dir.io_uring_fds()?;
        observer(ScanPoint::Listed { io_uring_fds: &fds });
        let mut found: Vec<(i32, RingInfo)> = Vec::new();
        for &fd in &fds {
            if let Some(info) = dir.ring(fd, opts)? {
                found.push((fd, info));
            }
        }
        let vm2 = dir.vm_pin()?;
        if vm1 == vm2 || attempt >= attempts {
            let mut d = build(pid, vm2, found);
            d.vm_pin_changed = vm1 != vm2;
            return Ok(d);
        }
    }
}

fn build(pid: u32, vm_pin_bytes: u64, found: Vec<(i32, RingInfo)>) -> Discovery {
    let mut pins = Vec::new();
    let mut rings: Vec<RingFound> = Vec::new();
    let mut seen = HashSet::new();
    for (fd, info) in found {
        for b in &info.bufs {
            // addr 0: a kernel-registered buffer (driver bio vectors), not in the address space.
            let Some(range) = pinned_pages(b.addr, b.len).filter(|_| b.addr != 0) else {
                continue;
            };
            pins.push(Pin {
                range,
                source: PinSource::IoUring { fd, index: b.index },
                kind: PinKind::LongTerm,
                device_writes: true,
            });
        }
        // Several fds of one ring (dup, SCM_RIGHTS) are accounted once.
        if info.ino.is_none_or(|ino| seen.insert(ino)) {
            rings.push(RingFound {
                fd,
                info,
                accounted_pages: 0,
            });
        }
    }
    let user_bufs = |r: &RingFound| -> Vec<Range> {
        r.info
            .bufs
            .iter()
            .filter(|b| b.addr != 0)
            .filter_map(|b| pinned_pages(b.addr, b.len))
            .collect()
    };
    let none = crate::range::RangeSet::new();
    let mut explained = 0;
    for r in &mut rings {
        r.accounted_pages = accounted_pages(&user_bufs(r), &none);
        explained += r.accounted_pages * PAGE_SIZE;
    }
    if vm_pin_bytes > explained {
        // Huge folios are accounted whole: look for PMD-mapped ones among the buffers.
        let all: Vec<Range> = rings.iter().flat_map(user_bufs).collect();
        if let Some(huge) = huge_blocks(pid, &all).filter(|h| !h.is_empty()) {
            explained = 0;
            for r in &mut rings {
                r.accounted_pages = accounted_pages(&user_bufs(r), &huge);
                explained += r.accounted_pages * PAGE_SIZE;
            }
        }
    }
    pins.sort_by_key(|p| (p.range.start(), p.range.end()));
    Discovery {
        pid,
        vm_pin_bytes,
        pins,
        rings,
        explained_bytes: explained,
        unexplained_bytes: vm_pin_bytes.saturating_sub(explained),
        fd_walk_skipped: false,
        vm_pin_changed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::RangeSet;

    #[test]
    fn pinned_pages_round_out() {
        assert_eq!(
            pinned_pages(0x1001, 1),
            Some(Range::from_bounds(0x1000, 0x2000))
        );
        assert_eq!(
            pinned_pages(0x1fff, 2),
            Some(Range::from_bounds(0x1000, 0x3000))
        );
        assert_eq!(pinned_pages(u64::MAX - 10, 5), None);
    }

    #[test]
    fn accounting_follows_io_buffer_account_pin() {
        let p = |a: u64, b: u64| Range::from_bounds(a * PAGE_SIZE, b * PAGE_SIZE);
        // Small pages: per buffer, overlaps counted twice.
        assert_eq!(accounted_pages(&[p(0, 4), p(2, 6)], &RangeSet::new()), 8);
        // A huge block is counted whole, once per ring, however many buffers touch it.
        let huge = RangeSet::single(Range::from_bounds(PMD_SIZE, 2 * PMD_SIZE));
        let in_huge = Range::from_bounds(PMD_SIZE, PMD_SIZE + PAGE_SIZE);
        let in_huge2 = Range::from_bounds(PMD_SIZE + 8 * PAGE_SIZE, PMD_SIZE + 9 * PAGE_SIZE);
        assert_eq!(accounted_pages(&[in_huge, in_huge2], &huge), 512);
        // Straddling: 2 small pages before the block + the block.
        let straddle = Range::from_bounds(PMD_SIZE - 2 * PAGE_SIZE, PMD_SIZE + PAGE_SIZE);
        assert_eq!(accounted_pages(&[straddle], &huge), 2 + 512);
    }

    #[test]
    fn errors_map_to_errnos() {
        let gone = PinScanError::ProcessGone {
            pid: 1,
            path: "/proc/1/status".into(),
            errno: Errno::NOENT,
        };
        assert_eq!(gone.errno(), Errno::SRCH);
        assert_eq!(gone.pid(), 1);
        assert!(gone.to_string().contains("no such process 1"));
    }
}

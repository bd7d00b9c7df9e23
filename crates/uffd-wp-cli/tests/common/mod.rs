//! What the remote-backend test files share: the workload target, the kernel-side checks of
//! a target (thread states, pagemap bit 57, VM_UFFD_WP, userfaultfds in its fds), the skip.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use uffd_wp::backend::linux::remote;
use uffd_wp::backend::linux::{AttachError, Config, LinuxMm};
use uffd_wp::helper::{Helper, HelperError, Kind};
use uffd_wp::range::{PAGE_SIZE, Range};

pub const BIN: &str = env!("CARGO_BIN_EXE_uffd-wp");
/// Upper bound for anything awaited from a child (a failure, not a measurement).
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Skips with a message naming what is missing, or fails under `UFFD_WP_REQUIRE_KERNEL=1`.
pub fn skip(what: &str) {
    if std::env::var("UFFD_WP_REQUIRE_KERNEL").as_deref() == Ok("1") {
        panic!("remote backend test needs {what} (UFFD_WP_REQUIRE_KERNEL=1)");
    }
    eprintln!("SKIPPED remote backend test: needs {what}");
}

pub fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .expect("effective uid")
}

/// A workload helper process (`uffd-wp`, helper kind `workload`): its region, and its write
/// counts as it answers them.
pub struct Workload {
    pub child: Helper,
    pub pid: u32,
    pub range: Range,
    pub threads: usize,
}

impl Workload {
    pub fn spawn(size: &str, threads: usize) -> Workload {
        let target = serde_json::json!({
            "size": uffd_wp::range::parse_size(size).expect("size"),
            "threads": threads,
            "interval_ms": 20,
        });
        let mut child = Helper::spawn(Path::new(BIN), &[], Kind::Workload, &target)
            .expect("spawn the workload helper");
        let v: Value = child.recv(PATIENCE).expect("workload header");
        let start = v["start"].as_u64().expect("start");
        let len = v["len"].as_u64().expect("len");
        let pid = v["pid"].as_u64().expect("pid") as u32;
        assert_eq!(pid, child.pid());
        Workload {
            child,
            pid,
            range: Range::from_bounds(start, start + len),
            threads,
        }
    }

    /// The next write count it answers within `wait` (None if none came).
    pub fn writes_within(&mut self, wait: Duration) -> Option<u64> {
        match self.child.recv::<Value>(wait) {
            Ok(v) => Some(v["writes"].as_u64().expect("a write count")),
            Err(HelperError::Timeout { .. }) => None,
            Err(e) => panic!("workload {}: {e}", self.pid),
        }
    }

    /// The next write count it prints (panics if it stops printing).
    pub fn next_writes(&mut self) -> u64 {
        self.writes_within(PATIENCE)
            .unwrap_or_else(|| panic!("workload {} stopped reporting", self.pid))
    }

    /// Waits until its write count grows past the latest value it printed, proving its writers
    /// run; returns (latest before, grown value).
    pub fn assert_writing(&mut self) -> (u64, u64) {
        // Drain what is already buffered: the latest value is the baseline.
        let mut base = self.next_writes();
        while let Some(n) = self.writes_within(Duration::ZERO) {
            base = n;
        }
        let t0 = Instant::now();
        loop {
            let n = self.next_writes();
            if n > base {
                return (base, n);
            }
            assert!(
                t0.elapsed() < PATIENCE,
                "workload {} writes stuck at {base}",
                self.pid
            );
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().is_none()
    }
}

/// The state letters of every thread of `pid`.
pub fn thread_states(pid: u32) -> Vec<(i32, char)> {
    let pid = pid as i32;
    remote::thread_ids(pid)
        .expect("list threads")
        .into_iter()
        .filter_map(|t| Some((t, remote::thread_state(pid, t)?)))
        .collect()
}

/// Whether some VMA overlapping `r` carries the `uw` (VM_UFFD_WP) flag, from /proc/PID/smaps.
pub fn smaps_uw(pid: u32, r: Range) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut overlaps = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            overlaps = a < r.end() && r.start() < b;
            continue;
        }
        if overlaps
            && let Some(flags) = line.strip_prefix("VmFlags:")
            && flags.split_whitespace().any(|f| f == "uw")
        {
            return true;
        }
    }
    false
}

/// Pages of `r` with pagemap bit 57 (uffd-wp) set, read from /proc/PID/pagemap directly.
pub fn bit57_pages(pid: u32, r: Range) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("open pagemap");
    let mut buf = vec![0u8; (r.pages() * 8) as usize];
    f.read_exact_at(&mut buf, r.start() / PAGE_SIZE * 8)
        .expect("read pagemap");
    buf.chunks_exact(8)
        .filter(|c| u64::from_ne_bytes((*c).try_into().unwrap()) & (1 << 57) != 0)
        .count() as u64
}

/// Attaches, or returns `None` after a skip when this machine cannot (no root, no ptrace, no
/// pidfd_getfd). Any other failure fails the test.
pub fn attach(pid: u32, tid: Option<u32>) -> Option<(LinuxMm, remote::AttachReport)> {
    if euid() != 0 {
        skip("root (ptrace and pidfd_getfd of another process)");
        return None;
    }
    match LinuxMm::attach_thread(pid, tid, Config::default()) {
        Ok(x) => Some(x),
        Err(e @ AttachError::Permission { .. }) => {
            skip(&format!("ptrace permission: {e}"));
            None
        }
        Err(e @ AttachError::Os { errno, .. }) if errno == uffd_wp::seam::Errno::NOSYS => {
            skip(&format!("pidfd_getfd (5.6+): {e}"));
            None
        }
        Err(e @ AttachError::UnsupportedArch { .. }) => {
            skip(&format!("x86_64: {e}"));
            None
        }
        Err(e) => panic!("attach to {pid}: {e}"),
    }
}

/// Whether this machine can attach to `w` (root, ptrace, pidfd_getfd, x86_64); skips (or fails
/// under `UFFD_WP_REQUIRE_KERNEL=1`) when it cannot. The probe attaches and releases at once.
pub fn can_attach(w: &Workload) -> bool {
    attach(w.pid, None).is_some()
}

/// Whether `pid` holds a userfaultfd (an `anon_inode:[userfaultfd]` among its fds).
pub fn holds_uffd(pid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("userfaultfd"))
    })
}

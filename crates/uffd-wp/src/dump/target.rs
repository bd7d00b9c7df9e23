//! What a dump reads about its target from /proc before it touches it: that it is a live user
//! process, its identity for `NT_PRPSINFO`, its auxiliary vector, its coredump filter, and from
//! smaps which private file mappings hold pages of their own and which mappings the target
//! registered with a userfaultfd of its own.

use std::collections::{BTreeMap, BTreeSet};

use crate::backend::procfs::{self, status_field};
use crate::seam::Errno;

use super::DumpError;

/// `PF_KTHREAD` in the flags field of /proc/PID/stat.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The process-wide facts of a core (`NT_PRPSINFO`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: i32,
    /// Parent's pid.
    pub ppid: i32,
    /// Process group.
    pub pgrp: i32,
    /// Session.
    pub sid: i32,
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// The state letter before the dump (`R`, `S`, `T`, ...).
    pub state: char,
    /// `comm`.
    pub comm: String,
    /// The command line, arguments joined by spaces.
    pub cmdline: String,
}

fn proc_err(pid: i32, what: &'static str) -> impl FnOnce(Errno) -> DumpError {
    move |errno| match errno {
        Errno::NOENT | Errno::SRCH => DumpError::NoProcess { pid },
        errno => DumpError::Proc { pid, what, errno },
    }
}

/// Reads the target's identity, refusing what cannot be dumped: no such process, a zombie, a
/// kernel thread.
pub fn process_info(pid: i32) -> Result<ProcessInfo, DumpError> {
    let stat = procfs::read(&procfs::path(pid, "stat")).map_err(proc_err(pid, "stat"))?;
    // Fields after the parenthesised comm: state ppid pgrp session tty tpgid flags ...
    let after = &stat[stat.rfind(')').ok_or(DumpError::Proc {
        pid,
        what: "stat",
        errno: Errno::INVAL,
    })? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    let state = f.first().and_then(|s| s.chars().next()).unwrap_or('?');
    if matches!(state, 'Z' | 'X') {
        return Err(DumpError::Zombie { pid });
    }
    if num(6) as u64 & PF_KTHREAD != 0 {
        return Err(DumpError::KernelThread { pid });
    }
    let status = procfs::read(&procfs::path(pid, "status")).map_err(proc_err(pid, "status"))?;
    let id = |key: &str| {
        status_field(&status, key)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let comm = procfs::read(&procfs::path(pid, "comm")).map_err(proc_err(pid, "comm"))?;
    let cmdline = std::fs::read(procfs::path(pid, "cmdline")).unwrap_or_default();
    Ok(ProcessInfo {
        pid,
        ppid: num(1) as i32,
        pgrp: num(2) as i32,
        sid: num(3) as i32,
        uid: id("Uid"),
        gid: id("Gid"),
        state,
        comm: comm.trim_end().to_string(),
        cmdline: String::from_utf8_lossy(&cmdline)
            .trim_end_matches('\0')
            .replace('\0', " "),
    })
}

/// The target's `/proc/PID/coredump_filter`.
pub fn coredump_filter(pid: i32) -> Result<u32, DumpError> {
    let s = procfs::read(&procfs::path(pid, "coredump_filter"))
        .map_err(proc_err(pid, "coredump_filter"))?;
    u32::from_str_radix(s.trim(), 16).map_err(|_| DumpError::Proc {
        pid,
        what: "coredump_filter",
        errno: Errno::INVAL,
    })
}

/// The target's auxiliary vector (`NT_AUXV`).
pub fn auxv(pid: i32) -> Result<Vec<u8>, DumpError> {
    std::fs::read(procfs::path(pid, "auxv"))
        .map_err(|e| proc_err(pid, "auxv")(crate::sys::errno_of(&e)))
}

/// `MemAvailable` of /proc/meminfo, in bytes: what the dump may hold without swapping or
/// reclaim pressure (`None` if the kernel does not say).
pub fn mem_available() -> Option<u64> {
    let text = procfs::read("/proc/meminfo").ok()?;
    let kb: u64 = status_field(&text, "MemAvailable")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb << 10)
}

/// What /proc/PID/smaps says about the target's mappings, each keyed by its start address.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Smaps {
    /// Mappings with pages of their own (`Anonymous:` above 0 kB).
    pub written: BTreeSet<u64>,
    /// Mappings the target registered with a userfaultfd of its own for missing or minor
    /// faults (`VmFlags` `um` or `ui`), with their resident bytes (`Rss:`). Reading one of
    /// their missing pages with `process_vm_readv(2)` waits for the target's own handler.
    pub own_uffd: BTreeMap<u64, u64>,
    /// Mappings the target marked `MADV_DONTDUMP` (`VmFlags` `dd`): no core holds them.
    pub dont_dump: BTreeSet<u64>,
    /// Every mapping's populated bytes: resident (`Rss:`) and swapped out (`Swap:`).
    pub populated: BTreeMap<u64, u64>,
}

/// Reads the target's smaps.
pub fn smaps(pid: i32) -> Result<Smaps, DumpError> {
    let text = procfs::read(&procfs::path(pid, "smaps")).map_err(proc_err(pid, "smaps"))?;
    Ok(parse_smaps(&text))
}

fn parse_smaps(text: &str) -> Smaps {
    let kb = |v: &str| -> u64 { v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0) };
    let mut out = Smaps::default();
    let (mut cur, mut rss, mut swap) = (None, 0, 0);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Anonymous:") {
            if let (Some(start), true) = (cur, kb(v) > 0) {
                out.written.insert(start);
            }
        } else if let Some(v) = line.strip_prefix("Rss:") {
            rss = kb(v) << 10;
        } else if let Some(v) = line.strip_prefix("Swap:") {
            swap = kb(v) << 10;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            let Some(start) = cur else { continue };
            let has = |f: &str| flags.split_whitespace().any(|x| x == f);
            if has("um") || has("ui") {
                out.own_uffd.insert(start, rss);
            }
            if has("dd") {
                out.dont_dump.insert(start);
            }
            out.populated.insert(start, rss + swap);
        } else if let Some((range, _)) = line.split_once(' ')
            && let Some((a, _)) = range.split_once('-')
            && let Ok(start) = u64::from_str_radix(a, 16)
        {
            (cur, rss, swap) = (Some(start), 0, 0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reads_as_a_live_user_process() {
        let me = std::process::id() as i32;
        let p = process_info(me).unwrap();
        assert_eq!(p.pid, me);
        assert!(p.ppid > 0);
        assert!(!p.comm.is_empty());
        assert!(!p.cmdline.is_empty());
        assert!(coredump_filter(me).is_ok());
        assert!(auxv(me).unwrap().len() >= 16);
        // The heap of a test process has pages of its own.
        let heap = procfs::read_maps(me)
            .unwrap()
            .into_iter()
            .find(|m| m.name == "[heap]");
        if let Some(h) = heap {
            assert!(smaps(me).unwrap().written.contains(&h.start));
        }
    }

    #[test]
    fn smaps_names_written_mappings_and_those_the_target_registered_itself() {
        let text = "\
55d0a0004000-55d0a0005000 rw-p 00004000 fd:01 123 /usr/bin/prog
Rss:                   4 kB
Anonymous:             4 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Rss:                1024 kB
Anonymous:          1024 kB
VmFlags: rd wr mr mw me ac um uw
7f0000400000-7f0000600000 rw-s 00000000 00:01 7 /memfd:x (deleted)
Rss:                   8 kB
Anonymous:             0 kB
VmFlags: rd wr sh mr mw me ms ui
7f0000600000-7f0000800000 rw-p 00000000 00:00 0
Rss:                   0 kB
Anonymous:             0 kB
Swap:                 12 kB
SwapPss:              12 kB
VmFlags: rd wr mr mw me ac uw dd
";
        let s = parse_smaps(text);
        assert_eq!(
            s.written,
            [0x55d0a0004000, 0x7f0000000000].into_iter().collect()
        );
        assert_eq!(
            s.own_uffd,
            [(0x7f0000000000, 1 << 20), (0x7f0000400000, 8 << 10)]
                .into_iter()
                .collect(),
            "um and ui, not uw alone (reading never waits on a WP-only registration)"
        );
        assert_eq!(s.dont_dump, [0x7f0000600000].into_iter().collect());
        assert_eq!(
            s.populated.get(&0x7f0000600000),
            Some(&(12 << 10)),
            "swap counts"
        );
        assert_eq!(
            s.populated.get(&0x7f0000000000),
            Some(&(1 << 20)),
            "rss counts"
        );
    }

    #[test]
    fn kernel_threads_zombies_and_missing_processes_are_refused() {
        // pid 2 is kthreadd on every Linux system.
        assert!(matches!(
            process_info(2),
            Err(DumpError::KernelThread { pid: 2 })
        ));
        assert!(matches!(
            process_info(i32::MAX),
            Err(DumpError::NoProcess { .. })
        ));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: a zombie once it exits.
        let t0 = std::time::Instant::now();
        while procfs::thread_state(pid, pid) != Some('Z') {
            assert!(t0.elapsed().as_secs() < 30, "`true` did not exit");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(process_info(pid), Err(DumpError::Zombie { .. })));
        child.wait().unwrap();
    }
}

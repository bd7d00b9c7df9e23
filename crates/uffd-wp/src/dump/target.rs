//! What a dump reads about its target from /proc before it touches it: that it is a live user
//! process, its identity for `NT_PRPSINFO`, its auxiliary vector, its coredump filter, and which
//! private file mappings hold pages of their own (smaps `Anonymous:`).

use std::collections::BTreeMap;

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

/// The start of every mapping with pages of its own (smaps `Anonymous:` above 0 kB).
pub fn written_mappings(pid: i32) -> Result<BTreeMap<u64, u64>, DumpError> {
    let smaps = procfs::read(&procfs::path(pid, "smaps")).map_err(proc_err(pid, "smaps"))?;
    let mut out = BTreeMap::new();
    let mut cur = None;
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Anonymous:") {
            let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if let (Some(start), true) = (cur, kb > 0) {
                out.insert(start, kb);
            }
        } else if let Some((range, _)) = line.split_once(' ')
            && let Some((a, _)) = range.split_once('-')
            && let Ok(start) = u64::from_str_radix(a, 16)
        {
            cur = Some(start);
        }
    }
    Ok(out)
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
            assert!(written_mappings(me).unwrap().contains_key(&h.start));
        }
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

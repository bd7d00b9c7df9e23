//! Reading `/proc/PID`: the one module that opens and parses what the kernel prints there, for
//! the remote backend ([`crate::backend::linux::remote`]: a target's threads, their states, its
//! mappings) and pin discovery ([`mod@crate::backend::pins::discover`]: a process's fds and
//! `status`).
//!
//! Two ways in:
//! - by path (`/proc/PID/...`, looked up anew on every call), as the remote backend does: its
//!   target is named by pid, and a traced or frozen target cannot be reaped under it;
//! - through a [`ProcDir`], a `/proc/PID` directory fd opened once, every file opened relative
//!   to it, as pin discovery does: a pid reused by a new process is never read, every lookup
//!   fails with ENOENT or ESRCH once the process is gone.
//!
//! Errors are the kernel's errno; each caller classifies them into its own error enum. The
//! formats only one caller reads stay with it: the io_uring part of `fdinfo` and the meaning of
//! `VmPin` (`backend/pins/fdinfo.rs`).

use std::fmt::Display;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

use rustix::fs::{CWD, Dir, Mode, OFlags};

use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::sys::ptrace;
use crate::sys::{Errno, errno_of};

/// The path of `rel` under `/proc/PID`.
pub fn path(pid: impl Display, rel: &str) -> String {
    format!("/proc/{pid}/{rel}")
}

/// Reads the whole text of `path`, relative to `dir` (absolute paths ignore `dir`).
fn read_at(dir: impl AsFd, path: &str) -> Result<String, Errno> {
    let fd = rustix::fs::openat(dir, path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mut s = String::new();
    File::from(fd)
        .read_to_string(&mut s)
        .map_err(|e| errno_of(&e))?;
    Ok(s)
}

/// The entries of directory `path` (relative to `dir`) whose names are numbers (pids, thread
/// ids, fds), ascending; other names (`.`, `..`) are left out.
fn numeric_entries_at(dir: impl AsFd, path: &str) -> Result<Vec<i32>, Errno> {
    let fd = rustix::fs::openat(
        dir,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for ent in Dir::new(fd)? {
        if let Ok(n) = ent?.file_name().to_str().unwrap_or("").parse::<i32>() {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads the whole text of the file at `path` (`/proc/...`).
pub fn read(path: &str) -> Result<String, Errno> {
    read_at(CWD, path)
}

/// Reads `buf.len()` bytes of process `pid`'s memory at `addr` through `/proc/PID/mem`, whose
/// accesses never wait for a userfaultfd handler: the kernel fails a page that only a handler
/// could fill (`handle_userfault()` cannot retry a `/proc/PID/mem` access), as it fails an
/// unmapped one. Those pages read as zero and are returned. `process_vm_readv(2)` would wait.
pub fn read_mem_no_wait(pid: i32, addr: u64, buf: &mut [u8]) -> Result<RangeSet, Errno> {
    let f = File::open(path(pid, "mem")).map_err(|e| errno_of(&e))?;
    let mut unread = RangeSet::new();
    let mut off = 0;
    while off < buf.len() {
        match f.read_at(&mut buf[off..], addr + off as u64) {
            Ok(n) if n > 0 => off += n,
            Ok(_) => unread_page(addr, buf, &mut off, &mut unread),
            Err(e) if matches!(errno_of(&e), Errno::IO | Errno::FAULT) => {
                unread_page(addr, buf, &mut off, &mut unread)
            }
            Err(e) => return Err(errno_of(&e)),
        }
    }
    Ok(unread)
}

/// Zeroes the page of `buf` at `off`, notes it unread, and moves `off` past it.
fn unread_page(addr: u64, buf: &mut [u8], off: &mut usize, unread: &mut RangeSet) {
    let end = (*off + PAGE_SIZE as usize).min(buf.len());
    buf[*off..end].fill(0);
    unread.insert(Range::from_bounds(addr + *off as u64, addr + end as u64));
    *off = end;
}

/// An open `/proc/PID` directory: every file is opened relative to it (see the module docs).
#[derive(Debug)]
pub struct ProcDir {
    pid: u32,
    dir: OwnedFd,
}

impl ProcDir {
    /// Opens `/proc/PID` (`O_PATH`), or `/proc/PID/task/TID` of a live thread once the
    /// leader exited ([`mm_dir`]: the leader's `status`, `fd` and `fdinfo` are empty then).
    pub fn open(pid: u32) -> Result<ProcDir, Errno> {
        let dir = rustix::fs::open(
            mm_dir(pid as i32).as_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(ProcDir { pid, dir })
    }

    /// The process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The path of `rel` in it (for messages: the file itself is opened through the fd).
    pub fn path(&self, rel: &str) -> String {
        path(self.pid, rel)
    }

    /// Opens `rel` in it with `flags` (plus `O_CLOEXEC`).
    pub fn open_at(&self, rel: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
        rustix::fs::openat(&self.dir, rel, flags | OFlags::CLOEXEC, Mode::empty())
    }

    /// The whole text of file `rel`.
    pub fn read(&self, rel: &str) -> Result<String, Errno> {
        read_at(&self.dir, rel)
    }

    /// The numeric entries of directory `rel` (`fd`, `task`), ascending.
    pub fn numeric_entries(&self, rel: &str) -> Result<Vec<i32>, Errno> {
        numeric_entries_at(&self.dir, rel)
    }
}

/// The raw value of field `key` of a `/proc/PID/status` text: what follows `key:` on its line,
/// blanks included; `None` when there is no such line.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
}

/// The state letter of a `/proc/.../stat` line (the field after the parenthesised name, which
/// may itself contain spaces and parentheses).
pub fn stat_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The state letter of thread `tid` of process `pid` (`/proc/PID/task/TID/stat`).
pub fn thread_state(pid: i32, tid: i32) -> Option<char> {
    stat_state(&read(&path(pid, &format!("task/{tid}/stat"))).ok()?)
}

/// A thread of process `pid` that still has its mm: `pid` itself, or the first live thread
/// once the leader exited (a zombie leader has no mm: its `/proc` files and
/// process_vm_readv(2) on its id fail with ESRCH).
pub fn mm_tid(pid: i32) -> i32 {
    let live = |t: i32| matches!(thread_state(pid, t), Some(s) if s != 'Z' && s != 'X');
    if live(pid) {
        return pid;
    }
    thread_ids(pid)
        .ok()
        .and_then(|t| t.into_iter().find(|t| live(*t)))
        .unwrap_or(pid)
}

/// The `/proc` directory whose `maps`, `mem` and `pagemap` show process `pid`'s memory:
/// `/proc/PID`, or `/proc/PID/task/TID` of [`mm_tid`] once the leader exited.
pub fn mm_dir(pid: i32) -> String {
    match mm_tid(pid) {
        t if t == pid => format!("/proc/{pid}"),
        t => format!("/proc/{pid}/task/{t}"),
    }
}

/// Whether `/proc/PID` exists and some thread of it is not a zombie (the leader may have
/// exited while other threads run).
pub fn process_alive(pid: i32) -> bool {
    let live = |t: i32| matches!(thread_state(pid, t), Some(s) if s != 'Z' && s != 'X');
    live(pid) || thread_ids(pid).is_ok_and(|tids| tids.into_iter().any(live))
}

/// The open fd numbers of thread `tid` of process `pid` (`/proc/PID/task/TID/fd`),
/// ascending.
pub fn fd_numbers(pid: i32, tid: i32) -> Result<Vec<i32>, Errno> {
    numeric_entries_at(CWD, &path(pid, &format!("task/{tid}/fd")))
}

/// The thread ids of process `pid` (`/proc/PID/task`), ascending.
pub fn thread_ids(pid: i32) -> Result<Vec<i32>, Errno> {
    numeric_entries_at(CWD, &path(pid, "task"))
}

/// Nanoseconds the threads of process `pid` have run on a CPU and waited on a run queue,
/// summed over its live threads (`/proc/PID/task/TID/schedstat`, sched-stats.rst); a thread
/// that exits between two readings takes its share with it.
pub fn cpu_and_wait_ns(pid: i32) -> Result<(u64, u64), Errno> {
    let mut sum = (0, 0);
    for tid in thread_ids(pid)? {
        let Ok(text) = read(&path(pid, &format!("task/{tid}/schedstat"))) else {
            continue; // exited since the listing
        };
        let mut f = text
            .split_whitespace()
            .map(|x| x.parse::<u64>().unwrap_or(0));
        sum.0 += f.next().unwrap_or(0);
        sum.1 += f.next().unwrap_or(0);
    }
    Ok(sum)
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Start address.
    pub start: u64,
    /// End address.
    pub end: u64,
    /// `rwxp` flags.
    pub perms: String,
    /// The byte offset in the mapped file (0 for anonymous memory).
    pub offset: u64,
    /// The mapped file's device, `MAJOR:MINOR` as maps prints it (`00:00` for anonymous
    /// memory; shmem's internal mount, shared anonymous memory included, is `00:01`).
    pub dev: String,
    /// The mapped file's inode number (0 for anonymous memory and pseudo-names such as
    /// `[heap]`; a file-backed mapping has one even when its name is ` (deleted)`).
    pub inode: u64,
    /// Path or pseudo-name (`[vdso]`, `[heap]`), empty for anonymous memory.
    pub name: String,
}

/// Parses the text of /proc/PID/maps (lines that do not parse are skipped).
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines()
        .filter_map(|l| {
            // The kernel separates the first five fields with one space each, then pads
            // before the name (which may itself contain spaces).
            let mut it = l.splitn(6, ' ');
            let (a, b) = it.next()?.split_once('-')?;
            let perms = it.next()?.to_string();
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let dev = it.next()?.to_string();
            let inode = it.next()?.parse().ok()?;
            let name = it.next().unwrap_or("").trim().to_string();
            Some(MapEntry {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                perms,
                offset,
                dev,
                inode,
                name,
            })
        })
        .collect()
}

/// Whether the mappings (sorted, as the kernel lists them) cover every byte of `r`.
pub fn maps_cover(maps: &[MapEntry], r: Range) -> bool {
    let mut cur = r.start();
    for m in maps {
        if m.end <= cur {
            continue;
        }
        if m.start > cur {
            return false;
        }
        cur = m.end;
        if cur >= r.end() {
            return true;
        }
    }
    cur >= r.end()
}

/// The other processes that map the same files as `pid`'s shared mappings in `wanted` (keys
/// `(dev, inode)`, as maps prints them), by key: every `/proc/N/maps` read once. A process
/// that cannot be read (gone, or not ours) is left out.
pub fn sharers(
    pid: i32,
    wanted: &std::collections::BTreeSet<(String, u64)>,
) -> std::collections::BTreeMap<(String, u64), Vec<i32>> {
    let mut found: std::collections::BTreeMap<(String, u64), Vec<i32>> = Default::default();
    if wanted.is_empty() {
        return found;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&n| n != pid)
        .collect();
    pids.sort_unstable();
    for n in pids {
        let Ok(text) = read(&format!("/proc/{n}/maps")) else {
            continue;
        };
        for m in parse_maps(&text) {
            let key = (m.dev, m.inode);
            if !wanted.contains(&key) {
                continue;
            }
            let list = found.entry(key).or_default();
            if list.last() != Some(&n) {
                list.push(n);
            }
        }
    }
    found
}

/// Reads /proc/PID/maps.
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>, Errno> {
    Ok(parse_maps(&read(&format!("{}/maps", mm_dir(pid)))?))
}

/// Whether every byte of `r` is mapped in process `pid`: `PROCMAP_QUERY` on its
/// /proc/PID/maps (one ioctl per VMA crossed, 6.11+), else parsing the whole file.
pub fn fully_mapped(pid: i32, r: Range) -> Result<bool, Errno> {
    let maps = File::open(format!("{}/maps", mm_dir(pid))).map_err(|e| errno_of(&e))?;
    match query_covers(&maps, r)? {
        Some(covered) => Ok(covered),
        None => Ok(maps_cover(&read_maps(pid)?, r)),
    }
}

/// Whether `PROCMAP_QUERY` on `maps` finds every byte of `r` mapped (`None`: the kernel has no
/// `PROCMAP_QUERY`).
fn query_covers(maps: &File, r: Range) -> Result<Option<bool>, Errno> {
    let mut cur = r.start();
    while cur < r.end() {
        match ptrace::procmap_query(maps, cur) {
            Ok(Some(v)) if v.start <= cur => cur = v.end,
            Ok(_) => return Ok(Some(false)),
            Err(Errno::NOTTY) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(true))
}

/// [`fully_mapped`] for a caller that asks about one process again and again (the exact
/// engine asks after every clean raw call on a remote target): the maps file stays open, so
/// a question is one `PROCMAP_QUERY`. Opening it anew (the leader's state read first, then the
/// file) cost 50-100 us a call on this project's machines, most of the dump's pause between
/// its re-protect calls. A "no" or an error is asked again through a fresh file, once the
/// leader may have exited (its own maps file then shows no mappings).
#[derive(Debug)]
pub struct MapsQuery {
    pid: i32,
    maps: std::sync::Mutex<Option<File>>,
}

impl MapsQuery {
    /// Nothing is opened until the first question.
    pub fn new(pid: i32) -> MapsQuery {
        MapsQuery {
            pid,
            maps: std::sync::Mutex::new(None),
        }
    }

    /// Whether every byte of `r` is mapped in the process.
    pub fn fully_mapped(&self, r: Range) -> Result<bool, Errno> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if maps.is_none() {
            let path = format!("{}/maps", mm_dir(self.pid));
            *maps = Some(File::open(path).map_err(|e| errno_of(&e))?);
        }
        if let Some(f) = maps.as_ref()
            && let Ok(Some(true)) = query_covers(f, r)
        {
            return Ok(true);
        }
        *maps = None;
        fully_mapped(self.pid, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_read_without_waiting_zeroes_and_names_the_pages_it_cannot_read() {
        use crate::sys::mem::{Backing, Mapping, Thp};
        let mut m = Mapping::new(4 * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
        let r = m.range();
        m.touch(r, 0x77).unwrap();
        let hole = Range::new(r.start() + PAGE_SIZE, PAGE_SIZE).unwrap();
        m.punch(hole).unwrap();
        let mut buf = vec![0xffu8; r.len() as usize];
        let me = std::process::id() as i32;
        let unread = read_mem_no_wait(me, r.start(), &mut buf).unwrap();
        assert_eq!(unread, RangeSet::single(hole));
        // `touch` writes each page's first byte; the rest of the page reads as zero.
        let p = PAGE_SIZE as usize;
        let firsts: Vec<u8> = (0..4).map(|i| buf[i * p]).collect();
        assert_eq!(firsts, [0x77, 0, 0x77, 0x77]);
        assert!(buf.iter().all(|&b| b != 0xff), "every byte written");
        assert_eq!(
            read_mem_no_wait(i32::MAX, r.start(), &mut buf),
            Err(Errno::NOENT)
        );
    }

    #[test]
    fn parses_maps_and_checks_coverage() {
        let text = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
00651000-00652000 r--p 00051000 08:02 173521      /usr/bin/dbus-daemon
00652000-00655000 rw-p 00052000 08:02 173521      /usr/bin/dbus-daemon
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7ffd5b9fe000-7ffd5ba00000 r-xp 00000000 00:00 0                          [vdso]
7ffd5ba00000-7ffd5ba01000 r--p 00000000 00:00 0                          /tmp/a b (deleted)
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].start, 0x400000);
        assert_eq!(m[0].perms, "r-xp");
        assert_eq!((m[1].offset, m[1].inode), (0x51000, 173521));
        assert_eq!((m[3].offset, m[3].inode), (0, 0));
        assert_eq!(m[3].name, "");
        assert_eq!(m[4].name, "[vdso]");
        assert_eq!(m[5].name, "/tmp/a b (deleted)");
        let r = |a: u64, b: u64| Range::from_bounds(a, b);
        assert!(maps_cover(&m, r(0x400000, 0x452000)));
        assert!(maps_cover(&m, r(0x651000, 0x655000)), "adjacent mappings");
        assert!(
            !maps_cover(&m, r(0x450000, 0x652000)),
            "gap 0x452000..0x651000"
        );
        assert!(
            !maps_cover(&m, r(0x7f00000ff000, 0x7f0000101000)),
            "runs past the end"
        );
        assert!(!maps_cover(&m, r(0x1000, 0x2000)), "before everything");
        assert!(maps_cover(&m, r(0x7ffd5b9fe000, 0x7ffd5ba01000)));
    }

    /// PROCMAP_QUERY, the parsed maps and msync (this process) agree on ranges with and
    /// without gaps. The gap is a hole punched in a mapping of ours, which another test's
    /// mmap running in parallel could fill (and unmap again between two reads: seen once in
    /// CI, maps said "covered" where msync had said "gap"). So the mapping is placed far
    /// below mmap_base, where the kernel's top-down search never looks for a small mapping
    /// (MAP_FIXED_NOREPLACE), and the answers are still checked only if the hole stayed a hole.
    #[test]
    fn fully_mapped_agrees_with_maps_and_msync() {
        use crate::range::PAGE_SIZE;
        use crate::sys::mem::Mapping;
        let me = std::process::id() as i32;
        for attempt in 0..5u64 {
            let Ok(mut m) = Mapping::new_at(
                0x1000_0000_0000 + attempt * (1 << 30),
                16 * PAGE_SIZE,
                crate::sys::mem::Backing::Anon,
            ) else {
                continue;
            };
            let r = m.range();
            let p = |a: u64, b: u64| {
                Range::from_bounds(r.start() + a * PAGE_SIZE, r.start() + b * PAGE_SIZE)
            };
            // A MapsQuery opened before the hole is made: its kept file must see it.
            let cached = MapsQuery::new(me);
            assert!(
                cached.fully_mapped(r).unwrap(),
                "whole mapping, before the hole"
            );
            m.punch(p(5, 7)).unwrap();
            let spans = [
                (0, 16),
                (0, 5),
                (4, 6),
                (6, 8),
                (7, 16),
                (5, 7),
                (0, 1),
                (15, 16),
            ];
            let answers: Vec<_> = spans
                .iter()
                .map(|&(a, b)| {
                    let q = p(a, b);
                    (
                        crate::sys::mem::fully_mapped(q).unwrap(),
                        fully_mapped(me, q).unwrap(),
                        maps_cover(&read_maps(me).unwrap(), q),
                        cached.fully_mapped(q).unwrap(),
                    )
                })
                .collect();
            let hole_kept = [p(5, 6), p(6, 7)]
                .iter()
                .all(|h| !crate::sys::mem::fully_mapped(*h).unwrap());
            if !hole_kept {
                continue;
            }
            for (&(a, b), &(want, query, maps, kept)) in spans.iter().zip(&answers) {
                assert_eq!(want, !(a < 7 && 5 < b), "msync on {a}..{b}");
                assert_eq!(query, want, "PROCMAP_QUERY on {a}..{b}");
                assert_eq!(maps, want, "maps on {a}..{b}");
                assert_eq!(kept, want, "MapsQuery (file kept open) on {a}..{b}");
            }
            return;
        }
        panic!("the punched hole was filled by another mapping in 5 attempts out of 5");
    }

    #[test]
    fn stat_state_skips_odd_names() {
        assert_eq!(stat_state("12 (a) b) c) S 1 2 3"), Some('S'));
        assert_eq!(stat_state("12 (sleep) t 1 2"), Some('t'));
        assert_eq!(stat_state("garbage"), None);
    }

    #[test]
    fn status_fields_are_raw_values() {
        let s = "Name:\tx\nVmPin:\t       8 kB\nVmPinned:\t1 kB\nTracerPid:\t0\n";
        assert_eq!(status_field(s, "VmPin"), Some("\t       8 kB"));
        assert_eq!(status_field(s, "TracerPid"), Some("\t0"));
        assert_eq!(
            status_field(s, "VmPi"),
            None,
            "a prefix of a key is not the key"
        );
        assert_eq!(status_field(s, "Nope"), None);
    }

    /// The same listing by path and through a `ProcDir`, with this thread in it; a pid that
    /// does not exist is ENOENT both ways.
    /// A busy single-threaded child has run (its time grows), read from its schedstat; a pid
    /// that does not exist is ENOENT. (Not this process: its sum over threads falls when a
    /// test thread beside this one exits.)
    #[test]
    fn this_process_has_run() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let (cpu0, _) = cpu_and_wait_ns(pid).expect("schedstat");
        let t = std::time::Instant::now();
        let mut cpu1 = cpu0;
        while cpu1 < cpu0 + 10_000_000 && t.elapsed() < std::time::Duration::from_secs(20) {
            std::thread::sleep(std::time::Duration::from_millis(10));
            cpu1 = cpu_and_wait_ns(pid).expect("schedstat").0;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            cpu1 >= cpu0 + 10_000_000,
            "{cpu0} -> {cpu1} after {:?} of spinning",
            t.elapsed()
        );
        assert_eq!(cpu_and_wait_ns(-1), Err(Errno::NOENT));
    }

    #[test]
    fn threads_of_this_process() {
        let me = std::process::id();
        let tids = thread_ids(me as i32).unwrap();
        assert!(tids.contains(&ptrace::gettid()), "{tids:?}");
        assert!(tids.windows(2).all(|w| w[0] < w[1]));
        let dir = ProcDir::open(me).unwrap();
        assert_eq!(dir.path("task"), format!("/proc/{me}/task"));
        assert!(dir.numeric_entries("task").unwrap().contains(&(me as i32)));
        assert!(process_alive(me as i32));
        assert_eq!(thread_ids(-5), Err(Errno::NOENT));
        assert_eq!(ProcDir::open(u32::MAX).err(), Some(Errno::NOENT));
    }
}

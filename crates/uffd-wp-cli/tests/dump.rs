//! `uffd-wp dump` on the real kernel: the built-in target dumped live and checked against itself,
//! gdb reading the core (every thread, the registers, memory at known addresses), and bad input
//! refused before the target is touched.
//!
//! Needs root (ptrace and a uffd inside another process), pidfd_getfd (5.6+) and gdb: each test
//! is skipped with a message without them, or fails under `UFFD_WP_REQUIRE_KERNEL=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use uffd_wp::testing::status_kb;

const BIN: &str = env!("CARGO_BIN_EXE_uffd-wp");

/// Skips with a message naming what is missing, or fails under `UFFD_WP_REQUIRE_KERNEL=1`.
fn skip(what: &str) {
    if std::env::var("UFFD_WP_REQUIRE_KERNEL").as_deref() == Ok("1") {
        panic!("dump test needs {what} (UFFD_WP_REQUIRE_KERNEL=1)");
    }
    eprintln!("SKIPPED dump test: needs {what}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            l.split_whitespace().nth(2).map(|u| u == "0")
        })
        .unwrap_or(false)
}

fn has_gdb() -> bool {
    Command::new("gdb")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("uffd-wp-dump-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uffd_wp(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("300")
        .arg(BIN)
        .args(args)
        .output()
        .expect("run uffd-wp")
}

fn gdb(exe: &Path, core: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("timeout");
    c.args(["120", "gdb", "-batch", "-nx"]);
    for x in cmds {
        c.args(["-ex", x]);
    }
    let o = c.arg(exe).arg(core).output().expect("run gdb");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_builtin_target_dumps_consistently_and_gdb_reads_every_thread() {
    if !is_root() {
        return skip("root");
    }
    if !has_gdb() {
        return skip("gdb");
    }
    let dir = Scratch::new("builtin");
    let core = dir.0.join("core");
    let o = uffd_wp(&[
        "dump",
        "--size",
        "16M",
        "--threads",
        "3",
        "--json",
        "-o",
        core.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}: {stdout}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(v["oracle"]["inconsistent"], 0, "{v}");
    assert_eq!(
        v["oracle"]["consistent"].as_u64().unwrap() + v["oracle"]["in_flight"].as_u64().unwrap(),
        4096,
        "{v}"
    );
    assert_eq!(v["threads"], 4, "3 writers and the main thread: {v}");
    assert!(v["pause_us"].as_f64().unwrap() > 0.0);
    let methods: Vec<&str> = v["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert!(methods.contains(&"write-protect") && methods.contains(&"in-freeze"));
    // gdb reads the memory too: page 0's header and its entry in the version table, both from
    // the core, agree as the oracle says (equal, or the page one version ahead mid-write).
    let t = &v["target"];
    let (start, versions) = (
        t["start"].as_u64().unwrap(),
        t["versions"].as_u64().unwrap(),
    );
    let mem = gdb(
        Path::new(BIN),
        &core,
        &[
            &format!("x/1gx {start:#x}"),
            &format!("x/1gx {versions:#x}"),
        ],
    );
    let words: Vec<u64> = mem
        .lines()
        .filter_map(|l| l.split_once(":\t"))
        .filter_map(|(_, w)| u64::from_str_radix(w.trim().trim_start_matches("0x"), 16).ok())
        .collect();
    assert_eq!(words.len(), 2, "gdb printed both words:\n{mem}");
    assert!(
        words[0] == words[1] || words[0] == words[1] + 1,
        "page 0 holds version {} but the table says {}:\n{mem}",
        words[0],
        words[1]
    );
    let out = gdb(Path::new(BIN), &core, &["info threads"]);
    // The rows of gdb's thread table: `* 1    Thread 0x... (LWP n) ...`.
    let threads = out
        .lines()
        .filter(|l| {
            let t = l.trim_start_matches(['*', ' ']);
            t.starts_with(|c: char| c.is_ascii_digit()) && t.contains("(LWP ")
        })
        .count();
    assert_eq!(threads, 4, "gdb sees every thread:\n{out}");
    assert!(!out.contains("not in executable format"), "{out}");
    assert!(!out.contains("is not a core dump"), "{out}");
}

#[test]
fn bad_targets_are_refused_with_a_json_error_before_anything_is_touched() {
    let dir = Scratch::new("bad");
    let core = dir.0.join("core");
    let c = core.to_str().unwrap();
    // A zombie: a child that exited and is not reaped yet.
    let mut child = Command::new("true").spawn().unwrap();
    let zombie = child.id().to_string();
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(format!("/proc/{zombie}/stat"))
        .unwrap()
        .contains(") Z ")
    {
        assert!(t0.elapsed().as_secs() < 30, "`true` did not exit");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let cases = [
        ("4194303", "ESRCH", "no process"),
        ("2", "EPERM", "kernel thread"),
        (zombie.as_str(), "ESRCH", "zombie"),
    ];
    for (pid, errno, says) in cases {
        let o = uffd_wp(&["dump", pid, "--json", "-o", c]);
        assert_eq!(o.status.code(), Some(2), "dump {pid}");
        let v: Value = serde_json::from_slice(&o.stdout).expect("JSON error");
        assert_eq!(v["error"]["kind"], "Dump", "{v}");
        assert_eq!(v["error"]["errno"], errno, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    // An output nobody can create: refused before the target is read or attached.
    let o = uffd_wp(&[
        "dump",
        &std::process::id().to_string(),
        "--json",
        "-o",
        "/nonexistent-dir/core",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON error");
    assert_eq!(v["error"]["kind"], "Io", "{v}");
    child.wait().unwrap();
}

/// `python3 -c script` with `env`, once it has printed "ready"; `None` without python3.
fn python_ready(script: &str, env: &[(&str, String)]) -> Option<std::process::Child> {
    python_says(script, env).map(|(py, _)| py)
}

/// [`python_ready`], with what the script printed after "ready" on the same line.
fn python_says(script: &str, env: &[(&str, String)]) -> Option<(std::process::Child, String)> {
    let mut py = Command::new("python3")
        .args(["-c", script])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(py.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let rest = first.trim().strip_prefix("ready");
    assert!(rest.is_some(), "{first}");
    Some((py, rest.unwrap_or_default().trim().to_string()))
}

/// Reserves `GIB` GiB of anonymous memory (`MAP_NORESERVE`, as sanitizers and allocators
/// reserve; `MAP_SHARED` when `SHARED` is set), writes byte `k % 251 + 1` at `k` GiB + `k`
/// pages for every `k`, maps 16 MiB of 0x77 marked `MADV_DONTDUMP`, prints "ready" and the two
/// addresses on the same line, and sleeps.
const SPARSE: &str = r#"
import mmap, os, sys, time, ctypes
size = int(os.environ["GIB"]) << 30
shared = mmap.MAP_SHARED if os.environ.get("SHARED") else mmap.MAP_PRIVATE
m = mmap.mmap(-1, size, flags=shared | mmap.MAP_ANONYMOUS | 0x4000)
for k in range(size >> 30):
    m[(k << 30) + k * 4096] = k % 251 + 1
dd = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
dd.write(b"\x77" * (16 << 20))
dd.madvise(mmap.MADV_DONTDUMP)
addr = lambda mm: ctypes.addressof(ctypes.c_char.from_buffer(mm))
print("ready", addr(m), addr(dd), flush=True)
time.sleep(600)
"#;

/// `MemAvailable`, bytes.
fn mem_available() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb << 10
}

/// The sparse script with `GIB` twice the memory available (64 at least), and the two
/// addresses it printed.
fn sparse_target(shared: bool) -> Option<(std::process::Child, u64, u64, u64)> {
    let gib = ((2 * mem_available()) >> 30).max(64);
    let mut env = vec![("GIB", gib.to_string())];
    if shared {
        env.push(("SHARED", "1".to_string()));
    }
    let (py, line) = python_says(SPARSE, &env)?;
    let a: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    Some((py, gib, a[0], a[1]))
}

/// A reservation twice the memory available, one page per GiB written: the dump holds and
/// copies only what is populated, leaves the target's page tables as they were (protecting
/// all of it would have allocated 2 MiB of them per GiB), and its core holds every written
/// byte, zero around them, nothing of the memory marked `MADV_DONTDUMP`.
#[test]
fn a_sparse_reservation_larger_than_memory_is_dumped_by_what_is_populated() {
    if !is_root() {
        return skip("root");
    }
    let Some((mut py, gib, base, dd)) = sparse_target(false) else {
        return skip("python3");
    };
    let pid = py.id().to_string();
    let pte0 = status_kb(&pid, "VmPTE");
    let dir = Scratch::new("sparse");
    let core = dir.0.join("core");
    let t0 = std::time::Instant::now();
    let o = uffd_wp(&["dump", &pid, "--json", "-o", core.to_str().unwrap()]);
    let took = t0.elapsed();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let map_at = |a: u64| {
        v["mappings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["start"].as_u64().unwrap() <= a && a < m["end"].as_u64().unwrap())
            .cloned()
            .unwrap()
    };
    assert_eq!(map_at(base)["method"], "write-protect-populated", "{v}");
    assert_eq!(map_at(dd)["method"], "omitted", "{v}");
    assert!(map_at(dd)["why"].as_str().unwrap().contains("DONTDUMP"));
    let pte_growth = status_kb(&pid, "VmPTE").saturating_sub(pte0);
    assert!(
        pte_growth < 1024,
        "the target's page tables grew by {pte_growth} kB"
    );
    let f = std::fs::File::open(&core).unwrap();
    let at = |a: u64| core_byte(&f, a);
    for k in 0..gib {
        let a = base + (k << 30) + k * 4096;
        assert_eq!(
            at(a),
            Some((k % 251 + 1) as u8),
            "byte {k} GiB in ({took:?})"
        );
        assert_eq!(at(a + 1), Some(0));
        assert_eq!(at(a + (1 << 29)), Some(0));
    }
    assert_eq!(
        at(dd),
        None,
        "MADV_DONTDUMP memory has no bytes in the core"
    );
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&core).unwrap().blocks() * 512;
    assert!(allocated < 256 << 20, "{allocated} bytes allocated");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    assert!(status.contains("State:\tS"), "{status}");
    py.kill().unwrap();
    py.wait().unwrap();
}

/// The byte at `addr` in a core's `PT_LOAD` segments, read where it is (the core may be
/// tens of GiB, mostly holes); `None` where no segment holds bytes.
fn core_byte(f: &std::fs::File, addr: u64) -> Option<u8> {
    use object::elf::{FileHeader64, PT_LOAD};
    use object::read::elf::{FileHeader, ProgramHeader};
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; 1 << 20];
    let n = f.read_at(&mut head, 0).unwrap();
    head.truncate(n);
    let h = FileHeader64::<object::Endianness>::parse(&*head).unwrap();
    let e = h.endian().unwrap();
    let p = *h.program_headers(e, &*head).unwrap().iter().find(|p| {
        p.p_type(e) == PT_LOAD && p.p_vaddr(e) <= addr && addr < p.p_vaddr(e) + p.p_filesz(e)
    })?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, p.p_offset(e) + (addr - p.p_vaddr(e)))
        .unwrap();
    Some(b[0])
}

/// A shared reservation twice the memory available: shared memory can hold pages with nothing
/// mapped, so the dump would hold all of it, and it is refused with ENOMEM before the target
/// is touched (a private one ran uffd-wp out of memory before the check, and is now dumped
/// sparse). The target runs on, untraced, with no core left behind.
#[test]
fn a_target_larger_than_the_memory_available_is_refused_before_it_is_touched() {
    if !is_root() {
        return skip("root");
    }
    let Some((mut py, _, _, _)) = sparse_target(true) else {
        return skip("python3");
    };
    let dir = Scratch::new("shared-reservation");
    let core = dir.0.join("core");
    let pid = py.id().to_string();
    let t0 = std::time::Instant::now();
    let o = uffd_wp(&["dump", &pid, "--json", "-o", core.to_str().unwrap()]);
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON error");
    assert_eq!(v["error"]["errno"], "ENOMEM", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MemAvailable"),
        "{v}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    assert!(status.contains("State:\tS"), "{status}");
    assert!(!core.exists(), "a core was left");
    py.kill().unwrap();
    py.wait().unwrap();
}

/// As an ordinary user: fills 256 MiB, says "ready", then for 4 s reads a file into page
/// after page of it with `preadv(2)` (the kernel writes the page: a kernel-mode fault on a
/// protected one), and prints how many reads failed and how many ran.
const PREADV: &str = r#"
import mmap, os, time
size = 256 << 20
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.write(b"\x01" * size)
fd = os.open("/proc/self/exe", os.O_RDONLY)
view = memoryview(m)
print("ready", flush=True)
errors, reads, off, t0 = 0, 0, 0, time.time()
while time.time() - t0 < 4:
    try:
        os.preadv(fd, [view[off:off + 4096]], 0)
        reads += 1
    except OSError:
        errors += 1
    off = (off + 4096 * 7) % size
print(errors, reads, flush=True)
"#;

/// A process of an ordinary user (no `CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd` 0) may
/// only create a user-mode uffd, under which the kernel's own writes into a protected page
/// fail with EFAULT: the dump raises the sysctl for the instant of its injected call (and says
/// so), so every `preadv(2)` the target runs into its memory during the copy succeeds, and the
/// sysctl is 0 again afterwards.
#[test]
fn a_process_of_an_ordinary_user_is_dumped_and_its_system_calls_never_fail() {
    if !is_root() {
        return skip("root");
    }
    let sysctl = || std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap();
    // Where the sysctl already lets anyone, there is nothing to raise (the rest holds).
    let was = sysctl();
    // The system's python: another one may sit where an ordinary user cannot read it.
    let python = "/usr/bin/python3";
    if !Path::new(python).exists() {
        return skip(python);
    }
    let mut py = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            "-c",
            PREADV,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let dir = Scratch::new("nobody");
    let core = dir.0.join("core");
    let o = uffd_wp(&[
        "dump",
        &py.id().to_string(),
        "--json",
        "-o",
        core.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["attach"]["raised_unprivileged_userfaultfd"],
        was.trim() == "0",
        "{v}"
    );
    assert_eq!(sysctl(), was, "set back");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let n: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(n[0], 0, "{} of {} reads failed", n[0], n[1]);
    assert!(n[1] > 0);
    py.wait().unwrap();
}

/// A python process whose threads map, fill and unmap 8 MiB in a loop: its mappings change
/// during every copy. Each dump must succeed, and the process must run on, untraced.
#[test]
fn a_process_that_maps_and_unmaps_during_the_copy_is_dumped_and_runs_on() {
    if !is_root() {
        return skip("root");
    }
    let Some(mut py) = python_ready(CHURN, &[]) else {
        return skip("python3");
    };
    let dir = Scratch::new("churn");
    let core = dir.0.join("core");
    let pid = py.id().to_string();
    for i in 0..5 {
        let o = uffd_wp(&["dump", &pid, "--json", "-o", core.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "dump {i}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["threads"], 3, "{v}");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    assert!(!status.contains("State:\tt"), "{status}");
    assert!(py.try_wait().unwrap().is_none(), "python exited");
    py.kill().unwrap();
    py.wait().unwrap();
}

const CHURN: &str = r#"
import mmap, threading
keep = bytearray(b"k" * (16 << 20))
def churn():
    while True:
        m = mmap.mmap(-1, 8 << 20)
        m.write(b"x" * (8 << 20))
        m.close()
for _ in range(2):
    threading.Thread(target=churn, daemon=True).start()
print("ready", flush=True)
churn()
"#;

/// The PT_LOAD segments of a core: (vaddr, the bytes in the file).
fn loads(core: &Path) -> Vec<(u64, Vec<u8>)> {
    use object::elf::{FileHeader64, PT_LOAD};
    use object::read::elf::{FileHeader, ProgramHeader};
    let data = std::fs::read(core).unwrap();
    let h = FileHeader64::<object::Endianness>::parse(&*data).unwrap();
    let e = h.endian().unwrap();
    h.program_headers(e, &*data)
        .unwrap()
        .iter()
        .filter(|p| p.p_type(e) == PT_LOAD)
        .map(|p| (p.p_vaddr(e), p.data(e, &*data).unwrap().to_vec()))
        .collect()
}

/// Whether `pid` is blocked in nanosleep or clock_nanosleep (x86-64 syscalls 35 and 230).
fn in_nanosleep(pid: &str) -> bool {
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    matches!(syscall.split(' ').next(), Some("35" | "230"))
}

/// Beside gcore on the same idle process: every byte both cores hold is the same, and every
/// segment gcore fills that the kernel's rules dump is filled in ours too.
#[test]
fn an_idle_process_dumps_the_same_bytes_as_gcore() {
    if !is_root() {
        return skip("root");
    }
    if Command::new("gcore").arg("--version").output().is_err() {
        return skip("gcore (gdb)");
    }
    let mut idle = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = idle.id().to_string();
    // Dump `sleep` once it sleeps: not the test's child before its exec, nor the dynamic
    // loader still relocating after it (comm changes at exec; CI saw a libc page differ).
    let t = std::time::Instant::now();
    while !in_nanosleep(&pid) {
        assert!(
            t.elapsed().as_secs() < 30,
            "sleep did not reach its sleep in 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let dir = Scratch::new("gcore");
    let ours = dir.0.join("ours");
    let o = uffd_wp(&["dump", &pid, "--json", "-o", ours.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let prefix = dir.0.join("gcore");
    let g = Command::new("timeout")
        .args(["120", "gcore", "-o", prefix.to_str().unwrap(), &pid])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let theirs = loads(&dir.0.join(format!("gcore.{pid}")));
    let ours = loads(&ours);
    // The stack below the stack pointer is dead memory that attaching (ours, then gdb's)
    // may write: the live part is what gdb's backtraces check.
    let stack = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .find(|l| l.ends_with("[stack]"))
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .unwrap();
    let mut compared = 0;
    for (addr, bytes) in ours.iter().filter(|(a, _)| *a != stack) {
        let Some((_, gb)) = theirs.iter().find(|(a, _)| a == addr) else {
            continue;
        };
        let n = bytes.len().min(gb.len());
        if let Some(i) = (0..n).find(|&i| bytes[i] != gb[i]) {
            panic!(
                "segment at {addr:#x} differs from gcore's at {:#x}: ours {:02x?}, gcore {:02x?}",
                addr + i as u64,
                &bytes[i..n.min(i + 16)],
                &gb[i..n.min(i + 16)]
            );
        }
        compared += n;
    }
    assert!(compared >= 100 << 10, "only {compared} bytes in common");
    idle.kill().unwrap();
    idle.wait().unwrap();
}

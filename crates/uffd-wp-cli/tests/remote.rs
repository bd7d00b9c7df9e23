//! The remote backend on the real kernel, against workload helper processes: attach
//! (a uffd created inside the target), write-protect from here and receive the target's WP
//! faults, a remote snapshot, and THE KILL TESTS: a monitor process SIGKILLed mid-snapshot (in
//! the copy, and inside the freeze) leaves the target running, writing, not stopped and with
//! nothing write-protected.
//!
//! Needs root (ptrace of a process this test does not own as a tracer-to-be is fine as root;
//! pidfd_getfd needs PTRACE_MODE_ATTACH) and a kernel with pidfd_getfd (5.6+): otherwise each
//! test is skipped with a message, or fails under `UFFD_WP_REQUIRE_KERNEL=1`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use uffd_wp::backend::linux::remote::{self, SyscallSite};
use uffd_wp::backend::linux::{AttachError, Config, LinuxMm, RemoteQuiesce};
use uffd_wp::engine::snapshot::Image;
use uffd_wp::range::{PAGE_SIZE, Range};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Event, RegisterMode, WpMode};
use uffd_wp_bench::workload::{PageVerdict, check_page};

/// The target's writes arrive as WP faults on the monitor's uffd; protection set from here is
/// exactly what the target's page tables say; releasing the uffd leaves nothing protected.
#[test]
fn attach_protects_and_receives_the_targets_faults() {
    let mut w = Workload::spawn("16M", 2);
    let Some((mm, rep)) = attach(w.pid, None) else {
        return;
    };
    eprintln!("attach: {rep:?}");
    assert_eq!(rep.pid, w.pid as i32);
    assert_eq!(
        rep.tid, w.pid as i32,
        "the leader (in a system call, unlike the writers) runs the injected calls"
    );
    // The target's copy of the uffd is closed: fd `target_fd` is gone or something else.
    let link = std::fs::read_link(format!("/proc/{}/fd/{}", w.pid, rep.target_fd));
    assert!(
        !matches!(&link, Ok(p) if p.to_string_lossy().contains("userfaultfd")),
        "the target still holds the uffd: {link:?}"
    );
    let r = w.range;
    let half = Range::from_bounds(r.start(), r.start() + r.len() / 2);
    mm.register(r, RegisterMode::WP)
        .expect("register the target's region");
    assert!(smaps_uw(w.pid, r), "VM_UFFD_WP set on the target's VMA");
    mm.writeprotect(half, WpMode::Protect)
        .expect("write-protect");
    // Nobody un-protects yet: the kernel's own bits say exactly the first half (prefilled).
    assert_eq!(bit57_pages(w.pid, half), half.pages());
    assert_eq!(
        bit57_pages(w.pid, Range::from_bounds(half.end(), r.end())),
        0
    );
    assert_eq!(mm.wp_pages(r).unwrap().pages(), half.pages());

    let tids: Vec<i32> = remote::thread_ids(w.pid as i32).unwrap();
    let mut served = 0;
    while served < 50 {
        assert!(mm.wait_event(PATIENCE.as_millis() as i32).expect("poll"));
        for ev in mm.read_events(16).expect("read") {
            let Event::PageFault {
                flags,
                address,
                tid,
            } = ev
            else {
                panic!("unexpected event {ev:?}");
            };
            assert_eq!(flags & 2, 2, "a WP fault: {ev:?}");
            assert!(half.contains(address), "{address:#x} outside {half}");
            assert!(
                tids.contains(&(tid as i32)),
                "fault from thread {tid}, not one of {tids:?}"
            );
            let page = address & !(PAGE_SIZE - 1);
            mm.writeprotect(
                Range::from_bounds(page, page + PAGE_SIZE),
                WpMode::Unprotect { dontwake: false },
            )
            .expect("un-protect and wake");
            served += 1;
        }
    }
    assert_eq!(
        bit57_pages(w.pid, half) + served,
        half.pages(),
        "exactly the served pages were un-protected"
    );
    // Dropping the monitor's (only) reference releases the context: nothing stays protected.
    drop(mm);
    assert!(!smaps_uw(w.pid, r), "VM_UFFD_WP gone after release");
    assert_eq!(bit57_pages(w.pid, r), 0, "PTE bits cleared by the release");
    w.assert_writing();
}

/// A thread interrupted in user space (a busy writer) is sent into the restorer, whose
/// rt_sigreturn entry is substituted, and resumes intact: the workload goes on writing.
#[test]
fn attach_through_a_busy_thread_uses_the_restorer() {
    // One writer: once the write count grows it has left its start-up futex wait for good
    // (it never makes a system call again), so it is interrupted in user space.
    let mut w = Workload::spawn("8M", 1);
    w.assert_writing();
    let writer = remote::thread_ids(w.pid as i32)
        .unwrap()
        .into_iter()
        .find(|t| *t != w.pid as i32)
        .expect("a writer thread");
    let Some((mm, rep)) = attach(w.pid, Some(writer as u32)) else {
        return;
    };
    eprintln!("attach via writer: {rep:?}");
    assert_eq!(rep.tid, writer);
    assert_eq!(
        rep.site,
        SyscallSite::Restorer,
        "a writer runs in user space"
    );
    mm.register(w.range, RegisterMode::WP).unwrap();
    mm.writeprotect(w.range, WpMode::Protect).unwrap();
    assert!(mm.wait_event(PATIENCE.as_millis() as i32).unwrap());
    drop(mm);
    w.assert_writing();
    assert!(w.alive());
    assert_eq!(bit57_pages(w.pid, w.range), 0);
}

/// A thread blocked in read(2) is interrupted, re-enters its read, which is substituted, and
/// its read is restarted as if nothing happened: `cat` still echoes.
#[test]
fn attach_restarts_an_interrupted_blocking_call() {
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn cat");
    let pid = cat.id();
    // Wait until cat is blocked in read(2) (syscall 0) on its stdin.
    let t0 = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .unwrap_or_default()
        .starts_with("0 ")
    {
        assert!(t0.elapsed() < PATIENCE, "cat never blocked in read");
        std::thread::sleep(Duration::from_millis(5));
    }
    let attached = attach(pid, None);
    let mut stdin: ChildStdin = cat.stdin.take().unwrap();
    let mut out = BufReader::new(cat.stdout.take().unwrap());
    if let Some((mm, rep)) = attached {
        eprintln!("attach to cat: {rep:?}");
        assert_eq!(rep.site, SyscallSite::Ridden);
        drop(mm);
        let state = remote::thread_state(pid as i32, pid as i32);
        assert!(
            !matches!(state, Some('t' | 'T')),
            "cat left stopped: {state:?}"
        );
        writeln!(stdin, "hello through a restarted read").unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "hello through a restarted read\n");
    }
    drop(stdin);
    let status = cat.wait().unwrap();
    assert!(status.success(), "cat exited with {status}");
}

/// Typed errors, and the target is left running: no such process; a target another tracer
/// holds (found before the attach), here the freeze of this very test on another thread.
#[test]
fn attach_errors_are_typed_and_leave_the_target_running() {
    if euid() != 0 {
        return skip("root");
    }
    // A pid that does not exist: above pid_max.
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    match LinuxMm::attach(max + 1, Config::default()) {
        Err(AttachError::NoSuchProcess { .. }) => {}
        other => panic!("expected NoSuchProcess, got {other:?}"),
    }
    let mut w = Workload::spawn("4M", 1);
    let q = RemoteQuiesce::new(w.pid);
    let stats = match q.try_freeze() {
        Ok(s) => s,
        Err(e) => return skip(&format!("ptrace: {e}")),
    };
    assert_eq!(stats.threads, 2, "the leader and one writer");
    assert!(
        thread_states(w.pid).iter().all(|(_, s)| *s == 't'),
        "{:?}",
        thread_states(w.pid)
    );
    let pid = w.pid;
    let other = std::thread::spawn(move || LinuxMm::attach(pid, Config::default()).map(drop))
        .join()
        .unwrap();
    // Found before the attach, naming the other tracer (this test process).
    match other {
        Err(AttachError::AlreadyTraced { tracer, .. }) => {
            assert_eq!(tracer, std::process::id() as i32)
        }
        other => panic!("expected AlreadyTraced, got {other:?}"),
    }
    q.try_resume().unwrap();
    assert!(
        thread_states(w.pid)
            .iter()
            .all(|(_, s)| *s != 't' && *s != 'T'),
        "{:?}",
        thread_states(w.pid)
    );
    w.assert_writing();
    // A quiesce dropped while frozen resumes the target.
    let q = RemoteQuiesce::new(w.pid);
    q.try_freeze().unwrap();
    drop(q);
    assert!(thread_states(w.pid).iter().all(|(_, s)| *s != 't'));
    w.assert_writing();
}

/// `uffd-wp snapshot --pid` of a running workload completes, its image is a point-in-time copy
/// (every page a whole version of itself, except at most one page per writer, caught mid-write
/// by the ptrace freeze), and the target runs on with nothing protected.
#[test]
fn remote_snapshot_of_a_running_workload() {
    let mut w = Workload::spawn("64M", 2);
    if !can_attach(&w) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("uffd-wp-remote-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img_path = dir.join("snap.img");
    let range = format!("{}:{}", w.range.start(), w.range.len());
    let out = Command::new(BIN)
        .args([
            "snapshot",
            "--pid",
            &w.pid.to_string(),
            "--range",
            &range,
            "--json",
        ])
        .arg("--out")
        .arg(&img_path)
        .output()
        .expect("run uffd-wp snapshot --pid");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("permission denied") {
        return skip(&format!("ptrace permission: {stderr}"));
    }
    assert!(out.status.success(), "snapshot --pid failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    eprintln!(
        "remote snapshot: pause {} us (freeze {} us), attach {} us, copy {} MB/s, faults {}",
        v["pause_us"],
        v["freeze_us"],
        v["remote"]["attach"]["total_us"],
        v["copy_mb_s"],
        v["faults_served"]
    );
    assert!(v["consistent"].is_null(), "no oracle for a foreign process");
    assert_eq!(v["pages"].as_u64(), Some(w.range.pages()));
    assert_eq!(v["not_captured"].as_array().map(Vec::len), Some(0));
    assert_eq!(v["remote"]["pid"].as_u64(), Some(u64::from(w.pid)));
    assert_eq!(
        v["remote"]["freeze"]["threads"].as_u64(),
        Some(w.threads as u64 + 1)
    );
    assert!(v["fault_latency_us"]["p50"].is_number());

    let img = Image::read_from(std::io::BufReader::new(
        std::fs::File::open(&img_path).unwrap(),
    ))
    .expect("read the image");
    let mut torn = Vec::new();
    for p in 0..w.range.pages() {
        let data = img
            .page(w.range.start() + p * PAGE_SIZE)
            .expect("page in image");
        // The version is unknown; only check the page is a whole version of page p.
        let v0 = u64::from_ne_bytes(data[..8].try_into().unwrap());
        if check_page(p, v0, &data) != PageVerdict::Consistent {
            torn.push(p);
        }
    }
    assert!(
        torn.len() <= w.threads,
        "{} pages torn (at most one per writer can be caught mid-write): {:?}",
        torn.len(),
        &torn[..torn.len().min(8)]
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!smaps_uw(w.pid, w.range));
    assert_eq!(bit57_pages(w.pid, w.range), 0);
    assert!(
        thread_states(w.pid)
            .iter()
            .all(|(_, s)| *s != 't' && *s != 'T'),
        "{:?}",
        thread_states(w.pid)
    );
    w.assert_writing();
}

/// Runs `uffd-wp snapshot --pid` against `w`, stalled at `at`, waits for its marker, checks
/// the state mid-snapshot with `during`, SIGKILLs it, and checks the target is released.
fn kill_monitor_mid_snapshot(w: &mut Workload, at: &str, during: impl FnOnce(&Workload)) {
    let range = format!("{}:{}", w.range.start(), w.range.len());
    let mut mon = Command::new(BIN)
        .args(["snapshot", "--pid", &w.pid.to_string(), "--range", &range])
        .args(["--json", "--stall-at", at])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the monitor");
    let mut err = BufReader::new(mon.stderr.take().unwrap());
    let marker = format!("STALLED at {at}");
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = err.read_line(&mut line).expect("monitor stderr");
        assert!(n > 0, "monitor exited before stalling: {seen}");
        seen.push_str(&line);
        if line.contains(&marker) {
            break;
        }
    }
    during(w);
    mon.kill().expect("SIGKILL the monitor");
    let status = mon.wait().expect("reap the monitor");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the monitor died of SIGKILL"
    );
    // The monitor is reaped: its exit released the uffd (fput at exit) and detached its
    // tracees (exit_ptrace) before it became a zombie.
    let states = thread_states(w.pid);
    assert!(
        states.iter().all(|(_, s)| *s != 't' && *s != 'T'),
        "target left stopped: {states:?}"
    );
    assert!(!smaps_uw(w.pid, w.range), "VM_UFFD_WP left on the VMA");
    let left = bit57_pages(w.pid, w.range);
    eprintln!("after the monitor's death: {left} pages with pagemap bit 57 (uffd-wp)");
    assert_eq!(
        left, 0,
        "userfaultfd_release -> userfaultfd_clear_vma clears the PTE bits"
    );
    assert!(w.alive(), "the target died");
    let (a, b) = w.assert_writing();
    eprintln!("target writes went on: {a} -> {b}");
}

/// THE KILL TEST, in the copy: the range is write-protected, faults go unserved (writers block
/// on them), and the monitor is SIGKILLed. The kernel's release of the uffd un-protects
/// everything and wakes the blocked writers.
#[test]
fn monitor_killed_mid_copy_leaves_the_target_running_and_unprotected() {
    let mut w = Workload::spawn("64M", 2);
    if !can_attach(&w) {
        return;
    }
    kill_monitor_mid_snapshot(&mut w, "copy", |w| {
        assert!(smaps_uw(w.pid, w.range), "mid-snapshot: VMA registered");
        let p = bit57_pages(w.pid, w.range);
        eprintln!("mid-copy: {p} of {} pages write-protected", w.range.pages());
        assert!(p > 0, "mid-snapshot: pages write-protected");
    });
}

/// THE KILL TEST, inside the pause: every thread of the target is ptrace-stopped when the
/// monitor is SIGKILLed; the kernel detaches them and they run on.
#[test]
fn monitor_killed_in_the_freeze_leaves_the_target_running() {
    let mut w = Workload::spawn("16M", 2);
    if !can_attach(&w) {
        return;
    }
    kill_monitor_mid_snapshot(&mut w, "frozen", |w| {
        let states = thread_states(w.pid);
        assert_eq!(states.len(), w.threads + 1);
        assert!(
            states.iter().all(|(_, s)| *s == 't'),
            "mid-freeze: every thread in a tracing stop: {states:?}"
        );
        assert!(smaps_uw(w.pid, w.range), "registered before the pause");
    });
}

/// process_vm_readv against /proc/PID/mem over the same frozen 256 MiB: same bytes; figures
/// printed (the backend reads with process_vm_readv).
#[test]
fn remote_read_throughput() {
    if euid() != 0 {
        return skip("root");
    }
    use std::os::unix::fs::FileExt;
    let w = Workload::spawn("256M", 1);
    let q = RemoteQuiesce::new(w.pid);
    if let Err(e) = q.try_freeze() {
        return skip(&format!("ptrace: {e}"));
    }
    let r = w.range;
    let chunk = 1 << 20;
    let mut a = vec![0u8; r.len() as usize];
    let mut b = vec![0u8; r.len() as usize];
    let mem = std::fs::File::open(format!("/proc/{}/mem", w.pid)).unwrap();
    let mut figures = Vec::new();
    for round in 0..3 {
        let t = Instant::now();
        for (i, c) in a.chunks_mut(chunk).enumerate() {
            remote::read_remote(w.pid as i32, r.start() + (i * chunk) as u64, c).unwrap();
        }
        let vm = r.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
        let t = Instant::now();
        for (i, c) in b.chunks_mut(chunk).enumerate() {
            mem.read_exact_at(c, r.start() + (i * chunk) as u64)
                .unwrap();
        }
        let pm = r.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
        figures.push((round, vm, pm));
        assert!(a == b, "both paths read the same bytes of a frozen target");
    }
    for (round, vm, pm) in figures {
        eprintln!(
            "round {round}: process_vm_readv {vm:.0} MB/s, /proc/PID/mem {pm:.0} MB/s (1 MiB reads, 256 MiB)"
        );
    }
    q.try_resume().unwrap();
}

//! Issue #9, bad input: each refused `uffd-wp snapshot --pid` says why (text and `--json`),
//! exits with 2, and never touched the target: a `sleep` process, whose context-switch counts
//! (/proc/PID/status) stay the same, since a ptrace seize + interrupt would wake it. Also the
//! input forms that must work: a range pasted from /proc/PID/maps.
//!
//! Needs root (else skips; fails under `UFFD_WP_REQUIRE_KERNEL=1`).

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use uffd_wp::backend::linux::RemoteQuiesce;

/// A `sleep` process (blocked in clock_nanosleep: it switches context only when woken).
struct Sleeper(Child);

impl Sleeper {
    fn spawn() -> Sleeper {
        let c = Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        std::thread::sleep(Duration::from_millis(50));
        Sleeper(c)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its voluntary and non-voluntary context switches.
    fn switches(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let f = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
                .unwrap()
        };
        (
            f("voluntary_ctxt_switches:"),
            f("nonvoluntary_ctxt_switches:"),
        )
    }

    /// Its first mapping, as /proc/PID/maps prints it (`start-end`).
    fn first_mapping(&self) -> String {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap();
        maps.split_whitespace().next().unwrap().to_string()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("snapshot")
        .args(args)
        .output()
        .expect("run uffd-wp")
}

/// Runs `snapshot --pid PID args` against a fresh sleeper (`pid` overrides the pid), in text
/// and in JSON: exit 2, `want` in the message both ways, the sleeper untouched.
fn refused(pid: Option<&str>, args: &[&str], want: &str) {
    if euid() != 0 {
        return skip("root");
    }
    let s = Sleeper::spawn();
    let own = s.pid().to_string();
    let pid = pid.unwrap_or(&own);
    let before = s.switches();
    let text = run(&[&["--pid", pid], args].concat());
    let json = run(&[&["--pid", pid, "--json"], args].concat());
    assert_eq!(s.switches(), before, "the target was touched");
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert_eq!(text.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(want), "{want:?} not in {stderr:?}");
    let v: Value = serde_json::from_slice(&json.stdout).expect("a JSON error");
    assert_eq!(json.status.code(), Some(2), "{v}");
    let msg = v["error"]["message"].as_str().expect("a message");
    assert!(msg.contains(want), "{want:?} not in {v}");
}

#[test]
fn a_range_not_mapped_is_refused_before_the_attach() {
    refused(None, &["--range", "0x1000:4096"], "is not entirely mapped");
}

#[test]
fn an_unaligned_start_is_refused_with_the_page_it_is_in() {
    refused(
        None,
        &["--range", "0x7f0000001001:4096"],
        "is not a multiple of the page size 4096 (the page holding it starts at 0x7f0000001000)",
    );
}

#[test]
fn an_unknown_unit_names_the_units() {
    refused(None, &["--range", "0x1000:4X"], "use K, M, G or T");
}

#[test]
fn a_kernel_thread_is_named_as_such() {
    refused(Some("2"), &["--range", "0x1000:4096"], "is a kernel thread");
}

#[test]
fn a_missing_process_is_named() {
    let max = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap();
    let none = (max.trim().parse::<u64>().unwrap() + 1).to_string();
    refused(Some(&none), &["--range", "0x1000:4096"], "no process");
}

#[test]
fn an_unwritable_out_file_is_refused_before_the_attach() {
    if euid() != 0 {
        return skip("root");
    }
    let s = Sleeper::spawn();
    let range = s.first_mapping();
    let path = "/nonexistent-dir/snap.img";
    refused(
        Some(&s.pid().to_string()),
        &["--range", &range, "--out", path],
        path,
    );
}

/// Another tracer (here this test, freezing the target) is named, not just "EPERM".
#[test]
fn another_tracer_is_named() {
    if euid() != 0 {
        return skip("root");
    }
    let s = Sleeper::spawn();
    let q = RemoteQuiesce::new(s.pid());
    q.try_freeze().expect("freeze the sleeper");
    let before = s.switches();
    let range = s.first_mapping();
    let out = run(&["--pid", &s.pid().to_string(), "--range", &range]);
    assert_eq!(s.switches(), before, "the target was touched");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let me = std::process::id();
    assert!(
        stderr.contains(&format!("already traced by process {me}")),
        "{stderr}"
    );
    q.try_resume().unwrap();
}

/// A range pasted from /proc/PID/maps (`start-end`, hex without 0x) is taken, and the report
/// gives the exact byte count.
#[test]
fn a_range_pasted_from_maps_is_taken() {
    if euid() != 0 {
        return skip("root");
    }
    let w = Workload::spawn("64K", 1);
    let maps_form = format!("{:x}-{:x}", w.range.start(), w.range.end());
    let out = run(&["--pid", &w.pid.to_string(), "--range", &maps_form]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("snapshot of 65536 bytes (64 KiB)"),
        "{stdout}"
    );
}

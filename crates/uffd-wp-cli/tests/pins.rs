//! `uffd-wp pins` against a real holder of io_uring registered buffers (the `uffd-wp` binary in
//! its hidden holder mode), its errors, and `uffd-wp scenario pinned-io-uring --json`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use uffd_wp::testing::holder::{Holder, HolderConfig};

const P: u64 = 4096;
const BIN: &str = env!("CARGO_BIN_EXE_uffd-wp");

/// Skips with a message naming what is missing, or fails under `UFFD_WP_REQUIRE_KERNEL=1`.
fn skip(what: &str) {
    if std::env::var("UFFD_WP_REQUIRE_KERNEL").as_deref() == Ok("1") {
        panic!("needs {what} (UFFD_WP_REQUIRE_KERNEL=1)");
    }
    eprintln!("SKIPPED: needs {what}");
}

fn holder(pages: u64, buffers: &[[u64; 2]], hide: bool) -> Option<Holder> {
    let cfg = HolderConfig {
        pages,
        buffers: buffers.to_vec(),
        hide,
    };
    match Holder::spawn(Path::new(BIN), &cfg) {
        Ok(h) => Some(h),
        Err(e) => {
            skip(&format!(
                "io_uring registered buffers in a child process: {e}"
            ));
            None
        }
    }
}

fn pins_json(args: &[&str]) -> Value {
    let out = Command::new(BIN).arg("pins").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "uffd-wp pins {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn pins_lists_another_processes_buffers_with_their_source() {
    let Some(h) = holder(16, &[[2, 4], [10, 11]], false) else {
        return;
    };
    let fd = h.ready.ring_fd.unwrap();
    let pid = h.pid().to_string();
    let v = pins_json(&["--pid", &pid, "--json"]);
    assert_eq!(v["pid"], h.pid());
    let pins = v["pins"].as_array().unwrap();
    assert_eq!(pins.len(), 2, "{v}");
    for (i, p) in pins.iter().enumerate() {
        assert_eq!(p["start"], h.ready.buffers[i][0], "addresses as numbers");
        assert_eq!(p["len"], h.ready.buffers[i][1]);
        assert_eq!(p["source"], format!("io_uring fd {fd} buffer {i}"));
        assert_eq!(p["kind"], "long-term");
    }
    assert_eq!(v["vm_pin_bytes"], 3 * P);
    assert_eq!(v["unexplained_bytes"], 0);

    // The table names the same.
    let out = Command::new(BIN)
        .args(["pins", "--pid", &pid])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains(&format!("io_uring fd {fd} buffer 1")),
        "{text}"
    );
    assert!(text.contains("VmPin 12288 bytes"), "{text}");
}

#[test]
fn pins_reports_unexplained_vm_pin() {
    let Some(h) = holder(8, &[[0, 4]], true) else {
        return;
    };
    let v = pins_json(&["--pid", &h.pid().to_string(), "--json"]);
    assert_eq!(v["pins"], Value::Array(vec![]));
    assert_eq!(v["vm_pin_bytes"], 4 * P);
    assert_eq!(v["unexplained_bytes"], 4 * P);
    let out = Command::new(BIN)
        .args(["pins", "--pid", &h.pid().to_string()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("16384 long-term pinned bytes have no known source")
    );
}

#[test]
fn pins_of_itself_by_default() {
    let v = pins_json(&["--json"]);
    assert!(v["pid"].as_u64().unwrap() > 0);
    assert_eq!(v["pins"], Value::Array(vec![]));
    assert_eq!(v["unexplained_bytes"], 0);
}

/// A failed `--json` run: exit status 2, no report on stdout but the error as JSON (kind
/// `Pins`, the stderr message), and the message on stderr.
fn failed(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "exit status 2");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout: the error as JSON");
    assert_eq!(v["error"]["kind"], "Pins", "{v}");
    let msg = v["error"]["message"].as_str().expect("a message");
    assert!(err.contains(msg), "{err} / {msg}");
    err
}

#[test]
fn pins_of_a_missing_process_is_a_clear_error() {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    let out = Command::new(BIN)
        .args(["pins", "--pid", &pid.to_string(), "--json"])
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains(&format!("no such process {pid}")) && err.contains("ENOENT"),
        "{err}"
    );
}

/// `uffd-wp pins` run as `nobody` on a root process: a clear error, exit status 2.
#[test]
fn pins_without_permission_is_a_clear_error() {
    let Some(h) = holder(4, &[[0, 1]], false) else {
        return;
    };
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let mut cmd = Command::new(BIN);
    cmd.args(["pins", "--pid", &h.pid().to_string(), "--json"]);
    if root {
        cmd.uid(65534).gid(65534);
    }
    let err = failed(&cmd.output().unwrap());
    let pid = h.pid();
    assert!(
        err.contains(&format!(
            "no permission to read /proc/{pid}/fd of process {pid}"
        )),
        "{err}"
    );
    assert!(err.contains("EACCES") || err.contains("EPERM"), "{err}");
}

#[test]
fn scenario_pinned_io_uring_json() {
    let out = Command::new(BIN)
        .args(["scenario", "pinned-io-uring", "--json"])
        .output()
        .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("cannot run") {
            return skip(&format!("io_uring and userfaultfd: {err}"));
        }
        panic!("{err}");
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = v["results"].as_array().unwrap();
    assert_eq!(steps[0]["step"], "trusting");
    assert_eq!(steps[0]["verified"], true);
    assert_eq!(
        steps[0]["report"]["protected"],
        serde_json::json!([[0, 16 * P]])
    );
    let note = steps[0]["note"].as_str().unwrap();
    assert!(note.contains("data landed: true") && note.contains("WP faults raised: 0"));
    assert_eq!(steps[1]["step"], "skip-pinned");
    assert_eq!(steps[1]["verified"], true);
    assert_eq!(
        steps[1]["report"]["skipped"],
        serde_json::json!([[4 * P, 8 * P]])
    );
    assert_eq!(
        steps[1]["report"]["protected"],
        serde_json::json!([[0, 4 * P], [8 * P, 16 * P]])
    );
    assert_eq!(steps[1]["report"]["bytes_not_protected"], 0);
}

/// The seed's semantics on both backends: the same layout (16 pages, an io_uring fixed buffer
/// over pages [4, 8)) gives the same `skip_pinned` report on the real kernel and on the model
/// (where `proposed` skips pinned pages natively), and under both model semantics.
#[test]
fn skip_pinned_reports_agree_between_the_kernel_and_the_model() {
    let run = |extra: &[&str]| -> Option<Value> {
        let mut args = vec!["scenario", "pinned-io-uring", "--json"];
        args.extend_from_slice(extra);
        let out = Command::new(BIN).args(&args).output().unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("cannot run"), "{err}");
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    };
    let Some(linux) = run(&[]) else {
        return skip("io_uring and userfaultfd for scenario pinned-io-uring");
    };
    let fields = [
        "protected",
        "skipped",
        "not_protected",
        "bytes_not_protected",
        "error",
    ];
    for semantics in ["linux", "proposed"] {
        let model =
            run(&["--backend", "model", "--semantics", semantics]).expect("the model runs it");
        for (k, m) in linux["results"]
            .as_array()
            .unwrap()
            .iter()
            .zip(model["results"].as_array().unwrap())
        {
            assert_eq!(k["step"], m["step"]);
            for f in fields {
                assert_eq!(
                    k["report"][f], m["report"][f],
                    "{semantics} {}: {f}",
                    k["step"]
                );
            }
        }
    }
}

/// `uffd-wp snapshot --pid` of a process holding an io_uring fixed buffer: the buffer's pages
/// are found from the target's fdinfo, left writable, copied last and reported as pinned; the
/// snapshot completes (before session 3 a pinned page hung the copier) and leaves nothing
/// protected. Needs root (ptrace and pidfd_getfd of another process).
#[test]
fn remote_snapshot_skips_another_processes_pinned_buffer() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            l.split_whitespace().nth(2)?.parse::<u32>().ok()
        });
    if uid != Some(0) {
        return skip("root (ptrace and pidfd_getfd of another process)");
    }
    let Some(h) = holder(16, &[[2, 4]], false) else {
        return;
    };
    let start = h.ready.buffers[0][0] - 2 * P;
    let mut child = Command::new(BIN)
        .args(["snapshot", "--pid", &h.pid().to_string(), "--range"])
        .arg(format!("{start}:{}", 16 * P))
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A hang is a failure, not a wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("uffd-wp snapshot --pid hung on a pinned buffer");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "snapshot --pid: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pages"], 16, "{v}");
    assert_eq!(v["pinned_pages"], 2, "the buffer's pages: {v}");
    assert_eq!(v["not_captured"].as_array().map(Vec::len), Some(0), "{v}");
    // Nothing of the target is left write-protected.
    let pm = uffd_wp::sys::pagemap::Pagemap::open_pid(h.pid()).unwrap();
    let left = pm
        .entries(start, 16)
        .unwrap()
        .iter()
        .filter(|e| *e & uffd_wp::seam::bits::UFFD_WP != 0)
        .count();
    assert_eq!(left, 0);
}

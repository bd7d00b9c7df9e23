//! Behaviour of the `uffd-wp` binary itself, whatever the command.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

/// Output to a pipe nobody reads (`uffd-wp ... | head` once head has exited) ends the
/// process quietly by SIGPIPE, like any Unix tool, instead of a panic with a backtrace.
#[test]
fn a_closed_stdout_ends_quietly_by_sigpipe() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_uffd-wp"))
        .args(["scenario", "--list"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run uffd-wp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(13), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Runs `uffd-wp ARGS` and returns (exit code, stdout JSON, stderr).
fn run_json(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_uffd-wp"))
        .args(args)
        .output()
        .expect("run uffd-wp");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {stdout:?}"));
    (
        out.status.code(),
        json,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Under `--json` a failure is a JSON object on stdout naming its kind, errno and operation,
/// the same message on stderr, and exit code 2.
#[test]
fn json_errors_are_json_with_kind_errno_and_operation() {
    // A pid above pid_max: no such process, whatever runs on the machine.
    let (code, v, stderr) = run_json(&[
        "snapshot",
        "--pid",
        "2147483646",
        "--range",
        "0x10000:4096",
        "--json",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    let e = &v["error"];
    assert_eq!(e["kind"], "Attach", "{v}");
    assert_eq!(e["errno"], "ESRCH", "{v}");
    // Found by the checks made before anything is done to a process.
    assert_eq!(e["operation"], "checking process 2147483646", "{v}");
    assert!(stderr.contains(e["message"].as_str().unwrap()), "{stderr}");

    // Bad input: Usage, EINVAL.
    let (code, v, _) = run_json(&["snapshot", "--size", "1000", "--json"]);
    assert_eq!(code, Some(2));
    assert_eq!(v["error"]["kind"], "Usage", "{v}");
    assert_eq!(v["error"]["errno"], "EINVAL", "{v}");
}

/// An `--out` path that cannot be created fails before the snapshot starts (no workload, no
/// userfaultfd: the error is the file's), with the path and errno.
#[test]
fn an_unwritable_out_path_fails_first() {
    let (code, v, _) = run_json(&[
        "snapshot",
        "--size",
        "1M",
        "--out",
        "/nonexistent-dir/img",
        "--json",
    ]);
    assert_eq!(code, Some(2));
    assert_eq!(v["error"]["kind"], "Io", "{v}");
    assert_eq!(v["error"]["errno"], "ENOENT", "{v}");
    assert_eq!(
        v["error"]["operation"], "creating /nonexistent-dir/img",
        "{v}"
    );
}

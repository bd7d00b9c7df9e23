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

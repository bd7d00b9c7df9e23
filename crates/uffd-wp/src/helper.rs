//! Helper processes: the running executable re-executed as a child of one [`Kind`]. One
//! mechanism serves every helper uffd-wp starts (a scenario's memory-limited child, the
//! pin holder and its keeper, compare's kernel worker, the built-in workload as a target):
//!
//! - **Entry**: the environment variable [`HELPER_ENV`] names the kind. An executable serves
//!   helpers by calling [`entry`] first in `main` with the kinds it serves, and dispatching on
//!   the kind it returns (the `uffd-wp` binary serves all; a test binary with its own `main`
//!   serves the kinds its tests start).
//! - **Framing**: JSON, one value per line. The parent's first line on the child's stdin is the
//!   kind's configuration; after it, each side writes one value per line. On the parent's side,
//!   stdout lines that do not start a JSON object or array (a test harness's own) are skipped.
//! - **Lifetime**: a [`Helper`] kills and reaps its child when dropped, and a child reading end
//!   of file on its stdin ([`Parent::recv`], [`Parent::wait_for_eof`]) knows its parent is gone.
//!   Every wait of the parent is bounded ([`Helper::recv`] takes a timeout).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The environment variable naming the [`Kind`] a re-executed binary runs as.
pub const HELPER_ENV: &str = "UFFD_WP_HELPER";

/// The helpers uffd-wp starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A scenario whose labs limit page-table allocations, in memory cgroups of its own.
    LimitedScenario,
    /// A process holding io_uring registered buffers (pin discovery's other process).
    PinHolder,
    /// The pin holder's keeper: holds an inherited ring fd until its parent exits.
    PinKeeper,
    /// `compare`'s kernel side: runs cases on the real kernel.
    CompareWorker,
    /// The built-in workload in a process of its own: a target for the remote backend.
    Workload,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [
        Kind::LimitedScenario,
        Kind::PinHolder,
        Kind::PinKeeper,
        Kind::CompareWorker,
        Kind::Workload,
    ];

    /// The name in [`HELPER_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Kind::LimitedScenario => "limited-scenario",
            Kind::PinHolder => "pin-holder",
            Kind::PinKeeper => "pin-keeper",
            Kind::CompareWorker => "compare-worker",
            Kind::Workload => "workload",
        }
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// The kinds this executable serves (set by [`entry`]).
static SERVED: AtomicU32 = AtomicU32::new(0);

/// Call first in `main`: records that this executable serves `kinds`, and returns the kind
/// this process was started as, if it is a helper of one of them. An unknown or unserved kind
/// in [`HELPER_ENV`] ends the process with exit code 2 and a message.
pub fn entry(kinds: &[Kind]) -> Option<Kind> {
    for k in kinds {
        SERVED.fetch_or(k.bit(), Ordering::SeqCst);
    }
    let v = std::env::var_os(HELPER_ENV)?;
    match kinds.iter().find(|k| OsStr::new(k.name()) == v) {
        Some(k) => Some(*k),
        None => {
            eprintln!("{HELPER_ENV}={v:?}: this executable serves no such helper");
            std::process::exit(2);
        }
    }
}

/// Whether this executable serves `kind` ([`entry`] was called with it).
pub fn serves(kind: Kind) -> bool {
    SERVED.load(Ordering::SeqCst) & kind.bit() != 0
}

/// Why a helper failed, from the parent's side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelperError {
    /// The executable could not be started.
    #[error("starting the {kind} helper ({exe}): {why}")]
    Spawn {
        /// The helper's kind name.
        kind: &'static str,
        /// The executable.
        exe: String,
        /// The reason.
        why: String,
    },
    /// The helper exited (or closed its stdout) before answering.
    #[error("the {kind} helper exited ({status}) without an answer; its stderr: {stderr}")]
    Gone {
        /// The helper's kind name.
        kind: &'static str,
        /// Its exit status, as text.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The helper did not answer in time (still running: dropping the [`Helper`] kills it).
    #[error("the {kind} helper did not answer within {} ms", .waited.as_millis())]
    Timeout {
        /// The helper's kind name.
        kind: &'static str,
        /// How long the parent waited.
        waited: Duration,
    },
    /// The helper's answer was not what the protocol expects.
    #[error("the {kind} helper's answer is not valid: {what}")]
    Protocol {
        /// The helper's kind name.
        kind: &'static str,
        /// What was wrong, with the line.
        what: String,
    },
}

/// A running helper; killed and reaped when dropped.
#[derive(Debug)]
pub struct Helper {
    kind: Kind,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Helper {
    /// Starts `exe args..` as a helper of `kind` and sends it `config` (its first stdin line).
    /// The child inherits every fd without close-on-exec (how the pin holder hands its ring to
    /// its keeper). Use `/proc/self/exe` for this executable: it names the running image even
    /// if the file was replaced since.
    pub fn spawn(
        exe: &Path,
        args: &[&OsStr],
        kind: Kind,
        config: &impl Serialize,
    ) -> Result<Helper, HelperError> {
        let mut child = Command::new(exe)
            .args(args)
            .env(HELPER_ENV, kind.name())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| HelperError::Spawn {
                kind: kind.name(),
                exe: exe.display().to_string(),
                why: e.to_string(),
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = e.read_to_string(&mut s);
                s
            })
        });
        let mut h = Helper {
            kind,
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        };
        h.send(config)?;
        Ok(h)
    }

    /// The helper's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one value (one line).
    pub fn send(&mut self, v: &impl Serialize) -> Result<(), HelperError> {
        let line = serde_json::to_string(v).expect("helper messages serialize");
        let sent = match self.stdin.as_mut() {
            Some(s) => writeln!(s, "{line}").and_then(|()| s.flush()).is_ok(),
            None => false,
        };
        if sent { Ok(()) } else { Err(self.gone()) }
    }

    /// The next value the helper writes, waiting `timeout` at most. Lines that do not start a
    /// JSON object or array are skipped.
    pub fn recv<T: DeserializeOwned>(&mut self, timeout: Duration) -> Result<T, HelperError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if !l.trim_start().starts_with(['{', '[']) => continue,
                Ok(l) => {
                    return serde_json::from_str(&l).map_err(|e| HelperError::Protocol {
                        kind: self.kind.name(),
                        what: format!("{e}: {l:?}"),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(HelperError::Timeout {
                        kind: self.kind.name(),
                        waited: timeout,
                    });
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.gone()),
            }
        }
    }

    /// Closes the helper's stdin: a helper waiting for its parent's end of file ends.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The helper's exit status, if it has exited (reaped then).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the helper and reaps it: its pid names no process afterwards.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The helper is gone or going: waits up to a second for its exit, and says how it ended.
    fn gone(&mut self) -> HelperError {
        let t0 = Instant::now();
        let mut status = self.try_wait();
        while status.is_none() && t0.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(5));
            status = self.try_wait();
        }
        if status.is_none() {
            self.kill();
        }
        HelperError::Gone {
            kind: self.kind.name(),
            status: status.map_or("killed, still running".into(), |s| s.to_string()),
            stderr: self.stderr_tail(),
        }
    }

    /// The last 2,000 bytes of the helper's stderr once it has exited (empty before).
    pub fn stderr_tail(&mut self) -> String {
        if self.try_wait().is_none() {
            return String::new();
        }
        let all = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let s = all.trim();
        let mut cut = s.len().saturating_sub(2000);
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s[cut..].to_string()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The child's side: its parent's messages on stdin, its own on stdout.
#[derive(Debug)]
pub struct Parent {
    lines: std::io::Lines<std::io::StdinLock<'static>>,
}

impl Parent {
    /// Reads the configuration (the first line).
    pub fn connect<T: DeserializeOwned>() -> Result<(Parent, T), String> {
        let mut p = Parent {
            lines: std::io::stdin().lock().lines(),
        };
        match p.recv() {
            Some(cfg) => Ok((p, cfg?)),
            None => Err("no configuration line on stdin (start helpers with Helper::spawn)".into()),
        }
    }

    /// The parent's next value; `None` once the parent closed stdin or died.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Option<Result<T, String>> {
        let line = self.lines.next()?.ok()?;
        Some(serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}")))
    }

    /// Sends one value; false once the parent stopped reading.
    pub fn send(&mut self, v: &impl Serialize) -> bool {
        let line = serde_json::to_string(v).expect("helper messages serialize");
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    }

    /// Blocks until the parent closes stdin or dies.
    pub fn wait_for_eof(mut self) {
        while self.lines.next().is_some_and(|l| l.is_ok()) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip_through_serde() {
        for k in Kind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("{:?}", k.name()));
            assert_eq!(serde_json::from_str::<Kind>(&json).unwrap(), k);
        }
    }

    #[test]
    fn a_helper_that_exits_at_once_is_reported_gone_with_its_stderr() {
        // `sh` is no uffd-wp binary: it reads nothing, writes to stderr and exits 3. Sending the
        // configuration may already find the pipe closed; either way the error says how it ended.
        let spawned = Helper::spawn(
            Path::new("/bin/sh"),
            &[OsStr::new("-c"), OsStr::new("echo nope >&2; exit 3")],
            Kind::Workload,
            &(),
        );
        let err = match spawned {
            Ok(mut h) => h
                .recv::<serde_json::Value>(Duration::from_secs(10))
                .unwrap_err(),
            Err(e) => e,
        };
        match err {
            HelperError::Gone { status, stderr, .. } => {
                assert!(status.contains('3'), "{status}");
                assert!(stderr.contains("nope"), "{stderr}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_silent_helper_times_out_and_is_killed_when_dropped() {
        let mut h = Helper::spawn(
            Path::new("/bin/sh"),
            &[OsStr::new("-c"), OsStr::new("echo not-json; sleep 30")],
            Kind::Workload,
            &(),
        )
        .unwrap();
        let t0 = Instant::now();
        let e = h.recv::<serde_json::Value>(Duration::from_millis(300));
        assert!(matches!(e, Err(HelperError::Timeout { .. })), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(h.try_wait().is_none(), "still running after a timeout");
        let pid = h.pid();
        drop(h);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "killed and reaped when dropped"
        );
    }

    #[test]
    fn lines_that_are_not_json_are_skipped_and_bad_json_is_a_protocol_error() {
        let mut h = Helper::spawn(
            Path::new("/bin/sh"),
            &[
                OsStr::new("-c"),
                OsStr::new("read cfg; echo running 1 test; echo \"$cfg\"; echo '{bad'"),
            ],
            Kind::Workload,
            &serde_json::json!({"n": 7}),
        )
        .unwrap();
        let v: serde_json::Value = h.recv(Duration::from_secs(10)).unwrap();
        assert_eq!(v["n"], 7);
        let e = h.recv::<serde_json::Value>(Duration::from_secs(10));
        assert!(matches!(e, Err(HelperError::Protocol { .. })), "{e:?}");
    }
}

//! A helper process that holds io_uring registered buffers until told to stop: the other
//! process that pin discovery is tested against (and a way to see `uffd-wp pins --pid` work).
//!
//! An executable serves it by calling [`maybe_run_holder`] first in `main` (the `uffd-wp`
//! binary does). [`Holder::spawn`] re-executes that binary with the configuration in
//! [`HOLDER_ENV`]; the holder maps memory, registers the buffers, prints one JSON line
//! ([`HolderReady`]) and then waits until its stdin is closed, so it never outlives its parent
//! (dropping the [`Holder`] kills it).
//!
//! With [`HolderConfig::hide`], the holder passes its ring fd to a *keeper* child (the same
//! binary, fd inherited) and closes its own: the buffers stay registered and counted in the
//! holder's `VmPin`, but no fd of the holder names the ring. That is exactly the situation
//! discovery reports as unexplained pinned bytes. The keeper exits when the holder does.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::range::{PAGE_SIZE, Range};
use crate::sys::mem::{Backing, Mapping, Thp};
use crate::sys::uring::FixedRing;
use crate::sys::{Errno, errno_name, errno_of};

/// The environment variable that turns a re-executed binary into a holder (its value: the
/// JSON [`HolderConfig`]) or a keeper ([`KEEPER`]).
pub const HOLDER_ENV: &str = "UFFD_WP_PIN_HOLDER";
/// The value of [`HOLDER_ENV`] for a keeper.
pub const KEEPER: &str = "keeper";

/// What the holder registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderConfig {
    /// Pages of the anonymous mapping the buffers live in (THP off).
    pub pages: u64,
    /// The buffers, as `[first page, end page)` of the mapping.
    pub buffers: Vec<[u64; 2]>,
    /// Hand the ring to a keeper and close the holder's fd (pins no fd explains).
    pub hide: bool,
}

/// What the holder prints once its buffers are registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderReady {
    /// The holder's pid.
    pub pid: u32,
    /// Its ring fd (`None` when hidden).
    pub ring_fd: Option<i32>,
    /// The buffers, as `[start address, length]`.
    pub buffers: Vec<[u64; 2]>,
    /// The keeper's pid, when hidden.
    pub keeper_pid: Option<u32>,
}

/// Why a holder could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HolderError {
    /// Spawning the executable failed.
    #[error("spawning the pin holder {exe}: {}", errno_name(*errno))]
    Spawn {
        /// The executable.
        exe: String,
        /// The errno.
        errno: Errno,
    },
    /// The holder exited or printed something else instead of its ready line.
    #[error("pin holder failed: {what}")]
    Failed {
        /// What it printed or why it stopped.
        what: String,
    },
}

/// A running holder process; killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Holder {
    child: Option<Child>,
    /// Its ready line.
    pub ready: HolderReady,
}

impl Holder {
    /// Runs `exe` (an executable whose `main` calls [`maybe_run_holder`]) as a holder of `cfg`
    /// and waits for its ready line.
    pub fn spawn(exe: &Path, cfg: &HolderConfig) -> Result<Holder, HolderError> {
        Self::spawn_with_args(exe, &[], cfg)
    }

    /// Like [`Holder::spawn`], passing `args`: a test binary runs the test that calls
    /// [`maybe_run_holder`] (`--ignored --exact NAME`). Lines before the ready line (the test
    /// harness's own) are skipped.
    pub fn spawn_with_args(
        exe: &Path,
        args: &[&str],
        cfg: &HolderConfig,
    ) -> Result<Holder, HolderError> {
        let mut child = Command::new(exe)
            .args(args)
            .env(
                HOLDER_ENV,
                serde_json::to_string(cfg).expect("config serializes"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| HolderError::Spawn {
                exe: exe.display().to_string(),
                errno: errno_of(&e),
            })?;
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut seen = String::new();
        let ready = loop {
            let mut line = String::new();
            match out.read_line(&mut line) {
                Ok(n) if n > 0 => {}
                _ => break None,
            }
            if let Ok(r) = serde_json::from_str::<HolderReady>(&line) {
                break Some(r);
            }
            seen.push_str(&line);
        };
        match ready {
            Some(ready) => Ok(Holder {
                child: Some(child),
                ready,
            }),
            None => {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                let _ = child.wait();
                Err(HolderError::Failed {
                    what: format!("stdout {seen:?}, stderr {err:?}"),
                })
            }
        }
    }

    /// The holder's pid.
    pub fn pid(&self) -> u32 {
        self.ready.pid
    }

    /// Kills the holder and reaps it: its pid names no process afterwards.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// If this process was started as a holder or keeper ([`HOLDER_ENV`] set), runs it and exits;
/// otherwise returns at once. Call first in `main`.
pub fn maybe_run_holder() {
    let Some(v) = std::env::var_os(HOLDER_ENV) else {
        return;
    };
    let v = v.to_string_lossy().into_owned();
    if v == KEEPER {
        // Hold the inherited ring until the holder closes our stdin (or dies).
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    }
    match run_holder(&v) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("pin holder: {e}");
            std::process::exit(3);
        }
    }
}

fn run_holder(cfg: &str) -> Result<(), String> {
    let cfg: HolderConfig = serde_json::from_str(cfg).map_err(|e| format!("config: {e}"))?;
    let m = Mapping::new(cfg.pages * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge)
        .map_err(|e| format!("mmap: {}", errno_name(e)))?;
    m.touch(m.range(), 0x77).map_err(errno_name)?;
    let base = m.range().start();
    let bufs: Vec<Range> = cfg
        .buffers
        .iter()
        .map(|&[a, b]| {
            Range::new(base + a * PAGE_SIZE, (b.saturating_sub(a)) * PAGE_SIZE)
                .map_err(|e| format!("buffer [{a}, {b}): {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut ring = FixedRing::new(8).map_err(|e| format!("io_uring_setup: {}", errno_name(e)))?;
    ring.adopt(m);
    ring.register_buffers(&bufs)
        .map_err(|e| format!("IORING_REGISTER_BUFFERS: {}", errno_name(e)))?;
    let buffers = bufs.iter().map(|b| [b.start(), b.len()]).collect();
    let mut keeper = None;
    let mut held = None;
    let ring_fd = if cfg.hide {
        // Let the keeper inherit the ring fd, then close ours: the registration lives on in
        // the keeper's fd, accounted to this process's VmPin.
        use std::os::fd::AsFd;
        rustix::io::fcntl_setfd(ring.as_fd(), rustix::io::FdFlags::empty())
            .map_err(|e| format!("clearing FD_CLOEXEC: {}", errno_name(e)))?;
        // The same executable with the same arguments (a test binary's `--exact` filter),
        // so that the keeper reaches `maybe_run_holder` too and nothing else runs.
        let k = Command::new("/proc/self/exe")
            .args(std::env::args_os().skip(1))
            .env(HOLDER_ENV, KEEPER)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning the keeper: {e}"))?;
        ring.detach();
        keeper = Some(k);
        None
    } else {
        let fd = ring.raw_fd();
        held = Some(ring);
        Some(fd)
    };
    let ready = HolderReady {
        pid: std::process::id(),
        ring_fd,
        buffers,
        keeper_pid: keeper.as_ref().map(Child::id),
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        serde_json::to_string(&ready).expect("ready serializes")
    )
    .and_then(|()| out.flush())
    .map_err(|e| format!("stdout: {e}"))?;
    drop(out);
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
    if let Some(mut k) = keeper {
        drop(k.stdin.take());
        let _ = k.wait();
    }
    Ok(())
}

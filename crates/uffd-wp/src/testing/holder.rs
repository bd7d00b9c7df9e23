//! A helper process that holds io_uring registered buffers until told to stop: the other
//! process that pin discovery is tested against (and a way to see `uffd-wp pins --pid` work).
//!
//! A helper process of kind [`Kind::PinHolder`] (see [`crate::helper`]): an executable serves
//! it by calling [`maybe_run_holder`] first in `main` (the `uffd-wp` binary dispatches to
//! [`holder_main`]). [`Holder::spawn`] re-executes that binary with its [`HolderConfig`]; the
//! holder maps memory, registers the buffers, answers one [`HolderReady`] and then waits until
//! its stdin is closed, so it never outlives its parent (dropping the [`Holder`] kills it).
//!
//! With [`HolderConfig::hide`], the holder passes its ring fd to a *keeper* child (the same
//! binary, fd inherited) and closes its own: the buffers stay registered and counted in the
//! holder's `VmPin`, but no fd of the holder names the ring. That is exactly the situation
//! discovery reports as unexplained pinned bytes. The keeper exits when the holder does.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::helper::{self, Helper, HelperError, Kind, Parent};
use crate::range::{PAGE_SIZE, Range};
use crate::sys::errno_name;
use crate::sys::mem::{Backing, Mapping, Thp};
use crate::sys::uring::FixedRing;

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

/// Why a holder could not be started: the helper's own error.
pub type HolderError = HelperError;

/// How long a holder may take to register its buffers.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running holder process; killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Holder {
    helper: Helper,
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
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let mut helper = Helper::spawn(exe, &args, Kind::PinHolder, cfg)?;
        let ready = helper.recv(READY_TIMEOUT)?;
        Ok(Holder { helper, ready })
    }

    /// The holder's pid.
    pub fn pid(&self) -> u32 {
        self.ready.pid
    }

    /// Kills the holder and reaps it: its pid names no process afterwards.
    pub fn kill(&mut self) {
        self.helper.kill();
    }
}

/// If this process was started as a holder or keeper, runs it and exits; otherwise returns at
/// once. Call first in `main` of an executable that serves holders (the `uffd-wp` binary
/// dispatches to [`holder_main`] itself).
pub fn maybe_run_holder() {
    if let Some(kind) = helper::entry(&[Kind::PinHolder, Kind::PinKeeper]) {
        std::process::exit(holder_main(kind));
    }
}

/// Runs this process as a holder ([`Kind::PinHolder`]) or keeper ([`Kind::PinKeeper`]);
/// returns the exit code.
pub fn holder_main(kind: Kind) -> i32 {
    let res = match kind {
        // Hold the inherited ring until the holder closes our stdin (or dies).
        Kind::PinKeeper => Parent::connect::<()>().map(|(p, ())| p.wait_for_eof()),
        _ => Parent::connect::<HolderConfig>().and_then(|(p, cfg)| run_holder(p, &cfg)),
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pin holder: {e}");
            3
        }
    }
}

fn run_holder(mut parent: Parent, cfg: &HolderConfig) -> Result<(), String> {
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
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let k = Helper::spawn(Path::new("/proc/self/exe"), &args, Kind::PinKeeper, &())
            .map_err(|e| e.to_string())?;
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
        keeper_pid: keeper.as_ref().map(Helper::pid),
    };
    if !parent.send(&ready) {
        return Err("stdout closed before the ready line".into());
    }
    parent.wait_for_eof();
    drop(held);
    if let Some(mut k) = keeper {
        // The keeper ends at the end of file on its stdin; wait for it a little, then kill.
        k.close_stdin();
        let t0 = std::time::Instant::now();
        while k.try_wait().is_none() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

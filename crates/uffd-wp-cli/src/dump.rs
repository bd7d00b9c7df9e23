//! `uffd-wp dump [PID]`: an ELF core of a whole running process at one instant, while it runs.
//!
//! With a PID, that process is dumped to `core.PID` (like gcore). Without one, a built-in
//! target is started in a process of its own (the workload: writer threads and the version
//! table they keep in another mapping), dumped live, and the dump checked against itself: every
//! page of the region must hold the version the table in the same dump records, except the one
//! page each writer may be writing at the freeze.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use uffd_wp::backend::linux::AttachError;
use uffd_wp::dump::{self, Captured, DumpError, DumpOptions, DumpReport};
use uffd_wp::engine::snapshot::Copier;
use uffd_wp::helper::{Helper, Kind};
use uffd_wp::range::{RangeSet, parse_size};
use uffd_wp::sys::{Errno, file, signal};
use uffd_wp_bench::workload::{DumpVerdict, Layout};

use crate::snapshot::remote::{CliObserver, parse_range};
use crate::workload::Target;
use crate::{CliError, report};

/// Arguments of `uffd-wp dump`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process to dump. Without it, a built-in target is started, dumped and checked.
    pid: Option<u32>,
    /// The core file (default `core.PID`, like gcore).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Only this range, START:LEN (repeatable); other mappings are in the core with no bytes.
    #[arg(long = "range")]
    ranges: Vec<String>,
    /// The coredump filter, hex (core(5); default: the target's /proc/PID/coredump_filter).
    #[arg(long, value_parser = parse_filter)]
    filter: Option<u32>,
    /// The built-in target's region (K, M, G).
    #[arg(long, default_value = "64M", value_parser = parse_size, conflicts_with = "pid")]
    size: u64,
    /// The built-in target's writer threads.
    #[arg(long, default_value_t = 2, conflicts_with = "pid")]
    threads: usize,
    /// How the copy after the pause competes with the target for CPU: `normal` (the
    /// shortest copy) or `background` (the copier at nice 19 takes only the CPU the target
    /// leaves; faults are still served at once).
    #[arg(long, value_enum, default_value_t = CopierArg::Normal)]
    copier: CopierArg,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `--copier`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CopierArg {
    Normal,
    Background,
}

fn parse_filter(s: &str) -> Result<u32, String> {
    let t = s.trim_start_matches("0x").trim_start_matches("0X");
    u32::from_str_radix(t, 16).map_err(|e| format!("--filter {s:?}: not hex: {e}"))
}

/// How long the built-in target may take to start.
const TARGET_PATIENCE: Duration = Duration::from_secs(60);

/// The report of `uffd-wp dump`.
#[derive(Debug, Serialize)]
struct Output {
    /// The core file.
    core: String,
    /// What the capture did.
    #[serde(flatten)]
    dump: DumpReport,
    /// The built-in target's check of the dump against itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    oracle: Option<DumpVerdict>,
    /// Where the built-in target keeps its region and its version table.
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Layout>,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    let mut opts = options(a)?;
    let mut target = match a.pid {
        Some(_) => None,
        None => Some(start_target(a)?),
    };
    let pid = a
        .pid
        .or(target.as_ref().map(|t| t.layout.pid))
        .expect("a pid");
    let path = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("core.{pid}")));
    let out = CoreOut::create(&path)?;
    signal::catch_stop_signals().map_err(|errno| CliError::Os {
        operation: "installing the signal handlers".into(),
        errno,
    })?;
    watch_signals(a.json, out.named_path().map(Path::to_path_buf));
    // The watcher takes the signals: this thread (and the dump's threads) may sit in a long
    // system call.
    signal::block_stop_signals().map_err(|errno| CliError::Os {
        operation: "blocking the stop signals in the dumping threads".into(),
        errno,
    })?;
    let obs = Arc::new(CliObserver::new(None));
    opts.observer = Some(obs.clone());
    let res = dump_to(a, (pid, &opts), &out, target.as_mut(), &obs).and_then(|o| {
        // A stop signal before the core is named ends the run as one during it.
        match signal::caught_signal() {
            Some(sig) => Err(CliError::Interrupted {
                signal: sig,
                during: "core write",
            }),
            None => Ok(o),
        }
    });
    if !claim_end() {
        // The signal watcher is ending the run.
        loop {
            std::thread::park();
        }
    }
    let res = match res {
        Ok(o) => out.persist().map(|()| o),
        Err(e) => {
            out.discard();
            Err(e)
        }
    };
    signal::default_stop_signals();
    let o = res?;
    report::emit(a.json, &o, print);
    match o.oracle {
        Some(v) if v.inconsistent > 0 => Err(CliError::Unverified(format!(
            "{} pages of the dump are inconsistent with the version table in the same dump",
            v.inconsistent
        ))),
        _ => Ok(()),
    }
}

/// Captures process `pid` and writes its core into `out` (not named yet). A stop signal
/// cancels the attach or the freeze through `obs` (the target resumed) and ends the run from
/// inside the copy or the core's writing ([`exit_interrupted`]).
fn dump_to(
    a: &Args,
    (pid, opts): (u32, &DumpOptions),
    out: &CoreOut,
    target: Option<&mut BuiltIn>,
    obs: &CliObserver,
) -> Result<Output, CliError> {
    let bar = report::bar(
        report::show_progress(a.json),
        0,
        "{msg:10} [{bar:30}] {pos}/{len} pages {elapsed}",
        "copying".into(),
    );
    let mut first = true;
    let cap = dump::capture(pid, opts, |done, total| {
        if std::mem::take(&mut first) {
            obs.trace("copy");
        }
        if let Some(sig) = signal::caught_signal() {
            bar.finish_and_clear();
            exit_interrupted(
                a.json,
                out.named_path(),
                sig,
                obs.cancelled_during().unwrap_or("copy"),
            );
        }
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|source| dump_error(pid, source, obs))?;
    bar.finish_and_clear();
    if let Some(sig) = signal::caught_signal() {
        return Err(CliError::Interrupted {
            signal: sig,
            during: "copy",
        });
    }
    let layout = target.as_ref().map(|t| t.layout);
    let oracle = target.map(|t| t.check(&cap));
    obs.trace("core-write");
    dump::write_core(&cap, &out.file, |_, _| {
        if let Some(sig) = signal::caught_signal() {
            exit_interrupted(a.json, out.named_path(), sig, "core write");
        }
    })
    .map_err(|source| CliError::Dump { pid, source })?;
    Ok(Output {
        core: out.path.display().to_string(),
        dump: cap.report,
        oracle,
        target: layout,
    })
}

/// A dump's error; a cancel by a stop signal becomes `Interrupted`.
fn dump_error(pid: u32, source: DumpError, obs: &CliObserver) -> CliError {
    match (&source, signal::caught_signal()) {
        (
            DumpError::Attach(AttachError::Cancelled { .. })
            | DumpError::Freeze(Some(AttachError::Cancelled { .. })),
            Some(sig),
        ) => CliError::Interrupted {
            signal: sig,
            during: obs.cancelled_during().unwrap_or("attach"),
        },
        _ => CliError::Dump { pid, source },
    }
}

/// Claimed by whoever ends the run: the dump itself, or [`watch_signals`]'s exit (the other
/// then does nothing more).
static ENDING: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// How long a caught stop signal may wait for the dump to act on it (at the attach's and the
/// freeze's steps, in the copy, in the core's writing) before [`watch_signals`] ends the run.
const SIGNAL_GRACE: Duration = Duration::from_secs(1);

/// Claims the end of the run: false if [`watch_signals`] claimed it first (it is exiting).
fn claim_end() -> bool {
    let mut ended = ENDING.lock().unwrap_or_else(|e| e.into_inner());
    !std::mem::replace(&mut *ended, true)
}

/// Ends the run after a stop signal, with the error `Interrupted` (JSON under `--json`) and
/// exit code 128 + the signal; the core file is discarded (`discard`: a file that has a name
/// already). The exit closes the dump's uffd, whose release un-protects every page,
/// unregisters every range and wakes every faulting thread, and detaches any thread still
/// stopped: the issue-9 protocol keeps the target whole whenever this process ends.
fn exit_interrupted(json: bool, discard: Option<&Path>, sig: i32, during: &'static str) -> ! {
    if !claim_end() {
        // The watcher is exiting: wait for it.
        loop {
            std::thread::park();
        }
    }
    if let Some(p) = discard {
        let _ = std::fs::remove_file(p);
    }
    let e = CliError::Interrupted {
        signal: sig,
        during,
    };
    if json {
        crate::print_json(&serde_json::json!({ "error": e.report() }));
    }
    eprintln!("uffd-wp: error: {e}");
    signal::exit_now(i32::from(e.exit_code()))
}

/// A thread that takes the stop signals (started before the others block them) and ends the
/// run if the dump does not act on one within [`SIGNAL_GRACE`]: between the steps where the
/// dump looks (allocating and pre-faulting a large image before the pause takes seconds)
/// one signal must still end it promptly.
fn watch_signals(json: bool, discard: Option<PathBuf>) {
    std::thread::spawn(move || {
        let sig = loop {
            if let Some(s) = signal::caught_signal() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(SIGNAL_GRACE);
        exit_interrupted(json, discard.as_deref(), sig, "capture")
    });
}

/// The core file: an unnamed file (`O_TMPFILE`) in the directory of its path, created before
/// the target is touched (an unwritable output fails first) and named only once written, so
/// that a dump that fails, is interrupted or killed leaves no file (and a file already of
/// that name as it was). Where the filesystem has no `O_TMPFILE`, the file is created under
/// its name at once and removed when the dump fails or is interrupted.
struct CoreOut {
    path: PathBuf,
    file: File,
    /// Created under its name (no `O_TMPFILE`).
    named: bool,
}

impl CoreOut {
    fn create(path: &Path) -> Result<CoreOut, CliError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let io = |operation, errno: Errno| CliError::Io {
            operation,
            path: path.display().to_string(),
            source: std::io::Error::from_raw_os_error(errno.raw_os_error()),
        };
        let (file, named) = match file::create_unnamed(dir) {
            Ok(f) => (f, false),
            Err(Errno::OPNOTSUPP | Errno::ISDIR) => (create(path)?, true),
            Err(errno) => return Err(io("creating", errno)),
        };
        Ok(CoreOut {
            path: path.to_path_buf(),
            file,
            named,
        })
    }

    /// Names the written file: linked under a temporary name beside it, then renamed over
    /// the path (atomic: the path is the old file or the whole new one).
    fn persist(&self) -> Result<(), CliError> {
        if self.named {
            return Ok(());
        }
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = self
            .path
            .with_file_name(format!(".{name}.uffd-wp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let failed = |source| CliError::Io {
            operation: "naming",
            path: self.path.display().to_string(),
            source,
        };
        file::link_unnamed(&self.file, &tmp)
            .map_err(|errno| failed(std::io::Error::from_raw_os_error(errno.raw_os_error())))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            failed(e)
        })
    }

    /// Its path if it has a name already (no `O_TMPFILE`): what [`CoreOut::discard`] removes.
    fn named_path(&self) -> Option<&Path> {
        self.named.then_some(self.path.as_path())
    }

    /// Removes the file if it has a name already (an unnamed one goes with its descriptor).
    fn discard(&self) {
        if let Some(p) = self.named_path() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn options(a: &Args) -> Result<DumpOptions, CliError> {
    let only = if a.ranges.is_empty() {
        None
    } else {
        let rs = a
            .ranges
            .iter()
            .map(|r| parse_range(r))
            .collect::<Result<Vec<_>, _>>()?;
        Some(RangeSet::from_ranges(rs))
    };
    let mut opts = DumpOptions {
        filter: a.filter,
        only,
        ..DumpOptions::default()
    };
    opts.snapshot.copier = match a.copier {
        CopierArg::Normal => Copier::Normal,
        CopierArg::Background => Copier::Background,
    };
    Ok(opts)
}

fn create(path: &Path) -> Result<File, CliError> {
    std::fs::File::create(path).map_err(|source| CliError::Io {
        operation: "creating",
        path: path.display().to_string(),
        source,
    })
}

/// The built-in target: the workload in a helper process (killed when dropped).
struct BuiltIn {
    _helper: Helper,
    layout: Layout,
}

fn start_target(a: &Args) -> Result<BuiltIn, CliError> {
    let target = Target {
        size: a.size,
        threads: a.threads,
        thp: false,
        interval_ms: 1000,
        zoo: false,
        spinners: 0,
    };
    let failed = |e: String| CliError::Os {
        operation: format!("starting the built-in target: {e}"),
        errno: uffd_wp::sys::Errno::CHILD,
    };
    let mut helper = Helper::spawn(Path::new("/proc/self/exe"), &[], Kind::Workload, &target)
        .map_err(|e| failed(e.to_string()))?;
    let head: serde_json::Value = helper
        .recv(TARGET_PATIENCE)
        .map_err(|e| failed(e.to_string()))?;
    Ok(BuiltIn {
        layout: Layout::from_header(&head).map_err(failed)?,
        _helper: helper,
    })
}

impl BuiltIn {
    /// The dump against itself: the region's pages against the version table, both read
    /// from the capture.
    fn check(&mut self, cap: &Captured) -> DumpVerdict {
        self.layout.check(|a, b| {
            let _ = cap.read(a, b);
        })
    }
}

fn print(o: &Output) {
    let d = &o.dump;
    println!("dumped process {} to {}", d.pid, o.core);
    println!(
        "  threads {}, paused {:.0} us (freeze {:.0} us, of which registers and in-freeze copies {:.0} us)",
        d.threads, d.pause_us, d.freeze_us, d.capture_in_freeze_us
    );
    println!(
        "  {} bytes write-protected and copied live, {} bytes copied inside the freeze",
        d.write_protected_bytes, d.in_freeze_bytes
    );
    if let Some(s) = d.snapshot.as_ref().filter(|s| s.unpopulated_pages > 0) {
        println!(
            "  of which {} bytes of sparse memory had nothing mapped: zero, neither protected \
             nor copied",
            s.unpopulated_pages * uffd_wp::range::PAGE_SIZE
        );
    }
    if d.pre_copied_bytes > 0 || d.pre_copies_redone > 0 {
        println!(
            "  {} bytes of read-only file memory copied before the freeze and checked in it \
             ({} mappings changed meanwhile, copied again inside it)",
            d.pre_copied_bytes, d.pre_copies_redone
        );
    }
    if let Some(c) = &d.target_cpu {
        println!(
            "  the target over {:.0} ms: {:.0} ms on a CPU, {:.0} ms waiting for one",
            c.wall_ms, c.on_cpu_ms, c.runqueue_wait_ms
        );
    }
    for m in &d.mappings {
        let how = serde_json::to_value(&m.method).unwrap_or_default();
        println!(
            "  {:#014x}-{:#014x} {} {:>12} {} {}",
            m.start,
            m.end,
            m.perms,
            m.bytes,
            how["method"].as_str().unwrap_or(""),
            if m.name.is_empty() { "" } else { &m.name }
        );
        if !m.shared_with.is_empty() {
            println!(
                "    also mapped by pids {:?}: not stopped, their writes during the copy land as \
                 they come",
                m.shared_with
            );
        }
    }
    if let Some(v) = &o.oracle {
        println!(
            "  oracle: {} pages consistent, {} in flight (at most one per writer), {} inconsistent",
            v.consistent, v.in_flight, v.inconsistent
        );
    }
}

//! The command line's errors: one variant per failing operation, with the library's error as
//! its source, and the JSON form every `--json` failure prints.

use serde::Serialize;
use uffd_wp::sys::{Errno, errno_name};

/// A failure the CLI reports (stderr, or a JSON object on stdout under `--json`) with a
/// non-zero exit: 1 when a report did not verify, 2 for everything else.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad command-line input, found before anything was touched.
    #[error("{0}")]
    Usage(String),
    /// A scenario could not run.
    #[error(transparent)]
    Scenario(#[from] uffd_wp::scenario::ScenarioError),
    /// A benchmark could not run, or a measured report was wrong.
    #[error(transparent)]
    Bench(#[from] uffd_wp_bench::protect::BenchError),
    /// The dump benchmark could not run.
    #[error(transparent)]
    DumpBench(#[from] uffd_wp_bench::dump::DumpBenchError),
    /// Dirty tracking failed.
    #[error(transparent)]
    Track(#[from] uffd_wp::engine::track::TrackError),
    /// The pins of a process could not be discovered.
    #[error(transparent)]
    Pins(#[from] uffd_wp::backend::pins::PinScanError),
    /// Opening a userfaultfd in this process failed.
    #[error("opening a userfaultfd: {0}")]
    Open(#[from] uffd_wp::backend::linux::OpenError),
    /// Attaching to, freezing or releasing another process failed.
    #[error("{operation} process {pid}: {source}")]
    Attach {
        /// What was being done (`attaching to`, `freezing`).
        operation: &'static str,
        /// The process.
        pid: u32,
        /// Why.
        source: uffd_wp::backend::linux::AttachError,
    },
    /// A snapshot failed (nothing is left protected: the engine releases everything).
    #[error("snapshot: {0}")]
    Snapshot(#[from] uffd_wp::engine::snapshot::SnapshotError),
    /// A dump failed (the target runs on, nothing of it left protected or stopped).
    #[error("dump of process {pid}: {source}")]
    Dump {
        /// The target.
        pid: u32,
        /// Why.
        source: uffd_wp::dump::DumpError,
    },
    /// Reading or writing a file failed.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was being done (`creating`, `writing`, `reading`).
        operation: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A system operation of the command's own failed (mapping the workload, ...).
    #[error("{operation}: {}", errno_name(*errno))]
    Os {
        /// What was being done.
        operation: String,
        /// The errno.
        errno: Errno,
    },
    /// The differential tester's worker or a replay failed.
    #[error("{operation}: {message}")]
    Compare {
        /// What was being done.
        operation: &'static str,
        /// What it said.
        message: String,
    },
    /// A report did not match the page tables.
    #[error("{0}")]
    Unverified(String),
    /// A stop signal (INT, TERM, HUP, PIPE) ended the run; the target was released first.
    #[error("interrupted by signal {signal} during {during}: the target was released")]
    Interrupted {
        /// The signal number.
        signal: i32,
        /// What was being done (`attach`, `freeze`, `copy`).
        during: &'static str,
    },
}

/// The JSON of a failure: `{"error": {"kind", "errno", "address", "operation", "message"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorReport {
    /// The variant of [`CliError`] (`Usage`, `Attach`, `Snapshot`, ...).
    pub kind: &'static str,
    /// The errno's name (`EPERM`), when the failure has one.
    pub errno: Option<String>,
    /// The address the failure is about (`0x...`), when there is one.
    pub address: Option<String>,
    /// What was being done, when the variant says.
    pub operation: Option<String>,
    /// The whole message, as printed on stderr.
    pub message: String,
}

impl CliError {
    /// The exit code: 1 when a report did not verify, 128 + the signal when a stop signal
    /// ended the run (130 for SIGINT, 143 for SIGTERM), 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unverified(_) => 1,
            CliError::Interrupted { signal, .. } => (128 + signal) as u8,
            _ => 2,
        }
    }

    /// The errno behind the failure, when there is one.
    fn errno(&self) -> Option<Errno> {
        Some(match self {
            CliError::Usage(_) => Errno::INVAL,
            CliError::Scenario(uffd_wp::scenario::ScenarioError::Lab(
                uffd_wp::scenario::LabError::Setup { errno, .. },
            )) => *errno,
            CliError::Track(e) => e.errno(),
            CliError::Pins(e) => e.errno(),
            CliError::Open(e) => e.errno(),
            CliError::Attach { source, .. } => source.errno(),
            CliError::Snapshot(e) => e.errno(),
            CliError::Dump { source, .. } => source.errno(),
            CliError::DumpBench(e) => return e.errno(),
            CliError::Io { source, .. } => Errno::from_raw_os_error(source.raw_os_error()?),
            CliError::Os { errno, .. } => *errno,
            CliError::Interrupted { .. } => Errno::INTR,
            _ => return None,
        })
    }

    /// The JSON form.
    pub fn report(&self) -> ErrorReport {
        let (kind, operation) = match self {
            CliError::Usage(_) => ("Usage", Some("parsing the command line".to_string())),
            CliError::Scenario(_) => ("Scenario", None),
            CliError::Bench(_) => ("Bench", None),
            CliError::DumpBench(_) => ("Bench", Some("bench dump".into())),
            CliError::Track(_) => ("Track", None),
            CliError::Pins(_) => ("Pins", None),
            CliError::Open(_) => ("Open", Some("opening a userfaultfd".into())),
            CliError::Attach { operation, pid, .. } => {
                ("Attach", Some(format!("{operation} process {pid}")))
            }
            CliError::Snapshot(_) => ("Snapshot", None),
            CliError::Dump { pid, .. } => ("Dump", Some(format!("dumping process {pid}"))),
            CliError::Io {
                operation, path, ..
            } => ("Io", Some(format!("{operation} {path}"))),
            CliError::Os { operation, .. } => ("Os", Some(operation.clone())),
            CliError::Compare { operation, .. } => ("Compare", Some((*operation).into())),
            CliError::Unverified(_) => ("Unverified", None),
            CliError::Interrupted { during, .. } => ("Interrupted", Some((*during).into())),
        };
        let address = match self {
            CliError::Snapshot(e) => e.addr(),
            _ => None,
        };
        ErrorReport {
            kind,
            errno: self.errno().map(errno_name),
            address: address.map(|a| format!("{a:#x}")),
            operation,
            message: self.to_string(),
        }
    }
}

/// Whether the command line asked for JSON (every subcommand's `--json`).
pub fn json_requested() -> bool {
    std::env::args_os().any(|a| a == "--json")
}

//! Setting the machine up for the swap (and hugetlb) cases, and putting it back.
//!
//! Both need root and change the whole machine: a swapfile enabled with `swapon`, huge pages
//! reserved in `/proc/sys/vm/nr_hugepages`. [`MachineSetup`] undoes what it did when dropped
//! (also when a test panics): `swapoff` and the file removed, `nr_hugepages` written back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the machine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The caller is not root (`swapon` and `nr_hugepages` need it).
    #[error("setting up {feature} needs root")]
    NotRoot {
        /// What was being set up.
        feature: &'static str,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A command (`mkswap`, `swapon`) failed or could not be run.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status and error output, or why it could not start.
        detail: String,
    },
    /// The kernel gave fewer huge pages than asked for.
    #[error("asked for {wanted} free 2 MiB huge pages, the kernel has {free}")]
    HugePages {
        /// Free huge pages wanted.
        wanted: u64,
        /// Free huge pages there are.
        free: u64,
    },
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// What was changed on the machine; undone on drop.
#[derive(Debug, Default)]
pub struct MachineSetup {
    swapfile: Option<PathBuf>,
    hugepages_before: Option<u64>,
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn run(cmd: &str, args: &[&str]) -> Result<(), SetupError> {
    let command = format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| SetupError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SetupError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// A field of `/proc/meminfo` (its number).
pub(crate) fn meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The swapfile a process with this pid makes.
fn swapfile_name(pid: u32) -> String {
    format!("uffd-wp-compare-{pid}.swap")
}

/// Turns off and removes the swapfiles in `dir` left by runs that were killed before they
/// could undo their set-up (a SIGKILL skips `Drop`): their pid no longer exists. Without this
/// a killed run's swap would stay on for good, and later runs would take it for the machine's.
fn reap_stale_swapfiles(dir: &Path) -> Result<(), SetupError> {
    let Ok(swaps) = std::fs::read_to_string("/proc/swaps") else {
        return Ok(());
    };
    for line in swaps.lines().skip(1) {
        let Some(file) = line.split_whitespace().next() else {
            continue;
        };
        let path = Path::new(file);
        let stale = path.parent() == Some(dir)
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("uffd-wp-compare-")?.strip_suffix(".swap"))
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if stale {
            run("swapoff", &[file])?;
            std::fs::remove_file(path).map_err(|source| SetupError::Io {
                what: "removing a stale swapfile",
                path: path.to_path_buf(),
                source,
            })?;
        }
    }
    Ok(())
}

impl MachineSetup {
    /// Nothing changed yet.
    pub fn new() -> MachineSetup {
        MachineSetup::default()
    }

    /// Makes a swapfile of `mib` MiB in `dir` and enables it, unless a swap area is already
    /// active (then nothing is changed).
    pub fn swap(&mut self, dir: &Path, mib: u64) -> Result<(), SetupError> {
        reap_stale_swapfiles(dir)?;
        if crate::swap_active() {
            return Ok(());
        }
        if !is_root() {
            return Err(SetupError::NotRoot { feature: "swap" });
        }
        let path = dir.join(swapfile_name(std::process::id()));
        let io = |what, source| SetupError::Io {
            what,
            path: path.clone(),
            source,
        };
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io("creating", e))?;
            // Written, not fallocated: swapon refuses files with holes on some filesystems.
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..mib {
                f.write_all(&chunk).map_err(|e| io("writing", e))?;
            }
            f.sync_all().map_err(|e| io("syncing", e))?;
        }
        self.swapfile = Some(path.clone());
        let p = path.to_string_lossy();
        run("mkswap", &[&p])?;
        run("swapon", &[&p])
    }

    /// Raises `nr_hugepages` so that at least `free` 2 MiB huge pages are free.
    pub fn hugepages(&mut self, free: u64) -> Result<(), SetupError> {
        let have = meminfo("HugePages_Free").unwrap_or(0);
        if have >= free {
            return Ok(());
        }
        if !is_root() {
            return Err(SetupError::NotRoot { feature: "hugetlb" });
        }
        let path = PathBuf::from(NR_HUGEPAGES);
        let io = |what, source| SetupError::Io {
            what,
            path: path.clone(),
            source,
        };
        let before: u64 = std::fs::read_to_string(&path)
            .map_err(|e| io("reading", e))?
            .trim()
            .parse()
            .unwrap_or(0);
        if self.hugepages_before.is_none() {
            self.hugepages_before = Some(before);
        }
        std::fs::write(&path, format!("{}\n", before + free - have))
            .map_err(|e| io("writing", e))?;
        let now = meminfo("HugePages_Free").unwrap_or(0);
        if now < free {
            return Err(SetupError::HugePages {
                wanted: free,
                free: now,
            });
        }
        Ok(())
    }

    /// Undoes everything now (what `drop` does), reporting the first failure.
    pub fn restore(&mut self) -> Result<(), SetupError> {
        let mut first = Ok(());
        if let Some(path) = self.swapfile.take() {
            let p = path.to_string_lossy().into_owned();
            let listed = std::fs::read_to_string("/proc/swaps")
                .is_ok_and(|s| s.lines().any(|l| l.split_whitespace().next() == Some(&p)));
            if listed && let Err(e) = run("swapoff", &[&p]) {
                first = first.and(Err(e));
            }
            if let Err(source) = std::fs::remove_file(&path) {
                first = first.and(Err(SetupError::Io {
                    what: "removing",
                    path,
                    source,
                }));
            }
        }
        if let Some(n) = self.hugepages_before.take()
            && let Err(source) = std::fs::write(NR_HUGEPAGES, format!("{n}\n"))
        {
            first = first.and(Err(SetupError::Io {
                what: "writing",
                path: NR_HUGEPAGES.into(),
                source,
            }));
        }
        first
    }
}

impl Drop for MachineSetup {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("uffd-wp compare: restoring the machine: {e}");
        }
    }
}

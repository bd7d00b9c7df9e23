//! userfaultfd feature bits and the probe of what this kernel offers.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::range::Range;
use crate::sys::{self, Errno};

/// A set of `UFFD_FEATURE_*` bits (serialized as the number).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Features(pub u64);

/// The kernel's feature names without the `UFFD_FEATURE_` prefix, lower case, by bit.
pub const FEATURE_NAMES: [&str; 19] = [
    "pagefault_flag_wp",
    "event_fork",
    "event_remap",
    "event_remove",
    "missing_hugetlbfs",
    "missing_shmem",
    "event_unmap",
    "sigbus",
    "thread_id",
    "minor_hugetlbfs",
    "minor_shmem",
    "exact_address",
    "wp_hugetlbfs_shmem",
    "wp_unpopulated",
    "poison",
    "wp_async",
    "move",
    "wp_report",
    "wp_skip_pinned",
];

impl Features {
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
    pub const PAGEFAULT_FLAG_WP: Features = Features(1 << 0);
    /// `UFFD_FEATURE_EVENT_FORK`.
    pub const EVENT_FORK: Features = Features(1 << 1);
    /// `UFFD_FEATURE_EVENT_REMAP`.
    pub const EVENT_REMAP: Features = Features(1 << 2);
    /// `UFFD_FEATURE_EVENT_REMOVE`.
    pub const EVENT_REMOVE: Features = Features(1 << 3);
    /// `UFFD_FEATURE_EVENT_UNMAP`.
    pub const EVENT_UNMAP: Features = Features(1 << 6);
    /// `UFFD_FEATURE_THREAD_ID`.
    pub const THREAD_ID: Features = Features(1 << 8);
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
    pub const WP_HUGETLBFS_SHMEM: Features = Features(1 << 12);
    /// `UFFD_FEATURE_WP_UNPOPULATED` (6.4): unpopulated anonymous pages get PTE markers, so
    /// write-protecting them works.
    pub const WP_UNPOPULATED: Features = Features(1 << 13);
    /// `UFFD_FEATURE_WP_ASYNC` (6.7): the kernel resolves WP faults itself (dirty tracking).
    pub const WP_ASYNC: Features = Features(1 << 15);
    /// `UFFD_FEATURE_MOVE` (6.8).
    pub const MOVE: Features = Features(1 << 16);
    /// `UFFD_FEATURE_WP_REPORT` (kernel/README.md; no released kernel): the kernel accepts
    /// `UFFDIO_WRITEPROTECT_REPORT`, which says how far the protection got (`done`) even on
    /// failure.
    pub const WP_REPORT: Features = Features(1 << 17);
    /// `UFFD_FEATURE_WP_SKIP_PINNED` (kernel/README.md): `UFFDIO_WRITEPROTECT_REPORT` accepts
    /// `MODE_SKIP_PINNED` and leaves maybe-DMA-pinned pages writable, counted in `pinned`.
    pub const WP_SKIP_PINNED: Features = Features(1 << 18);

    /// No feature.
    pub const fn empty() -> Features {
        Features(0)
    }
    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    pub const fn with(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }
    /// Bits of self not in `other`.
    pub const fn without(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }
    /// The names of the set bits (unknown bits as `bit<N>`).
    pub fn names(self) -> Vec<String> {
        (0..64)
            .filter(|b| self.0 & (1 << b) != 0)
            .map(|b| {
                FEATURE_NAMES
                    .get(b)
                    .map_or_else(|| format!("bit{b}"), |n| (*n).to_string())
            })
            .collect()
    }
    /// Parses a feature name (as in [`FEATURE_NAMES`], case-insensitive, `UFFD_FEATURE_` prefix
    /// allowed).
    pub fn from_name(name: &str) -> Option<Features> {
        let n = name.to_ascii_lowercase();
        let n = n.strip_prefix("uffd_feature_").unwrap_or(&n);
        FEATURE_NAMES
            .iter()
            .position(|x| *x == n)
            .map(|b| Features(1 << b))
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({})", self.names().join("|"))
    }
}

/// The kernel's ioctl names (`_UFFDIO_*` bit numbers), lower case.
pub fn ioctl_names(mask: u64) -> Vec<String> {
    const NAMES: [(u32, &str); 10] = [
        (0, "register"),
        (1, "unregister"),
        (2, "wake"),
        (3, "copy"),
        (4, "zeropage"),
        (5, "move"),
        (6, "writeprotect"),
        (7, "continue"),
        (8, "poison"),
        (63, "api"),
    ];
    NAMES
        .iter()
        .filter(|(b, _)| mask & (1u64 << b) != 0)
        .map(|(_, n)| (*n).to_string())
        .collect()
}

/// How the uffd can be created here.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct UffdAvailability {
    /// The `userfaultfd(2)` syscall works for this caller.
    pub syscall: bool,
    /// `/dev/userfaultfd` works for this caller.
    pub dev: bool,
}

/// What this kernel offers, as `uffd-wp probe` prints it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Probe {
    /// `uname -r`.
    pub kernel: String,
    /// How a uffd can be created.
    pub uffd: UffdAvailability,
    /// Every known feature and whether the kernel offers it.
    pub features: BTreeMap<String, bool>,
    /// The ioctls of a uffd and of a range registered in MISSING|WP mode.
    pub ioctls: Vec<String>,
    /// The `PAGEMAP_SCAN` ioctl works.
    pub pagemap_scan: bool,
    /// pagemap bit 57 (uffd-wp) reads back as set on a write-protected page.
    pub pagemap_wp_bit: bool,
    /// Soft-dirty tracking works (`CONFIG_MEM_SOFT_DIRTY`: a written page shows bit 55 after
    /// `clear_refs` 4).
    pub soft_dirty: bool,
    /// io_uring can be set up (`io_uring_setup` succeeds).
    pub io_uring: bool,
    /// `/sys/kernel/mm/transparent_hugepage/enabled`: always, madvise or never.
    pub thp: String,
    /// This process may ptrace others (capability or same-uid with permissive Yama).
    pub ptrace: bool,
    /// The write-protect report (kernel/README.md): offered or not, and what the command
    /// answered on a scratch page.
    pub wp_report: WpReportProbe,
}

/// What `uffd-wp probe` says about `UFFDIO_WRITEPROTECT_REPORT` (kernel/README.md).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WpReportProbe {
    /// `UFFD_FEATURE_WP_REPORT` is offered: the exact engine takes the kernel's report.
    pub report: bool,
    /// `UFFD_FEATURE_WP_SKIP_PINNED` is offered: `skip_pinned` asks the kernel too.
    pub skip_pinned: bool,
    /// The call the exact engine protects with: `UFFDIO_WRITEPROTECT_REPORT` or
    /// `UFFDIO_WRITEPROTECT`.
    pub engine_call: &'static str,
    /// How its reports are made exact: `"kernel-report"` or `"read-back"`.
    pub exactness: &'static str,
    /// The command, issued whatever the features say, on one registered scratch page with
    /// `MODE_WP` (plus `MODE_SKIP_PINNED` where offered); `None` when no uffd could be set up.
    pub trial: Option<ReportTrial>,
}

/// One `UFFDIO_WRITEPROTECT_REPORT` call as the probe made it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReportTrial {
    /// The ioctl command number, `"0xc028aa06"`.
    pub command: String,
    /// The mode bits passed.
    pub mode: u64,
    /// Bytes asked for (one page).
    pub len: u64,
    /// `null` (success) or the errno's name (a kernel without the command: `EINVAL`).
    pub errno: Option<String>,
    /// What the kernel wrote in `done`.
    pub done: u64,
    /// What the kernel wrote in `pinned`.
    pub pinned: u64,
    /// pagemap bit 57 after the call.
    pub protected: bool,
}

impl WpReportProbe {
    /// The figures for a kernel offering `offered`, with the trial's answer.
    pub fn new(offered: Features, trial: Option<ReportTrial>) -> Self {
        let report = offered.contains(Features::WP_REPORT);
        WpReportProbe {
            report,
            skip_pinned: offered.contains(Features::WP_SKIP_PINNED),
            engine_call: if report {
                "UFFDIO_WRITEPROTECT_REPORT"
            } else {
                "UFFDIO_WRITEPROTECT"
            },
            exactness: if report { "kernel-report" } else { "read-back" },
            trial,
        }
    }
}

impl Probe {
    /// The offered features as a bit set.
    pub fn feature_bits(&self) -> Features {
        Features(
            FEATURE_NAMES
                .iter()
                .enumerate()
                .filter(|(_, n)| self.features.get(**n).copied().unwrap_or(false))
                .fold(0, |acc, (b, _)| acc | 1 << b),
        )
    }

    /// Whether a named feature is offered.
    pub fn has(&self, f: Features) -> bool {
        self.feature_bits().contains(f)
    }
}

/// The features the kernel offers: `UFFDIO_API` with no feature requested answers with all of
/// them (then the fd is spent, since the handshake is done once per fd).
pub fn kernel_features() -> Result<Features, Errno> {
    let u = sys::uffd::Uffd::create(true, false)?;
    Ok(Features(u.api(0)?.features))
}

/// Probes this kernel. Never fails: what cannot be checked reads as unavailable.
pub fn probe() -> Probe {
    let kernel = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let flags = linux_raw_sys::general::O_CLOEXEC | linux_raw_sys::general::O_NONBLOCK;
    let syscall = sys::uffd::Uffd::create_syscall(flags).is_ok();
    let dev = sys::uffd::Uffd::create_dev(flags).is_ok();
    let offered = kernel_features().unwrap_or_default();
    let features = FEATURE_NAMES
        .iter()
        .enumerate()
        .map(|(b, n)| ((*n).to_string(), offered.0 & (1 << b) != 0))
        .collect();
    let (ioctls, pagemap_wp_bit) = probe_range().unwrap_or_default();
    Probe {
        kernel,
        uffd: UffdAvailability { syscall, dev },
        features,
        ioctls,
        pagemap_scan: pagemap_scan_works(),
        pagemap_wp_bit,
        soft_dirty: probe_soft_dirty(),
        io_uring: probe_io_uring(),
        thp: read_thp_mode(),
        ptrace: probe_ptrace(),
        wp_report: WpReportProbe::new(offered, probe_report(offered).ok()),
    }
}

/// Registers one scratch page for WP and issues `UFFDIO_WRITEPROTECT_REPORT` on it.
fn probe_report(offered: Features) -> Result<ReportTrial, Errno> {
    use crate::sys::mem::Mapping;
    use crate::sys::pagemap::{Pagemap, bits};
    use crate::sys::uffd::{UFFDIO_WRITEPROTECT_REPORT, WP_MODE_SKIP_PINNED, WP_MODE_WP};
    let m = Mapping::anon(4096)?;
    m.touch(m.range(), 1)?;
    let u = sys::uffd::Uffd::create(true, false)?;
    let ask = Features(offered.0 & (Features::WP_REPORT.0 | Features::WP_SKIP_PINNED.0));
    u.api(Features::PAGEFAULT_FLAG_WP.with(ask).0)?;
    let r = m.range();
    u.register(r.start(), r.len(), 2)?;
    let mode = if offered.contains(Features::WP_SKIP_PINNED) {
        WP_MODE_WP | WP_MODE_SKIP_PINNED
    } else {
        WP_MODE_WP
    };
    let a = u.writeprotect_report(r.start(), r.len(), mode);
    let protected = Pagemap::open_self()?.entries(r.start(), 1)?[0] & bits::UFFD_WP != 0;
    Ok(ReportTrial {
        command: format!("{UFFDIO_WRITEPROTECT_REPORT:#x}"),
        mode,
        len: r.len(),
        errno: a.result.err().map(sys::errno_name),
        done: a.done,
        pinned: a.pinned,
        protected,
    })
}

/// Registers one scratch page (MISSING|WP), write-protects it and reads pagemap bit 57 back.
fn probe_range() -> Result<(Vec<String>, bool), Errno> {
    use crate::sys::mem::Mapping;
    use crate::sys::pagemap::{Pagemap, bits};
    let m = Mapping::anon(4096)?;
    m.touch(m.range(), 1)?;
    let u = sys::uffd::Uffd::create(true, false)?;
    let api = u.api(Features::PAGEFAULT_FLAG_WP.0)?;
    let r = m.range();
    let range_ioctls = u.register(r.start(), r.len(), 1 | 2)?;
    u.writeprotect(r.start(), r.len(), sys::uffd::WP_MODE_WP)?;
    let wp = Pagemap::open_self()?.entries(r.start(), 1)?[0] & bits::UFFD_WP != 0;
    u.writeprotect(r.start(), r.len(), 0)?;
    Ok((ioctl_names(api.ioctls | range_ioctls), wp))
}

/// Whether `PAGEMAP_SCAN` works on /proc/self/pagemap (6.7+).
pub fn pagemap_scan_works() -> bool {
    use crate::sys::mem::Mapping;
    use crate::sys::pagemap::{PageRegion, Pagemap, ScanArg, category};
    let Ok(m) = Mapping::anon(4096) else {
        return false;
    };
    if m.touch(m.range(), 1).is_err() {
        return false;
    }
    let mut arg = ScanArg {
        size: 0,
        flags: 0,
        start: m.range().start(),
        end: m.range().end(),
        walk_end: 0,
        vec: 0,
        vec_len: 0,
        max_pages: 0,
        category_inverted: 0,
        category_mask: 0,
        category_anyof_mask: category::PRESENT,
        return_mask: category::PRESENT,
    };
    let mut vec = [PageRegion {
        start: 0,
        end: 0,
        categories: 0,
    }; 4];
    Pagemap::open_self()
        .and_then(|p| p.scan_once(&mut arg, &mut vec))
        .is_ok_and(|n| n == 1)
}

/// Soft-dirty works when a page written after `clear_refs` 4 shows pagemap bit 55 while an
/// unwritten one does not. Kernels built without `CONFIG_MEM_SOFT_DIRTY` fail this.
pub fn probe_soft_dirty() -> bool {
    use crate::sys::mem::Mapping;
    use crate::sys::pagemap::{Pagemap, bits};
    let run = || -> Result<bool, Errno> {
        let m = Mapping::anon(2 * 4096)?;
        m.touch(m.range(), 1)?;
        std::fs::write("/proc/self/clear_refs", "4").map_err(|e| sys::errno_of(&e))?;
        m.touch(
            Range::from_bounds(m.range().start(), m.range().start() + 4096),
            2,
        )?;
        let e = Pagemap::open_self()?.entries(m.range().start(), 2)?;
        Ok(e[0] & bits::SOFT_DIRTY != 0 && e[1] & bits::SOFT_DIRTY == 0)
    };
    run().unwrap_or(false)
}

fn probe_io_uring() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim() != "2")
        .unwrap_or(true)
        && std::path::Path::new("/proc/self/fdinfo").exists()
        && io_uring_setup_works()
}

fn io_uring_setup_works() -> bool {
    io_uring::IoUring::new(2).is_ok()
}

fn read_thp_mode() -> String {
    let s =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    s.split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        .unwrap_or_else(|| "never".to_string())
}

fn probe_ptrace() -> bool {
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "0".to_string());
    let root = rustix::process::geteuid().is_root();
    yama != "3" && (root || yama == "0")
}

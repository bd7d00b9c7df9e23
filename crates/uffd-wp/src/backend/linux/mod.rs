//! The Linux backend: [`Mm`] over a real userfaultfd.
//!
//! The monitored address space is this process's own ([`LinuxMm::open`]) or another
//! process's ([`LinuxMm::attach`]: a uffd created inside the target and taken with
//! pidfd_getfd, see [`remote`]). Everything that names the address space goes through
//! [`Target`] (its pagemap, its memory, its maps), so the engines run unchanged on both.

pub mod fail_nth;
pub mod lab;
pub mod memcg;
pub mod remote;

pub use remote::{AttachError, AttachReport, RemoteQuiesce};

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::backend::pins::{PinGuard, PinRegistry, PinTarget, RegistryOptions};
use crate::backend::procfs;
use crate::features::{self, Features};
use crate::range::{Range, RangeSet};
use crate::seam::{
    Errno, Event, KernelReport, Mapping, Memory, PageState, PageTables, Pins, Region, RegisterMode,
    ScanRequest, ScanResult, Uffd, WpMode,
};
use crate::sys::errno_of;
use crate::sys::pagemap::{PageRegion, Pagemap, ScanArg, category};
use crate::sys::uffd::Uffd as RawUffd;

/// Why a Linux backend could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Neither `userfaultfd(2)` nor `/dev/userfaultfd` gave a uffd.
    #[error("creating a userfaultfd: {}", crate::sys::errno_name(*.0))]
    Create(Errno),
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake for features {features:?}: {}", crate::sys::errno_name(*errno))]
    Api {
        /// Features asked for.
        features: Features,
        /// The kernel's errno.
        errno: Errno,
    },
    /// The kernel lacks features the caller requires.
    #[error("this kernel does not offer userfaultfd feature(s) {}", .missing.names().join(", "))]
    Unsupported {
        /// The required features the kernel does not offer.
        missing: Features,
    },
    /// `/proc/PID/pagemap` or `/proc/PID/mem` could not be opened.
    #[error("opening {path}: {}", crate::sys::errno_name(*errno))]
    Proc {
        /// The file.
        path: String,
        /// The errno.
        errno: Errno,
    },
}

impl OpenError {
    /// The errno behind the failure (EOPNOTSUPP for missing features).
    pub fn errno(&self) -> Errno {
        match self {
            OpenError::Create(e)
            | OpenError::Api { errno: e, .. }
            | OpenError::Proc { errno: e, .. } => *e,
            OpenError::Unsupported { .. } => Errno::OPNOTSUPP,
        }
    }
}

/// The address space a backend monitors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This process.
    SelfProcess,
    /// Another process (memory read with process_vm_readv, mappings from /proc/PID/maps).
    Pid(u32),
}

/// What to negotiate when opening a [`LinuxMm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Features to enable when the kernel offers them.
    pub wanted: Features,
    /// Features without which opening fails with [`OpenError::Unsupported`].
    pub required: Features,
    /// `UFFD_USER_MODE_ONLY`: kernel-mode accesses (GUP) fail with EFAULT instead of faulting.
    pub user_mode_only: bool,
}

impl Default for Config {
    /// WP fault flags and markers for unpopulated pages (so write-protection covers every page),
    /// thread ids in fault messages, and the write-protect report with its skip-pinned mode
    /// where the kernel offers them (kernel/README.md; no released kernel does). No non-cooperative events: those block the faulting thread
    /// until the monitor reads them, which a library cannot impose on its host.
    fn default() -> Self {
        Config {
            wanted: Features::PAGEFAULT_FLAG_WP
                .with(Features::WP_UNPOPULATED)
                .with(Features::THREAD_ID)
                .with(Features::WP_HUGETLBFS_SHMEM)
                .with(Features::WP_REPORT)
                .with(Features::WP_SKIP_PINNED),
            required: Features::PAGEFAULT_FLAG_WP,
            user_mode_only: false,
        }
    }
}

impl Config {
    /// The default without `WP_UNPOPULATED`: unpopulated anonymous pages cannot be protected.
    pub fn without_unpopulated() -> Self {
        let d = Self::default();
        Config {
            wanted: d.wanted.without(Features::WP_UNPOPULATED),
            ..d
        }
    }

    /// The default plus `WP_ASYNC` (which implies `WP_UNPOPULATED`): dirty tracking.
    pub fn async_wp() -> Self {
        let d = Self::default();
        Config {
            wanted: d.wanted.with(Features::WP_ASYNC),
            required: d.required.with(Features::WP_ASYNC),
            ..d
        }
    }
}

/// [`Mm`] over a real userfaultfd.
#[derive(Debug)]
pub struct LinuxMm {
    uffd: RawUffd,
    features: Features,
    target: Target,
    pagemap: Pagemap,
    mem: File,
    pagemap_scan: bool,
    pins: Arc<PinRegistry>,
    /// For [`Target::Pid`]: the target's maps, kept open for `fully_mapped`.
    maps: Option<procfs::MapsQuery>,
}

impl LinuxMm {
    /// Opens a backend on this process with the default [`Config`].
    pub fn open() -> Result<LinuxMm, OpenError> {
        Self::open_with(Config::default())
    }

    /// Opens a backend on this process, negotiating `cfg`.
    pub fn open_with(cfg: Config) -> Result<LinuxMm, OpenError> {
        let offered = features::kernel_features().map_err(OpenError::Create)?;
        let missing = cfg.required.without(offered);
        if missing != Features::empty() {
            return Err(OpenError::Unsupported { missing });
        }
        let uffd = RawUffd::create(true, cfg.user_mode_only).map_err(OpenError::Create)?;
        Self::from_uffd(uffd, cfg, offered, Target::SelfProcess)
    }

    /// The backend over a fresh `uffd` (before `UFFDIO_API`) bound to `target`'s mm.
    fn from_uffd(
        uffd: RawUffd,
        cfg: Config,
        offered: Features,
        target: Target,
    ) -> Result<LinuxMm, OpenError> {
        let ask = Features(cfg.wanted.0 & offered.0).with(cfg.required);
        // The kernel answers with every feature it supports, not the ones it enabled
        // (fs/userfaultfd.c, userfaultfd_api(): "report all available features"): what is
        // enabled is what was asked, plus WP_UNPOPULATED, which WP_ASYNC implies.
        uffd.api(ask.0).map_err(|errno| OpenError::Api {
            features: ask,
            errno,
        })?;
        let enabled = if ask.contains(Features::WP_ASYNC) {
            ask.with(Features::WP_UNPOPULATED)
        } else {
            ask
        };
        let proc_err = |path: &str| {
            let path = path.to_string();
            move |errno| OpenError::Proc { path, errno }
        };
        let proc_dir = match target {
            Target::SelfProcess => "/proc/self".to_string(),
            Target::Pid(pid) => procfs::mm_dir(pid as i32),
        };
        let pagemap_path = format!("{proc_dir}/pagemap");
        let pagemap = Pagemap::open_path(&pagemap_path).map_err(proc_err(&pagemap_path))?;
        let mem_path = format!("{proc_dir}/mem");
        let mem = File::open(&mem_path)
            .map_err(|e| errno_of(&e))
            .map_err(proc_err(&mem_path))?;
        let mut mm = LinuxMm {
            uffd,
            features: enabled,
            target,
            pagemap,
            mem,
            pagemap_scan: false,
            maps: match target {
                Target::SelfProcess => None,
                Target::Pid(pid) => Some(procfs::MapsQuery::new(pid as i32)),
            },
            pins: PinRegistry::new(
                match target {
                    Target::SelfProcess => PinTarget::SelfProcess,
                    Target::Pid(pid) => PinTarget::Pid(pid),
                },
                RegistryOptions::default(),
            ),
        };
        mm.pagemap_scan = features::pagemap_scan_works();
        Ok(mm)
    }

    /// The userfaultfd itself (for a fault handler that polls it directly).
    pub fn uffd(&self) -> &RawUffd {
        &self.uffd
    }

    /// The monitored address space.
    pub fn target(&self) -> Target {
        self.target
    }

    /// The pin registry of the monitored process: declared pins, and the io_uring buffers
    /// discovered in its `/proc/PID/fdinfo` (see [`crate::backend::pins`]). [`Mm::pinned`] answers from
    /// it, rescanning per query by default.
    pub fn pins(&self) -> &Arc<PinRegistry> {
        &self.pins
    }

    /// Declares `r` pinned (the application's own DMA or O_DIRECT buffer) until the guard is
    /// dropped, panics included.
    pub fn pin(&self, r: Range) -> PinGuard {
        self.pins.declare(r)
    }

    /// Declares `r` pinned without a guard, until [`LinuxMm::undeclare_pin`]. Prefer
    /// [`LinuxMm::pin`].
    pub fn declare_pin(&self, r: Range) {
        self.pins.declare_range(r);
    }

    /// Withdraws the pages of `r` from the declarations made with [`LinuxMm::declare_pin`].
    pub fn undeclare_pin(&self, r: Range) {
        self.pins.undeclare_range(r);
    }

    /// The uffd-wp pages of `r` through `PAGEMAP_SCAN`: a page is protected when it is present
    /// or a swap entry/marker and not `PAGE_IS_WRITTEN` (fs/proc/task_mmu.c,
    /// pagemap_page_category: WRITTEN is exactly "no uffd-wp bit").
    ///
    /// The kernel is asked for the protected pages only (`!WRITTEN` through
    /// `category_inverted`), not for every present page with its WRITTEN bit: a page that does
    /// not match costs the walk only, while each matching page also goes through
    /// pagemap_scan_output(). Reading back 512 MiB of unprotected 4 KiB pages costs ~0.25 ms
    /// this way against ~1.4 ms when every page is returned (docs/benchmarks.md).
    fn wp_pages_scan(&self, r: Range) -> Result<RangeSet, Errno> {
        let req = ScanRequest {
            start: r.start(),
            end: r.end(),
            category_inverted: category::WRITTEN,
            category_mask: category::WRITTEN,
            category_anyof_mask: category::PRESENT | category::SWAPPED,
            return_mask: category::WRITTEN,
            ..Default::default()
        };
        let res = self.scan_all(&req)?;
        Ok(res
            .regions
            .iter()
            .map(|g| Range::from_bounds(g.start, g.end))
            .collect())
    }
}

impl Uffd for LinuxMm {
    fn backend(&self) -> &'static str {
        "linux"
    }

    fn features(&self) -> Features {
        self.features
    }

    fn register(&self, r: Range, mode: RegisterMode) -> Result<u64, Errno> {
        self.uffd.register(r.start(), r.len(), mode.0)
    }

    fn unregister(&self, r: Range) -> Result<(), Errno> {
        self.uffd.unregister(r.start(), r.len())
    }

    fn writeprotect(&self, r: Range, mode: WpMode) -> Result<(), Errno> {
        self.uffd.writeprotect(r.start(), r.len(), mode.bits())
    }

    /// The ioctl, whatever the features say: a kernel without it answers EINVAL.
    fn writeprotect_report(&self, r: Range, mode: WpMode, skip_pinned: bool) -> KernelReport {
        self.uffd
            .writeprotect_report(r.start(), r.len(), mode.report_bits(skip_pinned))
            .into()
    }

    fn wake(&self, r: Range) -> Result<(), Errno> {
        self.uffd.wake(r.start(), r.len())
    }

    fn read_events(&self, max: usize) -> Result<Vec<Event>, Errno> {
        Ok(self
            .uffd
            .read_msgs(max)?
            .iter()
            .map(Event::decode)
            .collect())
    }

    fn wait_event(&self, timeout_ms: i32) -> Result<bool, Errno> {
        self.uffd.poll(timeout_ms)
    }

    fn close_forked(&self, ufd: u32) -> Result<(), Errno> {
        self.uffd.close_forked(ufd)
    }

    fn events_in_flight(&self) -> Result<bool, Errno> {
        self.uffd.mmap_changing()
    }
}

impl PageTables for LinuxMm {
    fn page_states(&self, r: Range) -> Result<Vec<PageState>, Errno> {
        Ok(self
            .pagemap
            .entries(r.start(), r.pages())?
            .into_iter()
            .map(PageState::from_pagemap)
            .collect())
    }

    fn wp_pages(&self, r: Range) -> Result<RangeSet, Errno> {
        if self.pagemap_scan {
            self.wp_pages_scan(r)
        } else {
            Ok(crate::seam::pages_where(r, &self.page_states(r)?, |s| {
                s.uffd_wp
            }))
        }
    }

    fn scan(&self, req: &ScanRequest, vec_len: usize) -> Result<ScanResult, Errno> {
        scan_once(&self.pagemap, req, vec_len)
    }

    /// From `/proc/PID/pagemap`'s swap type, which only a reader with `CAP_SYS_ADMIN` sees
    /// (for others, none).
    fn markers(&self, r: Range) -> Result<RangeSet, Errno> {
        let entries = self.pagemap.entries(r.start(), r.pages())?;
        Ok(entries
            .iter()
            .enumerate()
            .filter(|(_, e)| crate::sys::pagemap::is_pte_marker(**e))
            .map(|(i, _)| {
                let a = r.start() + i as u64 * crate::range::PAGE_SIZE;
                Range::from_bounds(a, a + crate::range::PAGE_SIZE)
            })
            .collect())
    }

    fn fully_mapped(&self, r: Range) -> Result<bool, Errno> {
        match self.target {
            Target::SelfProcess => crate::sys::mem::fully_mapped(r),
            Target::Pid(pid) => match &self.maps {
                Some(q) => q.fully_mapped(r),
                None => procfs::fully_mapped(pid as i32, r),
            },
        }
    }

    /// `clear_refs` 4 on the target. Without `CONFIG_MEM_SOFT_DIRTY` the kernel accepts the
    /// write and does nothing useful, so soft-dirty is probed once (a written and an unwritten
    /// page after a clear) and EOPNOTSUPP returned when it does not work.
    fn clear_soft_dirty(&self) -> Result<(), Errno> {
        static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if !*WORKS.get_or_init(features::probe_soft_dirty) {
            return Err(Errno::OPNOTSUPP);
        }
        match self.target {
            Target::SelfProcess => {
                std::fs::write("/proc/self/clear_refs", "4").map_err(|e| errno_of(&e))
            }
            Target::Pid(pid) => {
                std::fs::write(format!("/proc/{pid}/clear_refs"), "4").map_err(|e| errno_of(&e))
            }
        }
    }
}

impl Pins for LinuxMm {
    /// Declared plus discovered pins of `r` ([`PinRegistry::pinned`]). A scan failure is its
    /// errno ([`crate::backend::pins::PinScanError::errno`]); under the registry's strict option,
    /// unexplained long-term pins are EBUSY (the typed error: [`PinRegistry::refresh`]).
    fn pinned(&self, r: Range) -> Result<RangeSet, Errno> {
        self.pins.pinned(r).map_err(|e| e.errno())
    }

    fn unexplained_pinned_bytes(&self) -> u64 {
        self.pins.unexplained_bytes()
    }

    fn declared_pinned(&self, r: Range) -> RangeSet {
        self.pins.view(r).declared
    }
}

impl Memory for LinuxMm {
    fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        match self.target {
            Target::SelfProcess => self.mem.read_exact_at(buf, addr).map_err(|e| errno_of(&e)),
            Target::Pid(pid) => remote::read_memory(pid, addr, buf),
        }
    }

    /// One copy, straight into `dst`: `pread` of /proc/self/mem, or `process_vm_readv` from
    /// the target (looping over short reads); EFAULT at unmapped memory either way.
    fn read_memory_into(
        &self,
        addr: u64,
        dst: &Mapping,
        dst_addr: u64,
        len: u64,
    ) -> Result<(), Errno> {
        let mut done = 0;
        while done < len {
            let left = usize::try_from(len - done).map_err(|_| Errno::NOMEM)?;
            let n = match self.target {
                // /proc/self/mem says EIO for unmapped memory; process_vm_readv says EFAULT.
                Target::SelfProcess => dst
                    .read_from_file(dst_addr + done, self.mem.as_fd(), addr + done, left)
                    .map_err(|e| if e == Errno::IO { Errno::FAULT } else { e })?,
                Target::Pid(pid) => {
                    let read = |p| dst.read_from_process(dst_addr + done, p, addr + done, left);
                    match read(pid as i32) {
                        // The leader exited (other threads run): through a live thread.
                        Err(Errno::SRCH) => read(procfs::mm_tid(pid as i32))?,
                        r => r?,
                    }
                }
            };
            if n == 0 {
                return Err(Errno::FAULT);
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// One raw `PAGEMAP_SCAN` call of `req` with room for `vec_len` regions.
pub fn scan_once(
    pagemap: &Pagemap,
    req: &ScanRequest,
    vec_len: usize,
) -> Result<ScanResult, Errno> {
    let mut vec = vec![
        PageRegion {
            start: 0,
            end: 0,
            categories: 0,
        };
        vec_len.max(1)
    ];
    let mut arg = ScanArg {
        size: 0,
        flags: req.flags,
        start: req.start,
        end: req.end,
        walk_end: 0,
        vec: 0,
        vec_len: 0,
        max_pages: req.max_pages,
        category_inverted: req.category_inverted,
        category_mask: req.category_mask,
        category_anyof_mask: req.category_anyof_mask,
        return_mask: req.return_mask,
    };
    let n = pagemap.scan_once(&mut arg, &mut vec)?;
    Ok(ScanResult {
        regions: vec[..n]
            .iter()
            .map(|r| Region {
                start: r.start,
                end: r.end,
                categories: r.categories,
            })
            .collect(),
        walk_end: arg.walk_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::PAGE_SIZE;
    use crate::sys::mem::{Backing, Mapping, Thp};

    /// A backend, or a skip naming the feature (a panic with `UFFD_WP_REQUIRE_KERNEL=1`).
    fn open() -> Option<LinuxMm> {
        match LinuxMm::open() {
            Ok(mm) if mm.pagemap_scan && mm.features().contains(Features::WP_UNPOPULATED) => {
                Some(mm)
            }
            res => {
                let why = match res {
                    Ok(_) => "PAGEMAP_SCAN and UFFD_FEATURE_WP_UNPOPULATED".to_string(),
                    Err(e) => format!("userfaultfd: {e}"),
                };
                if std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1") {
                    panic!("kernel feature required (UFFD_WP_REQUIRE_KERNEL=1): {why}");
                }
                eprintln!("SKIPPED: needs kernel feature {why}");
                None
            }
        }
    }

    /// `read_memory_into` copies straight into a mapping, write-protected pages included (no
    /// fault), across several calls' worth of bytes; unmapped memory is EFAULT; a destination
    /// outside the mapping is refused before any copy.
    #[test]
    fn read_memory_into_copies_exactly_and_refuses_bad_ranges() {
        let Some(mm) = open() else { return };
        let src = Mapping::new(64 * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
        let dst = Mapping::new(64 * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
        let data: Vec<u8> = (0..64 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        src.write(src.range().start(), &data).unwrap();
        mm.register(src.range(), RegisterMode::WP).unwrap();
        mm.writeprotect(src.range(), WpMode::Protect).unwrap();
        let (s0, d0) = (src.range().start(), dst.range().start());
        mm.read_memory_into(s0 + 3, &dst, d0 + 5, 60 * PAGE_SIZE)
            .unwrap();
        let mut back = vec![0u8; 60 * PAGE_SIZE as usize];
        dst.read(d0 + 5, &mut back).unwrap();
        assert_eq!(back[..], data[3..3 + back.len()]);
        assert_eq!(
            bit57(src.range()),
            RangeSet::single(src.range()),
            "still protected"
        );
        // Unmapped source memory: EFAULT. The page at 0, below vm.mmap_min_addr, which nothing
        // can map (a hole punched in a mapping of our own was once filled by another test's
        // mmap running in parallel, and the read succeeded).
        assert_eq!(
            mm.read_memory_into(0, &dst, d0, PAGE_SIZE),
            Err(Errno::FAULT)
        );
        // The destination runs past its mapping: refused.
        assert!(
            mm.read_memory_into(s0, &dst, d0 + 63 * PAGE_SIZE, 2 * PAGE_SIZE)
                .is_err()
        );
        mm.unregister(src.range()).unwrap();
    }

    use crate::testing::bit57;

    /// Markers of unpopulated pages are told from present pages and from none: all of it
    /// for a reader with `CAP_SYS_ADMIN` (root), nothing for others.
    #[test]
    fn markers_are_the_protected_pages_with_nothing_mapped() {
        let Some(mm) = open() else { return };
        let m = Mapping::new(16 * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
        let r = m.range();
        mm.register(r, RegisterMode::WP).unwrap();
        m.touch(pages(r, 0, 4), 1).unwrap();
        mm.writeprotect(pages(r, 2, 12), WpMode::Protect).unwrap();
        let got = mm.markers(r).unwrap();
        if rustix::process::geteuid().is_root() {
            assert_eq!(got, RangeSet::single(pages(r, 4, 12)));
        } else {
            assert!(
                got.is_empty(),
                "swap types are hidden without CAP_SYS_ADMIN"
            );
        }
        drop(mm);
    }

    fn pages(r: Range, a: u64, b: u64) -> Range {
        Range::from_bounds(r.start() + a * PAGE_SIZE, r.start() + b * PAGE_SIZE)
    }

    /// The PAGEMAP_SCAN read-back (protected pages only) equals pagemap bit 57 over present
    /// protected and unprotected pages, markers on unpopulated pages, pte_none pages, and a THP
    /// partly protected (split) or wholly protected.
    #[test]
    fn wp_pages_scan_equals_pagemap_bit_57() {
        let Some(mm) = open() else { return };
        // 4 KiB pages: [0, 32) populated, [32, 64) not.
        let m = Mapping::new(64 * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
        let r = m.range();
        mm.register(r, RegisterMode::WP).unwrap();
        m.touch(pages(r, 0, 32), 1).unwrap();
        mm.writeprotect(pages(r, 8, 40), WpMode::Protect).unwrap();
        mm.writeprotect(pages(r, 48, 50), WpMode::Protect).unwrap();
        mm.writeprotect(pages(r, 10, 12), WpMode::Unprotect { dontwake: false })
            .unwrap();
        let want: RangeSet = [(8, 10), (12, 40), (48, 50)]
            .iter()
            .map(|&(a, b)| pages(r, a, b))
            .collect();
        assert_eq!(bit57(r), want, "the kernel's own bits");
        assert_eq!(mm.wp_pages(r).unwrap(), want);
        assert_eq!(mm.wp_pages_scan(r).unwrap(), want);
        // A sub-range starting inside a protected run.
        let sub = pages(r, 20, 60);
        assert_eq!(mm.wp_pages(sub).unwrap(), bit57(sub));

        // THP: 3 huge pages; the first wholly protected, one 4 KiB page of the second.
        let h = Mapping::new(6 << 20, 2 << 20, Backing::Anon, Thp::Huge).unwrap();
        let hr = h.range();
        mm.register(hr, RegisterMode::WP).unwrap();
        h.touch(hr, 1).unwrap();
        mm.writeprotect(
            Range::from_bounds(hr.start(), hr.start() + (2 << 20)),
            WpMode::Protect,
        )
        .unwrap();
        let one = Range::from_bounds(hr.start() + (3 << 20), hr.start() + (3 << 20) + PAGE_SIZE);
        mm.writeprotect(one, WpMode::Protect).unwrap();
        let expect = bit57(hr);
        assert_eq!(
            expect.bytes(),
            (2 << 20) + PAGE_SIZE,
            "the kernel's own bits"
        );
        assert_eq!(mm.wp_pages(hr).unwrap(), expect);
        drop(mm);
    }
}

//! The modelled kernel state of one address space and its userfaultfd contexts, and the
//! memory-management calls that are not about protection: mmap, munmap, madvise, register,
//! unregister, close.
//!
//! Everything here is single-threaded and deterministic; [`crate::Model`] wraps it in a mutex.
//! Function names in comments are the kernel functions (Linux 6.18) whose behaviour is modelled.

use std::collections::{BTreeMap, HashMap, VecDeque};

use uffd_wp::features::Features;
use uffd_wp::range::Range;
use uffd_wp::seam::{Errno, Event};

use crate::alloc::{Level, PtAllocator};
use crate::pt::{
    FrameId, Frames, HPAGE_NR, Huge, PAGE, PGDIR, PMD, PUD, PageData, PageTables, Pmd, Pte,
    PteTable, ZERO_FRAME, addr_end, is_zero_frame, pgd_index, pmd_index, pte_index, pud_index,
};

/// Which kernel the model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Semantics {
    /// What Linux 6.18 does (mm/userfaultfd.c, mm/mprotect.c), including the lost ENOMEM.
    #[default]
    Linux,
    /// The seed thread's proposal: a page-table allocation failure stops the walk and is always
    /// reported; the kernel offers `UFFDIO_WRITEPROTECT_REPORT`
    /// ([`crate::ModelMm::writeprotect_report_raw`]), which returns how far the protection got
    /// even on failure, and can skip pinned pages (kernel/README.md).
    Proposed,
}

impl Semantics {
    /// `"linux"` or `"proposed"`.
    pub fn name(self) -> &'static str {
        match self {
            Semantics::Linux => "linux",
            Semantics::Proposed => "proposed",
        }
    }
}

impl std::str::FromStr for Semantics {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linux" => Ok(Semantics::Linux),
            "proposed" => Ok(Semantics::Proposed),
            _ => Err(format!("unknown semantics {s:?}: linux or proposed")),
        }
    }
}

/// `/sys/kernel/mm/transparent_hugepage/enabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThpSysfs {
    /// THP for every anonymous VMA not marked `MADV_NOHUGEPAGE`.
    Always,
    /// THP only for `MADV_HUGEPAGE` VMAs (this project's machines).
    #[default]
    Madvise,
    /// No THP.
    Never,
}

/// The model's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    /// Linux or the proposal.
    pub semantics: Semantics,
    /// Whether a swap device exists: without one, `MADV_PAGEOUT` leaves anonymous pages present
    /// (shmem pages are still unmapped). This project's machines have no swap.
    pub swap: bool,
    /// The THP policy.
    pub thp: ThpSysfs,
    /// `/sys/kernel/mm/transparent_hugepage/use_zero_page`: a read fault on a THP-eligible range
    /// maps the huge zero page.
    pub thp_zero_page: bool,
    /// `CONFIG_MEM_SOFT_DIRTY`: pagemap bit 55 and `clear_refs` 4. Off by default, as on this
    /// project's kernels; on, the model follows fs/proc/task_mmu.c (a new VMA is soft-dirty as
    /// a whole, `VM_SOFTDIRTY`; a write marks its page; clearing resets both).
    pub soft_dirty: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            semantics: Semantics::Linux,
            swap: true,
            thp: ThpSysfs::Madvise,
            thp_zero_page: true,
            soft_dirty: false,
        }
    }
}

impl ModelConfig {
    /// The given semantics, everything else default.
    pub fn with_semantics(semantics: Semantics) -> Self {
        ModelConfig {
            semantics,
            ..Self::default()
        }
    }

    /// Like this project's test machines (Linux 6.18, x86_64, no swap, THP `madvise`), for
    /// differential testing against them.
    pub fn like_test_machine() -> Self {
        ModelConfig {
            swap: false,
            ..Self::default()
        }
    }
}

/// `TASK_SIZE_MAX` with 4-level paging.
pub const TASK_SIZE: u64 = (1 << 47) - PAGE;
/// `vm.mmap_min_addr` (the usual default).
pub const MMAP_MIN_ADDR: u64 = 65536;
/// Where the model places mappings (bottom-up, first fit).
pub(crate) const MMAP_BASE: u64 = 0x10_0000_0000;

/// `UFFDIO_REGISTER_MODE_*`.
pub(crate) const MODE_MISSING: u64 = 1;
pub(crate) const MODE_WP: u64 = 2;
pub(crate) const MODE_MINOR: u64 = 4;

/// `UFFD_API_RANGE_IOCTLS` (include/uapi/linux/userfaultfd.h): WAKE, COPY, ZEROPAGE, MOVE,
/// WRITEPROTECT, CONTINUE, POISON.
pub(crate) const RANGE_IOCTLS: u64 = 0x1fc;
/// `UFFD_API_RANGE_IOCTLS_BASIC` (hugetlb): WAKE, COPY, WRITEPROTECT, CONTINUE, POISON.
pub(crate) const RANGE_IOCTLS_BASIC: u64 = 0x1cc;
const IOCTL_WRITEPROTECT: u64 = 1 << 6;
const IOCTL_CONTINUE: u64 = 1 << 7;

/// Every feature this kernel offers (`UFFD_API_FEATURES` on 6.18 x86_64).
pub const OFFERED_FEATURES: u64 = 0x1ffff;
/// What the proposed semantics offers beyond it: `UFFD_FEATURE_WP_REPORT` and
/// `UFFD_FEATURE_WP_SKIP_PINNED` (kernel/README.md).
pub const PROPOSED_FEATURES: u64 = Features::WP_REPORT.0 | Features::WP_SKIP_PINNED.0;
pub(crate) const F_SIGBUS: Features = Features(1 << 7);
pub(crate) const F_EXACT_ADDRESS: Features = Features(1 << 11);

/// What backs a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (`vma_is_anonymous()`).
    Anon,
    /// A shared mapping of a shmem object (memfd): page cache, `vma_is_shmem()`.
    Shmem {
        /// The object.
        obj: u64,
        /// Page offset of the VMA's start in the object.
        pgoff: u64,
    },
    /// A regular file mapping (page cache, not shmem).
    File {
        /// The object.
        obj: u64,
        /// Page offset of the VMA's start in the object.
        pgoff: u64,
        /// `MAP_SHARED` (else `MAP_PRIVATE`: writes copy into anonymous pages).
        shared: bool,
    },
    /// Private anonymous hugetlb memory with 2 MiB pages.
    Hugetlb,
}

/// Per-VMA THP advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Thp {
    /// No advice.
    #[default]
    Default,
    /// `MADV_HUGEPAGE`.
    Huge,
    /// `MADV_NOHUGEPAGE`.
    NoHuge,
}

/// The uffd registration of a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaUffd {
    /// The context.
    pub ctx: u64,
    /// `UFFDIO_REGISTER_MODE_*` bits (`VM_UFFD_*`).
    pub mode: u64,
}

/// A VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// What backs it.
    pub backing: Backing,
    /// THP advice.
    pub thp: Thp,
    /// Registration, if any.
    pub uffd: Option<VmaUffd>,
    /// The `anon_vma` (an id), set by the first fault that installs an anonymous page or, for
    /// a THP-eligible block, reaches do_huge_pmd_anonymous_page() (vmf_anon_prepare()); two
    /// VMAs with different ones never merge (is_mergeable_anon_vma(), mm/vma.c).
    pub anon_vma: Option<u64>,
}

impl Vma {
    /// `vma_is_anonymous()`.
    pub fn is_anon(&self) -> bool {
        matches!(self.backing, Backing::Anon)
    }
    /// `is_vm_hugetlb_page()`.
    pub fn is_hugetlb(&self) -> bool {
        matches!(self.backing, Backing::Hugetlb)
    }
    /// `vma_is_shmem()`.
    pub fn is_shmem(&self) -> bool {
        matches!(self.backing, Backing::Shmem { .. })
    }
    /// `userfaultfd_wp()`.
    pub fn uffd_wp(&self) -> bool {
        self.uffd.is_some_and(|u| u.mode & MODE_WP != 0)
    }
    /// `userfaultfd_missing()`.
    pub fn uffd_missing(&self) -> bool {
        self.uffd.is_some_and(|u| u.mode & MODE_MISSING != 0)
    }
    /// The object and page offset backing `addr`, for page-cache VMAs.
    pub(crate) fn object_page(&self, addr: u64) -> Option<(u64, u64)> {
        match self.backing {
            Backing::Shmem { obj, pgoff } | Backing::File { obj, pgoff, .. } => {
                Some((obj, pgoff + (addr - self.start) / PAGE))
            }
            _ => None,
        }
    }
    /// A private mapping whose writes go to anonymous pages.
    pub(crate) fn cow(&self) -> bool {
        matches!(
            self.backing,
            Backing::Anon | Backing::File { shared: false, .. }
        )
    }
}

/// A shmem or file object (its page cache).
#[derive(Debug, Clone)]
pub(crate) struct Object {
    pub size: u64,
    pub pages: HashMap<u64, FrameId>,
}

/// A userfaultfd context.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// Enabled features (`ctx->features`).
    pub features: Features,
    /// `UFFD_USER_MODE_ONLY`.
    pub user_mode_only: bool,
    /// `ctx->mmap_changing`: non-cooperative events in flight.
    pub mmap_changing: u32,
    /// Unread page-fault messages, oldest first (`fault_pending_wqh`): access ids.
    pub faults: VecDeque<u64>,
    /// Unread non-cooperative events, oldest first (`event_wqh`).
    pub events: VecDeque<(Event, u64)>,
    /// Closed (`ctx->released`).
    pub released: bool,
}

impl Ctx {
    pub(crate) fn wp_async(&self) -> bool {
        self.features.contains(Features::WP_ASYNC)
    }
}

/// A page access or call that is waiting for the monitor.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub op: PendingOp,
    pub tid: u32,
    pub kernel: bool,
    pub blocked: Option<Blocked>,
}

/// Where a pending access is blocked in `handle_userfault()`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocked {
    pub ctx: u64,
    /// The message's address (page aligned unless EXACT_ADDRESS).
    pub msg_addr: u64,
    /// The faulting page, for wake ranges (`uwq->msg.arg.pagefault.address`).
    pub wake_addr: u64,
    pub flags: u64,
    /// Still in the unread queue.
    pub unread: bool,
}

/// What a pending access still has to do.
#[derive(Debug, Clone)]
pub(crate) enum PendingOp {
    Write {
        addr: u64,
        data: Vec<u8>,
        done: usize,
    },
    Read {
        addr: u64,
        buf: Vec<u8>,
        done: usize,
    },
    Touch {
        next: u64,
        end: u64,
        write: bool,
    },
    Pin {
        start: u64,
        end: u64,
        next: u64,
        write: bool,
        longterm: bool,
        frames: Vec<FrameId>,
    },
    /// `MADV_DONTNEED` of `[next, end)` (waiting for the monitor to read `UFFD_EVENT_REMOVE`
    /// for the VMA at `next` when blocked); `gap`: the range has a hole (ENOMEM at the end).
    Dontneed {
        next: u64,
        end: u64,
        gap: bool,
    },
    /// `munmap()` waiting for the monitor to read its `UFFD_EVENT_UNMAP` messages.
    Unmap {
        events_left: u32,
    },
}

/// How a finished access ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// A write, touch, madvise or munmap completed.
    Done,
    /// A read completed with these bytes.
    Read(Vec<u8>),
    /// A pin completed.
    Pinned(u64),
    /// It failed (EFAULT for SIGBUS, ENOMEM for OOM, ...).
    Failed(Errno),
}

/// A pin (`pin_user_pages()`).
#[derive(Debug, Clone)]
pub(crate) struct PinRec {
    pub start: u64,
    pub frames: Vec<FrameId>,
    pub write: bool,
    pub longterm: bool,
}

/// The kernel.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    pub cfg: ModelConfig,
    pub vmas: BTreeMap<u64, Vma>,
    pub pt: PageTables,
    pub alloc: PtAllocator,
    pub frames: Frames,
    pub objects: HashMap<u64, Object>,
    next_object: u64,
    pub swap: HashMap<u64, PageData>,
    next_slot: u64,
    pub ctxs: BTreeMap<u64, Ctx>,
    next_ctx: u64,
    next_anon_vma: u64,
    pub pending: BTreeMap<u64, Pending>,
    pub completed: BTreeMap<u64, Completion>,
    pub next_access: u64,
    pub pins: BTreeMap<u64, PinRec>,
    pub next_pin: u64,
    pub alive: bool,
    /// Soft-dirty state (with `cfg.soft_dirty`): VMAs created since the last clear
    /// (`VM_SOFTDIRTY`) and pages written since.
    pub sd_vmas: uffd_wp::range::RangeSet,
    pub sd_pages: std::collections::BTreeSet<u64>,
}

/// How to zap (`struct zap_details`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Zap {
    /// `ZAP_FLAG_DROP_MARKER` (munmap): uffd-wp markers go too.
    pub drop_markers: bool,
    /// `details->reclaim_pt` (MADV_DONTNEED with CONFIG_PT_RECLAIM): free a PTE table the zap
    /// emptied entirely.
    pub reclaim_pt: bool,
}

/// `validate_range()` / `validate_unaligned_range()` (fs/userfaultfd.c).
pub(crate) fn validate_range(start: u64, len: u64) -> Result<(), Errno> {
    if start % PAGE != 0 || len % PAGE != 0 || len == 0 {
        return Err(Errno::INVAL);
    }
    if !(MMAP_MIN_ADDR..TASK_SIZE).contains(&start) || len > TASK_SIZE - start {
        return Err(Errno::INVAL);
    }
    Ok(())
}

impl Kernel {
    pub(crate) fn new(cfg: ModelConfig) -> Kernel {
        Kernel {
            cfg,
            vmas: BTreeMap::new(),
            pt: PageTables::default(),
            alloc: PtAllocator::default(),
            frames: Frames::default(),
            objects: HashMap::new(),
            next_object: 1,
            swap: HashMap::new(),
            next_slot: 1,
            ctxs: BTreeMap::new(),
            next_ctx: 1,
            next_anon_vma: 1,
            pending: BTreeMap::new(),
            completed: BTreeMap::new(),
            next_access: 1,
            pins: BTreeMap::new(),
            next_pin: 1,
            alive: true,
            sd_vmas: uffd_wp::range::RangeSet::new(),
            sd_pages: std::collections::BTreeSet::new(),
        }
    }

    /// Whether pagemap shows `a` soft-dirty (pagemap_pte_range(): `VM_SOFTDIRTY` or the PTE's
    /// own bit).
    pub(crate) fn soft_dirty_at(&self, a: u64) -> bool {
        self.cfg.soft_dirty
            && (self.sd_vmas.contains(a) || self.sd_pages.contains(&(a & !(PAGE - 1))))
    }

    /// `clear_refs` 4 (clear_soft_dirty()): EOPNOTSUPP-like refusal without the config.
    pub(crate) fn clear_soft_dirty(&mut self) -> Result<(), Errno> {
        if !self.cfg.soft_dirty {
            return Err(Errno::OPNOTSUPP);
        }
        self.sd_vmas = uffd_wp::range::RangeSet::new();
        self.sd_pages.clear();
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // VMAs

    /// The VMA containing `addr`.
    pub(crate) fn vma_at(&self, addr: u64) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end)
    }

    /// The VMAs intersecting `[start, end)`, in order (copies).
    pub(crate) fn vmas_in(&self, start: u64, end: u64) -> Vec<Vma> {
        let first = self
            .vmas
            .range(..start)
            .next_back()
            .filter(|(_, v)| v.end > start)
            .map(|(k, _)| *k)
            .unwrap_or(start);
        self.vmas
            .range(first..end)
            .map(|(_, v)| *v)
            .filter(|v| v.end > start)
            .collect()
    }

    /// Splits the VMA containing `addr` so that a VMA starts at `addr`.
    pub(crate) fn split_at(&mut self, addr: u64) {
        let Some(v) = self.vma_at(addr).copied() else {
            return;
        };
        if v.start == addr {
            return;
        }
        // vma_adjust_trans_huge(): a PMD-mapped THP across the new boundary is split.
        if addr % PMD != 0
            && let Some(p) = self.pt.pmd_mut(addr)
            && matches!(p, Pmd::Thp(_))
        {
            Self::split_thp(p);
        }
        let mut lo = v;
        let mut hi = v;
        lo.end = addr;
        hi.start = addr;
        let shift = (addr - v.start) / PAGE;
        hi.backing = match v.backing {
            Backing::Shmem { obj, pgoff } => Backing::Shmem {
                obj,
                pgoff: pgoff + shift,
            },
            Backing::File { obj, pgoff, shared } => Backing::File {
                obj,
                pgoff: pgoff + shift,
                shared,
            },
            b => b,
        };
        self.vmas.insert(lo.start, lo);
        self.vmas.insert(hi.start, hi);
    }

    /// Sets a VMA attribute over `[start, end)`, splitting VMAs at the ends.
    ///
    /// Then merges what has become mergeable, as vma_modify() does for each VMA it changes
    /// (with its neighbours before and after). Merging the whole range and its two neighbours
    /// gives the same VMAs: two adjacent VMAs only become mergeable when one of them is
    /// modified (a fault can set an `anon_vma`, which only makes merging less likely).
    fn modify_vmas(&mut self, start: u64, end: u64, f: impl Fn(&mut Vma)) {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.vmas.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(v) = self.vmas.get_mut(&k) {
                f(v);
            }
        }
        self.merge_vmas(start, end);
    }

    /// Whether `b`, which starts where `a` ends, can be merged into `a`
    /// (is_mergeable_vma() and is_mergeable_anon_vma(), mm/vma.c 6.18): same flags (THP
    /// advice, uffd modes), same uffd context, same file with contiguous offsets, and
    /// compatible `anon_vma`s (equal, or at most one set: no fork here, so
    /// vma_had_uncowed_parents() is false). Anonymous VMAs' offsets are their addresses, so
    /// always contiguous. Each hugetlb mapping is its own file here.
    fn mergeable(a: &Vma, b: &Vma) -> bool {
        let pages = (a.end - a.start) / PAGE;
        let backing = match (a.backing, b.backing) {
            (Backing::Anon, Backing::Anon) => true,
            (Backing::Shmem { obj, pgoff }, Backing::Shmem { obj: o2, pgoff: p2 }) => {
                obj == o2 && pgoff + pages == p2
            }
            (
                Backing::File { obj, pgoff, shared },
                Backing::File {
                    obj: o2,
                    pgoff: p2,
                    shared: s2,
                },
            ) => obj == o2 && shared == s2 && pgoff + pages == p2,
            _ => false,
        };
        let anon = match (a.anon_vma, b.anon_vma) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        };
        a.end == b.start && backing && anon && a.thp == b.thp && a.uffd == b.uffd
    }

    /// Merges every mergeable pair of adjacent VMAs from the one before `start` to the one
    /// after `end`.
    fn merge_vmas(&mut self, start: u64, end: u64) {
        let from = self
            .vmas
            .range(..start)
            .next_back()
            .map_or(start, |(k, _)| *k);
        let mut keys: Vec<u64> = self.vmas.range(from..=end).map(|(k, _)| *k).collect();
        if let Some((k, _)) = self.vmas.range(end + 1..).next() {
            keys.push(*k);
        }
        let mut cur: Option<u64> = None;
        for k in keys {
            let Some(b) = self.vmas.get(&k).copied() else {
                continue;
            };
            if let Some(ka) = cur
                && let Some(a) = self.vmas.get_mut(&ka)
                && Self::mergeable(a, &b)
            {
                a.end = b.end;
                a.anon_vma = a.anon_vma.or(b.anon_vma);
                self.vmas.remove(&k);
                continue;
            }
            cur = Some(k);
        }
    }

    /// anon_vma_prepare() for the VMA containing `addr`.
    pub(crate) fn anon_vma_prepare(&mut self, addr: u64) {
        let id = self.next_anon_vma;
        if let Some((_, v)) = self.vmas.range_mut(..=addr).next_back()
            && addr < v.end
            && v.anon_vma.is_none()
        {
            v.anon_vma = Some(id);
            self.next_anon_vma += 1;
        }
    }

    /// Whether THP may back the 2 MiB block at `addr` in `vma` (anonymous only: shmem THP is
    /// `never` on this project's machines).
    pub(crate) fn thp_eligible(&self, vma: &Vma, addr: u64) -> bool {
        let base = addr & !(PMD - 1);
        let on = match (self.cfg.thp, vma.thp) {
            (ThpSysfs::Never, _) | (_, Thp::NoHuge) => false,
            (ThpSysfs::Always, _) => true,
            (ThpSysfs::Madvise, t) => t == Thp::Huge,
        };
        on && vma.is_anon() && base >= vma.start && base + PMD <= vma.end
    }

    /// The context a VMA is registered with.
    pub(crate) fn vma_ctx(&self, vma: &Vma) -> Option<&Ctx> {
        vma.uffd.and_then(|u| self.ctxs.get(&u.ctx))
    }

    /// `userfaultfd_wp_use_markers()`: a WP-registered VMA that is file-backed (shmem, file,
    /// hugetlb), or anonymous with `UFFD_FEATURE_WP_UNPOPULATED`.
    pub(crate) fn use_markers(&self, vma: &Vma) -> bool {
        if !vma.uffd_wp() {
            return false;
        }
        if !vma.is_anon() {
            return true;
        }
        self.vma_ctx(vma)
            .is_some_and(|c| c.features.contains(Features::WP_UNPOPULATED))
    }

    /// `userfaultfd_wp_async()`.
    pub(crate) fn vma_wp_async(&self, vma: &Vma) -> bool {
        self.vma_ctx(vma).is_some_and(Ctx::wp_async)
    }

    // ------------------------------------------------------------------------------------
    // mmap / munmap

    /// A free, `align`-aligned range of `len` bytes, first fit from [`MMAP_BASE`].
    fn find_free(&self, len: u64, align: u64) -> Option<u64> {
        let align = align.max(PAGE);
        let mut cand = MMAP_BASE.next_multiple_of(align);
        for v in self.vmas.values() {
            if v.end <= cand {
                continue;
            }
            if v.start >= cand.checked_add(len)? {
                break;
            }
            cand = v.end.next_multiple_of(align);
        }
        (cand.checked_add(len)? <= TASK_SIZE).then_some(cand)
    }

    /// A new object (memfd or file: the VMA says which) of `size` bytes.
    pub(crate) fn new_object(&mut self, size: u64) -> u64 {
        let id = self.next_object;
        self.next_object += 1;
        self.objects.insert(
            id,
            Object {
                size,
                pages: HashMap::new(),
            },
        );
        id
    }

    /// `mmap()`: a new VMA at `addr` (MAP_FIXED, replacing what was there) or at a free
    /// `align`-aligned place.
    pub(crate) fn mmap(
        &mut self,
        addr: Option<u64>,
        len: u64,
        align: u64,
        backing: Backing,
        thp: Thp,
    ) -> Result<Range, Errno> {
        if len == 0 || !align.is_power_of_two() {
            return Err(Errno::INVAL);
        }
        let len = len.checked_next_multiple_of(PAGE).ok_or(Errno::NOMEM)?;
        if matches!(backing, Backing::Hugetlb)
            && (len % PMD != 0 || addr.is_some_and(|a| a % PMD != 0))
        {
            return Err(Errno::INVAL);
        }
        let align = if matches!(backing, Backing::Hugetlb) {
            align.max(PMD)
        } else {
            align
        };
        let start = match addr {
            Some(a) => {
                if a % PAGE != 0 || a < MMAP_MIN_ADDR || a > TASK_SIZE - len.min(TASK_SIZE) {
                    return Err(Errno::INVAL);
                }
                self.munmap_now(a, a + len)?;
                a
            }
            None => self.find_free(len, align).ok_or(Errno::NOMEM)?,
        };
        // Mapping past the end of an object is allowed; faults there raise SIGBUS.
        if let Backing::Shmem { obj, .. } | Backing::File { obj, .. } = backing
            && !self.objects.contains_key(&obj)
        {
            return Err(Errno::BADF);
        }
        self.vmas.insert(
            start,
            Vma {
                start,
                end: start + len,
                backing,
                thp,
                uffd: None,
                anon_vma: None,
            },
        );
        // vma_merge_new_range() in __mmap_region().
        self.merge_vmas(start, start + len);
        let r = Range::from_bounds(start, start + len);
        if self.cfg.soft_dirty {
            self.sd_vmas.insert(r);
        }
        Ok(r)
    }

    /// `munmap()`: returns the number of `UFFD_EVENT_UNMAP` messages queued (the caller blocks
    /// until they are read).
    pub(crate) fn munmap(&mut self, start: u64, len: u64) -> Result<Vec<u64>, Errno> {
        if start % PAGE != 0 || len == 0 {
            return Err(Errno::INVAL);
        }
        let len = len.checked_next_multiple_of(PAGE).ok_or(Errno::INVAL)?;
        let end = start.checked_add(len).ok_or(Errno::INVAL)?;
        if end > TASK_SIZE {
            return Err(Errno::INVAL);
        }
        // userfaultfd_unmap_prep(): one event per context with UFFD_FEATURE_EVENT_UNMAP.
        let mut ctxs: Vec<u64> = Vec::new();
        for v in self.vmas_in(start, end) {
            if let Some(u) = v.uffd
                && self
                    .ctxs
                    .get(&u.ctx)
                    .is_some_and(|c| c.features.contains(Features::EVENT_UNMAP))
                && !ctxs.contains(&u.ctx)
            {
                ctxs.push(u.ctx);
            }
        }
        self.munmap_now(start, end)?;
        for &c in &ctxs {
            if let Some(ctx) = self.ctxs.get_mut(&c) {
                ctx.mmap_changing += 1;
            }
        }
        Ok(ctxs)
    }

    /// Unmaps `[start, end)` without events.
    pub(crate) fn munmap_now(&mut self, start: u64, end: u64) -> Result<(), Errno> {
        let vmas = self.vmas_in(start, end);
        // A hugetlb VMA can only be split at huge page boundaries (hugetlb_vm_op_split()).
        for v in &vmas {
            if v.is_hugetlb()
                && ((start > v.start && start % PMD != 0) || (end < v.end && end % PMD != 0))
            {
                return Err(Errno::INVAL);
            }
        }
        self.split_at(start);
        self.split_at(end);
        let zap = Zap {
            drop_markers: true,
            reclaim_pt: false,
        };
        for v in self.vmas_in(start, end) {
            self.zap_range(&v, v.start, v.end, zap);
            self.vmas.remove(&v.start);
        }
        self.free_pgtables(start, end);
        Ok(())
    }

    /// `free_pgtables()`: frees the tables covering `[start, end)` that no VMA uses any more.
    fn free_pgtables(&mut self, start: u64, end: u64) {
        let used = |k: &Kernel, s: u64, e: u64| !k.vmas_in(s, e).is_empty();
        let mut a = start & !(PGDIR - 1);
        while a < end {
            let gnext = a.saturating_add(PGDIR);
            let gi = pgd_index(a);
            if self.pt.pgd[gi].is_some() {
                let mut u = a.max(start & !(PUD - 1));
                while u < gnext.min(end) {
                    let unext = u + PUD;
                    let ui = pud_index(u);
                    let has = self.pt.pgd[gi].as_ref().is_some_and(|t| t.e[ui].is_some());
                    if has {
                        let mut m = u.max(start & !(PMD - 1));
                        while m < unext.min(end) {
                            let mnext = m + PMD;
                            if !used(self, m, mnext) {
                                let pmdt = self.pt.pgd[gi].as_mut().and_then(|t| t.e[ui].as_mut());
                                if let Some(t) = pmdt {
                                    let e = &mut t.e[pmd_index(m)];
                                    if matches!(e, Pmd::Table(_) | Pmd::Thp(_)) {
                                        self.alloc.free(Level::Pte);
                                    }
                                    *e = Pmd::None;
                                }
                            }
                            m = mnext;
                        }
                        if !used(self, u, unext) {
                            let t = self.pt.pgd[gi].as_mut().expect("checked");
                            if let Some(pm) = t.e[ui].take() {
                                for e in pm.e.iter() {
                                    if matches!(e, Pmd::Table(_) | Pmd::Thp(_)) {
                                        self.alloc.free(Level::Pte);
                                    }
                                }
                                self.alloc.free(Level::Pmd);
                            }
                        }
                    }
                    u = unext;
                }
                if !used(self, a, gnext) && self.pt.pgd[gi].take().is_some() {
                    self.alloc.free(Level::Pud);
                }
            }
            a = gnext;
            if a == 0 {
                break;
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // zap (mm/memory.c: zap_pte_range(), zap_huge_pmd(); mm/hugetlb.c: __unmap_hugepage_range())

    /// Splits a PMD-mapped THP into a PTE table (the deposited one: no allocation), keeping the
    /// uffd-wp bit on every PTE (`__split_huge_pmd()`).
    pub(crate) fn split_thp(pmd: &mut Pmd) {
        if let Pmd::Thp(h) = *pmd {
            let mut t = crate::pt::PteTable::new();
            for (i, e) in t.e.iter_mut().enumerate() {
                let frame = if is_zero_frame(h.base) {
                    crate::pt::ZERO_FRAME
                } else {
                    h.base + i as u64
                };
                *e = Pte::Present { frame, wp: h.wp };
            }
            *pmd = Pmd::Table(t);
        }
    }

    /// Zaps `[start, end)` of `vma` (within it), one PMD entry at a time (zap_pmd_range()).
    pub(crate) fn zap_range(&mut self, vma: &Vma, start: u64, end: u64, zap: Zap) {
        if start >= end {
            return;
        }
        let mut a = start;
        while a < end {
            let next = addr_end(a, end, PMD);
            let Some(pmd) = self.pt.pmd_mut(a) else {
                // No PMD table here: skip to the next PUD.
                a = addr_end(a, end, PUD);
                continue;
            };
            match pmd {
                Pmd::None => {}
                Pmd::Hugetlb(_) | Pmd::HugetlbMarker => {
                    Self::unmap_hugepage_range(pmd, zap, &mut self.frames);
                }
                Pmd::Thp(_) if next - a == PMD => {
                    Self::zap_huge_pmd(pmd, &mut self.alloc, &mut self.frames);
                }
                Pmd::Thp(_) | Pmd::Table(_) => {
                    Self::split_thp(pmd);
                    let Pmd::Table(t) = pmd else { unreachable!() };
                    let freed = Self::zap_pte_range(vma, t, a, next, zap, &mut self.swap);
                    // CONFIG_PT_RECLAIM: a whole table zapped to none is freed.
                    if zap.reclaim_pt && next - a == PMD && t.all_none() {
                        *pmd = Pmd::None;
                        self.alloc.free(Level::Pte);
                    }
                    for f in freed {
                        self.frames.unmap_one(f);
                    }
                }
            }
            a = next;
        }
    }

    /// __unmap_hugepage_range() for one hugetlb entry: keeps a marker for a wr-protected page
    /// unless ZAP_FLAG_DROP_MARKER.
    fn unmap_hugepage_range(pmd: &mut Pmd, zap: Zap, frames: &mut Frames) {
        match *pmd {
            Pmd::Hugetlb(h) => {
                *pmd = if h.wp && !zap.drop_markers {
                    Pmd::HugetlbMarker
                } else {
                    Pmd::None
                };
                for i in 0..HPAGE_NR {
                    frames.unmap_one(h.base + i);
                }
            }
            Pmd::HugetlbMarker if zap.drop_markers => *pmd = Pmd::None,
            _ => {}
        }
    }

    /// zap_huge_pmd(): the THP and its deposited table go.
    fn zap_huge_pmd(pmd: &mut Pmd, alloc: &mut PtAllocator, frames: &mut Frames) {
        let Pmd::Thp(h) = *pmd else {
            return;
        };
        *pmd = Pmd::None;
        alloc.free(Level::Pte);
        if !is_zero_frame(h.base) {
            for i in 0..HPAGE_NR {
                frames.unmap_one(h.base + i);
            }
        }
    }

    /// zap_pte_range() over `[a, next)` of the PTE table `t` of `vma`: clears the entries
    /// (keeping a marker for a wr-protected page of a file VMA registered for WP, unless
    /// ZAP_FLAG_DROP_MARKER) and frees swap slots; returns the frames to unmap.
    fn zap_pte_range(
        vma: &Vma,
        t: &mut PteTable,
        a: u64,
        next: u64,
        zap: Zap,
        swap: &mut HashMap<u64, PageData>,
    ) -> Vec<FrameId> {
        let keep_wp = !vma.is_anon() && !zap.drop_markers && vma.uffd_wp();
        let mut freed = Vec::new();
        for i in pte_index(a)..pte_index(a) + ((next - a) / PAGE) as usize {
            let e = &mut t.e[i];
            match *e {
                Pte::None => {}
                Pte::Present { frame, wp } => {
                    *e = if keep_wp && wp {
                        Pte::Marker
                    } else {
                        Pte::None
                    };
                    if !is_zero_frame(frame) {
                        freed.push(frame);
                    }
                }
                Pte::Swap { slot, .. } => {
                    swap.remove(&slot);
                    *e = Pte::None;
                }
                Pte::Marker => {
                    // For anon: always drop the marker; for file: only if asked.
                    if vma.is_anon() || zap.drop_markers {
                        *e = Pte::None;
                    }
                }
            }
        }
        freed
    }

    // ------------------------------------------------------------------------------------
    // madvise

    /// The VMAs of an madvise range, or ENOMEM for a gap (reported after the mapped parts are
    /// done, as madvise_walk_vmas() does).
    fn madvise_check(&self, start: u64, len: u64) -> Result<(u64, bool), Errno> {
        if start % PAGE != 0 {
            return Err(Errno::INVAL);
        }
        let len = len.checked_next_multiple_of(PAGE).ok_or(Errno::INVAL)?;
        let end = start.checked_add(len).ok_or(Errno::INVAL)?;
        let covered: u64 = self
            .vmas_in(start, end)
            .iter()
            .map(|v| v.end.min(end) - v.start.max(start))
            .sum();
        Ok((end, covered < len))
    }

    /// `MADV_DONTNEED` from `next` to `end`: returns the context to notify (and block on) with
    /// `UFFD_EVENT_REMOVE` before zapping the VMA at `next`, if any. `notified` says the event
    /// for the VMA at `next` was already read.
    pub(crate) fn dontneed_from(
        &mut self,
        mut next: u64,
        end: u64,
        mut notified: bool,
    ) -> Result<Option<(u64, u64, u64)>, Errno> {
        while next < end {
            let Some(v) = self.vmas_in(next, end).first().copied() else {
                break;
            };
            let s = v.start.max(next);
            let mut e = v.end.min(end);
            if !notified
                && let Some(u) = v.uffd
                && self
                    .ctxs
                    .get(&u.ctx)
                    .is_some_and(|c| c.features.contains(Features::EVENT_REMOVE))
            {
                // userfaultfd_remove(): mmap_changing++, queue the event, wait for the read.
                return Ok(Some((u.ctx, s, e)));
            }
            notified = false;
            if v.is_hugetlb() {
                // madvise_dontneed_free_valid_vma(): huge-aligned start, end rounded down.
                if s % PMD != 0 {
                    return Err(Errno::INVAL);
                }
                e &= !(PMD - 1);
            }
            self.zap_range(
                &v,
                s,
                e,
                Zap {
                    drop_markers: false,
                    reclaim_pt: true,
                },
            );
            next = v.end.min(end);
        }
        Ok(None)
    }

    pub(crate) fn dontneed_check(&self, start: u64, len: u64) -> Result<(u64, bool), Errno> {
        self.madvise_check(start, len)
    }

    /// `MADV_PAGEOUT` (mm/madvise.c madvise_pageout(), madvise_cold_or_pageout_pte_range(),
    /// then reclaim): anonymous pages go to swap (if there is swap) unless pinned; shmem and file
    /// pages are unmapped (a wr-protected one leaves a uffd-wp marker); a THP the call reaches
    /// is split first (see [`Kernel::split_anon_folio`]).
    pub(crate) fn pageout(&mut self, start: u64, len: u64) -> Result<(), Errno> {
        let (end, gap) = self.madvise_check(start, len)?;
        for v in self.vmas_in(start, end) {
            if v.is_hugetlb() {
                // can_madv_lru_vma()
                return Err(Errno::INVAL);
            }
            let s = v.start.max(start);
            let e = v.end.min(end);
            self.pageout_vma(&v, s, e);
        }
        if gap { Err(Errno::NOMEM) } else { Ok(()) }
    }

    /// The head of the large folio `f` belongs to, if it belongs to one.
    fn large_folio_head(&self, f: FrameId) -> Option<FrameId> {
        let head = self.frames.map.get(&f)?.folio;
        if head != f {
            return Some(head);
        }
        (f % HPAGE_NR == 0
            && (1..HPAGE_NR).any(|i| self.frames.map.get(&(f + i)).is_some_and(|t| t.folio == f)))
        .then_some(f)
    }

    /// split_folio() of the anonymous THP `head`, PTE-mapped by the table of the PMD at
    /// `pmd_base` (mm/huge_memory.c __folio_split()): its pages become small folios, and every
    /// mapped page that is all zeros is replaced by the shared zero page, keeping its uffd-wp
    /// bit (remap_page() with `RMP_USE_SHARED_ZEROPAGE` -> try_to_map_unused_to_zeropage(),
    /// mm/migrate.c; seen on the 6.18 machine: such pages stay present, and a later
    /// `MADV_PAGEOUT` skips them).
    fn split_anon_folio(&mut self, pmd_base: u64, head: FrameId) {
        for i in 0..HPAGE_NR {
            if let Some(f) = self.frames.map.get_mut(&(head + i))
                && f.folio == head
            {
                f.folio = head + i;
            }
        }
        // Pages no longer mapped (zapped from the THP before) are freed with the split.
        for i in 0..HPAGE_NR {
            self.frames.maybe_free(head + i);
        }
        let Some(Pmd::Table(t)) = self.pt.pmd_mut(pmd_base) else {
            return;
        };
        let mut zeroed = Vec::new();
        for e in t.e.iter_mut() {
            if let Pte::Present { frame, wp } = *e
                && (head..head + HPAGE_NR).contains(&frame)
                && self
                    .frames
                    .map
                    .get(&frame)
                    .is_some_and(|f| f.anon && f.data.is_zero())
            {
                *e = Pte::Present {
                    frame: ZERO_FRAME,
                    wp,
                };
                zeroed.push(frame);
            }
        }
        for f in zeroed {
            self.frames.unmap_one(f);
        }
    }

    /// madvise_cold_or_pageout_pte_range() over `[s, e)` of `v`, then the reclaim of what it
    /// isolated, one PMD entry at a time.
    fn pageout_vma(&mut self, v: &Vma, s: u64, e: u64) {
        let mut a = s;
        while a < e {
            let next = addr_end(a, e, PMD);
            let pmd_base = a & !(PMD - 1);
            let whole = a == pmd_base && next == pmd_base + PMD;
            let Some(pmd) = self.pt.pmd(a) else {
                a = addr_end(a, e, PUD);
                continue;
            };
            if let Pmd::Thp(h) = *pmd
                && !self.pageout_split_huge_pmd(pmd_base, h, whole)
            {
                a = next;
                continue;
            }
            self.pageout_split_pte_folios(a, next, whole);
            self.pageout_pte_range(v, a, next);
            a = next;
        }
    }

    /// The PMD-mapped THP `h` at `pmd_base` in madvise_cold_or_pageout_pte_range(): split (the
    /// PMD and the folio) unless it is left alone; returns whether its PTEs are then paged out.
    fn pageout_split_huge_pmd(&mut self, pmd_base: u64, h: Huge, whole: bool) -> bool {
        if is_zero_frame(h.base) || self.frames.pinned(h.base) {
            // The huge zero page has no folio to reclaim (is_huge_zero_pmd()); a pinned THP
            // cannot be split (can_split_folio()) nor swapped.
            return false;
        }
        if whole && !self.cfg.swap {
            return false;
        }
        // Part of the THP: split_folio() in madvise_cold_or_pageout_pte_range(). All of it,
        // with swap: shrink_folio_list() cannot get a THP-sized swap cluster from a swap device
        // that is not an SSD (thp_swpout_fallback in /proc/vmstat: this project's swapfile on a
        // rotational disk) and falls back to split_folio_to_list(); either way the PMD is split
        // and the folio with it.
        if let Some(pmd) = self.pt.pmd_mut(pmd_base) {
            Self::split_thp(pmd);
        }
        self.split_anon_folio(pmd_base, h.base);
        true
    }

    /// PTE-mapped THPs with a page in `[a, next)`: split first, like a PMD-mapped one
    /// (madvise_folio_pte_batch() short of the folio -> split_folio(); all of it -> the reclaim
    /// fallback of [`Kernel::pageout_split_huge_pmd`], with swap).
    fn pageout_split_pte_folios(&mut self, a: u64, next: u64, whole: bool) {
        let Some(Pmd::Table(t)) = self.pt.pmd(a) else {
            return;
        };
        let mut frames = Vec::new();
        for i in pte_index(a)..pte_index(a) + ((next - a) / PAGE) as usize {
            if let Pte::Present { frame, .. } = t.e[i]
                && !is_zero_frame(frame)
                && !frames.contains(&frame)
            {
                frames.push(frame);
            }
        }
        let mut heads = Vec::new();
        for f in frames {
            if let Some(h) = self.large_folio_head(f)
                && !heads.contains(&h)
            {
                heads.push(h);
            }
        }
        let pmd_base = a & !(PMD - 1);
        for h in heads {
            if !self.frames.pinned(h) && (self.cfg.swap || !whole) {
                self.split_anon_folio(pmd_base, h);
            }
        }
    }

    /// shrink_folio_list() for the small folios mapped in `[a, next)`: an anonymous page goes to
    /// swap (add_to_swap()) if there is swap and it is neither shared nor pinned; a page cache
    /// page is unmapped, a uffd-wp bit surviving as a marker (try_to_unmap_one()).
    fn pageout_pte_range(&mut self, v: &Vma, a: u64, next: u64) {
        let swap = self.cfg.swap;
        let Some(Pmd::Table(t)) = self.pt.pmd_mut(a) else {
            return;
        };
        let mut to_unmap = Vec::new();
        for i in pte_index(a)..pte_index(a) + ((next - a) / PAGE) as usize {
            let Pte::Present { frame, wp } = t.e[i] else {
                continue;
            };
            if is_zero_frame(frame) {
                continue;
            }
            let Some(f) = self.frames.map.get(&frame) else {
                continue;
            };
            if f.anon {
                if !swap || f.mapcount > 1 || self.frames.pinned(frame) {
                    continue;
                }
                let slot = self.next_slot;
                self.next_slot += 1;
                self.swap.insert(slot, f.data.clone());
                t.e[i] = Pte::Swap { slot, wp };
            } else {
                // try_to_unmap_one(): a uffd-wp bit survives as a marker.
                t.e[i] = if wp && v.uffd_wp() {
                    Pte::Marker
                } else {
                    Pte::None
                };
            }
            to_unmap.push(frame);
        }
        for f in to_unmap {
            self.frames.unmap_one(f);
        }
    }

    /// `MADV_HUGEPAGE` / `MADV_NOHUGEPAGE`.
    pub(crate) fn set_thp(&mut self, start: u64, len: u64, thp: Thp) -> Result<(), Errno> {
        let (end, gap) = self.madvise_check(start, len)?;
        self.modify_vmas(start, end, |v| {
            if v.is_anon() {
                v.thp = thp;
            }
        });
        if gap { Err(Errno::NOMEM) } else { Ok(()) }
    }

    // ------------------------------------------------------------------------------------
    // userfaultfd contexts (fs/userfaultfd.c)

    /// `userfaultfd()` + `UFFDIO_API` (userfaultfd_api()).
    /// `UFFD_API_FEATURES` of this kernel.
    pub(crate) fn offered_features(&self) -> u64 {
        match self.cfg.semantics {
            Semantics::Linux => OFFERED_FEATURES,
            Semantics::Proposed => OFFERED_FEATURES | PROPOSED_FEATURES,
        }
    }

    pub(crate) fn open_ctx(&mut self, features: u64, user_mode_only: bool) -> Result<u64, Errno> {
        let mut f = features;
        // WP_ASYNC relies on WP_UNPOPULATED, choose it unconditionally.
        if f & Features::WP_ASYNC.0 != 0 {
            f |= Features::WP_UNPOPULATED.0;
        }
        if f & !self.offered_features() != 0 {
            return Err(Errno::INVAL);
        }
        let id = self.next_ctx;
        self.next_ctx += 1;
        self.ctxs.insert(
            id,
            Ctx {
                features: Features(f),
                user_mode_only,
                mmap_changing: 0,
                faults: VecDeque::new(),
                events: VecDeque::new(),
                released: false,
            },
        );
        Ok(id)
    }

    /// `vma_can_userfault()` (include/linux/userfaultfd_k.h, 6.18).
    fn vma_can_userfault(v: &Vma, mode: u64, wp_async: bool) -> bool {
        if mode & MODE_MINOR != 0 && !v.is_hugetlb() && !v.is_shmem() {
            return false;
        }
        // If wp async enabled, and WP is the only mode enabled, allow any memory type.
        if wp_async && mode == MODE_WP {
            return true;
        }
        v.is_anon() || v.is_hugetlb() || v.is_shmem()
    }

    /// `UFFDIO_REGISTER` (userfaultfd_register()).
    pub(crate) fn register(
        &mut self,
        ctx: u64,
        start: u64,
        len: u64,
        mode: u64,
    ) -> Result<u64, Errno> {
        if mode == 0 || mode & !(MODE_MISSING | MODE_WP | MODE_MINOR) != 0 {
            return Err(Errno::INVAL);
        }
        validate_range(start, len)?;
        if !self.alive {
            return Err(Errno::NOMEM);
        }
        let end = start + len;
        let wp_async = self.ctxs.get(&ctx).is_some_and(Ctx::wp_async);
        let vmas = self.vmas_in(start, end);
        let first = vmas.first().ok_or(Errno::INVAL)?;
        if first.is_hugetlb() && start % PMD != 0 {
            return Err(Errno::INVAL);
        }
        let mut basic = false;
        for cur in &vmas {
            if !Self::vma_can_userfault(cur, mode, wp_async) {
                return Err(Errno::INVAL);
            }
            if cur.is_hugetlb() && end <= cur.end && end > cur.start && end % PMD != 0 {
                return Err(Errno::INVAL);
            }
            if cur.uffd.is_some_and(|u| u.ctx != ctx) {
                return Err(Errno::BUSY);
            }
            basic |= cur.is_hugetlb();
        }
        // userfaultfd_register_range(): a VMA already registered here with at least these modes
        // is left alone; the others are split at the ends and get the new modes (replacing the
        // old ones) and the context.
        for cur in &vmas {
            if cur
                .uffd
                .is_some_and(|u| u.ctx == ctx && u.mode & mode == mode)
            {
                continue;
            }
            let (s, e) = (start.max(cur.start), end.min(cur.end));
            self.modify_vmas(s, e, |v| v.uffd = Some(VmaUffd { ctx, mode }));
        }
        let mut ioctls = if basic {
            RANGE_IOCTLS_BASIC
        } else {
            RANGE_IOCTLS
        };
        if mode & MODE_WP == 0 {
            ioctls &= !IOCTL_WRITEPROTECT;
        }
        if mode & MODE_MINOR == 0 {
            ioctls &= !IOCTL_CONTINUE;
        }
        Ok(ioctls)
    }

    /// Clears the registration of `[s, e)` (userfaultfd_clear_vma()): the uffd-wp bits and
    /// markers of a WP range go (uffd_wp_range(.., false)).
    fn clear_vma_range(&mut self, s: u64, e: u64) {
        for v in self.vmas_in(s, e) {
            let (vs, ve) = (v.start.max(s), v.end.min(e));
            if v.uffd_wp() {
                // Un-protecting never allocates, so it cannot fail.
                let _ = self.uffd_wp_range(&v, vs, ve, false, false, false);
            }
        }
        self.modify_vmas(s, e, |v| v.uffd = None);
    }

    /// `UFFDIO_UNREGISTER` (userfaultfd_unregister()): EINVAL if another context registered a
    /// VMA of the range; blocked faults are woken only for MISSING-mode VMAs (a fault blocked on
    /// a WP-only range waits for `UFFDIO_WAKE`, measured on the 6.18 machine).
    pub(crate) fn unregister(&mut self, ctx: u64, start: u64, len: u64) -> Result<(), Errno> {
        validate_range(start, len)?;
        if !self.alive {
            return Err(Errno::NOMEM);
        }
        let end = start + len;
        let wp_async = self.ctxs.get(&ctx).is_some_and(Ctx::wp_async);
        let vmas = self.vmas_in(start, end);
        let first = vmas.first().ok_or(Errno::INVAL)?;
        if first.is_hugetlb() && start % PMD != 0 {
            return Err(Errno::INVAL);
        }
        for cur in &vmas {
            let mode = cur.uffd.map_or(0, |u| u.mode);
            if !Self::vma_can_userfault(cur, mode, wp_async) {
                return Err(Errno::INVAL);
            }
            // Prevent unregistering through a different userfaultfd than the one used for
            // registration (EINVAL; measured on the 6.18 machine).
            if cur.uffd.is_some_and(|u| u.ctx != ctx) {
                return Err(Errno::INVAL);
            }
            if cur.is_hugetlb() && end <= cur.end && end > cur.start && end % PMD != 0 {
                return Err(Errno::INVAL);
            }
        }
        for cur in &vmas {
            let Some(u) = cur.uffd else { continue };
            let (s, e) = (cur.start.max(start), cur.end.min(end));
            if cur.uffd_missing() {
                self.wake(u.ctx, s, e - s);
            }
            self.clear_vma_range(s, e);
        }
        Ok(())
    }

    /// Closing the uffd (userfaultfd_release()): every VMA registered with it is cleared (its
    /// protection released) and every blocked fault woken.
    pub(crate) fn release(&mut self, ctx: u64) {
        let mine: Vec<(u64, u64)> = self
            .vmas
            .values()
            .filter(|v| v.uffd.is_some_and(|u| u.ctx == ctx))
            .map(|v| (v.start, v.end))
            .collect();
        for (s, e) in mine {
            self.clear_vma_range(s, e);
        }
        if let Some(c) = self.ctxs.get_mut(&ctx) {
            c.released = true;
            c.faults.clear();
        }
        // Pending events of this context complete; blocked faults retry without it.
        let evs: Vec<u64> = self
            .ctxs
            .get_mut(&ctx)
            .map(|c| c.events.drain(..).map(|(_, id)| id).collect())
            .unwrap_or_default();
        for id in evs {
            self.event_consumed(ctx, id);
        }
        self.wake(ctx, 0, 0);
    }

    /// Queues a non-cooperative event for `access` and raises `mmap_changing`.
    pub(crate) fn queue_event(&mut self, ctx: u64, ev: Event, access: u64) {
        if let Some(c) = self.ctxs.get_mut(&ctx) {
            c.events.push_back((ev, access));
        }
    }

    /// The process exits: its mm goes (`mmget_not_zero()` fails from now on).
    pub(crate) fn exit(&mut self) {
        let all: Vec<(u64, u64)> = self.vmas.values().map(|v| (v.start, v.end)).collect();
        for (s, e) in all {
            let _ = self.munmap_now(s, e);
        }
        self.pending.clear();
        for c in self.ctxs.values_mut() {
            c.faults.clear();
        }
        self.alive = false;
    }
}

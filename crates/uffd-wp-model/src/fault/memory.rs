//! The page fault handler: handle_mm_fault() (mm/memory.c) and what it calls, in mm/memory.c,
//! mm/huge_memory.c and mm/hugetlb.c.

use std::collections::HashMap;

use uffd_wp::features::Features;
use uffd_wp::seam::Errno;

use crate::alloc::{Level, PtAllocator};
use crate::kernel::{Blocked, F_EXACT_ADDRESS, F_SIGBUS, Kernel, Object, Vma};
use crate::pt::{
    FrameId, Frames, HPAGE_NR, HUGE_ZERO_FRAME, Huge, PAGE, PageData, Pmd, Pte, PteTable,
    ZERO_FRAME, is_zero_frame, pte_index,
};

/// One step of fault handling.
enum Step {
    /// The page is mapped as the access needs: this frame.
    Done(FrameId),
    /// The fault changed the page tables; retry.
    Retry,
    /// The access waits in handle_userfault().
    Block(Blocked),
}

/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const FLAG_WRITE: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_WP`.
const FLAG_WP: u64 = 2;

/// The fault being handled (`struct vm_fault`).
struct Vmf {
    /// The faulting address.
    addr: u64,
    /// Its page.
    page: u64,
    /// The VMA, as it was when the fault started.
    vma: Vma,
    /// A write fault (`FAULT_FLAG_WRITE`).
    write: bool,
    /// A kernel-mode access (no `FAULT_FLAG_USER`).
    kernel: bool,
    /// The VMA's uffd context: its id, features and `UFFD_USER_MODE_ONLY`.
    ctx: Option<(u64, Features, bool)>,
}

impl Vmf {
    /// userfaultfd_wp_async(): the VMA's context has `UFFD_FEATURE_WP_ASYNC`.
    fn wp_async(&self) -> bool {
        self.ctx
            .is_some_and(|(_, f, _)| f.contains(Features::WP_ASYNC))
    }

    /// handle_userfault(): SIGBUS with UFFD_FEATURE_SIGBUS, or for a kernel-mode fault with
    /// UFFD_USER_MODE_ONLY (the syscall sees EFAULT); else the access waits.
    fn handle_userfault(&self, reason_wp: bool) -> Result<Step, Errno> {
        let (c, feats, user_mode_only) = self.ctx.ok_or(Errno::FAULT)?;
        if feats.contains(F_SIGBUS) || (self.kernel && user_mode_only) {
            return Err(Errno::FAULT);
        }
        let mut flags = if self.write { FLAG_WRITE } else { 0 };
        if reason_wp {
            flags |= FLAG_WP;
        }
        let msg_addr = if feats.contains(F_EXACT_ADDRESS) {
            self.addr
        } else {
            self.page
        };
        Ok(Step::Block(Blocked {
            ctx: c,
            msg_addr,
            wake_addr: msg_addr,
            flags,
            unread: true,
        }))
    }
}

impl Kernel {
    /// handle_mm_fault() for the page of `addr` until it is mapped as the access needs.
    pub(super) fn fault_in(
        &mut self,
        addr: u64,
        write: bool,
        kernel: bool,
    ) -> Result<Result<FrameId, Blocked>, Errno> {
        for _ in 0..8 {
            match self.fault_once(addr, write, kernel)? {
                Step::Done(f) => return Ok(Ok(f)),
                Step::Retry => {}
                Step::Block(b) => return Ok(Err(b)),
            }
        }
        Err(Errno::FAULT)
    }

    /// One pass of the fault handler (__handle_mm_fault()): allocates the tables down to the
    /// PMD and hands the fault to the handler of what the PMD entry holds.
    fn fault_once(&mut self, addr: u64, write: bool, kernel: bool) -> Result<Step, Errno> {
        let vmf = self.vm_fault(addr, write, kernel)?;
        let thp_ok = self.thp_eligible(&vmf.vma, vmf.page);
        self.vmf_anon_prepare(&vmf, thp_ok);
        // pud_alloc(), pmd_alloc() (huge_pte_alloc() for hugetlb).
        let pmd = self
            .pt
            .ensure_pmd(vmf.page, &mut self.alloc)
            .ok_or(Errno::NOMEM)?;
        if vmf.vma.is_hugetlb() {
            return hugetlb_fault(&vmf, pmd, &mut self.frames);
        }
        match *pmd {
            Pmd::None if thp_ok => do_huge_pmd_anonymous_page(
                &vmf,
                pmd,
                &mut self.alloc,
                &mut self.frames,
                self.cfg.thp_zero_page,
            ),
            Pmd::None => pte_alloc(vmf.page, pmd, &mut self.alloc),
            // huge_pmd_set_accessed(): a read maps the subpage (the zero page for the huge one).
            Pmd::Thp(h) if !vmf.write => Ok(Step::Done(if is_zero_frame(h.base) {
                ZERO_FRAME
            } else {
                h.base + pte_index(vmf.page) as u64
            })),
            Pmd::Thp(h) => wp_huge_pmd(&vmf, pmd, h, &mut self.frames),
            Pmd::Hugetlb(_) | Pmd::HugetlbMarker => Err(Errno::FAULT),
            Pmd::Table(ref mut t) => handle_pte_fault(
                &vmf,
                &mut t.e[pte_index(vmf.page)],
                &mut self.frames,
                &mut self.objects,
                &mut self.swap,
            ),
        }
    }

    /// The `struct vm_fault` of an access to `addr`: its page, VMA and uffd context.
    fn vm_fault(&self, addr: u64, write: bool, kernel: bool) -> Result<Vmf, Errno> {
        let page = addr & !(PAGE - 1);
        let vma = *self.vma_at(page).ok_or(Errno::FAULT)?;
        let ctx = vma.uffd.and_then(|u| {
            self.ctxs
                .get(&u.ctx)
                .map(|c| (u.ctx, c.features, c.user_mode_only))
        });
        Ok(Vmf {
            addr,
            page,
            vma,
            write,
            kernel,
            ctx,
        })
    }

    /// vmf_anon_prepare(): an anon_vma for a write that may install an anonymous page
    /// (do_anonymous_page(), do_cow_fault(), wp_page_copy()), or any fault reaching
    /// do_huge_pmd_anonymous_page().
    fn vmf_anon_prepare(&mut self, vmf: &Vmf, thp_ok: bool) {
        let thp_fault = thp_ok && matches!(self.pt.pmd(vmf.page), None | Some(Pmd::None));
        if vmf.vma.anon_vma.is_none() && vmf.vma.cow() && (vmf.write || thp_fault) {
            self.anon_vma_prepare(vmf.page);
        }
    }
}

/// A new anonymous 2 MiB folio with each of its pages mapped once (by one PMD entry).
fn new_mapped_huge(frames: &mut Frames) -> FrameId {
    let base = frames.new_huge(true);
    for i in 0..HPAGE_NR {
        frames.map_one(base + i);
    }
    base
}

/// copy_user_highpage(): the data of frame `from` into frame `to`.
fn copy_user_highpage(frames: &mut Frames, from: FrameId, to: FrameId) {
    let data = frames.map.get(&from).map(|x| x.data.clone());
    if let (Some(d), Some(fr)) = (data, frames.map.get_mut(&to)) {
        fr.data = d;
    }
}

/// hugetlb_fault(): a leftover marker is cleared, a none entry or marker goes to
/// hugetlb_no_page(), a write to a write-protected page to hugetlb_wp()'s uffd-wp check.
fn hugetlb_fault(vmf: &Vmf, pmd: &mut Pmd, frames: &mut Frames) -> Result<Step, Errno> {
    match *pmd {
        Pmd::HugetlbMarker if !vmf.vma.uffd_wp() => {
            *pmd = Pmd::None;
            Ok(Step::Retry)
        }
        Pmd::None | Pmd::HugetlbMarker => hugetlb_no_page(vmf, pmd, frames),
        Pmd::Hugetlb(h) => {
            if vmf.write && h.wp && vmf.vma.uffd_wp() {
                if !vmf.wp_async() {
                    return vmf.handle_userfault(true);
                }
                *pmd = Pmd::Hugetlb(Huge { wp: false, ..h });
                return Ok(Step::Retry);
            }
            Ok(Step::Done(h.base + pte_index(vmf.page) as u64))
        }
        _ => Err(Errno::FAULT),
    }
}

/// hugetlb_no_page(): a new hugetlb folio, keeping a marker's uffd-wp bit.
fn hugetlb_no_page(vmf: &Vmf, pmd: &mut Pmd, frames: &mut Frames) -> Result<Step, Errno> {
    if vmf.vma.uffd_missing() {
        return vmf.handle_userfault(false);
    }
    let wp = matches!(*pmd, Pmd::HugetlbMarker);
    let base = new_mapped_huge(frames);
    *pmd = Pmd::Hugetlb(Huge { base, wp });
    Ok(Step::Retry)
}

/// do_huge_pmd_anonymous_page(): a deposited table, then the huge zero page for a read or a
/// new THP for a write.
fn do_huge_pmd_anonymous_page(
    vmf: &Vmf,
    pmd: &mut Pmd,
    alloc: &mut PtAllocator,
    frames: &mut Frames,
    zero_thp: bool,
) -> Result<Step, Errno> {
    if vmf.vma.uffd_missing() {
        return vmf.handle_userfault(false);
    }
    if !alloc.alloc(Level::Pte, vmf.page) {
        return Err(Errno::NOMEM);
    }
    let base = if !vmf.write && zero_thp {
        HUGE_ZERO_FRAME
    } else {
        new_mapped_huge(frames)
    };
    *pmd = Pmd::Thp(Huge { base, wp: false });
    Ok(Step::Retry)
}

/// pte_alloc(): a PTE table for the none PMD entry of `page`.
fn pte_alloc(page: u64, pmd: &mut Pmd, alloc: &mut PtAllocator) -> Result<Step, Errno> {
    if !alloc.alloc(Level::Pte, page) {
        return Err(Errno::NOMEM);
    }
    *pmd = Pmd::Table(PteTable::new());
    Ok(Step::Retry)
}

/// wp_huge_pmd(): a write to the PMD-mapped THP `h`.
fn wp_huge_pmd(vmf: &Vmf, pmd: &mut Pmd, h: Huge, frames: &mut Frames) -> Result<Step, Errno> {
    if h.wp && vmf.vma.uffd_wp() {
        // userfaultfd_huge_pmd_wp(); async splits and retries at the PTE level.
        if vmf.wp_async() {
            Kernel::split_thp(pmd);
            return Ok(Step::Retry);
        }
        return vmf.handle_userfault(true);
    }
    if is_zero_frame(h.base) {
        return Ok(do_huge_zero_wp_pmd(pmd, frames));
    }
    // Reused in place: a stale uffd-wp bit stays.
    Ok(Step::Done(h.base + pte_index(vmf.page) as u64))
}

/// do_huge_zero_wp_pmd(): a THP replaces the huge zero page.
fn do_huge_zero_wp_pmd(pmd: &mut Pmd, frames: &mut Frames) -> Step {
    let base = new_mapped_huge(frames);
    *pmd = Pmd::Thp(Huge { base, wp: false });
    Step::Retry
}

/// handle_pte_fault(): the fault on the PTE `pte` of the faulting page.
fn handle_pte_fault(
    vmf: &Vmf,
    pte: &mut Pte,
    frames: &mut Frames,
    objects: &mut HashMap<u64, Object>,
    swap: &mut HashMap<u64, PageData>,
) -> Result<Step, Errno> {
    match *pte {
        Pte::Marker if !vmf.vma.uffd_wp() => {
            // pte_marker_handle_uffd_wp(): a leftover marker is simply cleared.
            *pte = Pte::None;
            Ok(Step::Retry)
        }
        Pte::None | Pte::Marker => do_pte_missing(vmf, pte, frames, objects),
        Pte::Swap { slot, wp } => Ok(do_swap_page(pte, slot, wp, frames, swap)),
        Pte::Present { frame, .. } if !vmf.write => Ok(Step::Done(frame)),
        Pte::Present { frame, wp } => do_wp_page(vmf, pte, frame, wp, frames),
    }
}

/// do_pte_missing(): do_fault() for a page-cache backed VMA, else do_anonymous_page(); the new
/// PTE keeps the marker's uffd-wp bit.
fn do_pte_missing(
    vmf: &Vmf,
    pte: &mut Pte,
    frames: &mut Frames,
    objects: &mut HashMap<u64, Object>,
) -> Result<Step, Errno> {
    let wp = *pte == Pte::Marker;
    match vmf.vma.object_page(vmf.page) {
        Some((obj, pgoff)) => {
            let o = objects.get_mut(&obj).ok_or(Errno::FAULT)?;
            do_fault(vmf, pte, wp, o, pgoff, frames)
        }
        None => do_anonymous_page(vmf, pte, wp, frames),
    }
}

/// do_fault(): maps page `pgoff` of the object `o` (adding it to the page cache if needed), or
/// for a private write a copy of it (do_cow_fault()).
fn do_fault(
    vmf: &Vmf,
    pte: &mut Pte,
    wp: bool,
    o: &mut Object,
    pgoff: u64,
    frames: &mut Frames,
) -> Result<Step, Errno> {
    if pgoff * PAGE >= o.size {
        return Err(Errno::FAULT); // SIGBUS past EOF
    }
    let cached = o.pages.get(&pgoff).copied();
    if cached.is_none() && vmf.vma.uffd_missing() {
        return vmf.handle_userfault(false);
    }
    let f = match cached {
        Some(f) => f,
        None => filemap_add_folio(o, pgoff, frames),
    };
    let f = if vmf.write && vmf.vma.cow() {
        do_cow_fault(f, frames)
    } else {
        f
    };
    frames.map_one(f);
    *pte = Pte::Present { frame: f, wp };
    Ok(Step::Retry)
}

/// filemap_add_folio(): a new page cache page at `pgoff` of `o`.
fn filemap_add_folio(o: &mut Object, pgoff: u64, frames: &mut Frames) -> FrameId {
    let f = frames.new_frame(false);
    if let Some(fr) = frames.map.get_mut(&f) {
        fr.cached = true;
    }
    o.pages.insert(pgoff, f);
    f
}

/// do_cow_fault(): a private anonymous copy of the page cache page `f`.
fn do_cow_fault(f: FrameId, frames: &mut Frames) -> FrameId {
    let n = frames.new_frame(true);
    copy_user_highpage(frames, f, n);
    n
}

/// do_anonymous_page(): a new page for a write, the shared zero page for a read.
fn do_anonymous_page(
    vmf: &Vmf,
    pte: &mut Pte,
    wp: bool,
    frames: &mut Frames,
) -> Result<Step, Errno> {
    if vmf.vma.uffd_missing() {
        return vmf.handle_userfault(false);
    }
    *pte = if vmf.write {
        let f = frames.new_frame(true);
        frames.map_one(f);
        Pte::Present { frame: f, wp }
    } else {
        Pte::Present {
            frame: ZERO_FRAME,
            wp,
        }
    };
    Ok(Step::Retry)
}

/// do_swap_page(): the page comes back from swap slot `slot` with its uffd-wp bit.
fn do_swap_page(
    pte: &mut Pte,
    slot: u64,
    wp: bool,
    frames: &mut Frames,
    swap: &mut HashMap<u64, PageData>,
) -> Step {
    let data = swap.remove(&slot).unwrap_or(PageData::Zero);
    let f = frames.new_frame(true);
    if let Some(fr) = frames.map.get_mut(&f) {
        fr.data = data;
    }
    frames.map_one(f);
    *pte = Pte::Present { frame: f, wp };
    Step::Retry
}

/// do_wp_page(): a write to the present page `frame` (uffd-wp bit `wp`).
fn do_wp_page(
    vmf: &Vmf,
    pte: &mut Pte,
    frame: FrameId,
    wp: bool,
    frames: &mut Frames,
) -> Result<Step, Errno> {
    if wp && vmf.vma.uffd_wp() {
        // userfaultfd_pte_wp(); async clears the bit.
        if !vmf.wp_async() {
            return vmf.handle_userfault(true);
        }
        *pte = Pte::Present { frame, wp: false };
        return Ok(Step::Retry);
    }
    // A stale bit (the VMA is no longer registered for WP) stays on a page reused in place
    // (wp_page_reuse()), and goes with a copy (wp_page_copy()); seen on the 6.18 machine.
    let shared_page = frames.map.get(&frame).is_some_and(|f| !f.anon);
    if is_zero_frame(frame) || (vmf.vma.cow() && shared_page) {
        return Ok(wp_page_copy(pte, frame, frames));
    }
    Ok(Step::Done(frame))
}

/// wp_page_copy(): a new anonymous page, a copy of `frame` (zeros for the zero page), replaces
/// it without the uffd-wp bit.
fn wp_page_copy(pte: &mut Pte, frame: FrameId, frames: &mut Frames) -> Step {
    let n = frames.new_frame(true);
    if !is_zero_frame(frame) {
        copy_user_highpage(frames, frame, n);
        frames.unmap_one(frame);
    }
    frames.map_one(n);
    *pte = Pte::Present {
        frame: n,
        wp: false,
    };
    Step::Done(n)
}

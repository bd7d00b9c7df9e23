//! Page faults, CPU and kernel accesses, userfaultfd messages, wake-ups, pins and DMA.
//!
//! An access that needs the monitor (a write to a write-protected page in sync mode, a missing
//! fault in a MISSING-registered range, a non-cooperative event) does not complete: it is parked
//! with a message queued on its context, exactly as the faulting thread sleeps in
//! handle_userfault() (fs/userfaultfd.c). `UFFDIO_WAKE`, a successful un-protect without
//! `DONTWAKE`, or closing the uffd re-runs it: it completes, or faults again and queues a new
//! message. Reading a non-cooperative event lets the call that raised it finish.

use uffd_wp::features::Features;
use uffd_wp::seam::{Errno, Event};

use crate::alloc::Level;
use crate::kernel::{
    Blocked, Completion, F_EXACT_ADDRESS, F_SIGBUS, Kernel, Pending, PendingOp, PinRec,
};
use crate::pt::{
    FrameId, HPAGE_NR, HUGE_ZERO_FRAME, Huge, PAGE, Pmd, Pte, PteTable, ZERO_FRAME, is_zero_frame,
    pte_index,
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

/// How an access run ended.
pub(crate) enum Run {
    Done(Completion),
    Blocked(u64),
}

/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const FLAG_WRITE: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_WP`.
const FLAG_WP: u64 = 2;

impl Kernel {
    /// handle_mm_fault() for the page of `addr` until it is mapped as the access needs.
    fn fault_in(
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

    /// One pass of the fault handler.
    fn fault_once(&mut self, addr: u64, write: bool, kernel: bool) -> Result<Step, Errno> {
        let page = addr & !(PAGE - 1);
        let vma = *self.vma_at(page).ok_or(Errno::FAULT)?;
        let ctx = vma.uffd.and_then(|u| {
            self.ctxs
                .get(&u.ctx)
                .map(|c| (u.ctx, c.features, c.user_mode_only))
        });
        let wp_async = ctx.is_some_and(|(_, f, _)| f.contains(Features::WP_ASYNC));
        // handle_userfault(): SIGBUS with UFFD_FEATURE_SIGBUS, or for a kernel-mode fault with
        // UFFD_USER_MODE_ONLY (the syscall sees EFAULT); else the access waits.
        let userfault = |reason_wp: bool| -> Result<Step, Errno> {
            let (c, feats, user_mode_only) = ctx.ok_or(Errno::FAULT)?;
            if feats.contains(F_SIGBUS) || (kernel && user_mode_only) {
                return Err(Errno::FAULT);
            }
            let mut flags = if write { FLAG_WRITE } else { 0 };
            if reason_wp {
                flags |= FLAG_WP;
            }
            let msg_addr = if feats.contains(F_EXACT_ADDRESS) {
                addr
            } else {
                page
            };
            Ok(Step::Block(Blocked {
                ctx: c,
                msg_addr,
                wake_addr: msg_addr,
                flags,
                unread: true,
            }))
        };
        let thp_ok = self.thp_eligible(&vma, page);
        let zero_thp = self.cfg.thp_zero_page;
        // vmf_anon_prepare(): a write that may install an anonymous page (do_anonymous_page(),
        // do_cow_fault(), wp_page_copy()), or any fault reaching do_huge_pmd_anonymous_page().
        let thp_fault = thp_ok && matches!(self.pt.pmd(page), None | Some(Pmd::None));
        if vma.anon_vma.is_none() && vma.cow() && (write || thp_fault) {
            self.anon_vma_prepare(page);
        }
        let Self {
            pt,
            alloc,
            frames,
            objects,
            swap,
            ..
        } = self;
        // __handle_mm_fault(): pud_alloc(), pmd_alloc() (huge_pte_alloc() for hugetlb).
        let pmd = pt.ensure_pmd(page, alloc).ok_or(Errno::NOMEM)?;

        if vma.is_hugetlb() {
            // hugetlb_fault() / hugetlb_no_page() / hugetlb_wp().
            let idx = pte_index(page) as u64;
            return match *pmd {
                Pmd::HugetlbMarker if !vma.uffd_wp() => {
                    *pmd = Pmd::None;
                    Ok(Step::Retry)
                }
                Pmd::None | Pmd::HugetlbMarker => {
                    if vma.uffd_missing() {
                        return userfault(false);
                    }
                    let wp = matches!(*pmd, Pmd::HugetlbMarker);
                    let base = frames.new_huge(true);
                    for i in 0..HPAGE_NR {
                        frames.map_one(base + i);
                    }
                    *pmd = Pmd::Hugetlb(Huge { base, wp });
                    Ok(Step::Retry)
                }
                Pmd::Hugetlb(h) => {
                    if write && h.wp && vma.uffd_wp() {
                        if !wp_async {
                            return userfault(true);
                        }
                        *pmd = Pmd::Hugetlb(Huge { wp: false, ..h });
                        return Ok(Step::Retry);
                    }
                    Ok(Step::Done(h.base + idx))
                }
                _ => Err(Errno::FAULT),
            };
        }

        match pmd {
            Pmd::None => {
                if thp_ok {
                    // do_huge_pmd_anonymous_page(): a deposited table, then the huge zero page
                    // for a read or a new THP for a write.
                    if vma.uffd_missing() {
                        return userfault(false);
                    }
                    if !alloc.alloc(Level::Pte, page) {
                        return Err(Errno::NOMEM);
                    }
                    let base = if !write && zero_thp {
                        HUGE_ZERO_FRAME
                    } else {
                        let b = frames.new_huge(true);
                        for i in 0..HPAGE_NR {
                            frames.map_one(b + i);
                        }
                        b
                    };
                    *pmd = Pmd::Thp(Huge { base, wp: false });
                    return Ok(Step::Retry);
                }
                // pte_alloc().
                if !alloc.alloc(Level::Pte, page) {
                    return Err(Errno::NOMEM);
                }
                *pmd = Pmd::Table(PteTable::new());
                Ok(Step::Retry)
            }
            Pmd::Thp(h) => {
                let h = *h;
                let idx = pte_index(page) as u64;
                if !write {
                    return Ok(Step::Done(if is_zero_frame(h.base) {
                        ZERO_FRAME
                    } else {
                        h.base + idx
                    }));
                }
                if h.wp && vma.uffd_wp() {
                    // wp_huge_pmd(): async splits and retries at the PTE level.
                    if wp_async {
                        Kernel::split_thp(pmd);
                        return Ok(Step::Retry);
                    }
                    return userfault(true);
                }
                if is_zero_frame(h.base) {
                    // do_huge_zero_wp_pmd(): a THP replaces the huge zero page.
                    let b = frames.new_huge(true);
                    for i in 0..HPAGE_NR {
                        frames.map_one(b + i);
                    }
                    *pmd = Pmd::Thp(Huge { base: b, wp: false });
                    return Ok(Step::Retry);
                }
                // Reused in place: a stale uffd-wp bit stays.
                Ok(Step::Done(h.base + idx))
            }
            Pmd::Hugetlb(_) | Pmd::HugetlbMarker => Err(Errno::FAULT),
            Pmd::Table(t) => {
                let i = pte_index(page);
                match t.e[i] {
                    Pte::Marker if !vma.uffd_wp() => {
                        // pte_marker_handle_uffd_wp(): a leftover marker is simply cleared.
                        t.e[i] = Pte::None;
                        Ok(Step::Retry)
                    }
                    e @ (Pte::None | Pte::Marker) => {
                        // do_pte_missing(): the new PTE keeps the marker's uffd-wp bit.
                        let wp = e == Pte::Marker;
                        if let Some((obj, pgoff)) = vma.object_page(page) {
                            let o = objects.get_mut(&obj).ok_or(Errno::FAULT)?;
                            if pgoff * PAGE >= o.size {
                                return Err(Errno::FAULT); // SIGBUS past EOF
                            }
                            let cached = o.pages.get(&pgoff).copied();
                            if cached.is_none() && vma.uffd_missing() {
                                return userfault(false);
                            }
                            let f = match cached {
                                Some(f) => f,
                                None => {
                                    let f = frames.new_frame(false);
                                    if let Some(fr) = frames.map.get_mut(&f) {
                                        fr.cached = true;
                                    }
                                    o.pages.insert(pgoff, f);
                                    f
                                }
                            };
                            let f = if write && vma.cow() {
                                // do_cow_fault(): a private copy.
                                let n = frames.new_frame(true);
                                let data = frames.map.get(&f).map(|x| x.data.clone());
                                if let (Some(d), Some(fr)) = (data, frames.map.get_mut(&n)) {
                                    fr.data = d;
                                }
                                n
                            } else {
                                f
                            };
                            frames.map_one(f);
                            t.e[i] = Pte::Present { frame: f, wp };
                            return Ok(Step::Retry);
                        }
                        // do_anonymous_page().
                        if vma.uffd_missing() {
                            return userfault(false);
                        }
                        t.e[i] = if write {
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
                    Pte::Swap { slot, wp } => {
                        // do_swap_page(): the uffd-wp bit comes back with the page.
                        let data = swap.remove(&slot).unwrap_or(crate::pt::PageData::Zero);
                        let f = frames.new_frame(true);
                        if let Some(fr) = frames.map.get_mut(&f) {
                            fr.data = data;
                        }
                        frames.map_one(f);
                        t.e[i] = Pte::Present { frame: f, wp };
                        Ok(Step::Retry)
                    }
                    Pte::Present { frame, wp } => {
                        if !write {
                            return Ok(Step::Done(frame));
                        }
                        if wp && vma.uffd_wp() {
                            // do_wp_page(): userfaultfd_pte_wp(); async clears the bit.
                            if !wp_async {
                                return userfault(true);
                            }
                            t.e[i] = Pte::Present { frame, wp: false };
                            return Ok(Step::Retry);
                        }
                        // A stale bit (the VMA is no longer registered for WP) stays on a page
                        // reused in place (wp_page_reuse()), and goes with a copy
                        // (wp_page_copy()); seen on the 6.18 machine.
                        let shared_page = frames.map.get(&frame).is_some_and(|f| !f.anon);
                        if is_zero_frame(frame) || (vma.cow() && shared_page) {
                            // wp_page_copy().
                            let n = frames.new_frame(true);
                            if !is_zero_frame(frame) {
                                let data = frames.map.get(&frame).map(|x| x.data.clone());
                                if let (Some(d), Some(fr)) = (data, frames.map.get_mut(&n)) {
                                    fr.data = d;
                                }
                                frames.unmap_one(frame);
                            }
                            frames.map_one(n);
                            t.e[i] = Pte::Present {
                                frame: n,
                                wp: false,
                            };
                            return Ok(Step::Done(n));
                        }
                        Ok(Step::Done(frame))
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Accesses

    /// Starts an access: runs it now; returns its completion, or the id it waits under.
    pub(crate) fn start_access(&mut self, op: PendingOp, tid: u32, kernel: bool) -> Run {
        let id = self.next_access;
        self.next_access += 1;
        self.pending.insert(
            id,
            Pending {
                op,
                tid,
                kernel,
                blocked: None,
            },
        );
        self.run_access(id);
        match self.completed.remove(&id) {
            Some(c) => Run::Done(c),
            None => Run::Blocked(id),
        }
    }

    /// Runs (or re-runs) a pending access as far as it goes.
    pub(crate) fn run_access(&mut self, id: u64) {
        let Some(mut p) = self.pending.remove(&id) else {
            return;
        };
        let res = self.progress(id, &mut p);
        match res {
            Ok(None) => {}
            Ok(Some(b)) => {
                if let Some(c) = self.ctxs.get_mut(&b.ctx) {
                    c.faults.push_back(id);
                }
                p.blocked = Some(b);
                self.pending.insert(id, p);
                return;
            }
            Err(e) => {
                self.fail_pin(&p);
                self.completed.insert(id, Completion::Failed(e));
                return;
            }
        }
        // Ok(None): either completed (recorded by progress) or waiting on an event.
        if !self.completed.contains_key(&id) {
            self.pending.insert(id, p);
        }
    }

    /// Undoes the partial pins of a failed pin call (GUP drops what it pinned).
    fn fail_pin(&mut self, p: &Pending) {
        if let PendingOp::Pin {
            frames, longterm, ..
        } = &p.op
        {
            for f in frames.clone() {
                self.drop_pin(f, *longterm);
            }
        }
    }

    /// Advances `p`: Ok(None) when it completed (recorded) or waits for an event; Ok(Some)
    /// when it blocks on a fault.
    fn progress(&mut self, id: u64, p: &mut Pending) -> Result<Option<Blocked>, Errno> {
        let kernel = p.kernel;
        match &mut p.op {
            PendingOp::Write { addr, data, done } => {
                while *done < data.len() {
                    let a = *addr + *done as u64;
                    let off = (a % PAGE) as usize;
                    let n = (PAGE as usize - off).min(data.len() - *done);
                    match self.fault_in(a, true, kernel)? {
                        Ok(f) => {
                            self.frames.write(f, off, &data[*done..*done + n]);
                            if self.cfg.soft_dirty {
                                self.sd_pages.insert(a & !(PAGE - 1));
                            }
                        }
                        Err(b) => return Ok(Some(b)),
                    }
                    *done += n;
                }
                self.completed.insert(id, Completion::Done);
            }
            PendingOp::Read { addr, buf, done } => {
                while *done < buf.len() {
                    let a = *addr + *done as u64;
                    let off = (a % PAGE) as usize;
                    let n = (PAGE as usize - off).min(buf.len() - *done);
                    match self.fault_in(a, false, kernel)? {
                        Ok(f) => self.frames.read(f, off, &mut buf[*done..*done + n]),
                        Err(b) => return Ok(Some(b)),
                    }
                    *done += n;
                }
                self.completed
                    .insert(id, Completion::Read(std::mem::take(buf)));
            }
            PendingOp::Touch { next, end, write } => {
                while *next < *end {
                    if let Err(b) = self.fault_in(*next, *write, kernel)? {
                        return Ok(Some(b));
                    }
                    if *write && self.cfg.soft_dirty {
                        self.sd_pages.insert(*next);
                    }
                    *next += PAGE;
                }
                self.completed.insert(id, Completion::Done);
            }
            PendingOp::Pin {
                start,
                end,
                next,
                write,
                longterm,
                frames,
            } => {
                while *next < *end {
                    let f = match self.fault_in(*next, *write, true)? {
                        Ok(f) => f,
                        Err(b) => return Ok(Some(b)),
                    };
                    self.take_pin(f, *longterm);
                    frames.push(f);
                    *next += PAGE;
                }
                let pin = self.alloc_pin_id();
                self.pins.insert(
                    pin,
                    PinRec {
                        start: *start,
                        frames: std::mem::take(frames),
                        write: *write,
                        longterm: *longterm,
                    },
                );
                self.completed.insert(id, Completion::Pinned(pin));
            }
            PendingOp::Dontneed { next, end, gap } => {
                match self.dontneed_from(*next, *end, false)? {
                    None => {
                        if *gap {
                            return Err(Errno::NOMEM);
                        }
                        self.completed.insert(id, Completion::Done);
                    }
                    Some((ctx, s, e)) => {
                        // userfaultfd_remove(): mmap_changing++, the event, then wait.
                        *next = s;
                        if let Some(c) = self.ctxs.get_mut(&ctx) {
                            c.mmap_changing += 1;
                        }
                        self.queue_event(ctx, Event::Remove { start: s, end: e }, id);
                    }
                }
            }
            PendingOp::Unmap { events_left } => {
                if *events_left == 0 {
                    self.completed.insert(id, Completion::Done);
                }
            }
        }
        Ok(None)
    }

    pub(crate) fn alloc_pin_id(&mut self) -> u64 {
        let id = self.next_pin;
        self.next_pin += 1;
        id
    }

    /// Takes one FOLL_PIN reference on the folio of `f`.
    fn take_pin(&mut self, f: FrameId, longterm: bool) {
        if is_zero_frame(f) {
            return;
        }
        let head = self.frames.map.get(&f).map_or(f, |x| x.folio);
        if let Some(h) = self.frames.map.get_mut(&head) {
            h.pins += 1;
            if longterm {
                h.longterm += 1;
            }
        }
    }

    /// Drops one FOLL_PIN reference on the folio of `f` (unpin_user_page()).
    fn drop_pin(&mut self, f: FrameId, longterm: bool) {
        if is_zero_frame(f) {
            return;
        }
        let head = self.frames.map.get(&f).map_or(f, |x| x.folio);
        if let Some(h) = self.frames.map.get_mut(&head) {
            h.pins = h.pins.saturating_sub(1);
            if longterm {
                h.longterm = h.longterm.saturating_sub(1);
            }
        }
        self.frames.maybe_free(f);
        self.frames.maybe_free(head);
    }

    /// Unpins a pin.
    pub(crate) fn unpin(&mut self, pin: u64) -> Result<(), Errno> {
        let p = self.pins.remove(&pin).ok_or(Errno::INVAL)?;
        for f in p.frames {
            self.drop_pin(f, p.longterm);
        }
        Ok(())
    }

    /// A device (or the kernel through the pin) writes `data` at `offset` of a pinned range:
    /// no fault, no page-table change.
    pub(crate) fn dma_write(&mut self, pin: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let p = self.pins.get(&pin).ok_or(Errno::INVAL)?;
        if !p.write {
            return Err(Errno::FAULT);
        }
        let len = p.frames.len() as u64 * PAGE;
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::INVAL)?;
        if end > len {
            return Err(Errno::INVAL);
        }
        let frames = p.frames.clone();
        let mut done = 0usize;
        while done < data.len() {
            let o = offset + done as u64;
            let off = (o % PAGE) as usize;
            let n = (PAGE as usize - off).min(data.len() - done);
            let f = frames[(o / PAGE) as usize];
            if !is_zero_frame(f) {
                self.frames.write(f, off, &data[done..done + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// The start address of a pin.
    pub(crate) fn pin_start(&self, pin: u64) -> Option<u64> {
        self.pins.get(&pin).map(|p| p.start)
    }

    /// The pages of `[start, end)` mapping a folio that may be DMA-pinned.
    pub(crate) fn pinned_ranges(&self, start: u64, end: u64) -> uffd_wp::range::RangeSet {
        use uffd_wp::range::Range;
        let mut out = uffd_wp::range::RangeSet::new();
        if self.pins.is_empty() {
            return out;
        }
        for v in self.vmas_in(start, end) {
            let (s, e) = (v.start.max(start), v.end.min(end));
            let mut a = s;
            while a < e {
                let next = crate::pt::addr_end(a, e, crate::pt::PMD);
                match self.pt.pmd(a) {
                    None => {
                        a = crate::pt::addr_end(a, e, crate::pt::PUD);
                        continue;
                    }
                    Some(Pmd::Thp(h)) | Some(Pmd::Hugetlb(h)) if self.frames.pinned(h.base) => {
                        out.insert(Range::from_bounds(a, next));
                    }
                    Some(Pmd::Table(t)) => {
                        let i0 = pte_index(a);
                        for (j, p) in t.e[i0..i0 + ((next - a) / PAGE) as usize]
                            .iter()
                            .enumerate()
                        {
                            if let Pte::Present { frame, .. } = p
                                && self.frames.pinned(*frame)
                            {
                                let at = a + j as u64 * PAGE;
                                out.insert(Range::from_bounds(at, at + PAGE));
                            }
                        }
                    }
                    _ => {}
                }
                a = next;
            }
        }
        out
    }

    /// The frame mapped at `a`, if a page is present there.
    pub(crate) fn mapped_frame(&self, a: u64) -> Option<FrameId> {
        match self.pt.pmd(a)? {
            Pmd::Thp(h) | Pmd::Hugetlb(h) => Some(h.base + pte_index(a) as u64),
            Pmd::Table(t) => match t.e[pte_index(a)] {
                Pte::Present { frame, .. } => Some(frame),
                _ => None,
            },
            _ => None,
        }
    }

    // ------------------------------------------------------------------------------------
    // Messages and wake-ups

    /// Wakes the accesses of `ctx` blocked on a fault in `[start, start + len)` (`len == 0`:
    /// all of them), as wake_userfault() does: an unread message of a woken access is removed.
    pub(crate) fn wake(&mut self, ctx: u64, start: u64, len: u64) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.blocked.is_some_and(|b| {
                    b.ctx == ctx
                        && (len == 0 || (start <= b.wake_addr && b.wake_addr < start + len))
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(p) = self.pending.get_mut(&id)
                && let Some(b) = p.blocked.take()
                && b.unread
                && let Some(c) = self.ctxs.get_mut(&b.ctx)
            {
                c.faults.retain(|x| *x != id);
            }
            self.run_access(id);
        }
    }

    /// Reads up to `max` messages of `ctx` (userfaultfd_ctx_read()): page faults first, oldest
    /// first, then non-cooperative events; reading an event lets its call finish.
    pub(crate) fn read_events(&mut self, ctx: u64, max: usize) -> Vec<Event> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(c) = self.ctxs.get_mut(&ctx) else {
                break;
            };
            let thread_id = c.features.contains(Features::THREAD_ID);
            if let Some(id) = c.faults.pop_front() {
                if let Some(p) = self.pending.get_mut(&id)
                    && let Some(b) = p.blocked.as_mut()
                {
                    b.unread = false;
                    out.push(Event::PageFault {
                        flags: b.flags,
                        address: b.msg_addr,
                        tid: if thread_id { p.tid } else { 0 },
                    });
                }
                continue;
            }
            if let Some((ev, id)) = c.events.pop_front() {
                out.push(ev);
                self.event_consumed(ctx, id);
                continue;
            }
            break;
        }
        out
    }

    /// Whether `ctx` has a message to read.
    pub(crate) fn has_events(&self, ctx: u64) -> bool {
        self.ctxs
            .get(&ctx)
            .is_some_and(|c| !c.faults.is_empty() || !c.events.is_empty())
    }

    /// The monitor read the event of `access`: mmap_changing drops and the call goes on.
    pub(crate) fn event_consumed(&mut self, ctx: u64, access: u64) {
        if let Some(c) = self.ctxs.get_mut(&ctx) {
            c.mmap_changing = c.mmap_changing.saturating_sub(1);
        }
        let Some(mut p) = self.pending.remove(&access) else {
            return;
        };
        match &mut p.op {
            PendingOp::Unmap { events_left } => {
                *events_left = events_left.saturating_sub(1);
                if *events_left == 0 {
                    self.completed.insert(access, Completion::Done);
                } else {
                    self.pending.insert(access, p);
                }
            }
            PendingOp::Dontneed { next, end, gap } => {
                // The VMA at `next` was announced: zap it, then go on.
                let (n, e, g) = (*next, *end, *gap);
                match self.dontneed_from(n, e, true) {
                    Ok(None) => {
                        let c = if g {
                            Completion::Failed(Errno::NOMEM)
                        } else {
                            Completion::Done
                        };
                        self.completed.insert(access, c);
                    }
                    Ok(Some((c2, s, e2))) => {
                        if let PendingOp::Dontneed { next, .. } = &mut p.op {
                            *next = s;
                        }
                        if let Some(c) = self.ctxs.get_mut(&c2) {
                            c.mmap_changing += 1;
                        }
                        self.queue_event(c2, Event::Remove { start: s, end: e2 }, access);
                        self.pending.insert(access, p);
                    }
                    Err(err) => {
                        self.completed.insert(access, Completion::Failed(err));
                    }
                }
            }
            _ => {
                self.pending.insert(access, p);
            }
        }
    }
}

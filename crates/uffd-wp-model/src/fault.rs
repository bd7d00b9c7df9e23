//! Page faults, CPU and kernel accesses, userfaultfd messages, wake-ups, pins and DMA.
//!
//! An access that needs the monitor (a write to a write-protected page in sync mode, a missing
//! fault in a MISSING-registered range, a non-cooperative event) does not complete: it is parked
//! with a message queued on its context, exactly as the faulting thread sleeps in
//! handle_userfault() (fs/userfaultfd.c). `UFFDIO_WAKE`, a successful un-protect without
//! `DONTWAKE`, or closing the uffd re-runs it: it completes, or faults again and queues a new
//! message. Reading a non-cooperative event lets the call that raised it finish.
//!
//! The fault handler itself (handle_mm_fault() and its cases) is in the `memory` submodule.

mod memory;

use uffd_wp::features::Features;
use uffd_wp::seam::{Errno, Event};

use crate::kernel::{Blocked, Completion, Kernel, Pending, PendingOp, PinRec};
use crate::pt::{FrameId, PAGE, Pmd, Pte, is_zero_frame, pte_index};

/// How an access run ended.
pub(crate) enum Run {
    Done(Completion),
    Blocked(u64),
}

impl Kernel {
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
                self.access_write(id, kernel, *addr, data, done)
            }
            PendingOp::Read { addr, buf, done } => self.access_read(id, kernel, *addr, buf, done),
            PendingOp::Touch { next, end, write } => {
                self.access_touch(id, kernel, next, *end, *write)
            }
            PendingOp::Pin {
                start,
                end,
                next,
                write,
                longterm,
                frames,
            } => {
                if let Some(b) = self.pin_user_pages(next, *end, *write, *longterm, frames)? {
                    return Ok(Some(b));
                }
                let rec = PinRec {
                    start: *start,
                    frames: std::mem::take(frames),
                    write: *write,
                    longterm: *longterm,
                };
                self.complete_pin(id, rec);
                Ok(None)
            }
            PendingOp::Dontneed { next, end, gap } => self.madvise_dontneed(id, next, *end, *gap),
            PendingOp::Unmap { events_left } => {
                if *events_left == 0 {
                    self.completed.insert(id, Completion::Done);
                }
                Ok(None)
            }
        }
    }

    /// A CPU store (or a kernel copy_to_user()) of `data` at `addr`, from byte `done` on, page
    /// by page; completes access `id` or blocks on a fault.
    fn access_write(
        &mut self,
        id: u64,
        kernel: bool,
        addr: u64,
        data: &[u8],
        done: &mut usize,
    ) -> Result<Option<Blocked>, Errno> {
        while *done < data.len() {
            let a = addr + *done as u64;
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
        Ok(None)
    }

    /// A CPU load (or a kernel copy_from_user()) into `buf` from `addr`, from byte `done` on,
    /// page by page; completes access `id` with the bytes read or blocks on a fault.
    fn access_read(
        &mut self,
        id: u64,
        kernel: bool,
        addr: u64,
        buf: &mut Vec<u8>,
        done: &mut usize,
    ) -> Result<Option<Blocked>, Errno> {
        while *done < buf.len() {
            let a = addr + *done as u64;
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
        Ok(None)
    }

    /// Faults each page from `next` to `end` in for a read or a write without changing its
    /// contents (`MADV_POPULATE_READ` / `MADV_POPULATE_WRITE`); completes access `id` or blocks
    /// on a fault.
    fn access_touch(
        &mut self,
        id: u64,
        kernel: bool,
        next: &mut u64,
        end: u64,
        write: bool,
    ) -> Result<Option<Blocked>, Errno> {
        while *next < end {
            if let Err(b) = self.fault_in(*next, write, kernel)? {
                return Ok(Some(b));
            }
            if write && self.cfg.soft_dirty {
                self.sd_pages.insert(*next);
            }
            *next += PAGE;
        }
        self.completed.insert(id, Completion::Done);
        Ok(None)
    }

    /// pin_user_pages() (`FOLL_PIN`, `FOLL_LONGTERM`) from `next` to `end`: faults each page in
    /// as a kernel access and pins it, adding it to `frames`; Ok(Some) when it blocks on a fault.
    fn pin_user_pages(
        &mut self,
        next: &mut u64,
        end: u64,
        write: bool,
        longterm: bool,
        frames: &mut Vec<FrameId>,
    ) -> Result<Option<Blocked>, Errno> {
        while *next < end {
            let f = match self.fault_in(*next, write, true)? {
                Ok(f) => f,
                Err(b) => return Ok(Some(b)),
            };
            self.take_pin(f, longterm);
            frames.push(f);
            *next += PAGE;
        }
        Ok(None)
    }

    /// Records the pin `rec` of a finished pin call under a new id and completes access `id`
    /// with it.
    fn complete_pin(&mut self, id: u64, rec: PinRec) {
        let pin = self.alloc_pin_id();
        self.pins.insert(pin, rec);
        self.completed.insert(id, Completion::Pinned(pin));
    }

    /// madvise_dontneed_free() from `next` to `end`: completes access `id` (ENOMEM at the end
    /// with `gap`), or raises `UFFD_EVENT_REMOVE` for the VMA at `next` and waits for it to be
    /// read (userfaultfd_remove()).
    fn madvise_dontneed(
        &mut self,
        id: u64,
        next: &mut u64,
        end: u64,
        gap: bool,
    ) -> Result<Option<Blocked>, Errno> {
        match self.dontneed_from(*next, end, false)? {
            None => {
                if gap {
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

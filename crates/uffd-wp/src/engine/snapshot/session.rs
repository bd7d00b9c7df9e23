//! One snapshot as phases, each handing its state to the next: [`Session::arm`] (before the
//! pause), [`Session::pause`] (freeze and protect, pre-armed or not), [`Session::settle`]
//! (what could not be protected), [`Session::resume`], [`Session::copy`], [`Session::finish`].

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use super::events::Changes;
use super::prearm::{MAX_PASSES, Prearm, StopPrearm, prearm_handler};
use super::shared::{DONE, LAST, PENDING, Shared, any_huge};
use super::sparse::Sparse;
use super::{
    Copier, HandlerMode, Image, NotCaptured, Percentiles, RELEASE_BATCH, SnapshotError,
    SnapshotOptions, SnapshotReport, Source, Unprotected,
};
use crate::engine::protect::{FailureKind, WpError, WpOp, WpOptions, WpReport, write_protect};
use crate::features::Features;
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::prelude::*;
use crate::seam::{Errno, Quiesce, RegisterMode, WpMode};
use crate::sys::sched::{BACKGROUND_NICE, set_this_thread_nice};

/// Undoes everything on drop unless disarmed: resumes the writers, un-protects and unregisters.
pub(super) struct Cleanup<'a, M: Mm + ?Sized> {
    pub(super) mm: &'a M,
    pub(super) ranges: Vec<Range>,
    pub(super) quiesce: &'a dyn Quiesce,
    pub(super) frozen: bool,
    /// Un-protect on drop (false once the copier has un-protected everything).
    pub(super) protected: bool,
}

impl<M: Mm + ?Sized> Drop for Cleanup<'_, M> {
    fn drop(&mut self) {
        if self.frozen {
            self.quiesce.resume();
        }
        for r in &self.ranges {
            if self.protected {
                for part in r.split_at_multiples(crate::range::PUD_SIZE) {
                    let _ = self
                        .mm
                        .writeprotect(part, WpMode::Unprotect { dontwake: false });
                }
            }
            let _ = self.mm.unregister(*r);
        }
    }
}

/// Re-protecting the pages written since the last pre-arm pass bridges gaps up to this size
/// between them (protecting a page twice is harmless): fewer calls, each paying a syscall, a VMA
/// lookup, MMU-notifier calls and a TLB flush, against a walk over already-protected entries.
/// Measured on a 1 GiB dump of the built-in target (random writes), three dumps each, once the
/// engine's per-call check of the target's maps was one ioctl on a file kept open
/// (`procfs::MapsQuery`; before, it opened /proc files for 50-100 us a call, which is what made
/// bridging 2 MiB look worth it): bridging 2 MiB, 162-195 calls, 7-14.7 ms for 814-1204
/// written pages (7-12 us a page: each call walks up to 512 entries, and the passes before the
/// pause, as slow, never converged); bridging 16 pages, 23-170 calls, 0.06-0.8 ms for 35-302
/// pages (1.5-2.6 us a page, the passes converging to a few dozen pages); no bridging and 128
/// pages were within that.
const REPROTECT_BRIDGE: u64 = 16 * crate::range::PAGE_SIZE;

/// How often a background copier's progress is relayed to the caller's callback. Short enough
/// that a copy is seen at least once while it runs: at 50 ms a 128 MiB copy (about 50 ms at
/// the 2.7 GB/s these machines reach) could finish before the first call (a CI run at
/// 12:30 on 2026-12-06 saw none).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Splits `set` into at most `n` pieces of about equal bytes.
pub(super) fn split_even(set: &RangeSet, n: usize) -> Vec<RangeSet> {
    let per = set.bytes().div_ceil(n as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut out = vec![RangeSet::new()];
    let mut room = per;
    for r in set.iter() {
        let mut cur = r.start();
        while cur < r.end() {
            if room == 0 {
                out.push(RangeSet::new());
                room = per;
            }
            let take = (r.end() - cur).min(room);
            out.last_mut()
                .expect("non-empty")
                .insert(Range::from_bounds(cur, cur + take));
            cur += take;
            room -= take;
        }
    }
    out
}

/// Write-protects `set`, split over `threads` threads (one group of ranges each); the result
/// of every `write_protect` call with the range it covered.
pub(super) fn protect_all<M: Mm + ?Sized>(
    mm: &M,
    set: &RangeSet,
    threads: usize,
    opts: &WpOptions,
) -> Vec<(Range, Result<WpReport, WpError>)> {
    let run = |g: &RangeSet| {
        g.iter()
            .map(|r| (*r, write_protect(mm, *r, opts)))
            .collect::<Vec<_>>()
    };
    if threads <= 1 {
        return run(set);
    }
    let groups = split_even(set, threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = groups.iter().map(|g| s.spawn(move || run(g))).collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("protect thread"))
            .collect()
    })
}

/// Each write-protect call's range and result.
type Results = Vec<(Range, Result<WpReport, WpError>)>;

/// What the pause measured and protected.
pub(super) struct Paused {
    t_pause: Instant,
    /// The whole pause, set at the resume.
    pause_us: f64,
    freeze_us: f64,
    protect_us: f64,
    prearm_dirty_pages: u64,
    prearm_passes: u32,
}

/// The pause's write-protect results, summed: what is left unprotected and the first error.
pub(super) struct Protected {
    unprotected: RangeSet,
    raw_calls: u32,
    first_error: Option<WpError>,
}

impl Protected {
    fn sum(results: Results) -> Protected {
        let mut p = Protected {
            unprotected: RangeSet::new(),
            raw_calls: 0,
            first_error: None,
        };
        for (r, res) in results {
            let err = match res {
                Ok(rep) => {
                    p.raw_calls += rep.raw_calls;
                    p.unprotected.extend(&rep.not_protected);
                    rep.error
                }
                Err(e) => {
                    p.unprotected.insert(r);
                    Some(e)
                }
            };
            if p.first_error.is_none() {
                p.first_error = err;
            }
        }
        p
    }

    /// The error that aborts the snapshot (a kernel error always exists when pages are left).
    fn abort(self) -> SnapshotError {
        let addr = self.unprotected.first_addr().unwrap_or(0);
        SnapshotError::Protect(self.first_error.unwrap_or(WpError::Kernel {
            op: WpOp::Protect,
            kind: FailureKind::Other,
            errno: Errno::FAULT,
            addr,
        }))
    }
}

/// What the pause did with the pages it could not protect.
#[derive(Default)]
pub(super) struct Settled {
    not_captured: Vec<NotCaptured>,
    copied_in_freeze: u64,
}

/// A snapshot in progress, from registration to the report.
pub(super) struct Session<'a, M: Mm + ?Sized> {
    sh: Shared<'a, M>,
    guard: Cleanup<'a, M>,
    /// Pinned pages: never write-protected, copied last.
    pinned: RangeSet,
    /// Sparse memory: only its populated blocks protected and copied.
    sparse: Sparse,
    /// Pages the copier walks (for progress).
    total_pages: u64,
}

impl<'a, M: Mm + ?Sized> Session<'a, M> {
    /// Before the pause: registers `ranges` for WP, builds the page states, looks up pins.
    pub(super) fn arm(
        mm: &'a M,
        ranges: &RangeSet,
        (source, image): (Source<'a>, &'a Image),
        quiesce: &'a dyn Quiesce,
        (tolerate, fork_shared): (bool, &RangeSet),
        sparse: RangeSet,
    ) -> Result<Self, SnapshotError> {
        let mut guard = Cleanup {
            mm,
            ranges: Vec::new(),
            quiesce,
            frozen: false,
            protected: true,
        };
        let mut unregistered = RangeSet::new();
        for r in ranges.iter() {
            match mm.register(*r, RegisterMode::WP) {
                Ok(_) => guard.ranges.push(*r),
                // Unmapped since the caller looked (another process): not in the snapshot.
                Err(_) if tolerate => unregistered.insert(*r),
                Err(errno) => return Err(SnapshotError::Register { range: *r, errno }),
            }
        }
        let mut first_page = Vec::new();
        let mut total_pages = 0;
        for r in ranges.iter() {
            first_page.push(total_pages);
            total_pages += r.pages();
        }
        let sh = Shared {
            mm,
            source,
            image,
            ranges: ranges.iter().copied().collect(),
            first_page,
            state: (0..total_pages).map(|_| AtomicU8::new(PENDING)).collect(),
            huge: ranges.iter().any(|r| any_huge(mm, *r)),
            faults: AtomicU64::new(0),
            markers_skipped: AtomicU64::new(0),
            service_ns: std::sync::Mutex::new(Vec::new()),
            tolerate,
            vanished: std::sync::Mutex::new(unregistered.clone()),
            changes: Changes::new(
                mm.features().0
                    & (Features::EVENT_REMOVE.0
                        | Features::EVENT_UNMAP.0
                        | Features::EVENT_REMAP.0
                        | Features::EVENT_FORK.0)
                    != 0,
                fork_shared.clone(),
            ),
        };
        let pinned = pinned_in(mm, &ranges.difference(&unregistered))?;
        let sparse = Sparse::scan(mm, sparse);
        let s = Session {
            sh,
            guard,
            pinned,
            sparse,
            total_pages,
        };
        for r in unregistered.iter() {
            s.mark(*r, DONE);
        }
        // Nothing mapped there now: not captured unless the pause finds it populated.
        for r in s.sparse.untouched().iter() {
            s.mark(*r, DONE);
        }
        Ok(s)
    }

    fn wp_options(opts: &SnapshotOptions) -> WpOptions {
        WpOptions {
            skip_pinned: false,
            on_error: opts.on_error,
        }
    }

    fn freeze(&mut self) {
        self.guard.quiesce.freeze();
        self.guard.frozen = true;
    }

    /// The pause without pre-arming: freeze, then protect everything.
    pub(super) fn pause(&mut self, opts: &SnapshotOptions) -> (Paused, Results) {
        let to_protect = self.to_protect(&self.protectable());
        let t_pause = Instant::now();
        self.freeze();
        let freeze_us = t_pause.elapsed().as_secs_f64() * 1e6;
        let t_protect = Instant::now();
        let new = self.rescan_sparse();
        let to_protect = to_protect.union(&self.to_protect(&new));
        let wp = Self::wp_options(opts);
        let results = protect_all(self.sh.mm, &to_protect, opts.protect_threads, &wp);
        let paused = Paused {
            t_pause,
            pause_us: 0.0,
            freeze_us,
            protect_us: t_protect.elapsed().as_secs_f64() * 1e6,
            prearm_dirty_pages: 0,
            prearm_passes: 0,
        };
        (paused, results)
    }

    /// The pre-armed pause: protect everything while the writers run; pages they write
    /// meanwhile are un-protected by a handler and recorded, and only those are re-protected
    /// in the pause.
    ///
    /// The handler is not joined inside the pause (it may be napping): once the writers are
    /// frozen no fault is pending (a writer in a fault cannot park), so taking its record
    /// after setting `stop` is enough, and it reads no event after that. The scope joins it
    /// after the pause, before the copy's own handling of faults starts.
    pub(super) fn pause_prearmed<'scope, 'env>(
        &mut self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        st: &'env Prearm,
        ranges: &'env RangeSet,
        opts: &SnapshotOptions,
    ) -> Result<(Paused, Results), SnapshotError>
    where
        'a: 'env,
    {
        let mm: &'env M = self.sh.mm;
        let wp = Self::wp_options(opts);
        let stopper = StopPrearm(st);
        scope.spawn(move || prearm_handler(mm, ranges, st));
        let to_protect = self.to_protect(&self.protectable());
        let mut results = protect_all(mm, &to_protect, opts.protect_threads, &wp);
        // Converge as live migration's pre-copy does: each pass re-protects what the writers
        // wrote during the one before, a shorter pass, so fewer pages are written during it.
        let mut passes = 1;
        let mut previous = to_protect.pages();
        while passes < MAX_PASSES {
            let Some(written) = st.take_for_pass(previous)? else {
                break;
            };
            previous = written.pages();
            results.extend(protect_all(mm, &self.to_reprotect(&written), 1, &wp));
            passes += 1;
        }
        let t_pause = Instant::now();
        self.freeze();
        let freeze_us = t_pause.elapsed().as_secs_f64() * 1e6;
        drop(stopper);
        let (dirty, err) = std::mem::take(&mut *st.record.lock().expect("pre-arm record"));
        if let Some(e) = err {
            return Err(e);
        }
        let t_protect = Instant::now();
        let new = self.rescan_sparse();
        // Unmapped or moved away before the snapshot point: not part of it, never copied
        // (whatever is mapped there now came later).
        let gone = std::mem::take(&mut *st.gone.lock().expect("pre-arm gone"));
        self.sh
            .changes
            .forked_before_freeze(st.forks.load(std::sync::atomic::Ordering::Acquire));
        for r in gone.iter() {
            self.mark(*r, DONE);
        }
        self.sh
            .vanished
            .lock()
            .expect("vanished lock")
            .extend(&gone);
        // What phase 1 could not protect (EAGAIN: a mapping change was in flight) is protected
        // now, frozen, like the pages written meanwhile.
        let missed = Protected::sum(std::mem::take(&mut results));
        let again = self
            .to_reprotect(&dirty.union(&missed.unprotected))
            .union(&self.to_protect(&new));
        results.extend(protect_all(mm, &again, 1, &wp));
        let paused = Paused {
            t_pause,
            pause_us: 0.0,
            freeze_us,
            protect_us: t_protect.elapsed().as_secs_f64() * 1e6,
            prearm_dirty_pages: dirty.pages(),
            prearm_passes: passes,
        };
        Ok((paused, results))
    }

    /// Inside the pause: handles what could not be protected (per [`Unprotected`]) and keeps
    /// the copier and the handler off the pinned pages, which are copied last.
    pub(super) fn settle(
        &self,
        prot: &Protected,
        opts: &SnapshotOptions,
    ) -> Result<Settled, SnapshotError> {
        let mut settled = Settled::default();
        if !prot.unprotected.is_empty() {
            match opts.unprotected {
                Unprotected::Abort => unreachable!("aborted before settling"),
                Unprotected::CopyInFreeze => {
                    for r in prot.unprotected.iter() {
                        for p in r.page_iter() {
                            self.sh.claim_and_copy(p.start())?;
                        }
                        settled.copied_in_freeze += r.pages();
                    }
                }
                Unprotected::Report => {
                    let why = prot
                        .first_error
                        .as_ref()
                        .map_or("not write-protected".to_string(), |e| e.to_string());
                    for r in prot.unprotected.iter() {
                        self.mark(*r, DONE);
                        settled.not_captured.push(NotCaptured {
                            range: [r.start(), r.end()],
                            why: why.clone(),
                        });
                    }
                }
            }
        }
        for r in self.pinned.iter() {
            self.mark(*r, LAST);
        }
        Ok(settled)
    }

    /// Sets the state of every page of `r` inside the snapshot.
    fn mark(&self, r: Range, state: u8) {
        for (k, sr) in self.sh.ranges.iter().enumerate() {
            let Some(part) = sr.intersect(&r) else {
                continue;
            };
            let i0 = (self.sh.first_page[k] + (part.start() - sr.start()) / PAGE_SIZE) as usize;
            for s in &self.sh.state[i0..i0 + part.pages() as usize] {
                s.store(state, Ordering::Release);
            }
        }
    }

    /// Inside the pause: the blocks of sparse memory populated since arming, made pending
    /// (to protect and copy). If the scan fails, all of the sparse memory is.
    fn rescan_sparse(&mut self) -> RangeSet {
        if self.sparse.ranges.is_empty() {
            return RangeSet::new();
        }
        let new = self.sparse.rescan(self.sh.mm).unwrap_or_else(|_| {
            let all = self.sparse.untouched();
            self.sparse.blocks.extend(&all);
            all
        });
        let gone = self.sh.vanished.lock().expect("vanished lock").clone();
        for r in new.difference(&gone).iter() {
            self.mark(*r, PENDING);
        }
        new
    }

    /// What is write-protected and copied: everything but the sparse memory with nothing
    /// mapped.
    fn protectable(&self) -> RangeSet {
        self.ranges().difference(&self.sparse.untouched())
    }

    /// Ends the pause: the writers run again.
    pub(super) fn resume(&mut self, paused: &mut Paused) {
        self.guard.quiesce.resume();
        self.guard.frozen = false;
        paused.pause_us = paused.t_pause.elapsed().as_secs_f64() * 1e6;
    }

    /// The copy: every page copied once (faults first), each 2 MiB batch un-protected after
    /// its copy; the pinned pages last. Returns the seconds it took.
    pub(super) fn copy(
        &mut self,
        opts: &SnapshotOptions,
        progress: impl FnMut(u64, u64),
    ) -> Result<f64, SnapshotError> {
        let t_copy = Instant::now();
        if opts.handler.has_thread() {
            self.copy_with_handler(opts, progress)?;
        } else {
            self.copy_ranges(opts, progress)?;
        }
        // Pinned pages last (the pinning I/O may still write them: flagged).
        for r in self.pinned.iter() {
            self.sh.copy(r.start(), r.len())?;
        }
        self.sh.serve_pending()?;
        self.sh.unprotect_moved();
        self.guard.protected = false; // the copier un-protected every chunk
        Ok(t_copy.elapsed().as_secs_f64())
    }

    /// The copy with a fault-handler thread beside the copier.
    fn copy_with_handler(
        &self,
        opts: &SnapshotOptions,
        progress: impl FnMut(u64, u64),
    ) -> Result<(), SnapshotError> {
        let stop = AtomicBool::new(false);
        let copied = AtomicU64::new(0);
        std::thread::scope(|s| {
            let handler = s.spawn(|| -> Result<(), SnapshotError> {
                while !stop.load(Ordering::Acquire) {
                    if self.sh.mm.wait_event(20).unwrap_or(false) {
                        self.sh.serve_pending()?;
                    }
                }
                self.sh.serve_pending()
            });
            let r = match opts.copier {
                Copier::Normal => self.copy_ranges(opts, progress),
                Copier::Background => {
                    // Spawned after the handler, which keeps the caller's priority. It does
                    // not read the uffd itself: a fault it read could wait behind it for a CPU.
                    let bg = SnapshotOptions {
                        handler: HandlerMode::Thread,
                        ..*opts
                    };
                    let copied = &copied;
                    let copier = s.spawn(move || {
                        // Unset, the copy goes on at the caller's priority: slower for the
                        // target, never wrong.
                        let _ = set_this_thread_nice(BACKGROUND_NICE);
                        self.copy_ranges(&bg, |n, _| copied.store(n, Ordering::Relaxed))
                    });
                    self.relay_progress(&copier, copied, progress);
                    copier.join().expect("copier thread")
                }
            };
            stop.store(true, Ordering::Release);
            let h = handler.join().expect("fault handler thread");
            r.and(h)
        })
    }

    /// Reports a background copier's progress (`copied` pages) until it ends.
    fn relay_progress<T>(
        &self,
        copier: &std::thread::ScopedJoinHandle<'_, T>,
        copied: &AtomicU64,
        mut progress: impl FnMut(u64, u64),
    ) {
        loop {
            std::thread::sleep(PROGRESS_EVERY);
            if copier.is_finished() {
                return;
            }
            progress(copied.load(Ordering::Relaxed), self.total_pages);
        }
    }

    /// The copier: un-protecting flushes TLBs on every CPU running the writers, so it
    /// un-protects per [`RELEASE_BATCH`], while faults are polled (inline handler) every
    /// chunk.
    fn copy_ranges(
        &self,
        opts: &SnapshotOptions,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), SnapshotError> {
        let polls = opts.handler.inline_chunk();
        let chunk_pages = polls.unwrap_or(64);
        let mut done = 0;
        for r in self.protectable().iter() {
            for batch in r.split_at_multiples(RELEASE_BATCH) {
                if self.sparse.holds(batch) {
                    self.sh.skip_markers(batch)?;
                }
                for chunk in batch.split_at_multiples(chunk_pages * PAGE_SIZE) {
                    if polls.is_some() {
                        self.sh.serve_pending()?;
                    }
                    self.sh.copy_unclaimed(chunk)?;
                    done += chunk.pages();
                    progress(done, self.total_pages);
                }
                self.sh.release(batch)?;
            }
        }
        Ok(())
    }

    /// After the copy: unregisters and builds the report.
    pub(super) fn finish(
        self,
        pause: Paused,
        prot: Protected,
        settled: Settled,
        copy_s: f64,
        opts: &SnapshotOptions,
    ) -> SnapshotReport {
        let Session {
            sh,
            guard,
            pinned,
            sparse,
            ..
        } = self;
        drop(guard); // unregister
        let mut settled = settled;
        let gone = sh.vanished.lock().expect("vanished lock").clone();
        settled
            .not_captured
            .extend(gone.iter().map(|r| NotCaptured {
                range: [r.start(), r.end()],
                why: "unmapped or moved away by the target before the snapshot point".to_string(),
            }));
        settled.not_captured.extend(sh.changes.not_captured());
        let not_captured: u64 = settled
            .not_captured
            .iter()
            .map(|n| n.range[1] - n.range[0])
            .sum();
        let captured = sh.ranges.iter().map(|r| r.len()).sum::<u64>() - not_captured;
        let service = std::mem::take(&mut *sh.service_ns.lock().expect("latency lock"));
        SnapshotReport {
            consistent: None,
            pause_us: pause.pause_us,
            freeze_us: pause.freeze_us,
            protect_us: pause.protect_us,
            prearm_dirty_pages: pause.prearm_dirty_pages,
            prearm_passes: pause.prearm_passes,
            pages: captured / PAGE_SIZE,
            bytes: captured,
            faults_served: sh.faults.load(Ordering::Relaxed),
            fault_service_us: Percentiles::of_ns(service),
            pinned_pages: pinned.pages(),
            unexplained_pinned_bytes: sh.mm.unexplained_pinned_bytes(),
            copied_in_freeze_pages: settled.copied_in_freeze,
            not_captured: settled.not_captured,
            copy_ms: copy_s * 1e3,
            copy_mb_s: captured as f64 / copy_s.max(1e-9) / 1e6,
            protect_raw_calls: prot.raw_calls,
            protect_error: prot.first_error.map(|e| e.to_string()),
            handler: opts.handler,
            copier: opts.copier,
            events: sh.changes.counts(),
            unpopulated_pages: sparse.untouched().pages()
                + sh.markers_skipped.load(Ordering::Relaxed),
        }
    }

    /// Runs the phases after [`Session::arm`] in order. `scope` joins the pre-arm handler
    /// after the pause.
    pub(super) fn run<'scope, 'env>(
        mut self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        st: &'env Prearm,
        ranges: &'env RangeSet,
        opts: &SnapshotOptions,
        progress: impl FnMut(u64, u64),
    ) -> Result<SnapshotReport, SnapshotError>
    where
        'a: 'env,
    {
        let (mut paused, results) = if opts.prearm {
            self.pause_prearmed(scope, st, ranges, opts)?
        } else {
            self.pause(opts)
        };
        self.total_pages = self.protectable().pages();
        let prot = Protected::sum(results);
        if !prot.unprotected.is_empty() && matches!(opts.unprotected, Unprotected::Abort) {
            return Err(prot.abort());
        }
        let settled = self.settle(&prot, opts)?;
        self.resume(&mut paused);
        let copy_s = self.copy(opts, progress)?;
        Ok(self.finish(paused, prot, settled, copy_s, opts))
    }

    /// `ranges` without the pinned pages and what was gone before the snapshot began.
    fn to_protect(&self, ranges: &RangeSet) -> RangeSet {
        let gone = self.sh.vanished.lock().expect("vanished lock").clone();
        ranges.difference(&self.pinned).difference(&gone)
    }

    /// What re-protects `written`: its ranges bridged over gaps of up to [`REPROTECT_BRIDGE`]
    /// (protecting a page twice is harmless), within the snapshot's ranges, without the pinned
    /// pages and what is gone.
    fn to_reprotect(&self, written: &RangeSet) -> RangeSet {
        let bridged = written
            .bridged(REPROTECT_BRIDGE)
            .intersection(&self.protectable());
        self.to_protect(&bridged)
    }

    fn ranges(&self) -> RangeSet {
        self.sh.ranges.iter().copied().collect()
    }
}

/// Pins are looked up once, before the pause (a lookup reads /proc: tens of microseconds, too
/// much to pay per re-protected range inside it); the write-protects then leave them out
/// themselves. A pin taken between here and the resume is not seen.
fn pinned_in<M: Mm + ?Sized>(mm: &M, ranges: &RangeSet) -> Result<RangeSet, SnapshotError> {
    let mut pinned = RangeSet::new();
    for r in ranges.iter() {
        pinned.extend(&mm.pinned(*r).map_err(|errno| SnapshotError::Uffd {
            op: "looking up pinned pages",
            addr: r.start(),
            errno,
        })?);
    }
    Ok(pinned)
}

//! The driver: runs a [`Case`] on one side, deciding every call from its own bookkeeping of the
//! arena so that both sides get exactly the same calls, and records what each operation showed.

use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::seam::lab::{self, Advice, Lab, LabError, RawReturn, WpFault};
use uffd_wp::seam::{Errno, PageState, RegisterMode, ScanRequest, WpMode, errno_name};
use uffd_wp::seam::{SCAN_CHECK_WPASYNC, SCAN_WP_MATCHING, category};

use crate::{Case, CaseObs, MapKind, Op, StepObs, THP_SCALE, arena_pages};

/// Runs a case on one side: its lab (mappings, writes, pins, advice) and the lab's backend
/// (registration, write-protection, pagemap, `PAGEMAP_SCAN`, memory), the arena starting at
/// `base`. The decisions that depend on the arena's layout (skip a map that overlaps, write
/// only mapped pages) are taken from the driver's own bookkeeping, so both sides see exactly
/// the same calls. `check` runs after every operation (the model checks its invariants).
pub(crate) fn run_case(
    lab: &mut dyn Lab,
    base: u64,
    case: &Case,
    check: &mut dyn FnMut(),
) -> CaseObs {
    let mut d = Driver {
        lab,
        check,
        base,
        pages: arena_pages(case.config.thp),
        thp: case.config.thp,
        report: case.config.report,
        fail_alloc: case.config.fail_alloc,
        layout: Layout::default(),
    };
    let steps = case
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| d.step(i, op))
        .collect();
    let content = d.contents();
    CaseObs { steps, content }
}

/// What the driver knows is mapped in the arena.
#[derive(Default)]
struct Layout {
    /// Every mapped page.
    mapped: RangeSet,
    /// Anonymous pages. PAGEOUT only on these: without swap, the kernel sometimes leaves a
    /// shmem page mapped and sometimes not (reclaim's own decision), which no model can predict.
    anon: RangeSet,
    /// Anonymous and shmem pages. Long-term pins of regular-file pages are refused by the
    /// kernel: pin only these.
    pinnable: RangeSet,
}

impl Layout {
    /// `r` was mapped with `kind`.
    fn add(&mut self, r: Range, kind: MapKind) {
        self.mapped.insert(r);
        if kind == MapKind::Anon {
            self.anon.insert(r);
        }
        if matches!(kind, MapKind::Anon | MapKind::Shmem) {
            self.pinnable.insert(r);
        }
    }

    /// `r` was unmapped.
    fn remove(&mut self, r: Range) {
        let r = RangeSet::single(r);
        self.mapped = self.mapped.difference(&r);
        self.anon = self.anon.difference(&r);
        self.pinnable = self.pinnable.difference(&r);
    }
}

/// One side, the arena of the case and the layout the operations so far made.
struct Driver<'a> {
    lab: &'a mut dyn Lab,
    check: &'a mut dyn FnMut(),
    base: u64,
    /// Pages in the arena.
    pages: u64,
    /// The THP arena: offsets and lengths scaled by [`THP_SCALE`].
    thp: bool,
    /// Protects go through `UFFDIO_WRITEPROTECT_REPORT` ([`crate::CaseConfig::report`]).
    report: bool,
    /// Allocation failures are injected ([`crate::CaseConfig::fail_alloc`]).
    fail_alloc: bool,
    layout: Layout,
}

/// An operation's result: `"ok"` or the errno's name (a lab's error is its errno).
fn result<T>(r: &Result<T, Errno>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => errno_name(*e),
    }
}

/// The lab's mapping kind for a case's (anonymous memory has THP in the THP arena).
fn lab_kind(kind: MapKind, thp: bool) -> lab::MapKind {
    match kind {
        MapKind::Anon if thp => lab::MapKind::AnonThp,
        MapKind::Anon => lab::MapKind::Anon,
        MapKind::Shmem => lab::MapKind::Memfd,
        MapKind::FilePrivate => lab::MapKind::File { shared: false },
        MapKind::FileShared => lab::MapKind::File { shared: true },
    }
}

/// The observation of an operation that was not made (both sides skip it alike).
fn skipped() -> StepObs {
    StepObs::result("skipped".into())
}

impl StepObs {
    /// An observation with only its result (the pages are read after the operation).
    fn result(result: String) -> StepObs {
        StepObs {
            result,
            faults: Vec::new(),
            scan: None,
            pages: String::new(),
        }
    }
}

impl Driver<'_> {
    /// The arena pages `[off, off + pages)`, scaled in the THP arena and clamped to the arena
    /// (at least one page).
    fn range(&self, off: u64, pages: u64) -> Range {
        let (n, scale) = (self.pages, if self.thp { THP_SCALE } else { 1 });
        let off = (off * scale).min(n - 1);
        let pages = (pages * scale).clamp(1, n - off);
        let at = |p: u64| self.base + p * PAGE_SIZE;
        Range::from_bounds(at(off), at(off + pages))
    }

    /// The page of `addr`, from the arena's start.
    fn page_of(&self, addr: u64) -> u64 {
        (addr - self.base) / PAGE_SIZE
    }

    /// Runs operation `i`, checks the side (the model's invariants) and reads the pages.
    fn step(&mut self, i: usize, op: &Op) -> StepObs {
        let mut obs = match *op {
            Op::Map { off, pages, kind } => self.map(off, pages, kind),
            Op::Unmap { off, pages } => self.unmap(off, pages),
            Op::Write { off } => self.write(i, off, false),
            Op::PinWrite { off } => self.write(i, off, true),
            Op::DontNeed { off, pages } => self.advise(off, pages, false),
            Op::PageOut { off, pages } => self.advise(off, pages, true),
            Op::Register { off, pages } => {
                let r = self.range(off, pages);
                StepObs::result(result(&self.lab.mm().register(r, RegisterMode::WP)))
            }
            Op::Unregister { off, pages } => {
                StepObs::result(result(&self.lab.mm().unregister(self.range(off, pages))))
            }
            Op::Protect { off, pages, wp } => self.protect(off, pages, wp),
            Op::ProtectFailing { off, pages, nth } => self.protect_failing(off, pages, nth),
            Op::Scan {
                off,
                pages,
                wp_matching,
            } => self.scan(off, pages, wp_matching),
        };
        (self.check)();
        obs.pages = pages_string(&self.page_states());
        obs
    }

    /// A raw write-protect, or un-protect; with the report call (the case asked for it) a
    /// protect shows the kernel's `done` and `pinned` beside its result.
    fn protect(&mut self, off: u64, pages: u64, wp: bool) -> StepObs {
        let r = self.range(off, pages);
        if !wp {
            let mode = WpMode::Unprotect { dontwake: false };
            return StepObs::result(result(&self.lab.mm().writeprotect(r, mode)));
        }
        if !self.report {
            return StepObs::result(result(&self.lab.mm().writeprotect(r, WpMode::Protect)));
        }
        match self.lab.raw_protect(r, false) {
            RawReturn::Report(k) => StepObs::result(format!(
                "{} done {} pinned {}",
                result(&k.result),
                k.done / PAGE_SIZE,
                k.pinned / PAGE_SIZE
            )),
            RawReturn::Linux(res) => StepObs::result(format!("{} (old call)", result(&res))),
        }
    }

    /// `Op::ProtectFailing`: a protect whose `nth` page-table allocation fails, in a case that
    /// injects failures (elsewhere a plain protect). An arming the side refuses shows as the
    /// step's result.
    fn protect_failing(&mut self, off: u64, pages: u64, nth: u64) -> StepObs {
        if self.fail_alloc
            && let Err(e) = self.lab.fail_next_writeprotect_alloc(nth)
        {
            return StepObs::result(format!("arming the failure: {e}"));
        }
        self.protect(off, pages, true)
    }

    /// The page states of the whole arena (none at all if they cannot be read).
    fn page_states(&self) -> Vec<PageState> {
        let arena = Range::from_bounds(self.base, self.base + self.pages * PAGE_SIZE);
        self.lab
            .mm()
            .page_states(arena)
            .unwrap_or_else(|_| vec![PageState::default(); self.pages as usize])
    }

    /// `Op::Map`, skipped where it would overlap a mapping.
    fn map(&mut self, off: u64, pages: u64, kind: MapKind) -> StepObs {
        // In the THP arena a map may cover a whole huge page (up to 512 pages).
        let r = self.range(off, if self.thp { pages * 2 } else { pages });
        if !self.layout.mapped.clip(r).is_empty() {
            return skipped();
        }
        let x = self
            .lab
            .map_at(r, lab_kind(kind, self.thp))
            .map_err(|e| e.errno());
        if x.is_ok() {
            self.layout.add(r, kind);
        }
        StepObs::result(result(&x))
    }

    /// `Op::Unmap`.
    fn unmap(&mut self, off: u64, pages: u64) -> StepObs {
        let r = self.range(off, pages);
        let x = self.lab.punch(r).map_err(|e| e.errno());
        if x.is_ok() {
            self.layout.remove(r);
        }
        StepObs::result(result(&x))
    }

    /// `Op::Write` (a CPU write) or `Op::PinWrite` (a write through a pin), of a value that
    /// names the operation; skipped where the page is not mapped (not pinnable).
    fn write(&mut self, i: usize, off: u64, pin: bool) -> StepObs {
        let r = self.range(off, 1);
        let allowed = if pin {
            &self.layout.pinnable
        } else {
            &self.layout.mapped
        };
        if !allowed.covers(&r) {
            return skipped();
        }
        let v = (i % 250) as u8 + 1;
        let x = if pin {
            self.pin_write(Range::from_bounds(r.start(), r.start() + PAGE_SIZE), v)
        } else {
            self.lab.write(r.start(), &[v])
        }
        .map_err(|e| e.errno());
        let mut obs = StepObs::result(result(&x));
        if let Ok(f) = &x {
            obs.faults = f
                .iter()
                .map(|f| [self.page_of(f.page), f.flags & 3])
                .collect();
        }
        obs
    }

    /// Pins `page` as an io_uring fixed buffer (serving the WP faults the pin raises), writes 8
    /// bytes of `v` at its start through the pin, unpins it.
    fn pin_write(&mut self, page: Range, v: u8) -> Result<Vec<WpFault>, LabError> {
        let faults = self.lab.pin_fixed_buffer(page)?;
        let written = self.lab.write_through_pin(page.start(), &[v; 8]);
        self.lab.unpin_fixed_buffer(page)?;
        match written?.bytes {
            8 => Ok(faults),
            n => Err(LabError::Setup {
                what: format!("{n} of 8 bytes written through the pin"),
                errno: Errno::IO,
            }),
        }
    }

    /// `Op::DontNeed` on the mapped parts of the range or `Op::PageOut` on its anonymous
    /// parts, one call per part; skipped where there are none. The result is the last error.
    fn advise(&mut self, off: u64, pages: u64, pageout: bool) -> StepObs {
        let (within, advice) = if pageout {
            (&self.layout.anon, Advice::PageOut)
        } else {
            (&self.layout.mapped, Advice::DontNeed)
        };
        let parts = within.clip(self.range(off, pages));
        if parts.is_empty() {
            return skipped();
        }
        let mut out = "ok".to_string();
        for p in parts.iter() {
            let x = self.lab.advise(*p, advice).map_err(|e| e.errno());
            if x.is_err() {
                out = result(&x);
            }
        }
        StepObs::result(out)
    }

    /// `Op::Scan`: one `PAGEMAP_SCAN` for written pages with room for 64 regions.
    fn scan(&mut self, off: u64, pages: u64, wp_matching: bool) -> StepObs {
        let r = self.range(off, pages);
        let req = ScanRequest {
            flags: if wp_matching {
                SCAN_WP_MATCHING | SCAN_CHECK_WPASYNC
            } else {
                0
            },
            start: r.start(),
            end: r.end(),
            category_mask: category::WRITTEN,
            return_mask: category::WRITTEN,
            ..Default::default()
        };
        let x = self.lab.mm().scan(&req, 64);
        let mut obs = StepObs::result(result(&x));
        if let Ok(s) = &x {
            let rel = |a: u64| self.page_of(a);
            obs.scan = Some((
                s.regions
                    .iter()
                    .map(|g| [rel(g.start), rel(g.end), g.categories])
                    .collect(),
                rel(s.walk_end),
            ));
        }
        obs
    }

    /// The first byte of every present or swapped page, read through the backend's memory
    /// (which faults the page in, swapping it in if need be); `-1`: neither present nor
    /// swapped; `-2`: the read failed.
    fn contents(&mut self) -> Vec<i16> {
        let states = self.page_states();
        states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if s.present || s.swapped {
                    let mut b = [0u8];
                    let addr = self.base + i as u64 * PAGE_SIZE;
                    match self.lab.mm().read_memory(addr, &mut b) {
                        Ok(()) => i16::from(b[0]),
                        Err(_) => -2,
                    }
                } else {
                    -1
                }
            })
            .collect()
    }
}

/// The pages of the arena as [`StepObs::pages`] shows them.
fn pages_string(states: &[PageState]) -> String {
    states
        .iter()
        .map(|s| match (s.present, s.uffd_wp, s.swapped) {
            (true, true, _) => 'P',
            (true, false, _) => 'p',
            (false, true, _) => 'm',
            (false, false, true) => 's',
            _ => '.',
        })
        .collect()
}

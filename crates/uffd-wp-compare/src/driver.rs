//! The driver: runs a [`Case`] on one side, deciding every call from its own bookkeeping of the
//! arena so that both sides get exactly the same calls, and records what each operation showed.

use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::seam::{Errno, ScanRequest};
use uffd_wp::seam::{SCAN_CHECK_WPASYNC, SCAN_WP_MATCHING, bits, category};
use uffd_wp::sys::errno_name;

use crate::{Case, CaseObs, MapKind, Op, StepObs, THP_SCALE, arena_pages};

/// The operations a side (kernel or model) must provide, on absolute addresses.
pub(crate) trait Side {
    fn base(&self) -> u64;
    fn map(&mut self, r: Range, kind: MapKind) -> Result<(), Errno>;
    fn unmap(&mut self, r: Range) -> Result<(), Errno>;
    /// Writes `v` at `addr`, serving WP faults by un-protecting the page; returns the faults.
    fn write(&mut self, addr: u64, v: u8) -> Result<Vec<(u64, u64)>, Errno>;
    fn dontneed(&mut self, r: Range) -> Result<(), Errno>;
    fn pageout(&mut self, r: Range) -> Result<(), Errno>;
    /// Pins the page at `addr`, writes 8 bytes of `v` at `addr` through the pin, unpins;
    /// serves WP faults the pin raises. Returns the faults.
    fn pin_write(&mut self, addr: u64, v: u8) -> Result<Vec<(u64, u64)>, Errno>;
    fn register(&mut self, r: Range) -> Result<(), Errno>;
    fn unregister(&mut self, r: Range) -> Result<(), Errno>;
    fn protect(&mut self, r: Range, wp: bool) -> Result<(), Errno>;
    /// One `PAGEMAP_SCAN`: regions and walk_end.
    fn scan(&mut self, req: &ScanRequest, vec_len: usize) -> Result<(Vec<[u64; 3]>, u64), Errno>;
    fn pagemap(&mut self) -> Vec<u64>;
    /// A CPU read of the byte at `addr` (which faults the page in, swapping it in if need be).
    fn first_byte(&mut self, addr: u64) -> Option<u8>;
    /// Called after every operation: the model checks its internal invariants here.
    fn after_op(&mut self) {}
}

/// Runs a case on one side. The decisions that depend on the arena's layout (skip a map that
/// overlaps, write only mapped pages) are taken from the driver's own bookkeeping, so both
/// sides see exactly the same calls.
pub(crate) fn run_case(side: &mut dyn Side, case: &Case) -> CaseObs {
    let mut d = Driver::new(side, case);
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
    side: &'a mut dyn Side,
    base: u64,
    /// Pages in the arena.
    pages: u64,
    /// The THP arena: offsets and lengths scaled by [`THP_SCALE`].
    thp: bool,
    layout: Layout,
}

/// An operation's result: `"ok"` or the errno's name.
fn result<T>(r: &Result<T, Errno>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => errno_name(*e),
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

impl<'a> Driver<'a> {
    fn new(side: &'a mut dyn Side, case: &Case) -> Driver<'a> {
        Driver {
            base: side.base(),
            side,
            pages: arena_pages(case.config.thp),
            thp: case.config.thp,
            layout: Layout::default(),
        }
    }

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
                StepObs::result(result(&self.side.register(self.range(off, pages))))
            }
            Op::Unregister { off, pages } => {
                StepObs::result(result(&self.side.unregister(self.range(off, pages))))
            }
            Op::Protect { off, pages, wp } => {
                StepObs::result(result(&self.side.protect(self.range(off, pages), wp)))
            }
            Op::Scan {
                off,
                pages,
                wp_matching,
            } => self.scan(off, pages, wp_matching),
        };
        self.side.after_op();
        obs.pages = pages_string(&self.side.pagemap());
        obs
    }

    /// `Op::Map`, skipped where it would overlap a mapping.
    fn map(&mut self, off: u64, pages: u64, kind: MapKind) -> StepObs {
        // In the THP arena a map may cover a whole huge page (up to 512 pages).
        let r = self.range(off, if self.thp { pages * 2 } else { pages });
        if !self.layout.mapped.clip(r).is_empty() {
            return skipped();
        }
        let x = self.side.map(r, kind);
        if x.is_ok() {
            self.layout.add(r, kind);
        }
        StepObs::result(result(&x))
    }

    /// `Op::Unmap`.
    fn unmap(&mut self, off: u64, pages: u64) -> StepObs {
        let r = self.range(off, pages);
        let x = self.side.unmap(r);
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
            self.side.pin_write(r.start(), v)
        } else {
            self.side.write(r.start(), v)
        };
        let mut obs = StepObs::result(result(&x));
        if let Ok(f) = &x {
            obs.faults = f.iter().map(|(a, fl)| [self.page_of(*a), *fl]).collect();
        }
        obs
    }

    /// `Op::DontNeed` on the mapped parts of the range or `Op::PageOut` on its anonymous
    /// parts, one call per part; skipped where there are none. The result is the last error.
    fn advise(&mut self, off: u64, pages: u64, pageout: bool) -> StepObs {
        let within = if pageout {
            &self.layout.anon
        } else {
            &self.layout.mapped
        };
        let parts = within.clip(self.range(off, pages));
        if parts.is_empty() {
            return skipped();
        }
        let mut out = "ok".to_string();
        for p in parts.iter() {
            let x = if pageout {
                self.side.pageout(*p)
            } else {
                self.side.dontneed(*p)
            };
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
        let x = self.side.scan(&req, 64);
        let mut obs = StepObs::result(result(&x));
        if let Ok((regions, walk_end)) = &x {
            let rel = |a: u64| self.page_of(a);
            obs.scan = Some((
                regions
                    .iter()
                    .map(|g| [rel(g[0]), rel(g[1]), g[2]])
                    .collect(),
                rel(*walk_end),
            ));
        }
        obs
    }

    /// The first byte of every present or swapped page (`-1`: neither; `-2`: the read failed).
    fn contents(&mut self) -> Vec<i16> {
        let entries = self.side.pagemap();
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if e & (bits::PRESENT | bits::SWAPPED) != 0 {
                    self.side
                        .first_byte(self.base + i as u64 * PAGE_SIZE)
                        .map_or(-2, i16::from)
                } else {
                    -1
                }
            })
            .collect()
    }
}

/// The pages of the arena as [`StepObs::pages`] shows them.
fn pages_string(entries: &[u64]) -> String {
    entries
        .iter()
        .map(|e| {
            let (present, wp, swap) = (
                e & bits::PRESENT != 0,
                e & bits::UFFD_WP != 0,
                e & bits::SWAPPED != 0,
            );
            match (present, wp, swap) {
                (true, true, _) => 'P',
                (true, false, _) => 'p',
                (false, true, _) => 'm',
                (false, false, true) => 's',
                _ => '.',
            }
        })
        .collect()
}

//! The model side of a case.

use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, Event, RegisterMode, ScanRequest, WpMode};
use uffd_wp_model::{
    Advice, MapKind, Model, ModelConfig, ModelMm, PinFlags, Progress, Semantics, Thp, ThpSysfs,
    UffdConfig,
};

use crate::driver::Side;
use crate::{BELOW_PUD, Case, CaseObs};

struct ModelSide {
    mm: ModelMm,
    model: Model,
    base: u64,
    pages: u64,
    thp: bool,
}

/// A fresh model process with the kernel worker's surroundings (linux semantics, swap as the
/// case says, THP on madvise: this project's machines).
fn fresh(config: crate::CaseConfig) -> ModelSide {
    let cfg = ModelConfig {
        semantics: Semantics::Linux,
        swap: config.swap,
        thp: ThpSysfs::Madvise,
        thp_zero_page: true,
        soft_dirty: false,
    };
    let uffd = UffdConfig {
        features: config.features(),
        user_mode_only: false,
    };
    let mm = ModelMm::open(cfg, uffd).expect("the model offers every feature");
    let model = mm.model().clone();
    // The kernel worker's reservation around the arena: the rest of the two PMDs the arena
    // spans, with the guard pages written.
    let boundary = 4 * PUD_SIZE;
    let (lo, hi) = (boundary - PMD_SIZE, boundary + PMD_SIZE);
    let arena_lo = boundary - BELOW_PUD * PAGE_SIZE;
    let arena_hi = arena_lo + crate::ARENA_PAGES * PAGE_SIZE;
    for (a, b) in [(lo, arena_lo), (arena_hi, hi)] {
        model
            .map_at(Some(a), b - a, PAGE_SIZE, MapKind::Anon(Thp::NoHuge))
            .expect("guard mapping");
    }
    for page in crate::guard_pages(boundary) {
        let _ = model.write(page, &[1]).expect("guard write");
    }
    let thp = config.thp;
    ModelSide {
        mm,
        model,
        base: if thp {
            boundary - crate::THP_ARENA_BELOW_PUD
        } else {
            arena_lo
        },
        pages: crate::arena_pages(thp),
        thp,
    }
}

/// Runs a case on a fresh model process.
pub(crate) fn run(case: &Case) -> CaseObs {
    crate::driver::run_case(&mut fresh(case.config), case)
}

/// The fuzz check: run the case (invariants checked after every operation by
/// [`Side::after_op`]), then the exact engine over the whole arena.
pub(crate) fn fuzz(case: &Case, policy: u8) -> Result<(), String> {
    use uffd_wp::engine::protect::{OnError, WpOptions, write_protect};
    let mut side = fresh(case.config);
    crate::driver::run_case(&mut side, case);
    let arena = Range::from_bounds(side.base, side.base + side.pages * PAGE_SIZE);
    let opts = WpOptions {
        skip_pinned: policy & 1 != 0,
        on_error: match policy / 2 % 3 {
            0 => OnError::Stop,
            1 => OnError::Retry {
                attempts: 1,
                backoff: std::time::Duration::ZERO,
            },
            _ => OnError::Rollback,
        },
    };
    let truth_after = |side: &ModelSide| side.model.wp_set(arena);
    match write_protect(&side.mm, arena, &opts) {
        Ok(rep) => {
            let all = rep.protected.union(&rep.skipped).union(&rep.not_protected);
            if all != uffd_wp::range::RangeSet::single(arena)
                || !rep.protected.intersection(&rep.not_protected).is_empty()
                || !rep.skipped.intersection(&rep.protected).is_empty()
            {
                return Err(format!("the report does not partition the arena: {rep:?}"));
            }
            let truth = truth_after(&side);
            if rep.protected != truth {
                return Err(format!(
                    "report {:?} != page tables {truth:?}",
                    rep.protected
                ));
            }
        }
        Err(e) => {
            if !truth_after(&side).is_empty() && matches!(opts.on_error, OnError::Rollback) {
                return Err(format!(
                    "Err({e}) after a rollback, yet pages are protected"
                ));
            }
        }
    }
    side.model.check_invariants()
}

fn done<T>(p: Result<Progress<T>, Errno>) -> Result<(), Errno> {
    match p? {
        Progress::Done(_) => Ok(()),
        // munmap/madvise only wait for non-cooperative events, which cases never enable.
        Progress::Blocked(_) => Err(Errno::INTR),
    }
}

impl ModelSide {
    /// Serves WP faults (un-protecting the page) until access `id` completes.
    fn serve_until(
        &mut self,
        id: uffd_wp_model::AccessId,
        faults: &mut Vec<(u64, u64)>,
    ) -> Result<uffd_wp_model::Completion, Errno> {
        for _ in 0..64 {
            for ev in self.mm.read_events(16)? {
                if let Event::PageFault { flags, address, .. } = ev {
                    let page = address & !(PAGE_SIZE - 1);
                    faults.push((page, flags & 3));
                    self.mm.writeprotect(
                        Range::from_bounds(page, page + PAGE_SIZE),
                        WpMode::Unprotect { dontwake: false },
                    )?;
                }
            }
            if let Some(c) = self.model.completion(id) {
                return match c {
                    uffd_wp_model::Completion::Failed(e) => Err(e),
                    c => Ok(c),
                };
            }
        }
        Err(Errno::TIMEDOUT)
    }
}

impl Side for ModelSide {
    fn base(&self) -> u64 {
        self.base
    }
    fn map(&mut self, r: Range, kind: crate::MapKind) -> Result<(), Errno> {
        let kind = match kind {
            crate::MapKind::Anon if self.thp => MapKind::Anon(Thp::Huge),
            crate::MapKind::Anon => MapKind::Anon(Thp::NoHuge),
            crate::MapKind::Shmem => MapKind::Memfd,
            crate::MapKind::FilePrivate => MapKind::File { shared: false },
            crate::MapKind::FileShared => MapKind::File { shared: true },
        };
        self.model
            .map_at(Some(r.start()), r.len(), PAGE_SIZE, kind)
            .map(drop)
    }
    fn unmap(&mut self, r: Range) -> Result<(), Errno> {
        done(self.model.munmap(r))
    }
    fn write(&mut self, addr: u64, v: u8) -> Result<Vec<(u64, u64)>, Errno> {
        let mut faults = Vec::new();
        match self.model.write(addr, &[v])? {
            Progress::Done(()) => Ok(faults),
            Progress::Blocked(id) => self.serve_until(id, &mut faults).map(|_| faults),
        }
    }
    fn pin_write(&mut self, addr: u64, v: u8) -> Result<Vec<(u64, u64)>, Errno> {
        let mut faults = Vec::new();
        let page = Range::from_bounds(addr, addr + PAGE_SIZE);
        let pin = match self.model.pin(page, PinFlags::IO_URING)? {
            Progress::Done(p) => p,
            Progress::Blocked(id) => match self.serve_until(id, &mut faults)? {
                uffd_wp_model::Completion::Pinned(p) => uffd_wp_model::PinId(p),
                _ => return Err(Errno::FAULT),
            },
        };
        let res = self.model.dma_write(pin, 0, &[v; 8]);
        self.model.unpin(pin)?;
        res.map(|()| faults)
    }
    fn dontneed(&mut self, r: Range) -> Result<(), Errno> {
        done(self.model.madvise(r, Advice::DontNeed))
    }
    fn pageout(&mut self, r: Range) -> Result<(), Errno> {
        done(self.model.madvise(r, Advice::PageOut))
    }
    fn register(&mut self, r: Range) -> Result<(), Errno> {
        self.mm.register(r, RegisterMode::WP).map(drop)
    }
    fn unregister(&mut self, r: Range) -> Result<(), Errno> {
        self.mm.unregister(r)
    }
    fn protect(&mut self, r: Range, wp: bool) -> Result<(), Errno> {
        let mode = if wp {
            WpMode::Protect
        } else {
            WpMode::Unprotect { dontwake: false }
        };
        self.mm.writeprotect(r, mode)
    }
    fn scan(&mut self, req: &ScanRequest, vec_len: usize) -> Result<(Vec<[u64; 3]>, u64), Errno> {
        let raw = self.model.pagemap_scan(req, vec_len);
        raw.result?;
        Ok((
            raw.regions
                .iter()
                .map(|g| [g.start, g.end, g.categories])
                .collect(),
            raw.walk_end,
        ))
    }
    fn pagemap(&mut self) -> Vec<u64> {
        self.model.pagemap(Range::from_bounds(
            self.base,
            self.base + self.pages * PAGE_SIZE,
        ))
    }
    fn first_byte(&mut self, addr: u64) -> Option<u8> {
        // A read never waits: only WP is registered, and reads do not raise WP faults.
        match self.model.read(addr, 1).ok()? {
            Progress::Done(b) => b.first().copied(),
            Progress::Blocked(_) => None,
        }
    }
    fn after_op(&mut self) {
        if let Err(e) = self.model.check_invariants() {
            panic!("model invariant violated: {e}");
        }
    }
}

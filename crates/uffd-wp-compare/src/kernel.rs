//! The kernel side of a case, run in a worker process.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uffd_wp::range::{PAGE_SIZE, PUD_SIZE, Range, RangeSet};
use uffd_wp::seam::Event;
use uffd_wp::seam::{Errno, ScanRequest};
use uffd_wp::sys::mem::{Backing, Mapping, Thp};
use uffd_wp::sys::pagemap::Pagemap;
use uffd_wp::sys::uffd::{Uffd, WP_MODE_WP};

use crate::driver::Side;
use crate::{ARENA_PAGES, BELOW_PUD, Case, CaseObs, MapKind};

struct KernelSide {
    uffd: Uffd,
    pagemap: Pagemap,
    base: u64,
    pages: u64,
    thp: bool,
    maps: Vec<Mapping>,
}

/// The two arenas of the worker: the small one across the PUD boundary, the THP one.
#[derive(Clone, Copy)]
struct Arenas {
    small: u64,
    thp: u64,
}

/// The worker's main loop: one JSON [`Case`] per line on stdin, one JSON
/// `Result<CaseObs, String>` per line on stdout. Each case gets a fresh uffd and fresh mappings
/// in an arena that straddles a 1 GiB boundary of a 2 GiB reservation.
pub fn worker_main() -> ! {
    if let Err(e) = pin_to_one_cpu() {
        eprintln!("compare worker: pinning to one CPU: {e}");
        std::process::exit(2);
    }
    let arena = match reserve() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("compare worker: reserving the arena: {e}");
            std::process::exit(2);
        }
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let res: Result<CaseObs, String> = serde_json::from_str::<Case>(&line)
            .map_err(|e| format!("bad case: {e}"))
            .and_then(|c| {
                // The model would be told the wrong thing about MADV_PAGEOUT.
                if c.config.swap != crate::swap_active() {
                    return Err(format!(
                        "the case wants swap {} but /proc/swaps says {}",
                        c.config.swap,
                        crate::swap_active()
                    ));
                }
                run(&c, arena).map_err(|e| format!("set-up: {}", uffd_wp::sys::errno_name(e)))
            });
        let answer = serde_json::to_string(&res).expect("answer serializes");
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
    std::process::exit(0)
}

/// Pins the worker (every thread it will start inherits it) to the first CPU it may run on.
///
/// `MADV_PAGEOUT` only reclaims a folio it can take off the LRU (folio_isolate_lru() in
/// madvise_cold_or_pageout_pte_range(), mm/madvise.c), and a freshly faulted-in folio waits in
/// the per-CPU `lru_add` batch of the CPU that faulted it (folio_add_lru(), mm/swap.c) until
/// that batch is drained; madvise_pageout() drains only the calling CPU's batches
/// (lru_add_drain()). With the fault served on one thread and the madvise made on another, the
/// page was swapped out or left present depending on where the scheduler ran them (11 of 60
/// runs of one case left it present). On one CPU every batch is drained first: seen 60 of 60.
fn pin_to_one_cpu() -> Result<(), Errno> {
    use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
    let allowed = sched_getaffinity(None)?;
    let cpu = (0..CpuSet::MAX_CPU)
        .find(|&c| allowed.is_set(c))
        .ok_or(Errno::INVAL)?;
    let mut one = CpuSet::new();
    one.set(cpu);
    sched_setaffinity(None, &one)
}

/// Reserves 2 GiB aligned to 1 GiB and leaves the arena (64 pages around the middle boundary)
/// unmapped inside it, so nothing else lands next to it. The reservation is leaked on purpose:
/// it lives as long as the worker.
fn reserve() -> Result<Arenas, Errno> {
    let mut r = Mapping::new(2 * PUD_SIZE, PUD_SIZE, Backing::Anon, Thp::NoHuge)?;
    let boundary = r.range().start() + PUD_SIZE;
    let base = boundary - BELOW_PUD * PAGE_SIZE;
    // One written page in each of the two PMDs the arena spans, outside it: their page tables
    // then exist for the worker's whole life (free_pgtables() keeps tables a neighbouring VMA
    // still uses), so every case starts from the same page-table state. The model does the same
    // (crate::GUARD_PAGES).
    for page in crate::guard_pages(boundary) {
        r.touch(Range::from_bounds(page, page + PAGE_SIZE), 1)?;
    }
    r.punch(Range::from_bounds(base, base + ARENA_PAGES * PAGE_SIZE))?;
    let thp = boundary - crate::THP_ARENA_BELOW_PUD;
    r.punch(Range::from_bounds(
        thp,
        thp + crate::THP_ARENA_PAGES * PAGE_SIZE,
    ))?;
    std::mem::forget(r);
    Ok(Arenas { small: base, thp })
}

fn run(case: &Case, arenas: Arenas) -> Result<CaseObs, Errno> {
    let uffd = Uffd::create(true, false)?;
    uffd.api(case.config.features().0)?;
    let thp = case.config.thp;
    let mut side = KernelSide {
        uffd,
        pagemap: Pagemap::open_self()?,
        base: if thp { arenas.thp } else { arenas.small },
        pages: crate::arena_pages(thp),
        thp,
        maps: Vec::new(),
    };
    let obs = crate::driver::run_case(&mut side, case);
    // Tear down: closing the uffd releases every registration; the mappings unmap on drop.
    let KernelSide { uffd, maps, .. } = side;
    drop(uffd);
    drop(maps);
    Ok(obs)
}

/// Runs `f` on another thread while this one serves the WP faults it raises (un-protecting the
/// faulting page); gives up after 5 s, unregistering the arena (which wakes the waiter).
fn serving<T: Send>(
    uffd: &Uffd,
    base: u64,
    pages: u64,
    f: impl FnOnce() -> Result<T, Errno> + Send,
) -> (Result<T, Errno>, Vec<(u64, u64)>) {
    let done = AtomicBool::new(false);
    let mut faults = Vec::new();
    let mut timed_out = false;
    let res = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let r = f();
            done.store(true, Ordering::Release);
            r
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                // Unregistering wakes the waiter (fs/userfaultfd.c, userfaultfd_unregister).
                let _ = uffd.unregister(base, pages * PAGE_SIZE);
                timed_out = true;
                break;
            }
            if !uffd.poll(1).unwrap_or(false) {
                continue;
            }
            for msg in uffd.read_msgs(16).unwrap_or_default() {
                if let Event::PageFault { flags, address, .. } = Event::decode(&msg) {
                    let page = address & !(PAGE_SIZE - 1);
                    faults.push((page, flags & 3));
                    let _ = uffd.writeprotect(page, PAGE_SIZE, 0);
                }
            }
        }
        worker.join().expect("worker thread")
    });
    if timed_out {
        return (Err(Errno::TIMEDOUT), faults);
    }
    (res, faults)
}

impl KernelSide {
    /// `madvise` on `r`, each owning mapping its share.
    fn advise(&self, r: Range, advice: rustix::mm::Advice) -> Result<(), Errno> {
        for m in &self.maps {
            let owned = RangeSet::single(m.range()).difference(m.holes());
            for part in owned.clip(r).iter() {
                m.madvise(*part, advice)?;
            }
        }
        Ok(())
    }

    fn owner(&self, addr: u64) -> Option<&Mapping> {
        self.maps
            .iter()
            .find(|m| m.range().contains(addr) && !m.holes().contains(addr))
    }
}

impl Side for KernelSide {
    fn base(&self) -> u64 {
        self.base
    }
    fn map(&mut self, r: Range, kind: MapKind) -> Result<(), Errno> {
        let backing = match kind {
            MapKind::Anon if self.thp => Backing::AnonHuge,
            MapKind::Anon => Backing::Anon,
            MapKind::Shmem => Backing::Memfd,
            MapKind::FilePrivate => Backing::File { shared: false },
            MapKind::FileShared => Backing::File { shared: true },
        };
        self.maps
            .push(Mapping::new_at(r.start(), r.len(), backing)?);
        Ok(())
    }
    fn unmap(&mut self, r: Range) -> Result<(), Errno> {
        for m in &mut self.maps {
            let owned = RangeSet::single(m.range()).difference(m.holes());
            for part in owned.clip(r).iter() {
                m.punch(*part)?;
            }
        }
        Ok(())
    }
    fn write(&mut self, addr: u64, v: u8) -> Result<Vec<(u64, u64)>, Errno> {
        let m = self.owner(addr).ok_or(Errno::FAULT)?;
        let (res, faults) = serving(&self.uffd, self.base, self.pages, || m.write(addr, &[v]));
        res.map(|()| faults)
    }
    fn pin_write(&mut self, addr: u64, v: u8) -> Result<Vec<(u64, u64)>, Errno> {
        use uffd_wp::sys::uring::FixedRing;
        let i = self
            .maps
            .iter()
            .position(|m| m.range().contains(addr) && !m.holes().contains(addr))
            .ok_or(Errno::FAULT)?;
        let page = Range::from_bounds(addr, addr + PAGE_SIZE);
        let mut ring = FixedRing::new(2)?;
        ring.adopt(self.maps.remove(i));
        let (reg, faults) = serving(&self.uffd, self.base, self.pages, || {
            ring.register_buffers(&[page])
        });
        let res = reg.and_then(|()| {
            let src = rustix::fs::memfd_create("uffd-wp-src", rustix::fs::MemfdFlags::CLOEXEC)?;
            rustix::io::pwrite(&src, &[v; 8], 0)?;
            let n = ring.fixed(
                rustix::fd::AsFd::as_fd(&src),
                uffd_wp::sys::uring::FixedIo::read(0, addr, 8, 0),
            );
            let _ = ring.unregister_buffers();
            n.and_then(|n| if n == 8 { Ok(()) } else { Err(Errno::IO) })
        });
        self.maps.extend(ring.take_memory()?);
        res.map(|()| faults)
    }
    fn dontneed(&mut self, r: Range) -> Result<(), Errno> {
        self.advise(r, rustix::mm::Advice::LinuxDontNeed)
    }
    fn pageout(&mut self, r: Range) -> Result<(), Errno> {
        self.advise(r, rustix::mm::Advice::LinuxPageOut)
    }
    fn register(&mut self, r: Range) -> Result<(), Errno> {
        self.uffd.register(r.start(), r.len(), 2).map(drop)
    }
    fn unregister(&mut self, r: Range) -> Result<(), Errno> {
        self.uffd.unregister(r.start(), r.len())
    }
    fn protect(&mut self, r: Range, wp: bool) -> Result<(), Errno> {
        self.uffd
            .writeprotect(r.start(), r.len(), if wp { WP_MODE_WP } else { 0 })
    }
    fn scan(&mut self, req: &ScanRequest, vec_len: usize) -> Result<(Vec<[u64; 3]>, u64), Errno> {
        let r = uffd_wp::backend::linux::scan_once(&self.pagemap, req, vec_len)?;
        Ok((
            r.regions
                .iter()
                .map(|g| [g.start, g.end, g.categories])
                .collect(),
            r.walk_end,
        ))
    }
    fn pagemap(&mut self) -> Vec<u64> {
        self.pagemap
            .entries(self.base, self.pages)
            .unwrap_or_else(|_| vec![0; self.pages as usize])
    }
    fn first_byte(&mut self, addr: u64) -> Option<u8> {
        let mut b = [0u8];
        self.owner(addr)?.read(addr, &mut b).ok()?;
        Some(b[0])
    }
}

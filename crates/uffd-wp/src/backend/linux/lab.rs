//! The Linux [`Lab`]: real mappings in this process and a real uffd.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::backend::inject::InjectMm;
use crate::backend::linux::fail_nth::FailNth;
use crate::backend::linux::memcg::{LIMIT_BYTES, Limiter, prepare_limited};
use crate::backend::linux::{Config, LinuxMm};
use crate::backend::pins::io::read_fixed_serving_faults;
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::lab::{
    Advice, Lab, LabConfig, LabError, MapKind, PinWrite, Rule, WpFault, serve_wp_faults,
};
use crate::seam::prelude::*;
use crate::seam::{Errno, Wrap};
use crate::sys::mem::{Backing, Mapping, Thp};
use crate::sys::pagemap::{Pagemap, bits};
use crate::sys::uring::FixedRing;

/// Real mappings plus a [`LinuxMm`] behind an [`InjectMm`]. The uffd is closed (releasing all
/// protection) before the mappings are unmapped.
#[derive(Debug)]
pub struct LinuxLab {
    mm: std::sync::Arc<InjectMm<LinuxMm>>,
    pagemap: Pagemap,
    maps: Vec<Mapping>,
    /// io_uring rings holding fixed buffers over mappings they took from `maps`.
    rings: Vec<FixedRing>,
    /// The file `write_through_pin` reads from (a memfd).
    pin_src: Option<OwnedFd>,
    /// The memory cgroup `limit_next_writeprotect` moves this process into, if any.
    limiter: Option<Arc<Limiter>>,
}

impl LinuxLab {
    /// Opens a lab; `cfg` chooses whether to negotiate WP_UNPOPULATED and WP_ASYNC.
    pub fn open(cfg: LabConfig) -> Result<LinuxLab, LabError> {
        let c = if cfg.async_wp {
            Config::async_wp()
        } else if cfg.wp_unpopulated {
            let d = Config::default();
            Config {
                required: d.required.with(crate::features::Features::WP_UNPOPULATED),
                ..d
            }
        } else {
            Config::without_unpopulated()
        };
        Self::open_with(c)
    }

    /// Opens a lab whose uffd negotiates exactly what `c` says (the differential tester asks
    /// for the very features of a case).
    pub fn open_with(c: Config) -> Result<LinuxLab, LabError> {
        let mm = LinuxMm::open_with(c).map_err(|e| LabError::Unavailable {
            scenario: "(any)".into(),
            backend: "linux".into(),
            why: e.to_string(),
        })?;
        Ok(LinuxLab {
            mm: std::sync::Arc::new(InjectMm::new(mm)),
            pagemap: Pagemap::open_self().map_err(LabError::setup("open /proc/self/pagemap"))?,
            maps: Vec::new(),
            rings: Vec::new(),
            pin_src: None,
            limiter: None,
        })
    }

    /// The same lab, able to limit page-table allocations through `limiter`'s memory cgroup
    /// ([`Lab::limit_next_writeprotect`]). Only a process that may be limited (a helper, see
    /// [`crate::backend::linux::memcg`]) should do this.
    pub fn with_limiter(mut self, limiter: Limiter) -> LinuxLab {
        self.limiter = Some(Arc::new(limiter));
        self
    }

    /// The mapping owning `r`, among the lab's and those its rings hold.
    fn mapping(&self, r: Range) -> Result<&Mapping, LabError> {
        let owns =
            |m: &&Mapping| m.range().intersect(&r) == Some(r) && m.holes().clip(r).is_empty();
        self.maps
            .iter()
            .rev()
            .find(owns)
            .or_else(|| self.rings.iter().flat_map(|g| g.memory()).find(owns))
            .ok_or(LabError::Setup {
                what: format!("no lab mapping holds {r}"),
                errno: Errno::FAULT,
            })
    }

    /// The backend itself, under the injector: the lab serves its own faults with it, so that
    /// injected failures hit only the calls a scenario makes.
    fn raw(&self) -> &LinuxMm {
        Wrap::inner(&*self.mm)
    }
}

/// The parts of `r` that `m` holds (inside it, not in a hole).
fn held(m: &Mapping, r: Range) -> RangeSet {
    RangeSet::single(m.range()).difference(m.holes()).clip(r)
}

/// Runs `f` on another thread while this one serves the uffd-wp faults it raises through `mm`
/// ([`serve_wp_faults`]). Gives up after 5 s with ETIMEDOUT, unregistering `r` and waking its
/// waiters so that `f` can finish.
fn serving<T: Send>(
    mm: &LinuxMm,
    r: Range,
    f: impl FnOnce() -> Result<T, Errno> + Send,
) -> (Result<T, Errno>, Vec<WpFault>) {
    let done = AtomicBool::new(false);
    let mut faults = Vec::new();
    let mut timed_out = false;
    let res = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let res = f();
            done.store(true, Ordering::Release);
            res
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                let _ = mm.unregister(r);
                let _ = mm.wake(r);
                timed_out = true;
                break;
            }
            if mm.wait_event(1).unwrap_or(false) {
                let _ = serve_wp_faults(mm, &mut faults);
            }
        }
        worker.join().expect("the accessing thread")
    });
    if timed_out {
        return (Err(Errno::TIMEDOUT), faults);
    }
    (res, faults)
}

impl Lab for LinuxLab {
    fn mm(&self) -> &dyn Mm {
        &*self.mm
    }
    fn mm_arc(&self) -> std::sync::Arc<dyn Mm> {
        self.mm.clone()
    }
    fn inject(&self, rule: Rule) {
        self.mm.add_rule(rule);
    }
    fn reset_injection(&self) {
        self.mm.clear_rules();
        self.mm.clear_calls();
    }
    fn raw_results(&self) -> Vec<(Option<Errno>, bool)> {
        self.mm.raw_results()
    }
    fn map(&mut self, len: u64, align: u64, kind: MapKind) -> Result<Range, LabError> {
        let (backing, thp) = match kind {
            MapKind::Anon => (Backing::Anon, Thp::NoHuge),
            MapKind::AnonThp => (Backing::Anon, Thp::Huge),
            MapKind::Memfd => (Backing::Memfd, Thp::Default),
            MapKind::File { shared } => (Backing::File { shared }, Thp::Default),
        };
        let m = Mapping::new(len, align, backing, thp).map_err(LabError::setup("mmap"))?;
        let r = m.range();
        self.maps.push(m);
        Ok(r)
    }
    /// `MAP_FIXED_NOREPLACE`, with the THP advice of [`LinuxLab::map`].
    fn map_at(&mut self, r: Range, kind: MapKind) -> Result<(), LabError> {
        let backing = match kind {
            MapKind::Anon => Backing::Anon,
            MapKind::AnonThp => Backing::AnonHuge,
            MapKind::Memfd => Backing::Memfd,
            MapKind::File { shared } => Backing::File { shared },
        };
        let m = Mapping::new_at(r.start(), r.len(), backing)
            .map_err(LabError::setup(format!("mmap at {r}")))?;
        self.maps.push(m);
        Ok(())
    }
    /// One `munmap` per part a mapping holds. Memory a ring holds (pinned) is refused.
    fn punch(&mut self, r: Range) -> Result<(), LabError> {
        if let Some(m) = self
            .rings
            .iter()
            .flat_map(|g| g.memory())
            .find(|m| !held(m, r).is_empty())
        {
            return Err(LabError::Setup {
                what: format!("munmap of {r}: {} is pinned", m.range()),
                errno: Errno::BUSY,
            });
        }
        for m in &mut self.maps {
            for part in held(m, r).iter() {
                m.punch(*part).map_err(LabError::setup("munmap"))?;
            }
        }
        Ok(())
    }
    fn touch(&mut self, r: Range) -> Result<(), LabError> {
        self.mapping(r)?
            .touch(r, 0x5a)
            .map_err(LabError::setup("touch pages"))
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<Vec<WpFault>, LabError> {
        let what = || format!("writing {:#x} bytes at {addr:#x}", data.len());
        let end = addr
            .checked_add(data.len() as u64)
            .filter(|_| !data.is_empty())
            .ok_or_else(|| LabError::setup(what())(Errno::INVAL))?;
        let r = Range::from_bounds(addr & !(PAGE_SIZE - 1), end.next_multiple_of(PAGE_SIZE));
        let m = self.mapping(r)?;
        let (res, faults) = serving(self.raw(), r, || m.write(addr, data));
        res.map_err(LabError::setup(what()))?;
        Ok(faults)
    }
    fn advise(&mut self, r: Range, advice: Advice) -> Result<(), LabError> {
        let advice = match advice {
            Advice::DontNeed => rustix::mm::Advice::LinuxDontNeed,
            Advice::PageOut => rustix::mm::Advice::LinuxPageOut,
        };
        for m in &self.maps {
            for part in held(m, r).iter() {
                m.madvise(*part, advice)
                    .map_err(LabError::setup(format!("madvise of {part}")))?;
            }
        }
        Ok(())
    }
    fn verify_wp(&self, r: Range) -> Result<RangeSet, LabError> {
        let e = self
            .pagemap
            .entries(r.start(), r.pages())
            .map_err(LabError::setup("read /proc/self/pagemap"))?;
        Ok(e.iter()
            .enumerate()
            .filter(|(_, x)| *x & bits::UFFD_WP != 0)
            .map(|(i, _)| {
                let a = r.start() + i as u64 * crate::range::PAGE_SIZE;
                Range::from_bounds(a, a + crate::range::PAGE_SIZE)
            })
            .collect())
    }

    /// `IORING_REGISTER_BUFFERS` of `r` on a new ring, which takes over the mapping holding it.
    fn pin_fixed_buffer(&mut self, r: Range) -> Result<Vec<WpFault>, LabError> {
        let i = self
            .maps
            .iter()
            .rposition(|m| m.range().intersect(&r) == Some(r) && m.holes().clip(r).is_empty())
            .ok_or(LabError::Setup {
                what: format!("no lab mapping holds {r}"),
                errno: Errno::FAULT,
            })?;
        let mut ring = FixedRing::new(4).map_err(|errno| LabError::Unavailable {
            scenario: "pinned-io-uring".into(),
            backend: "linux".into(),
            why: format!("io_uring_setup: {}", crate::sys::errno_name(errno)),
        })?;
        ring.adopt(self.maps.remove(i));
        let (res, faults) = serving(self.raw(), r, || ring.register_buffers(&[r]));
        if let Err(errno) = res {
            self.maps.extend(ring.take_memory().unwrap_or_default());
            return Err(LabError::Setup {
                what: format!("IORING_REGISTER_BUFFERS of {r}"),
                errno,
            });
        }
        self.rings.push(ring);
        Ok(faults)
    }

    fn unpin_fixed_buffer(&mut self, r: Range) -> Result<(), LabError> {
        let i = self
            .rings
            .iter()
            .position(|g| g.buffers() == [r])
            .ok_or(LabError::Setup {
                what: format!("no pinned buffer is {r}"),
                errno: Errno::FAULT,
            })?;
        let memory = self.rings[i]
            .unregister_buffers()
            .and_then(|()| self.rings[i].take_memory())
            .map_err(LabError::setup(format!("IORING_UNREGISTER_BUFFERS of {r}")))?;
        self.maps.extend(memory);
        self.rings.remove(i);
        Ok(())
    }

    /// `IORING_OP_READ_FIXED` from a memfd holding `data`, serving uffd-wp faults if any.
    fn write_through_pin(&mut self, addr: u64, data: &[u8]) -> Result<PinWrite, LabError> {
        let len = u32::try_from(data.len()).map_err(|_| LabError::Setup {
            what: "write_through_pin: data longer than 4 GiB".into(),
            errno: Errno::INVAL,
        })?;
        let end = addr + u64::from(len);
        let (ring, index) = self
            .rings
            .iter_mut()
            .find_map(|g| {
                let i = g
                    .buffers()
                    .iter()
                    .position(|b| b.start() <= addr && end <= b.end())?;
                Some((g, i as u16))
            })
            .ok_or(LabError::Setup {
                what: format!("no pinned buffer holds {len:#x} bytes at {addr:#x}"),
                errno: Errno::FAULT,
            })?;
        if self.pin_src.is_none() {
            let fd = rustix::fs::memfd_create("uffd-wp-pin-src", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(LabError::setup("memfd_create"))?;
            self.pin_src = Some(fd);
        }
        let src = self.pin_src.as_ref().expect("just set");
        rustix::io::pwrite(src, data, 0).map_err(LabError::setup("writing the source file"))?;
        let w = read_fixed_serving_faults(
            ring,
            src,
            index,
            addr,
            len,
            0,
            Wrap::inner(&*self.mm).uffd(),
        )
        .map_err(|e| LabError::Setup {
            what: e.to_string(),
            errno: e.errno(),
        })?;
        let mut back = vec![0u8; data.len()];
        ring.memory()
            .iter()
            .find(|m| m.range().contains(addr))
            .ok_or(LabError::Setup {
                what: format!("no ring memory holds {addr:#x}"),
                errno: Errno::FAULT,
            })?
            .read(addr, &mut back)
            .map_err(LabError::setup("reading the buffer back"))?;
        Ok(PinWrite {
            bytes: w.bytes.into(),
            landed: back == data,
            wp_faults: w.wp_faults,
        })
    }

    /// Makes the next raw call's page-table allocations fail after [`PAGE_TABLES_ALLOWED`]:
    /// with the kernel's fault injection where it has it ([`FailNth`]: this thread's
    /// allocation [`PAGE_TABLES_ALLOWED`] + 1 fails), else through the lab's memory cgroup
    /// ([`Self::limit_through_memcg`]).
    fn limit_next_writeprotect(&mut self) -> Result<String, LabError> {
        if !FailNth::available() {
            return self.limit_through_memcg();
        }
        self.fail_around_next_writeprotect(PAGE_TABLES_ALLOWED)?;
        Ok(format!(
            "fault injection: page allocation {} of this thread fails",
            PAGE_TABLES_ALLOWED + 1
        ))
    }

    /// The kernel's fault injection ([`FailNth`]), armed right before the next raw call.
    fn fail_next_writeprotect_alloc(&mut self, nth: u64) -> Result<String, LabError> {
        if !FailNth::available() {
            return Err(LabError::Unavailable {
                scenario: "(page-table allocation failure)".into(),
                backend: "linux".into(),
                why: "this kernel has no fault injection (FAIL_PAGE_ALLOC, debugfs, \
                      /proc/thread-self/fail-nth); kernel/run's test kernels have it"
                    .into(),
            });
        }
        self.fail_around_next_writeprotect(nth.saturating_sub(1))?;
        Ok(format!(
            "fault injection: page allocation {nth} of the call fails"
        ))
    }
}

/// Page tables a limited raw call may allocate/// Page tables a limited raw call may allocate: as many as fit in the memory cgroup's limit,
/// and the same for fault injection, so both ways fail at the same allocation.
pub const PAGE_TABLES_ALLOWED: u64 = LIMIT_BYTES / PAGE_SIZE;

impl LinuxLab {
    /// Arms [`FailNth`] for `allowed` page allocations then a failure, in this thread, right
    /// before the next raw call enters the kernel, and disarms it right after: everything that
    /// allocates is done here, so only the call's own allocations count.
    fn fail_around_next_writeprotect(&mut self, allowed: u64) -> Result<(), LabError> {
        let mut fail = FailNth::open()?;
        fail.prepare(allowed)?;
        let fail = Arc::new(std::sync::Mutex::new(fail));
        let arm = Arc::clone(&fail);
        self.mm.before_next_writeprotect(Box::new(move || {
            // An arming that fails injects nothing: the call's outcome shows it.
            if let Ok(mut f) = arm.lock() {
                let _ = f.fire();
            }
        }));
        self.mm.after_next_writeprotect(Box::new(move || {
            if let Ok(mut f) = fail.lock() {
                let _ = f.disarm();
            }
        }));
        Ok(())
    }

    /// Moves this process into its limiter's cgroup (limited to [`LIMIT_BYTES`]); the
    /// injector raises the limit right after the next raw call returns. The hook is built and
    /// the stack and heap warmed before entering: nothing may fault in a page while limited.
    fn limit_through_memcg(&mut self) -> Result<String, LabError> {
        let Some(limiter) = self.limiter.clone() else {
            return Err(LabError::Unavailable {
                scenario: "(page-table limit)".into(),
                backend: "linux".into(),
                why: "this kernel has no fault injection (FAIL_PAGE_ALLOC), and only a lab \
                      opened with a memory cgroup limiter (LinuxLab::with_limiter, in a limited \
                      helper process) can limit page-table allocations otherwise"
                    .into(),
            });
        };
        let what = format!("{} MiB memory cgroup", LIMIT_BYTES >> 20);
        let raise = Arc::clone(&limiter);
        self.mm.after_next_writeprotect(Box::new(move || {
            // A failure shows in the next step: the cgroup stays limited and its task hangs
            // in a fault, which the parent sees (under_oom) and ends.
            let _ = raise.raise();
        }));
        prepare_limited();
        limiter.enter()?;
        Ok(what)
    }
}

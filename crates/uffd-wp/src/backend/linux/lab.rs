//! The Linux [`Lab`]: real mappings in this process and a real uffd.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::backend::inject::InjectMm;
use crate::backend::linux::memcg::{LIMIT_BYTES, Limiter, prepare_limited};
use crate::backend::linux::{Config, LinuxMm};
use crate::backend::pins::io::read_fixed_serving_faults;
use crate::range::{Range, RangeSet};
use crate::seam::lab::{Lab, LabConfig, LabError, MapKind, PinWrite, Rule};
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

    /// The mapping owning `r` (newest first: a fully punched mapping's addresses can be
    /// reused by a later one).
    fn owner(&mut self, r: Range) -> Result<&mut Mapping, LabError> {
        self.maps
            .iter_mut()
            .rev()
            .find(|m| m.range().intersect(&r) == Some(r) && m.holes().clip(r).is_empty())
            .ok_or(LabError::Setup {
                what: format!("no lab mapping holds {r}"),
                errno: Errno::FAULT,
            })
    }
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
        };
        let m = Mapping::new(len, align, backing, thp).map_err(LabError::setup("mmap"))?;
        let r = m.range();
        self.maps.push(m);
        Ok(r)
    }
    fn punch(&mut self, r: Range) -> Result<(), LabError> {
        self.owner(r)?.punch(r).map_err(LabError::setup("munmap"))
    }
    fn touch(&mut self, r: Range) -> Result<(), LabError> {
        self.mapping(r)?
            .touch(r, 0x5a)
            .map_err(LabError::setup("touch pages"))
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
    fn pin_fixed_buffer(&mut self, r: Range) -> Result<(), LabError> {
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
        if let Err(errno) = ring.register_buffers(&[r]) {
            self.maps.extend(ring.take_memory().unwrap_or_default());
            return Err(LabError::Setup {
                what: format!("IORING_REGISTER_BUFFERS of {r}"),
                errno,
            });
        }
        self.rings.push(ring);
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

    /// Moves this process into its limiter's cgroup (limited to [`LIMIT_BYTES`]); the
    /// injector raises the limit right after the next raw call returns. The hook is built and
    /// the stack and heap warmed before entering: nothing may fault in a page while limited.
    fn limit_next_writeprotect(&mut self) -> Result<String, LabError> {
        let Some(limiter) = self.limiter.clone() else {
            return Err(LabError::Unavailable {
                scenario: "(page-table limit)".into(),
                backend: "linux".into(),
                why: "only a lab opened with a memory cgroup limiter (LinuxLab::with_limiter, in \
                      a limited helper process) can limit page-table allocations"
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

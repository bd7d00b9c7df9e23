//! The Linux [`Lab`]: real mappings in this process and a real uffd.

use crate::inject::{InjectMm, Rule};
use crate::linux::{Config, LinuxMm};
use crate::mm::{Errno, Mm};
use crate::range::{Range, RangeSet};
use crate::scenario::{Lab, LabConfig, LabFactory, MapKind, ScenarioError, Step, raw_results_of};
use crate::sys::mem::{Backing, Mapping, Thp};
use crate::sys::pagemap::{Pagemap, bits};

/// Labs on the real kernel, in this process.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxLabs;

impl LabFactory for LinuxLabs {
    fn backend(&self) -> &'static str {
        "linux"
    }

    fn open(&self, cfg: LabConfig) -> Result<Box<dyn Lab>, ScenarioError> {
        Ok(Box::new(LinuxLab::open(cfg)?))
    }

    fn lost_enomem(&self) -> Result<Vec<Step>, ScenarioError> {
        super::lost_enomem::run()
    }
}

/// Real mappings plus a [`LinuxMm`] behind an [`InjectMm`]. The uffd is closed (releasing all
/// protection) before the mappings are unmapped.
#[derive(Debug)]
pub struct LinuxLab {
    mm: InjectMm<LinuxMm>,
    pagemap: Pagemap,
    maps: Vec<Mapping>,
}

impl LinuxLab {
    /// Opens a lab; `cfg.wp_unpopulated` chooses whether to negotiate WP_UNPOPULATED.
    pub fn open(cfg: LabConfig) -> Result<LinuxLab, ScenarioError> {
        let c = if cfg.wp_unpopulated {
            let d = Config::default();
            Config {
                required: d.required.with(crate::features::Features::WP_UNPOPULATED),
                ..d
            }
        } else {
            Config::without_unpopulated()
        };
        let mm = LinuxMm::open_with(c).map_err(|e| ScenarioError::Unavailable {
            scenario: "(any)".into(),
            backend: "linux".into(),
            why: e.to_string(),
        })?;
        Ok(LinuxLab {
            mm: InjectMm::new(mm),
            pagemap: Pagemap::open_self()
                .map_err(ScenarioError::setup("open /proc/self/pagemap"))?,
            maps: Vec::new(),
        })
    }

    /// The mapping owning `r` (newest first: a fully punched mapping's addresses can be
    /// reused by a later one).
    fn owner(&mut self, r: Range) -> Result<&mut Mapping, ScenarioError> {
        self.maps
            .iter_mut()
            .rev()
            .find(|m| m.range().intersect(&r) == Some(r) && m.holes().clip(r).is_empty())
            .ok_or(ScenarioError::Setup {
                what: format!("no lab mapping holds {r}"),
                errno: Errno::FAULT,
            })
    }
}

impl Lab for LinuxLab {
    fn mm(&self) -> &dyn Mm {
        &self.mm
    }
    fn inject(&self, rule: Rule) {
        self.mm.add_rule(rule);
    }
    fn reset_injection(&self) {
        self.mm.clear_rules();
        self.mm.clear_calls();
    }
    fn raw_results(&self) -> Vec<(Option<Errno>, bool)> {
        raw_results_of(&self.mm)
    }
    fn map(&mut self, len: u64, align: u64, kind: MapKind) -> Result<Range, ScenarioError> {
        let (backing, thp) = match kind {
            MapKind::Anon => (Backing::Anon, Thp::NoHuge),
            MapKind::AnonThp => (Backing::Anon, Thp::Huge),
            MapKind::Memfd => (Backing::Memfd, Thp::Default),
        };
        let m = Mapping::new(len, align, backing, thp).map_err(ScenarioError::setup("mmap"))?;
        let r = m.range();
        self.maps.push(m);
        Ok(r)
    }
    fn punch(&mut self, r: Range) -> Result<(), ScenarioError> {
        self.owner(r)?
            .punch(r)
            .map_err(ScenarioError::setup("munmap"))
    }
    fn touch(&mut self, r: Range) -> Result<(), ScenarioError> {
        self.owner(r)?
            .touch(r, 0x5a)
            .map_err(ScenarioError::setup("touch pages"))
    }
    fn verify_wp(&self, r: Range) -> Result<RangeSet, ScenarioError> {
        let e = self
            .pagemap
            .entries(r.start(), r.pages())
            .map_err(ScenarioError::setup("read /proc/self/pagemap"))?;
        Ok(e.iter()
            .enumerate()
            .filter(|(_, x)| *x & bits::UFFD_WP != 0)
            .map(|(i, _)| {
                let a = r.start() + i as u64 * crate::range::PAGE_SIZE;
                Range::from_bounds(a, a + crate::range::PAGE_SIZE)
            })
            .collect())
    }
}

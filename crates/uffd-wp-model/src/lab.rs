//! Scenario labs on the model.
//!
//! [`ModelLabs`] implements [`LabFactory`], so every built-in scenario of the library runs
//! unchanged on the model, behind the same [`InjectMm`] as on Linux; `lost-enomem` limits
//! page-table allocations with a budget where Linux uses a memory cgroup. The
//! scenarios that only the model can run (they need failures on demand, true pin counts or the
//! proposed semantics) are in [`MODEL_SCENARIOS`]; [`run`] looks there first, then in the
//! library's list.

use uffd_wp::backend::inject::{InjectMm, Rule};
use uffd_wp::engine::protect::{OnError, WpOptions};
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range, RangeSet};
use uffd_wp::scenario::raw::{
    describe, engine_note, engine_step, mib, raw_step, registered, result_name, slots, stop,
    touch_at,
};
use uffd_wp::scenario::{
    self, Lab, LabConfig, LabFactory, MapKind as LabMapKind, Outcome, PinWrite, ScenarioError, Step,
};
use uffd_wp::seam::Wrap;
use uffd_wp::seam::lab::{Advice as LabAdvice, LabError, RawReturn, WpFault, serve_wp_faults};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{Errno, WpMode};
use uffd_wp::sys::errno_name;

use crate::{
    AccessId, Advice, Completion, FailPolicy, MapKind, Model, ModelConfig, ModelMm, PinFlags,
    PinId, Progress, Semantics, Thp, UffdConfig,
};

/// The page-table allocations [`Lab::limit_next_writeprotect`] allows on the model: in the
/// `lost-enomem` recipe the first GiB's 257th PTE table fails, as the 1 MiB memory cgroup
/// makes it fail on Linux.
pub const PAGE_TABLE_BUDGET: u64 = 256;

/// Labs on the model with one semantics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelLabs {
    /// `linux` or `proposed`.
    pub semantics: Semantics,
}

impl ModelLabs {
    /// Labs with `semantics`.
    pub fn new(semantics: Semantics) -> Self {
        ModelLabs { semantics }
    }

    /// A fresh lab, as its concrete type (for model-only scenarios).
    pub fn open_model(&self, cfg: LabConfig) -> Result<ModelLab, ScenarioError> {
        ModelLab::open(self.semantics, cfg)
    }
}

impl LabFactory for ModelLabs {
    fn backend(&self) -> &'static str {
        "model"
    }

    fn semantics(&self) -> Option<&'static str> {
        Some(self.semantics.name())
    }

    fn open(&self, cfg: LabConfig) -> Result<Box<dyn Lab>, ScenarioError> {
        Ok(Box::new(self.open_model(cfg)?))
    }
}

/// A modelled process and a uffd on it behind an [`InjectMm`].
#[derive(Debug)]
pub struct ModelLab {
    mm: std::sync::Arc<InjectMm<ModelMm>>,
    model: Model,
    /// Long-term pins taken by [`Lab::pin_fixed_buffer`], with their ranges.
    pins: Vec<(Range, crate::PinId)>,
}

impl ModelLab {
    /// A fresh process with a uffd negotiated like the Linux lab's (WP_UNPOPULATED as `cfg`
    /// says; the write-protect report and its skip-pinned mode where the semantics offers
    /// them, as the Linux backend asks for them where the kernel offers them).
    pub fn open(semantics: Semantics, cfg: LabConfig) -> Result<ModelLab, ScenarioError> {
        let uffd = if cfg.async_wp {
            UffdConfig::async_wp()
        } else if cfg.wp_unpopulated {
            UffdConfig::default()
        } else {
            UffdConfig::without_unpopulated()
        };
        let cfg = ModelConfig::with_semantics(semantics);
        let offered = Model::new(cfg).offered_features();
        Self::with_config(cfg, uffd.with_report_if(offered))
    }

    /// A fresh process configured by `cfg` with a uffd negotiated as `uffd` says (the
    /// differential tester mirrors the kernel worker's machine and a case's features).
    pub fn with_config(cfg: ModelConfig, uffd: UffdConfig) -> Result<ModelLab, ScenarioError> {
        let mm = ModelMm::open(cfg, uffd).map_err(ScenarioError::setup("UFFDIO_API"))?;
        let model = mm.model().clone();
        Ok(ModelLab {
            mm: std::sync::Arc::new(InjectMm::new(mm)),
            model,
            pins: Vec::new(),
        })
    }

    /// The process.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The uffd itself, behind no injector.
    pub fn uffd(&self) -> &ModelMm {
        Wrap::inner(&*self.mm)
    }

    /// Serves uffd-wp faults ([`serve_wp_faults`], on the uffd itself, so that injected
    /// failures hit only a scenario's calls) until access `id` completes; ETIMEDOUT when it
    /// still waits after 64 rounds.
    fn serve_until(&self, id: AccessId, faults: &mut Vec<WpFault>) -> Result<Completion, Errno> {
        for _ in 0..64 {
            serve_wp_faults(self.uffd(), faults)?;
            if let Some(c) = self.model.completion(id) {
                return match c {
                    Completion::Failed(e) => Err(e),
                    c => Ok(c),
                };
            }
        }
        Err(Errno::TIMEDOUT)
    }
}

/// The result of a call that waits only for non-cooperative events, which labs never enable.
fn done<T>(p: Result<Progress<T>, Errno>, what: &str) -> Result<(), LabError> {
    match p.map_err(LabError::setup(what))? {
        Progress::Done(_) => Ok(()),
        Progress::Blocked(_) => Err(LabError::Setup {
            what: format!("{what}: waits for the monitor"),
            errno: Errno::INTR,
        }),
    }
}

/// The model's mapping kind for a lab's.
fn model_kind(kind: LabMapKind) -> MapKind {
    match kind {
        LabMapKind::Anon => MapKind::Anon(Thp::NoHuge),
        LabMapKind::AnonThp => MapKind::Anon(Thp::Huge),
        LabMapKind::Memfd => MapKind::Memfd,
        LabMapKind::File { shared } => MapKind::File { shared },
    }
}

impl Lab for ModelLab {
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
        self.model.set_alloc_policy(FailPolicy::Never);
    }
    fn raw_results(&self) -> Vec<(Option<Errno>, bool)> {
        self.mm.raw_results()
    }
    /// A budget of [`PAGE_TABLE_BUDGET`] page-table allocations, lifted after the next raw
    /// call (either command).
    fn limit_next_writeprotect(&mut self) -> Result<String, LabError> {
        self.model
            .set_alloc_policy(FailPolicy::Budget(PAGE_TABLE_BUDGET));
        let model = self.model.clone();
        self.mm.after_next_writeprotect(Box::new(move || {
            model.set_alloc_policy(FailPolicy::Never);
        }));
        Ok(format!("budget of {PAGE_TABLE_BUDGET} page tables"))
    }
    /// Exactly the `nth` page-table allocation of the next raw call fails
    /// ([`FailPolicy::Nth`], set right before the call), as the kernel's `fail-nth` does it.
    fn fail_next_writeprotect_alloc(&mut self, nth: u64) -> Result<String, LabError> {
        let arm = self.model.clone();
        self.mm.before_next_writeprotect(Box::new(move || {
            arm.set_alloc_policy(FailPolicy::Nth(nth));
        }));
        let model = self.model.clone();
        self.mm.after_next_writeprotect(Box::new(move || {
            model.set_alloc_policy(FailPolicy::Never);
        }));
        Ok(format!("page-table allocation {nth} of the call fails"))
    }
    fn map(&mut self, len: u64, align: u64, kind: LabMapKind) -> Result<Range, LabError> {
        self.model
            .map(len, align, model_kind(kind))
            .map_err(LabError::setup("mmap"))
    }
    /// `MAP_FIXED_NOREPLACE`: EEXIST when a VMA overlaps `r`.
    fn map_at(&mut self, r: Range, kind: LabMapKind) -> Result<(), LabError> {
        let what = format!("mmap at {r}");
        if self
            .model
            .vmas()
            .iter()
            .any(|v| v.start < r.end() && r.start() < v.end)
        {
            return Err(LabError::setup(what)(Errno::EXIST));
        }
        self.model
            .map_at(Some(r.start()), r.len(), PAGE_SIZE, model_kind(kind))
            .map(drop)
            .map_err(LabError::setup(what))
    }
    fn punch(&mut self, r: Range) -> Result<(), LabError> {
        done(self.model.munmap(r), "munmap")
    }
    fn touch(&mut self, r: Range) -> Result<(), LabError> {
        for p in r.page_iter() {
            match self.model.write(p.start(), &[0x5a]) {
                Ok(Progress::Done(())) => {}
                Ok(Progress::Blocked(_)) => {
                    return Err(LabError::Setup {
                        what: format!("touching {p}: the write waits for the monitor"),
                        errno: Errno::AGAIN,
                    });
                }
                Err(e) => return Err(LabError::setup(format!("touching {p}"))(e)),
            }
        }
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<Vec<WpFault>, LabError> {
        let what = format!("writing {:#x} bytes at {addr:#x}", data.len());
        let mut faults = Vec::new();
        match self
            .model
            .write(addr, data)
            .map_err(LabError::setup(&what))?
        {
            Progress::Done(()) => {}
            Progress::Blocked(id) => {
                self.serve_until(id, &mut faults)
                    .map_err(LabError::setup(what))?;
            }
        }
        Ok(faults)
    }
    fn advise(&mut self, r: Range, advice: LabAdvice) -> Result<(), LabError> {
        let advice = match advice {
            LabAdvice::DontNeed => Advice::DontNeed,
            LabAdvice::PageOut => Advice::PageOut,
        };
        done(self.model.madvise(r, advice), &format!("madvise of {r}"))
    }
    /// A page-table walk of the model (pagemap bit 57), independent of the engine's
    /// `PAGEMAP_SCAN` read-back.
    fn verify_wp(&self, r: Range) -> Result<RangeSet, LabError> {
        Ok(self.model.wp_set(r))
    }
    /// An io_uring fixed buffer is a `FOLL_WRITE | FOLL_LONGTERM` pin.
    fn pin_fixed_buffer(&mut self, r: Range) -> Result<Vec<WpFault>, LabError> {
        let what = format!("pinning {r}");
        let mut faults = Vec::new();
        let id = match self
            .model
            .pin(r, PinFlags::IO_URING)
            .map_err(LabError::setup(&what))?
        {
            Progress::Done(id) => id,
            Progress::Blocked(access) => match self.serve_until(access, &mut faults) {
                Ok(Completion::Pinned(p)) => PinId(p),
                Ok(_) => return Err(LabError::setup(what)(Errno::FAULT)),
                Err(e) => return Err(LabError::setup(what)(e)),
            },
        };
        self.pins.push((r, id));
        Ok(faults)
    }
    fn unpin_fixed_buffer(&mut self, r: Range) -> Result<(), LabError> {
        let i = self
            .pins
            .iter()
            .position(|(p, _)| *p == r)
            .ok_or(LabError::Setup {
                what: format!("no pinned buffer is {r}"),
                errno: Errno::FAULT,
            })?;
        self.model
            .unpin(self.pins[i].1)
            .map_err(LabError::setup(format!("unpinning {r}")))?;
        self.pins.remove(i);
        Ok(())
    }
    /// `IORING_OP_READ_FIXED` writes through the pin: a DMA/kernel write, no page-table walk,
    /// so no uffd-wp fault.
    fn write_through_pin(&mut self, addr: u64, data: &[u8]) -> Result<PinWrite, LabError> {
        let end = addr + data.len() as u64;
        let (r, id) = *self
            .pins
            .iter()
            .find(|(r, _)| r.start() <= addr && end <= r.end())
            .ok_or(LabError::Setup {
                what: format!(
                    "no pinned buffer holds {:#x} bytes at {addr:#x}",
                    data.len()
                ),
                errno: Errno::FAULT,
            })?;
        self.model
            .dma_write(id, addr - r.start(), data)
            .map_err(LabError::setup("DMA write through the pin"))?;
        Ok(PinWrite {
            bytes: data.len() as u64,
            landed: self.model.peek(addr, data.len()) == data,
            wp_faults: 0,
        })
    }
}

/// A scenario only the model can run.
#[derive(Debug, Clone, Copy)]
pub struct ModelScenario {
    /// Its name on the command line.
    pub name: &'static str,
    /// One line on what it shows.
    pub about: &'static str,
    /// Runs it.
    pub run: fn(&ModelLabs) -> Result<Vec<Step>, ScenarioError>,
}

/// The model-only scenarios.
pub const MODEL_SCENARIOS: &[ModelScenario] = &[
    ModelScenario {
        name: "enomem-pmd",
        about: "a page-table allocation fails inside one 1 GiB PUD: reported by both semantics",
        run: enomem_pmd,
    },
    ModelScenario {
        name: "enomem-pud",
        about: "3 GiB, an allocation fails in the middle GiB: linux returns 0 over a hole, proposed says how much",
        run: enomem_pud,
    },
    ModelScenario {
        name: "skip-pinned",
        about: "pinned pages: DMA writes behind a protection; the engine and the proposed call skip them",
        run: skip_pinned,
    },
];

/// The model-only scenarios (for listings beside the library's).
pub fn model_scenarios() -> &'static [ModelScenario] {
    MODEL_SCENARIOS
}

/// The model-only scenario called `name`.
pub fn find(name: &str) -> Option<&'static ModelScenario> {
    MODEL_SCENARIOS.iter().find(|s| s.name == name)
}

/// Runs `name` on the model: a model-only scenario, or any of the library's.
pub fn run(name: &str, labs: &ModelLabs) -> Result<Outcome, ScenarioError> {
    let Some(sc) = find(name) else {
        return scenario::run(name, labs);
    };
    Ok(Outcome {
        scenario: name.to_string(),
        backend: labs.backend().to_string(),
        semantics: labs.semantics().map(str::to_string),
        page_size: PAGE_SIZE,
        results: (sc.run)(labs)?,
    })
}

// ------------------------------------------------------------------------------------------
// Helpers

// ------------------------------------------------------------------------------------------
// enomem-pmd

fn enomem_pmd_recipe(labs: &ModelLabs) -> Result<(ModelLab, Range), ScenarioError> {
    let mut lab = labs.open_model(LabConfig::default())?;
    let r = registered(&mut lab, 32 * PMD_SIZE, PUD_SIZE)?;
    touch_at(&mut lab, r.start())?;
    lab.model.set_alloc_policy(FailPolicy::Budget(10));
    Ok((lab, r))
}

fn enomem_pmd(labs: &ModelLabs) -> Result<Vec<Step>, ScenarioError> {
    let (a, ra) = enomem_pmd_recipe(labs)?;
    let ret = a.raw_protect(ra, false);
    a.model.set_alloc_policy(FailPolicy::Never);
    let wp = a.model.wp_set(ra);
    let note = format!(
        "64 MiB (32 slots of 2 MiB) inside one PUD, slot 0 populated, 10 page tables left: {}; \
         true state: protected slots {}, not protected {}. Inside one PUD change_pmd_range()'s \
         -ENOMEM is the whole result, so the failure is reported",
        describe(&ret, ra),
        slots(&wp, ra.start()),
        slots(&wp.complement_in(ra), ra.start()),
    );
    let s1 = raw_step(&a, "raw-ioctl", ra, &ret, RangeSet::new(), note)?;
    let (b, rb) = enomem_pmd_recipe(labs)?;
    let s2 = engine_step(&b, "exact-engine", rb, stop(), |s| {
        engine_note(s, rb.start(), "fresh identical set-up, same budget")
    })?;
    b.model.set_alloc_policy(FailPolicy::Never);
    let s3 = engine_step(&b, "exact-engine-resume", rb, stop(), |s| {
        engine_note(s, rb.start(), "budget lifted: the same write_protect again")
    })?;
    Ok(vec![s1, s2, s3])
}

// ------------------------------------------------------------------------------------------
// enomem-pud

/// 3 GiB, PUD aligned, page 0 of each GiB touched (each PUD has its PMD table and the PTE
/// table of slot 0): GiB 0 needs 511 PTE tables, GiB 1's slots 1..=200 the next 200, so
/// allocation 712 is GiB 1's slot 201.
const FAIL_AT: u64 = 511 + 200 + 1;

fn enomem_pud_recipe(labs: &ModelLabs, p: FailPolicy) -> Result<(ModelLab, Range), ScenarioError> {
    let mut lab = labs.open_model(LabConfig::default())?;
    let r = registered(&mut lab, 3 * PUD_SIZE, PUD_SIZE)?;
    for g in 0..3 {
        touch_at(&mut lab, r.start() + g * PUD_SIZE)?;
    }
    lab.model.set_alloc_policy(p);
    Ok((lab, r))
}

fn enomem_pud_raw(
    labs: &ModelLabs,
    label: &str,
    p: FailPolicy,
    what: &str,
) -> Result<Step, ScenarioError> {
    let (a, r) = enomem_pud_recipe(labs, p)?;
    let ret = a.raw_protect(r, false);
    a.model.set_alloc_policy(FailPolicy::Never);
    let wp = a.model.wp_set(r);
    let hole = wp.complement_in(r);
    let verdict = match (&ret, hole.is_empty()) {
        (RawReturn::Linux(Ok(())), false) => format!(
            "the kernel says success while {} are NOT protected: change_pud_range() added the \
             -ENOMEM of GiB 1 to the entries changed in the other GiBs",
            mib(hole.bytes())
        ),
        (RawReturn::Linux(Err(e)), _) => format!("the kernel reports {}", errno_name(*e)),
        (RawReturn::Report(k), _) if r.len() - k.done == hole.bytes() => format!(
            "the report keeps the errno ({}) and says exactly where it stopped: len - done is \
             the unprotected part",
            result_name(k.errno())
        ),
        (RawReturn::Report(_), _) => "the reported prefix does NOT match the page tables".into(),
        _ => "everything is protected".into(),
    };
    let note = format!(
        "{what}: {}; true state: protected slots {}, NOT protected {} ({}); {verdict}",
        describe(&ret, r),
        slots(&wp, r.start()),
        slots(&hole, r.start()),
        mib(hole.bytes()),
    );
    raw_step(&a, label, r, &ret, RangeSet::new(), note)
}

fn enomem_pud(labs: &ModelLabs) -> Result<Vec<Step>, ScenarioError> {
    let nth = FailPolicy::Nth(FAIL_AT);
    let budget = FailPolicy::Budget(FAIL_AT - 1);
    let s1 = enomem_pud_raw(
        labs,
        "nth-failure/raw-ioctl",
        nth,
        "3 GiB, one page per GiB populated, the page-table allocation for GiB 1 slot 201 fails \
         (only that one)",
    )?;
    let s2 = enomem_pud_raw(
        labs,
        "budget/raw-ioctl",
        budget,
        "same set-up, every allocation from GiB 1 slot 201 on fails (a limit never raised)",
    )?;
    let (b, rb) = enomem_pud_recipe(labs, budget)?;
    let s3 = engine_step(&b, "budget/exact-engine", rb, stop(), |s| {
        engine_note(
            s,
            rb.start(),
            "fresh identical set-up, same budget: one raw call per GiB",
        )
    })?;
    b.model.set_alloc_policy(FailPolicy::Never);
    let s4 = engine_step(&b, "budget/exact-engine-resume", rb, stop(), |s| {
        engine_note(s, rb.start(), "budget lifted: the same write_protect again")
    })?;
    Ok(vec![s1, s2, s3, s4])
}

// ------------------------------------------------------------------------------------------
// skip-pinned

/// 64 registered, populated pages; pages [16, 24) pinned like an io_uring fixed buffer.
fn pinned_recipe(
    labs: &ModelLabs,
) -> Result<(ModelLab, Range, Range, crate::PinId), ScenarioError> {
    let mut lab = labs.open_model(LabConfig::default())?;
    let r = registered(&mut lab, 64 * PAGE_SIZE, PAGE_SIZE)?;
    lab.touch(r)?;
    let buf = Range::from_bounds(r.start() + 16 * PAGE_SIZE, r.start() + 24 * PAGE_SIZE);
    let pin = match lab.model.pin(buf, PinFlags::IO_URING) {
        Ok(Progress::Done(p)) => p,
        Ok(Progress::Blocked(_)) => {
            return Err(ScenarioError::setup(
                "pinning the buffer: waits for the monitor",
            )(Errno::AGAIN));
        }
        Err(e) => return Err(ScenarioError::setup("pinning the buffer")(e)),
    };
    Ok((lab, r, buf, pin))
}

fn pages_of(set: &RangeSet, base: u64) -> String {
    if set.is_empty() {
        return "none".into();
    }
    set.offsets_from(base)
        .iter()
        .map(|[a, b]| format!("[{}, {})", a / PAGE_SIZE, b / PAGE_SIZE))
        .collect::<Vec<_>>()
        .join(" ")
}

fn skip_pinned(labs: &ModelLabs) -> Result<Vec<Step>, ScenarioError> {
    // 1. Protect everything, then the "device" writes through the pin.
    let (a, ra, buf, pin) = pinned_recipe(labs)?;
    let mut s1 = engine_step(&a, "protect-all", ra, stop(), |_| String::new())?;
    a.model
        .dma_write(pin, 0, b"written by the device")
        .map_err(ScenarioError::setup("DMA write through the pin"))?;
    let still_wp = a.model.wp_set(buf) == RangeSet::single(buf);
    let messages = a
        .uffd()
        .wait_event(0)
        .map_err(ScenarioError::setup("polling the uffd"))?;
    let landed = a.model.peek(buf.start(), 7) == b"written";
    s1.note = format!(
        "all 64 pages protected, pages [16, 24) pinned (FOLL_WRITE|FOLL_LONGTERM, like an \
         io_uring fixed buffer); then a DMA write through the pin: data landed: {landed}, \
         uffd-wp bit still set: {still_wp}, fault message raised: {messages}. A tracker or \
         snapshot trusting the protection misses that write"
    );

    // 2. The exact engine with skip_pinned.
    let (b, rb, _, _) = pinned_recipe(labs)?;
    let opts = WpOptions {
        skip_pinned: true,
        on_error: OnError::Stop,
    };
    let s2 = engine_step(&b, "exact-engine-skip-pinned", rb, opts, |s| {
        format!(
            "write_protect with skip_pinned: protected pages {}, skipped (left writable, counted \
             as protected) {}, bytes not protected {}",
            pages_of(&s.report.protected, rb.start()),
            pages_of(&s.report.skipped, rb.start()),
            s.report.bytes_not_protected()
        )
    })?;

    // 3. The kernel's own skip-pinned mode: UFFDIO_WRITEPROTECT_REPORT with
    // MODE_SKIP_PINNED, issued whatever the features say (Linux 6.18 refuses the command).
    let (c, rc, _, _) = pinned_recipe(labs)?;
    let k = c.mm().writeprotect_report(rc, WpMode::Protect, true);
    let ret = RawReturn::Report(k);
    let skipped = match k.result {
        Ok(()) => c.model.pinned_pages(rc),
        Err(_) => RangeSet::new(),
    };
    let note = match c.model.semantics() {
        Semantics::Linux => format!(
            "{}: Linux 6.18 has no UFFDIO_WRITEPROTECT_REPORT (an unknown command: EINVAL) and \
             no skip-pinned mode; nothing was protected",
            describe(&ret, rc)
        ),
        Semantics::Proposed => format!(
            "UFFDIO_WRITEPROTECT_REPORT with MODE_SKIP_PINNED: {}; pinned pages {} left \
             writable and counted as done",
            describe(&ret, rc),
            pages_of(&skipped, rc.start())
        ),
    };
    let s3 = raw_step(&c, "proposed-skip-pinned", rc, &ret, skipped, note)?;
    Ok(vec![s1, s2, s3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use uffd_wp::engine::protect::Exactness;

    fn outcome(name: &str, sem: Semantics) -> Outcome {
        run(name, &ModelLabs::new(sem)).unwrap()
    }

    #[test]
    fn every_library_scenario_runs_and_verifies_on_the_model() {
        for sem in [Semantics::Linux, Semantics::Proposed] {
            for sc in scenario::SCENARIOS {
                let o = outcome(sc.name, sem);
                assert!(
                    o.all_verified(),
                    "{} under {sem:?}: {:#?}",
                    sc.name,
                    o.results
                );
                assert_eq!(o.backend, "model");
                assert_eq!(o.semantics.as_deref(), Some(sem.name()));
            }
            for sc in MODEL_SCENARIOS {
                let o = outcome(sc.name, sem);
                assert!(
                    o.all_verified(),
                    "{} under {sem:?}: {:#?}",
                    sc.name,
                    o.results
                );
            }
        }
    }

    #[test]
    fn lost_enomem_shapes() {
        let o = outcome("lost-enomem", Semantics::Linux);
        let raw = &o.results[0].report;
        let base = raw.requested.start();
        assert_eq!(o.results[0].kernel_errno, None, "linux: success");
        assert_eq!(slots(&raw.not_protected, base), "[257, 512)");
        let eng = &o.results[1];
        assert_eq!(eng.kernel_errno, Some(Errno::NOMEM));
        assert_eq!(slots(&eng.report.protected, base), "[0, 257)");
        assert!(o.results[2].report.complete());

        // Proposed: the raw call is UFFDIO_WRITEPROTECT_REPORT, which keeps the errno and
        // says where it stopped.
        let p = outcome("lost-enomem", Semantics::Proposed);
        let raw = &p.results[0].report;
        let base = raw.requested.start();
        assert_eq!(p.results[0].kernel_errno, Some(Errno::NOMEM));
        assert_eq!(slots(&raw.not_protected, base), "[257, 1024)");
        let d = p.results[0]
            .detail
            .as_ref()
            .expect("raw steps carry a detail");
        let k = &d["kernel_returned"];
        assert_eq!(k["call"], "UFFDIO_WRITEPROTECT_REPORT");
        assert_eq!(k["errno"], "ENOMEM");
        assert_eq!(k["done"], 257 * PMD_SIZE);
        assert_eq!(k["pinned"], 0);
        assert_eq!(k["bytes_not_protected"], (1024 - 257) * PMD_SIZE);
        assert!(p.results[0].verified);
        // The engine takes the kernel's report: one call, read-back only past the prefix.
        let eng = &p.results[1].report;
        assert_eq!(eng.provenance.exactness, Exactness::KernelReport);
        let kf = eng.provenance.kernel.expect("kernel figures");
        assert_eq!(
            (kf.calls, kf.done, kf.errno),
            (1, 257 * PMD_SIZE, Some(Errno::NOMEM))
        );
        assert_eq!(kf.stop, Some(base + 257 * PMD_SIZE));
        assert_eq!(eng.raw_calls, 1);
        assert_eq!(eng.read_back_bytes, (1024 - 257) * PMD_SIZE);
        assert_eq!(slots(&eng.protected, base), "[0, 257)");
        assert!(
            p.results[1].note.contains("took the kernel's report"),
            "{}",
            p.results[1].note
        );
        // Resumed without the limit: one call, nothing read back.
        let res = &p.results[2].report;
        assert!(res.complete());
        assert_eq!((res.raw_calls, res.read_back_bytes), (1, 0));
        // Linux: the engine's read-back path, as before.
        assert_eq!(
            o.results[1].report.provenance.exactness,
            Exactness::ReadBack
        );
        assert_eq!(o.results[1].report.raw_calls, 1);
    }

    #[test]
    fn enomem_pud_shapes() {
        let o = outcome("enomem-pud", Semantics::Linux);
        let base = o.results[0].report.requested.start();
        // One failure: success with a hole in GiB 1.
        assert_eq!(o.results[0].kernel_errno, None);
        assert_eq!(
            slots(&o.results[0].report.not_protected, base),
            "[713, 1024)"
        );
        // A budget: success with holes in GiB 1 and GiB 2 (slot 0 of GiB 2 kept its table).
        assert_eq!(o.results[1].kernel_errno, None);
        assert_eq!(
            slots(&o.results[1].report.not_protected, base),
            "[713, 1024) [1025, 1536)"
        );
        assert_eq!(o.results[2].kernel_errno, Some(Errno::NOMEM));
        assert!(o.results[3].report.complete());
        // The JSON detail: what the ioctl returned (success) beside the true hole.
        let d = o.results[0]
            .detail
            .as_ref()
            .expect("raw steps carry a detail");
        assert_eq!(d["kernel_returned"]["errno"], serde_json::Value::Null);
        assert_eq!(d["true_bytes_not_protected"], 311 * PMD_SIZE);

        let p = outcome("enomem-pud", Semantics::Proposed);
        let pb = p.results[0].report.requested.start();
        assert_eq!(slots(&p.results[0].report.not_protected, pb), "[713, 1536)");
        assert!(p.results.iter().all(|s| s.verified));
        // Under the proposal the report keeps ENOMEM and its done leaves exactly the bytes
        // left unprotected.
        assert_eq!(p.results[0].kernel_errno, Some(Errno::NOMEM));
        let d = p.results[0]
            .detail
            .as_ref()
            .expect("raw steps carry a detail");
        assert_eq!(d["kernel_returned"]["done"], 713 * PMD_SIZE);
        assert_eq!(d["kernel_returned"]["bytes_not_protected"], 823 * PMD_SIZE);
        assert_eq!(d["true_bytes_not_protected"], 823 * PMD_SIZE);
        assert!(p.results[0].note.contains("keeps the errno (ENOMEM)"));
    }

    #[test]
    fn skip_pinned_shapes() {
        let o = outcome("skip-pinned", Semantics::Proposed);
        assert!(o.results[0].note.contains("data landed: true"));
        assert!(o.results[0].note.contains("bit still set: true"));
        assert!(o.results[0].note.contains("message raised: false"));
        assert_eq!(o.results[1].report.skipped.pages(), 8);
        assert_eq!(o.results[1].report.bytes_not_protected(), 0);
        assert_eq!(o.results[2].report.skipped.pages(), 8);
        assert_eq!(o.results[2].report.protected.pages(), 56);
        let d = o.results[2]
            .detail
            .as_ref()
            .expect("raw steps carry a detail");
        assert_eq!(d["kernel_returned"]["pinned"], 8 * PAGE_SIZE);
        assert_eq!(d["kernel_returned"]["done"], 64 * PAGE_SIZE);
        assert_eq!(d["kernel_returned"]["errno"], serde_json::Value::Null);
        // Linux 6.18 answers the unknown command with EINVAL and touches nothing.
        let l = outcome("skip-pinned", Semantics::Linux);
        assert_eq!(l.results[2].kernel_errno, Some(Errno::INVAL));
        assert!(l.results[2].report.protected.is_empty());
        assert!(l.results[2].verified);
    }
}

//! The kernel side of a case, run in a worker process: the driver on a [`LinuxLab`], the
//! backend users run.

use uffd_wp::backend::linux::Config;
use uffd_wp::backend::linux::lab::LinuxLab;
use uffd_wp::backend::procfs::read_maps;
use uffd_wp::helper::Parent;
use uffd_wp::range::Range;
use uffd_wp::seam::lab::LabError;
use uffd_wp::seam::lab::{Lab, MapKind};
use uffd_wp::seam::{Errno, errno_name};

use crate::arena::{Arenas, surroundings};
use crate::{Case, CaseObs};

/// One case, refused if the machine's swap is not what the case says (the model would be told
/// the wrong thing about MADV_PAGEOUT).
fn run_checked(c: &Case, arenas: Arenas, hole: &mut Hole) -> Result<CaseObs, String> {
    if c.config.swap != crate::swap_active() {
        return Err(format!(
            "the case wants swap {} but /proc/swaps says {}",
            c.config.swap,
            crate::swap_active()
        ));
    }
    run(c, arenas, hole).map_err(|e| match e {
        LabError::Setup { what, errno } => format!("set-up: {what}: {}", errno_name(errno)),
        e => format!("set-up: {e}"),
    })
}

/// The worker's main loop (a [`uffd_wp::helper`] of kind `compare-worker`): one [`Case`] per
/// line from its parent, one `Result<CaseObs, String>` per line back. Each case gets a fresh lab
/// (a fresh uffd and fresh mappings) in an arena that straddles a 1 GiB boundary of a 2 GiB
/// reservation.
pub fn worker_main() -> ! {
    if let Err(e) = pin_to_one_cpu() {
        eprintln!("compare worker: pinning to one CPU: {e}");
        std::process::exit(2);
    }
    // The reservation's lab lives as long as the worker (exit() drops nothing).
    let (arenas, mut hole) = match reserve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("compare worker: reserving the arena: {e}");
            std::process::exit(2);
        }
    };
    let mut parent = match Parent::connect::<()>() {
        Ok((p, ())) => p,
        Err(e) => {
            eprintln!("compare worker: {e}");
            std::process::exit(2);
        }
    };
    while let Some(case) = parent.recv::<Case>() {
        let res = case
            .map_err(|e| format!("bad case: {e}"))
            .and_then(|c| run_checked(&c, arenas, &mut hole));
        if !parent.send(&res) {
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

/// The arenas' surroundings ([`surroundings`]), in a lab of their own: each case opens its
/// own lab with its own features. The fresh arena's hole is filled until a case needs it.
fn reserve() -> Result<(Arenas, Hole), LabError> {
    let mut lab = LinuxLab::open_with(Config::default())?;
    let arenas = surroundings(&mut lab)?;
    let mut hole = Hole {
        range: arenas.hole(),
        reservation: lab,
    };
    hole.fill()?;
    Ok((arenas, hole))
}

/// The fresh arena's hole ([`Arenas::hole`]). Between cases an untouched mapping fills it
/// (no page tables), so nothing the worker maps meanwhile (a thread's stack, a large buffer)
/// can land there and keep page tables in it; a case that injects allocation failures runs
/// with it empty, as the model's is.
struct Hole {
    range: Range,
    /// The lab of the surroundings, which maps and unmaps the filler.
    reservation: LinuxLab,
}

impl Hole {
    fn fill(&mut self) -> Result<(), LabError> {
        self.reservation
            .map_at(self.range, MapKind::Anon)
            .map_err(|e| self.intruded(e.errno()))
    }

    fn empty(&mut self) -> Result<(), LabError> {
        self.reservation.punch(self.range)
    }

    /// The error of a hole that cannot be filled again, naming what is mapped in it.
    fn intruded(&self, errno: Errno) -> LabError {
        let inside: Vec<String> = read_maps(std::process::id() as i32)
            .unwrap_or_default()
            .iter()
            .filter(|m| m.start < self.range.end() && m.end > self.range.start())
            .map(|m| format!("{:#x}-{:#x} {} {}", m.start, m.end, m.perms, m.name))
            .collect();
        LabError::Setup {
            what: format!(
                "filling the fresh arena's hole {} (mapped in it: {})",
                self.range,
                inside.join(", ")
            ),
            errno,
        }
    }
}

/// Runs `case` in a fresh lab whose uffd negotiates exactly the case's features. Dropping the
/// lab closes the uffd (releasing every registration), then unmaps its mappings.
///
/// A case that injects allocation failures runs in the fresh arena, its hole emptied once the
/// lab (and its fault-handling thread) exists and filled again once the lab is gone, which
/// unmapped everything the case mapped there and so freed its page tables.
fn run(case: &Case, arenas: Arenas, hole: &mut Hole) -> Result<CaseObs, LabError> {
    let features = case.config.features();
    let mut lab = LinuxLab::open_with(Config {
        wanted: features,
        required: features,
        user_mode_only: false,
    })?;
    let base = arenas.base(case.config);
    if !case.config.fail_alloc {
        return Ok(crate::driver::run_case(&mut lab, base, case, &mut || {}));
    }
    hole.empty()?;
    let obs = crate::driver::run_case(&mut lab, base, case, &mut || {});
    drop(lab);
    hole.fill()?;
    Ok(obs)
}

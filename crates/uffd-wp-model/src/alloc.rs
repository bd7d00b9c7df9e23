//! The page-table allocator, with fault injection.
//!
//! Every page table the model creates (a PUD table under a PGD entry, a PMD table under a PUD
//! entry, a PTE table under a PMD entry, and the PTE table a THP deposits when it is created)
//! comes from here, so a test can make the Nth allocation fail, let a budget of allocations
//! succeed and fail everything after it, or fail allocations at random from a seed. The real
//! kernel cannot do this on demand (a tight memory cgroup OOM-kills or hangs the caller), which is
//! why these paths are only exercised on the model.

use serde::Serialize;

/// The level of a page table (the table, not the entry pointing to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// A PUD table (512 entries of 1 GiB), hung under a PGD entry (`pud_alloc`).
    Pud,
    /// A PMD table (512 entries of 2 MiB), hung under a PUD entry (`pmd_alloc`).
    Pmd,
    /// A PTE table (512 entries of 4 KiB), hung under a PMD entry (`pte_alloc`) or deposited
    /// with a THP (`pte_alloc_one` in the huge-page fault path).
    Pte,
}

/// When allocations fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FailPolicy {
    /// Never.
    Never,
    /// Only the Nth attempt (1-based) counted from when the policy was set.
    Nth(u64),
    /// The first `n` attempts from when the policy was set succeed, every later one fails (a
    /// memory limit that is never raised).
    Budget(u64),
    /// Each attempt fails with probability `per_million / 1e6`, from a seeded generator
    /// (deterministic for a given seed and sequence of attempts).
    Random {
        /// The seed.
        seed: u64,
        /// Failure probability in millionths.
        per_million: u32,
    },
}

/// Page tables currently allocated, by level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TableCounts {
    /// PUD tables.
    pub pud: u64,
    /// PMD tables.
    pub pmd: u64,
    /// PTE tables, deposited ones (one per THP) included, as the kernel's `nr_ptes` counts them.
    pub pte: u64,
}

impl TableCounts {
    fn slot(&mut self, l: Level) -> &mut u64 {
        match l {
            Level::Pud => &mut self.pud,
            Level::Pmd => &mut self.pmd,
            Level::Pte => &mut self.pte,
        }
    }

    /// All levels together.
    pub fn total(&self) -> u64 {
        self.pud + self.pmd + self.pte
    }
}

/// Allocation statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AllocStats {
    /// Attempts since the model was created.
    pub attempts: u64,
    /// Attempts since the current policy was set.
    pub attempts_since_policy: u64,
    /// Failed attempts since the model was created.
    pub failures: u64,
    /// Tables allocated now.
    pub live: TableCounts,
}

/// One allocation attempt, for tests that want to know where the Nth allocation happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// The table's level.
    pub level: Level,
    /// The faulting or protected address that needed it.
    pub addr: u64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// The allocator.
#[derive(Debug, Clone)]
pub struct PtAllocator {
    policy: FailPolicy,
    since_policy: u64,
    stats: AllocStats,
    rng: u64,
    log: Option<Vec<Attempt>>,
}

impl Default for PtAllocator {
    fn default() -> Self {
        PtAllocator {
            policy: FailPolicy::Never,
            since_policy: 0,
            stats: AllocStats::default(),
            rng: 0,
            log: None,
        }
    }
}

impl PtAllocator {
    /// Sets the policy and restarts its attempt count.
    pub fn set_policy(&mut self, p: FailPolicy) {
        self.policy = p;
        self.since_policy = 0;
        if let FailPolicy::Random { seed, .. } = p {
            // splitmix64 of the seed, so that seed 0 is usable.
            self.rng = splitmix(seed);
        }
    }

    /// The current policy.
    pub fn policy(&self) -> FailPolicy {
        self.policy
    }

    /// Starts (or stops) recording every attempt.
    pub fn record(&mut self, on: bool) {
        self.log = on.then(Vec::new);
    }

    /// The attempts recorded since [`PtAllocator::record`].
    pub fn attempts_log(&self) -> &[Attempt] {
        self.log.as_deref().unwrap_or(&[])
    }

    /// Statistics.
    pub fn stats(&self) -> AllocStats {
        AllocStats {
            attempts_since_policy: self.since_policy,
            ..self.stats
        }
    }

    /// One attempt to allocate a table of `level` for `addr`: true on success (the table is
    /// then counted as live).
    pub(crate) fn alloc(&mut self, level: Level, addr: u64) -> bool {
        self.stats.attempts += 1;
        self.since_policy += 1;
        let n = self.since_policy;
        let ok = match self.policy {
            FailPolicy::Never => true,
            FailPolicy::Nth(k) => n != k,
            FailPolicy::Budget(b) => n <= b,
            FailPolicy::Random { per_million, .. } => {
                self.rng = splitmix(self.rng);
                (self.rng % 1_000_000) as u32 >= per_million
            }
        };
        if ok {
            *self.stats.live.slot(level) += 1;
        } else {
            self.stats.failures += 1;
        }
        if let Some(log) = &mut self.log {
            log.push(Attempt { level, addr, ok });
        }
        ok
    }

    /// A table of `level` is freed.
    pub(crate) fn free(&mut self, level: Level) {
        let s = self.stats.live.slot(level);
        debug_assert!(*s > 0, "freeing a {level:?} table that was never allocated");
        *s = s.saturating_sub(1);
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_fails_only_the_nth() {
        let mut a = PtAllocator::default();
        a.set_policy(FailPolicy::Nth(3));
        let r: Vec<bool> = (0..5).map(|_| a.alloc(Level::Pte, 0)).collect();
        assert_eq!(r, [true, true, false, true, true]);
        assert_eq!(a.stats().live.pte, 4);
        assert_eq!(a.stats().failures, 1);
    }

    #[test]
    fn budget_fails_everything_after() {
        let mut a = PtAllocator::default();
        a.set_policy(FailPolicy::Budget(2));
        let r: Vec<bool> = (0..4).map(|_| a.alloc(Level::Pmd, 0)).collect();
        assert_eq!(r, [true, true, false, false]);
        a.set_policy(FailPolicy::Never);
        assert!(a.alloc(Level::Pmd, 0));
        assert_eq!(a.stats().live.pmd, 3);
    }

    #[test]
    fn random_is_deterministic_and_roughly_calibrated() {
        let run = |seed| {
            let mut a = PtAllocator::default();
            a.set_policy(FailPolicy::Random {
                seed,
                per_million: 250_000,
            });
            (0..4000)
                .map(|_| a.alloc(Level::Pte, 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let fails = run(7).iter().filter(|ok| !**ok).count();
        assert!(
            (800..1200).contains(&fails),
            "{fails} failures of 4000 at 25%"
        );
    }
}

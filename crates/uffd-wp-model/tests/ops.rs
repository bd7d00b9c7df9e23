//! Random operation sequences on the model: no panic, the model's invariants hold after every
//! operation, every exact-engine report partitions its request and matches the page tables,
//! and the `UFFDIO_WRITEPROTECT_REPORT` answer (proposed semantics; EINVAL under linux) is a
//! prefix in the requested state with nothing changed past it. Under proposed the engine runs
//! on both paths (the kernel's report, and read-back when the uffd does not ask for it), and
//! pins can be hidden from the backend so that only the kernel's skip-pinned mode finds them.

use proptest::prelude::*;
use std::time::Duration;

use uffd_wp::engine::protect::{OnError, WpOptions, unprotect, write_protect};
use uffd_wp::features::Features;
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range, RangeSet};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{RegisterMode, ScanRequest, WpMode};
use uffd_wp::seam::{SCAN_CHECK_WPASYNC, SCAN_WP_MATCHING};
use uffd_wp_model::{
    Advice, FailPolicy, MapKind, ModelConfig, ModelMm, PROPOSED_FEATURES, PinFlags, PinId,
    Progress, Semantics, Thp, UffdConfig, Who,
};

const P: u64 = PAGE_SIZE;
/// A 32 MiB arena across a 1 GiB PUD boundary (16 MiB on each side).
const ARENA: u64 = 3 * PUD_SIZE - 8 * PMD_SIZE;
const ARENA_PAGES: u32 = 8192;

#[derive(Debug, Clone)]
enum Op {
    Map {
        off: u32,
        pages: u16,
        kind: u8,
    },
    Unmap {
        off: u32,
        pages: u16,
    },
    Register {
        off: u32,
        pages: u16,
        mode: u8,
    },
    Unregister {
        off: u32,
        pages: u16,
    },
    Protect {
        off: u32,
        pages: u16,
        skip: bool,
        retry: bool,
    },
    RawProtect {
        off: u32,
        pages: u16,
    },
    Unprotect {
        off: u32,
        pages: u16,
    },
    Write {
        off: u32,
        len: u16,
        kernel: bool,
    },
    Read {
        off: u32,
        len: u16,
    },
    Populate {
        off: u32,
        pages: u16,
        write: bool,
    },
    DontNeed {
        off: u32,
        pages: u16,
    },
    PageOut {
        off: u32,
        pages: u16,
    },
    Pin {
        off: u32,
        pages: u16,
    },
    Unpin {
        idx: u8,
    },
    Dma {
        idx: u8,
        off: u16,
    },
    Scan {
        off: u32,
        pages: u16,
        wp: bool,
        check: bool,
        mask: u16,
        max: u8,
    },
    Fail {
        kind: u8,
        n: u16,
    },
    Events,
    Wake {
        off: u32,
        pages: u16,
    },
    Report {
        off: u32,
        pages: u16,
        skip: bool,
    },
    HidePins {
        hidden: bool,
    },
}

/// Offsets cluster around a few anchors (2 MiB slots of the arena, the PUD boundary in the
/// middle) so that operations hit the same mappings.
fn offset() -> impl Strategy<Value = u32> + Clone {
    (0u32..16, 0u32..40, any::<bool>()).prop_map(|(slot, jitter, before)| {
        let a = slot * 512;
        if before {
            a.saturating_sub(jitter)
        } else {
            a + jitter
        }
    })
}

fn op() -> impl Strategy<Value = Op> {
    let off = offset();
    let pages = prop_oneof![1u16..8, 500u16..530, 1000u16..1100, 2040u16..2060];
    prop_oneof![
        3 => (off.clone(), pages.clone(), 0u8..6).prop_map(|(off, pages, kind)| Op::Map { off, pages, kind }),
        1 => (off.clone(), pages.clone()).prop_map(|(off, pages)| Op::Unmap { off, pages }),
        3 => (off.clone(), pages.clone(), 1u8..4).prop_map(|(off, pages, mode)| Op::Register { off, pages, mode }),
        1 => (off.clone(), pages.clone()).prop_map(|(off, pages)| Op::Unregister { off, pages }),
        4 => (off.clone(), pages.clone(), any::<bool>(), any::<bool>()).prop_map(|(off, pages, skip, retry)| Op::Protect { off, pages, skip, retry }),
        2 => (off.clone(), pages.clone()).prop_map(|(off, pages)| Op::RawProtect { off, pages }),
        2 => (off.clone(), pages.clone()).prop_map(|(off, pages)| Op::Unprotect { off, pages }),
        4 => (off.clone(), 1u16..9000, any::<bool>()).prop_map(|(off, len, kernel)| Op::Write { off, len, kernel }),
        1 => (off.clone(), 1u16..9000).prop_map(|(off, len)| Op::Read { off, len }),
        1 => (off.clone(), pages.clone(), any::<bool>()).prop_map(|(off, pages, write)| Op::Populate { off, pages, write }),
        2 => (off.clone(), pages.clone()).prop_map(|(off, pages)| Op::DontNeed { off, pages }),
        1 => (off.clone(), pages.clone()).prop_map(|(off, pages)| Op::PageOut { off, pages }),
        1 => (off.clone(), 1u16..16).prop_map(|(off, pages)| Op::Pin { off, pages }),
        1 => any::<u8>().prop_map(|idx| Op::Unpin { idx }),
        1 => (any::<u8>(), any::<u16>()).prop_map(|(idx, off)| Op::Dma { idx, off }),
        2 => (off.clone(), pages.clone(), any::<bool>(), any::<bool>(), 0u16..512, any::<u8>())
            .prop_map(|(off, pages, wp, check, mask, max)| Op::Scan { off, pages, wp, check, mask, max }),
        2 => (0u8..4, 0u16..40).prop_map(|(kind, n)| Op::Fail { kind, n }),
        2 => Just(Op::Events),
        1 => (off.clone(), pages.clone()).prop_map(|(off, pages)| Op::Wake { off, pages }),
        2 => (off, pages, any::<bool>()).prop_map(|(off, pages, skip)| Op::Report { off, pages, skip }),
        1 => any::<bool>().prop_map(|hidden| Op::HidePins { hidden }),
    ]
}

fn range(off: u32, pages: u16) -> Range {
    let start = ARENA + u64::from(off) * P;
    let len = u64::from(pages.max(1)) * P;
    Range::from_bounds(
        start,
        (start + len)
            .min(ARENA + u64::from(ARENA_PAGES) * P)
            .max(start + P),
    )
}

fn partition(r: Range, rep: &uffd_wp::WpReport) -> Result<(), TestCaseError> {
    let all = rep.protected.union(&rep.skipped).union(&rep.not_protected);
    prop_assert_eq!(all, RangeSet::single(r), "not a cover");
    prop_assert!(rep.protected.intersection(&rep.skipped).is_empty());
    prop_assert!(rep.protected.intersection(&rep.not_protected).is_empty());
    prop_assert!(rep.skipped.intersection(&rep.not_protected).is_empty());
    Ok(())
}

/// One raw `UFFDIO_WRITEPROTECT_REPORT`: under `linux` EINVAL with nothing written; under
/// `proposed` a page-aligned prefix (the model checks it is in the requested state), the whole
/// range on success, an errno that says why it is not, and `pinned` the pinned bytes of the
/// prefix not protected before the call, with `skip` (0 without).
fn report_op(mm: &ModelMm, r: Range, skip: bool, sem: Semantics) -> Result<(), TestCaseError> {
    let m = mm.model();
    let before = m.wp_set(r);
    let k = mm.writeprotect_report(r, WpMode::Protect, skip);
    if sem == Semantics::Linux {
        prop_assert_eq!(k, uffd_wp::seam::KernelReport::unsupported());
        prop_assert_eq!(m.wp_set(r), before);
        return Ok(());
    }
    prop_assert!(k.done <= r.len() && k.done % P == 0, "{:?}", k);
    prop_assert_eq!(k.result.is_ok(), k.done == r.len(), "{:?}", k);
    let prefix = k.prefix(r).map_or_else(RangeSet::new, RangeSet::single);
    // The pinned pages of the prefix the call left without the bit: those protected before
    // it stay so and do not count.
    let pinned = m
        .pinned_pages(r)
        .intersection(&prefix)
        .difference(&before)
        .bytes();
    prop_assert_eq!(k.pinned, if skip { pinned } else { 0 });
    // Past the prefix nothing changed.
    if let Some(rest) = k.rest(r) {
        prop_assert_eq!(m.wp_set(rest), before.clip(rest));
    }
    Ok(())
}

/// Engine protects that returned a report, and writes that waited, over all cases.
static PROTECTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static BLOCKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn run(sem: Semantics, uffd: u8, ops: &[Op]) -> Result<(), TestCaseError> {
    run_with(sem, uffd, None, ops)
}

/// `prelude`: map the whole arena with this kind and register it for WP first.
fn run_with(
    sem: Semantics,
    uffd: u8,
    prelude: Option<u8>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let cfg = match uffd / 2 {
        0 => UffdConfig::default(),
        1 => UffdConfig::without_unpopulated(),
        _ => UffdConfig::async_wp(),
    };
    // Under proposed the uffd asks for the report (the engine's kernel-report path) when
    // `uffd` is even, and not when odd (its read-back path on a fixed kernel).
    let cfg = match sem {
        Semantics::Proposed if uffd % 2 == 0 => cfg.with_report_if(Features(PROPOSED_FEATURES)),
        _ => cfg,
    };
    let mm = ModelMm::open(ModelConfig::with_semantics(sem), cfg).unwrap();
    let m = mm.model().clone();
    let mut pins: Vec<PinId> = Vec::new();
    let pre = prelude.map(|kind| {
        [
            Op::Map {
                off: 0,
                pages: ARENA_PAGES as u16,
                kind,
            },
            Op::Register {
                off: 0,
                pages: ARENA_PAGES as u16,
                mode: 2,
            },
        ]
    });
    for op in pre.iter().flatten().chain(ops) {
        match *op {
            Op::Map { off, pages, kind } => {
                let r = range(off, pages);
                let k = match kind {
                    0 | 1 => MapKind::Anon(Thp::NoHuge),
                    2 => MapKind::Anon(Thp::Huge),
                    3 => MapKind::Memfd,
                    4 => MapKind::File { shared: false },
                    _ => MapKind::Hugetlb,
                };
                let (start, len) = if matches!(k, MapKind::Hugetlb) {
                    let s = r.start().next_multiple_of(PMD_SIZE);
                    (s, r.len().next_multiple_of(PMD_SIZE))
                } else {
                    (r.start(), r.len())
                };
                let _ = m.map_at(Some(start), len, P, k);
            }
            Op::Unmap { off, pages } => {
                let _ = m.munmap(range(off, pages));
            }
            Op::Register { off, pages, mode } => {
                let _ = mm.register(range(off, pages), RegisterMode(u64::from(mode)));
            }
            Op::Unregister { off, pages } => {
                let _ = mm.unregister(range(off, pages));
            }
            Op::Protect {
                off,
                pages,
                skip,
                retry,
            } => {
                let r = range(off, pages);
                let opts = WpOptions {
                    skip_pinned: skip,
                    on_error: if retry {
                        OnError::Retry {
                            attempts: 2,
                            backoff: Duration::ZERO,
                        }
                    } else {
                        OnError::Stop
                    },
                };
                match write_protect(&mm, r, &opts) {
                    Ok(rep) => {
                        partition(r, &rep)?;
                        // A pinned page that was already write-protected stays so, but the
                        // engine lists it as skipped rather than protected.
                        let truth = m.wp_set(r).difference(&rep.skipped);
                        prop_assert_eq!(&rep.protected, &truth, "report vs page tables");
                        if !rep.protected.is_empty() {
                            PROTECTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Err(_) => prop_assert!(m.wp_set(r).is_empty(), "Err with pages protected"),
                }
            }
            Op::RawProtect { off, pages } => {
                let _ = mm.writeprotect(range(off, pages), WpMode::Protect);
            }
            Op::Unprotect { off, pages } => {
                let r = range(off, pages);
                match unprotect(&mm, r, OnError::Stop) {
                    Ok(rep) => {
                        partition(r, &rep)?;
                        prop_assert_eq!(&rep.protected, &m.wp_set(r));
                    }
                    Err(_) => prop_assert_eq!(m.wp_set(r), RangeSet::single(r)),
                }
            }
            Op::Write { off, len, kernel } => {
                let a = ARENA + u64::from(off) * P + u64::from(len % 97);
                let data = vec![0xab; usize::from(len)];
                if let Ok(Progress::Blocked(_)) = m.write_as(a, &data, Who { tid: 7, kernel }) {
                    BLOCKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Op::Read { off, len } => {
                let _ = m.read(ARENA + u64::from(off) * P + 13, usize::from(len));
            }
            Op::Populate { off, pages, write } => {
                let _ = m.populate(range(off, pages), write);
            }
            Op::DontNeed { off, pages } => {
                let _ = m.madvise(range(off, pages), Advice::DontNeed);
            }
            Op::PageOut { off, pages } => {
                let _ = m.madvise(range(off, pages), Advice::PageOut);
            }
            Op::Pin { off, pages } => {
                if let Ok(Progress::Done(p)) = m.pin(range(off, pages), PinFlags::IO_URING) {
                    pins.push(p);
                }
            }
            Op::Unpin { idx } => {
                if !pins.is_empty() {
                    let p = pins.remove(usize::from(idx) % pins.len());
                    m.unpin(p).unwrap();
                }
            }
            Op::Dma { idx, off } => {
                if !pins.is_empty() {
                    let p = pins[usize::from(idx) % pins.len()];
                    let _ = m.dma_write(p, u64::from(off) % P, b"dma");
                }
            }
            Op::Scan {
                off,
                pages,
                wp,
                check,
                mask,
                max,
            } => {
                let r = range(off, pages);
                let req = ScanRequest {
                    flags: if wp { SCAN_WP_MATCHING } else { 0 }
                        | if check { SCAN_CHECK_WPASYNC } else { 0 },
                    start: r.start(),
                    end: r.end(),
                    max_pages: u64::from(max % 8) * 3,
                    category_mask: u64::from(mask) & 0x0f,
                    category_anyof_mask: u64::from(mask >> 4) & 0x1f,
                    return_mask: 0x1ff,
                    ..Default::default()
                };
                for vec_len in [0usize, 1, 7, 600] {
                    let raw = m.pagemap_scan(&req, vec_len);
                    prop_assert!(raw.regions.len() <= vec_len);
                    for w in raw.regions.windows(2) {
                        prop_assert!(
                            w[0].end <= w[1].start,
                            "unordered regions {:?}",
                            raw.regions
                        );
                    }
                    for g in &raw.regions {
                        prop_assert!(g.start < g.end && g.start >= r.start() && g.end <= r.end());
                    }
                    if let Ok(n) = raw.result {
                        prop_assert_eq!(n as usize, raw.regions.len());
                    }
                }
            }
            Op::Fail { kind, n } => m.set_alloc_policy(match kind {
                0 => FailPolicy::Never,
                1 => FailPolicy::Nth(u64::from(n)),
                2 => FailPolicy::Budget(u64::from(n)),
                _ => FailPolicy::Random {
                    seed: u64::from(n),
                    per_million: 200_000,
                },
            }),
            Op::Events => {
                let _ = mm.read_events(8);
            }
            Op::Wake { off, pages } => {
                let _ = mm.wake(range(off, pages));
            }
            Op::Report { off, pages, skip } => report_op(&mm, range(off, pages), skip, sem)?,
            Op::HidePins { hidden } => mm.hide_pins(hidden),
        }
        if let Err(e) = m.check_invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
    }
    // Closing the uffd releases every registration and wakes every blocked fault (protection
    // goes with WP registrations; a stale bit left by re-registering without WP stays, as on
    // the real kernel).
    let arena = Range::from_bounds(ARENA, ARENA + u64::from(ARENA_PAGES) * P);
    let wp_registered: RangeSet = m
        .vmas()
        .iter()
        .filter(|v| v.uffd.is_some_and(|u| u.mode & 2 != 0))
        .map(|v| Range::from_bounds(v.start, v.end))
        .collect();
    drop(mm);
    m.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert!(
        m.vmas().iter().all(|v| v.uffd.is_none()),
        "registration left after close"
    );
    prop_assert!(
        m.wp_set(arena).intersection(&wp_registered).is_empty(),
        "protection left after close"
    );
    prop_assert!(m.waiting().iter().all(|id| m.is_waiting(*id)));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_linux(
        uffd in 0u8..6,
        prelude in prop::option::weighted(0.8, 0u8..6),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run_with(Semantics::Linux, uffd, prelude, &ops)?;
    }

    #[test]
    fn random_sequences_proposed(
        uffd in 0u8..6,
        prelude in prop::option::weighted(0.8, 0u8..6),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run_with(Semantics::Proposed, uffd, prelude, &ops)?;
    }
}

#[test]
fn sequences_do_real_work() {
    // A fixed sequence that must protect, block a write and release it.
    let ops = [
        Op::Map {
            off: 4000,
            pages: 600,
            kind: 0,
        },
        Op::Register {
            off: 4000,
            pages: 600,
            mode: 2,
        },
        Op::Write {
            off: 4100,
            len: 10,
            kernel: false,
        },
        Op::Protect {
            off: 3990,
            pages: 700,
            skip: false,
            retry: false,
        },
        Op::Write {
            off: 4100,
            len: 10,
            kernel: false,
        },
        Op::Events,
        Op::Unprotect {
            off: 4100,
            pages: 1,
        },
    ];
    let p0 = PROTECTED.load(std::sync::atomic::Ordering::Relaxed);
    let b0 = BLOCKED.load(std::sync::atomic::Ordering::Relaxed);
    run(Semantics::Linux, 0, &ops).unwrap();
    assert!(PROTECTED.load(std::sync::atomic::Ordering::Relaxed) > p0);
    assert!(BLOCKED.load(std::sync::atomic::Ordering::Relaxed) > b0);
    println!(
        "random sequences so far: {} engine protects with protected pages, {} writes waited",
        PROTECTED.load(std::sync::atomic::Ordering::Relaxed),
        BLOCKED.load(std::sync::atomic::Ordering::Relaxed)
    );
}

//! A dirty-tracking epoch over 1 GiB with 1% of the pages written: the uffd tracker (async WP,
//! one `PAGEMAP_SCAN` with `WP_MATCHING`) against an mprotect/SIGSEGV tracker (take the
//! bitmap, re-arm with `mprotect(PROT_READ)` by dirty runs or over the whole range), on 4 KiB
//! pages: `cargo bench -p uffd-wp --bench track`.
//!
//! Each iteration writes a fresh 1% of the pages (one per block of 100, not timed) and times
//! the epoch boundary alone; every epoch is checked to return exactly the pages written. The
//! measuring code is `uffd_wp_bench::track`, shared with `uffd-wp bench track` (which also
//! reports the per-write costs and the ratios).

use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use uffd_wp::sys::mem::Thp;
use uffd_wp_bench::track::{MprotectSide, Rearm, UffdSide, dirty_pages};

const SIZE: u64 = 1 << 30;

fn epoch(c: &mut Criterion) {
    let pages = SIZE / 4096;
    let mut g = c.benchmark_group("track_epoch_1GiB_1pct/4k");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut round = 0u64;
    let mut next = || {
        round += 1;
        dirty_pages(pages, 0.01, round)
    };
    match UffdSide::new(SIZE, Thp::NoHuge, |_| {}) {
        Ok(mut u) => {
            g.bench_function("uffd_async_wp_pagemap_scan", |b| {
                b.iter_custom(|n| {
                    (0..n)
                        .map(|_| {
                            let set = next();
                            u.write(&set, None);
                            u.epoch(&set).expect("exact uffd epoch")
                        })
                        .sum()
                })
            });
        }
        Err(e) => {
            eprintln!("SKIPPED uffd tracker: needs kernel feature UFFD_FEATURE_WP_ASYNC: {e}")
        }
    }
    let mut m = MprotectSide::new(SIZE, Thp::NoHuge, |_| {}).expect("mprotect tracker");
    for rearm in [Rearm::Pages, Rearm::Range] {
        let name = match rearm {
            Rearm::Pages => "mprotect_sigsegv_rearm_pages",
            Rearm::Range => "mprotect_sigsegv_rearm_range",
        };
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| {
                        let set = next();
                        m.write(&set, None);
                        m.epoch(&set, rearm).expect("exact mprotect epoch")
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, epoch);
criterion_main!(benches);

//! How fast the model write-protects: pages per second on dense and sparse layouts.
//!
//! - `dense`: 1 GiB of anonymous memory, every page populated (262,144 PTEs in 512 tables).
//! - `sparse`: 1 GiB, one page per 2 MiB populated, WP_UNPOPULATED: every other page gets a
//!   marker (the walk still visits all 262,144 entries).
//! - `sparse-no-markers`: the same without WP_UNPOPULATED: 511 of 512 PTEs stay none.
//! - `thp`: 1 GiB of PMD-mapped THPs (512 huge entries).
//!
//! Each iteration protects the whole range with one raw `UFFDIO_WRITEPROTECT` (timed) and
//! un-protects it again (not timed); the `engine` variants go through
//! `uffd_wp::engine::protect::write_protect`. Throughput is reported in pages (elements) per second.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use uffd_wp::engine::protect::{WpOptions, write_protect};
use uffd_wp::range::{PAGE_SIZE, PMD_SIZE, PUD_SIZE, Range};
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{RegisterMode, WpMode};
use uffd_wp_model::{MapKind, ModelConfig, ModelMm, Thp, UffdConfig};

const LEN: u64 = PUD_SIZE;

fn layout(name: &str) -> (ModelMm, Range) {
    let uffd = if name == "sparse-no-markers" {
        UffdConfig::without_unpopulated()
    } else {
        UffdConfig::default()
    };
    let mm = ModelMm::open(ModelConfig::default(), uffd).unwrap();
    let m = mm.model();
    let thp = if name == "thp" {
        Thp::Huge
    } else {
        Thp::NoHuge
    };
    let r = m.map(LEN, PUD_SIZE, MapKind::Anon(thp)).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    match name {
        "dense" => {
            m.populate(r, true).unwrap();
        }
        "thp" => {
            for s in 0..LEN / PMD_SIZE {
                let a = r.start() + s * PMD_SIZE;
                m.populate(Range::from_bounds(a, a + PAGE_SIZE), true)
                    .unwrap();
            }
        }
        _ => {
            for s in 0..LEN / PMD_SIZE {
                let a = r.start() + s * PMD_SIZE;
                m.populate(Range::from_bounds(a, a + PAGE_SIZE), true)
                    .unwrap();
            }
        }
    }
    (mm, r)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("model-protect");
    g.throughput(Throughput::Elements(LEN / PAGE_SIZE));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));
    for name in ["dense", "sparse", "sparse-no-markers", "thp"] {
        let (mm, r) = layout(name);
        g.bench_function(format!("raw/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let s = Instant::now();
                    mm.writeprotect(r, WpMode::Protect).unwrap();
                    t += s.elapsed();
                    mm.writeprotect(r, WpMode::Unprotect { dontwake: false })
                        .unwrap();
                }
                t
            })
        });
        g.bench_function(format!("engine/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let s = Instant::now();
                    let rep = write_protect(&mm, r, &WpOptions::default()).unwrap();
                    t += s.elapsed();
                    assert!(rep.error.is_none());
                    mm.writeprotect(r, WpMode::Unprotect { dontwake: false })
                        .unwrap();
                }
                t
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

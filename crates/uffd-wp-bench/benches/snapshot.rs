//! Live snapshots against their alternatives, on 128 MiB of the built-in workload (2 writers)
//! with 4 KiB pages: `cargo bench -p uffd-wp --bench snapshot`.
//!
//! - `snapshot_pause`: the writers' pause of a live snapshot (pre-armed, and not) against the
//!   `fork()` call of the process holding the same region;
//! - `snapshot_copy`: the copy phase of a live snapshot against a memcpy of the region with the
//!   writers running;
//! - `fault_latency`: one write to a write-protected page, timed by the writer, served by a bare
//!   poll/read/ioctl handler or by the engine (inline, handler thread), on the writer's CPU and
//!   on the other one.
//!
//! Every snapshot is checked with the workload's oracle. The measuring code is
//! `uffd_wp_bench::snapshot`, shared with `uffd-wp bench snapshot` (1 GiB, 4 KiB and THP, with
//! the ratios against the goals).

use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use uffd_wp::backend::linux::LinuxMm;
use uffd_wp::engine::snapshot::SnapshotOptions;
use uffd_wp_bench::protect::PageKind;
use uffd_wp_bench::snapshot::{
    FaultBench, Server, default_options, memcpy_mb_s, snapshot_workload,
};
use uffd_wp_bench::sys::fork::time_fork;
use uffd_wp_bench::workload::{Workload, WorkloadConfig};

const SIZE: u64 = 128 << 20;

fn us(x: f64) -> Duration {
    Duration::from_secs_f64(x / 1e6)
}

fn pause_and_copy(c: &mut Criterion) {
    let Ok(mm) = LinuxMm::open() else {
        eprintln!("SKIPPED snapshot benches: needs kernel feature userfaultfd");
        return;
    };
    let w = Workload::start(WorkloadConfig {
        size: SIZE,
        threads: 2,
        ..WorkloadConfig::default()
    })
    .expect("workload");
    let base = default_options(PageKind::Small);
    let mut g = c.benchmark_group("snapshot_pause_128MiB/4k");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for prearm in [true, false] {
        let opts = SnapshotOptions { prearm, ..base };
        let name = if prearm {
            "snapshot_prearm"
        } else {
            "snapshot_no_prearm"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| {
                        let (rep, _) = snapshot_workload(&mm, &w, &opts, true).expect("snapshot");
                        us(rep.pause_us)
                    })
                    .sum()
            })
        });
    }
    g.bench_function("fork", |b| {
        b.iter_custom(|n| (0..n).map(|_| time_fork().expect("fork")).sum())
    });
    g.finish();

    let mut g = c.benchmark_group("snapshot_copy_128MiB/4k");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.bench_function("snapshot_copy_live", |b| {
        b.iter_custom(|n| {
            (0..n)
                .map(|_| {
                    let (rep, _) = snapshot_workload(&mm, &w, &base, true).expect("snapshot");
                    us(rep.copy_ms * 1e3)
                })
                .sum()
        })
    });
    g.bench_function("memcpy_live", |b| {
        b.iter_custom(|n| {
            (0..n)
                .map(|_| {
                    let mb_s = memcpy_mb_s(&w, true).expect("memcpy");
                    us(SIZE as f64 / mb_s)
                })
                .sum()
        })
    });
    g.finish();
}

fn fault_latency(c: &mut Criterion) {
    let fb = match FaultBench::new(256 << 20, 100) {
        Ok(fb) => fb,
        Err(e) => {
            eprintln!("SKIPPED fault latency: needs kernel feature userfaultfd: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("fault_latency");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for server in Server::ALL {
        for placement in fb.placements() {
            let name = format!("{}/{}", server.name(), placement.name());
            g.bench_function(name, |b| {
                b.iter_custom(|n| {
                    let mut got: Vec<u64> = Vec::new();
                    while (got.len() as u64) < n {
                        got.extend(fb.run(server, placement).expect("fault round"));
                    }
                    got[..n as usize]
                        .iter()
                        .map(|&ns| Duration::from_nanos(ns))
                        .sum()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, pause_and_copy, fault_latency);
criterion_main!(benches);

//! Exact `write_protect` against the raw `UFFDIO_WRITEPROTECT` on the real kernel, on 4 KiB
//! pages and on THP: `cargo bench -p uffd-wp --bench protect`.
//!
//! 256 MiB of populated anonymous memory, starting 128 MiB before a 1 GiB boundary (so the
//! engine splits the clean call in two raw calls, as for most real mappings, and the partial
//! run fails at that boundary). Only the protecting call is timed; every iteration un-protects
//! the range outside the timed part. The measuring code is `uffd_wp_bench::protect`, shared with
//! `uffd-wp bench protect` (which prints the ratios and checks each sample against pagemap).

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use uffd_wp::range::PUD_SIZE;
use uffd_wp_bench::protect::{BenchError, PageKind, ProtectBench};

const SIZE: u64 = 256 << 20;

fn timed(iters: u64, mut one: impl FnMut() -> Result<Duration, BenchError>) -> Duration {
    (0..iters).map(|_| one().expect("benchmark step")).sum()
}

fn protect(c: &mut Criterion) {
    for kind in PageKind::ALL {
        let b = match ProtectBench::new(SIZE, kind, PUD_SIZE - SIZE / 2) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("SKIPPED: needs kernel feature userfaultfd (write-protect): {e}");
                return;
            }
        };
        b.populate(SIZE, |_| {}).expect("populate");
        // The CLI checks every sample against pagemap; here one checked round is enough.
        uffd_wp_bench::protect::measure(&b, 1, |_| {}).expect("a checked round");
        let mut b = b;
        b.verify = false;

        let mut g = c.benchmark_group(format!("protect_256MiB/{}", kind.name()));
        g.sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        g.bench_function("raw", |x| x.iter_custom(|n| timed(n, || b.raw())));
        g.bench_function("exact", |x| {
            x.iter_custom(|n| timed(n, || b.exact().map(|(d, _)| d)))
        });
        g.bench_function("partial_raw", |x| {
            x.iter_custom(|n| timed(n, || b.partial_raw()))
        });
        g.bench_function("partial_exact", |x| {
            x.iter_custom(|n| timed(n, || b.partial_exact().map(|(d, _)| d)))
        });
        g.finish();
    }
}

criterion_group!(benches, protect);
criterion_main!(benches);

//! The dirty tracker on the reference model (`uffd-wp-model`), the same engine code as on the
//! kernel: async-WP epochs equal the pages written, a DMA write through a long-term pin (which
//! raises no fault) is covered by the pinned range reported every epoch, sync-WP epochs with the
//! handler thread serving the model's faults, and nothing left protected after drop. (This
//! lives in the CLI crate because it is the one that depends on both the library and the model.)

use std::sync::Arc;

use uffd_wp::engine::track::{Method, TrackOptions, Tracker};
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp_model::{MapKind, ModelConfig, ModelMm, PinFlags, Progress, Thp, UffdConfig};

fn page(r: Range, i: u64) -> Range {
    Range::from_bounds(r.start() + i * PAGE_SIZE, r.start() + (i + 1) * PAGE_SIZE)
}

fn pages(r: Range, idx: &[u64]) -> RangeSet {
    idx.iter().map(|&i| page(r, i)).collect()
}

#[test]
fn async_epochs_and_pins_on_the_model() {
    let mm = Arc::new(ModelMm::open(ModelConfig::default(), UffdConfig::async_wp()).unwrap());
    let model = mm.model().clone();
    let r = model
        .map(1024 * PAGE_SIZE, 2 << 20, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    model
        .populate(
            Range::from_bounds(r.start(), r.start() + 512 * PAGE_SIZE),
            true,
        )
        .unwrap();
    let pinned = Range::from_bounds(page(r, 100).start(), page(r, 104).start());
    let Progress::Done(pin) = model.pin(pinned, PinFlags::IO_URING).unwrap() else {
        panic!("pin blocked");
    };
    let mut t =
        Tracker::start(Arc::clone(&mm), r, Method::AsyncWp, TrackOptions::default()).unwrap();
    assert_eq!(
        model.wp_set(r),
        RangeSet::single(r).difference(&RangeSet::single(pinned)),
        "armed, pins left writable"
    );
    for (k, idx) in [&[0u64, 1, 7, 600, 1023][..], &[5, 511, 512], &[]]
        .into_iter()
        .enumerate()
    {
        for &i in idx {
            assert!(matches!(
                model.write(page(r, i).start(), &[k as u8 + 1; 8]).unwrap(),
                Progress::Done(())
            ));
        }
        model.dma_write(pin, 0, &[9; 16]).unwrap();
        let e = t.epoch().unwrap();
        assert_eq!(e.dirty, pages(r, idx), "epoch {k}");
        assert_eq!(e.pinned, RangeSet::single(pinned), "epoch {k}");
        assert_eq!(
            model.wp_set(r),
            RangeSet::single(r).difference(&RangeSet::single(pinned)),
            "epoch {k}: re-armed"
        );
    }
    drop(t);
    assert_eq!(
        model.wp_set(r),
        RangeSet::new(),
        "nothing protected after drop"
    );
}

#[test]
fn sync_epochs_on_the_model() {
    let mm = Arc::new(ModelMm::open(ModelConfig::default(), UffdConfig::default()).unwrap());
    let model = mm.model().clone();
    let r = model
        .map(256 * PAGE_SIZE, 2 << 20, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    model.populate(r, true).unwrap();
    let opts = TrackOptions {
        poll_ms: 1,
        ..Default::default()
    };
    let mut t = Tracker::start(Arc::clone(&mm), r, Method::SyncWp, opts).unwrap();
    for (k, idx) in [&[3u64, 4, 200][..], &[4, 255]].into_iter().enumerate() {
        for &i in idx {
            match model.write(page(r, i).start(), &[7; 8]).unwrap() {
                Progress::Done(()) => panic!("a write to a protected page must fault"),
                Progress::Blocked(id) => {
                    // The tracker's handler thread serves the fault and wakes the writer.
                    // (The deadline only turns a hang into a failure.)
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    while model.is_waiting(id) {
                        assert!(std::time::Instant::now() < deadline, "fault never served");
                        std::thread::yield_now();
                    }
                }
            }
        }
        let e = t.epoch().unwrap();
        assert_eq!(e.dirty, pages(r, idx), "epoch {k}");
        assert_eq!(e.faults, idx.len() as u64);
        assert_eq!(model.wp_set(r), RangeSet::single(r), "epoch {k}: re-armed");
    }
    t.close().unwrap();
    assert_eq!(model.wp_set(r), RangeSet::new());
}

/// The soft-dirty fallback, which this project's kernels cannot run (no
/// `CONFIG_MEM_SOFT_DIRTY`), on the model with soft-dirty on: every epoch equals the pages
/// written; and without the config the tracker refuses it.
#[test]
fn soft_dirty_epochs_on_the_model() {
    let cfg = ModelConfig {
        soft_dirty: true,
        ..ModelConfig::default()
    };
    let mm = Arc::new(ModelMm::open(cfg, UffdConfig::default()).unwrap());
    let model = mm.model().clone();
    let r = model
        .map(256 * PAGE_SIZE, PAGE_SIZE, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    let mut t = Tracker::start(
        Arc::clone(&mm),
        r,
        Method::SoftDirty,
        TrackOptions::default(),
    )
    .unwrap();
    for (k, idx) in [&[0u64, 3, 200][..], &[3, 4, 255], &[]]
        .into_iter()
        .enumerate()
    {
        for &i in idx {
            assert!(matches!(
                model.write(page(r, i).start(), &[k as u8 + 1]).unwrap(),
                Progress::Done(())
            ));
        }
        let e = t.epoch().unwrap();
        assert_eq!(e.method, Method::SoftDirty);
        assert_eq!(e.dirty, pages(r, idx), "epoch {k}");
    }
    t.close().unwrap();

    let plain = Arc::new(ModelMm::open(ModelConfig::default(), UffdConfig::default()).unwrap());
    let r = plain
        .model()
        .map(16 * PAGE_SIZE, PAGE_SIZE, MapKind::Anon(Thp::NoHuge))
        .unwrap();
    assert!(Tracker::start(plain, r, Method::SoftDirty, TrackOptions::default()).is_err());
}

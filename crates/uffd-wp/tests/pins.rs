//! Pin safety on the real kernel: the io_uring hazard itself, discovery of registered buffers,
//! skip_pinned over exactly the known pins, declared-pin guards, pin-aware I/O helpers.
//!
//! Cross-process discovery (another process's buffers, unexplained VmPin, a process exiting
//! mid-scan, no permission) is tested from the CLI crate, whose binary serves the holder.

mod common;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use uffd_wp::backend::linux::{Config, LinuxMm};
use uffd_wp::backend::pins::io::{DirectFile, PinnedRing, read_fixed_serving_faults};
use uffd_wp::backend::pins::{PinKind, PinScanError, PinSource, discover};
use uffd_wp::engine::protect::{OnError, WpOptions};
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::scenario;
use uffd_wp::scenario::LinuxLabs;
use uffd_wp::seam::prelude::*;
use uffd_wp::seam::{RegisterMode, ScanRequest};
use uffd_wp::sys::mem::{Backing, Mapping, Thp};
use uffd_wp::sys::pagemap::category;
use uffd_wp::sys::uring::{FixedIo, FixedRing};
use uffd_wp::write_protect;

const P: u64 = PAGE_SIZE;

fn pages(r: Range, a: u64, b: u64) -> Range {
    Range::from_bounds(r.start() + a * P, r.start() + b * P)
}

fn set(r: Range, spans: &[(u64, u64)]) -> RangeSet {
    spans.iter().map(|&(a, b)| pages(r, a, b)).collect()
}

use common::bit57;

/// Pages of `r` that `PAGEMAP_SCAN` says are `PAGE_IS_WRITTEN`.
fn written(mm: &LinuxMm, r: Range) -> RangeSet {
    let req = ScanRequest {
        start: r.start(),
        end: r.end(),
        category_mask: category::WRITTEN,
        return_mask: category::WRITTEN,
        ..Default::default()
    };
    mm.scan_all(&req)
        .unwrap()
        .regions
        .iter()
        .map(|g| Range::from_bounds(g.start, g.end))
        .collect()
}

fn ring() -> Option<FixedRing> {
    common::need("io_uring (io_uring_setup)", FixedRing::new(8))
}

/// A memfd holding `data` at offset 0.
fn source(data: &[u8]) -> OwnedFd {
    let fd = rustix::fs::memfd_create("pins-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::io::pwrite(&fd, data, 0).unwrap();
    fd
}

/// 16 populated pages registered for WP on `mm`, handed to `ring` with pages [4, 8) registered
/// as its fixed buffer 0.
fn pinned_layout(mm: &LinuxMm, ring: &mut FixedRing) -> (Range, Range) {
    let m = Mapping::new(16 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let r = m.range();
    m.touch(r, 1).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    ring.adopt(m);
    let buf = pages(r, 4, 8);
    ring.register_buffers(&[buf]).unwrap();
    (r, buf)
}

/// The seed's hazard, pinned down: a buffer registered with io_uring (a long-term pin),
/// write-protected, then written by IORING_OP_READ_FIXED: the data lands, no WP fault is
/// raised, pagemap bit 57 stays set and PAGE_IS_WRITTEN stays 0, in sync and async mode. If a
/// kernel ever fixes this, this test fails and says so.
#[test]
fn read_fixed_into_a_protected_registered_buffer_lands_unseen() {
    for (mode, cfg) in [("sync", Config::default()), ("async", Config::async_wp())] {
        let Some(mm) = common::need(
            &format!("userfaultfd WP ({mode} mode)"),
            LinuxMm::open_with(cfg),
        ) else {
            return;
        };
        let Some(mut ring) = ring() else { return };
        let (r, _) = pinned_layout(&mm, &mut ring);
        let rep = write_protect(&mm, r, &WpOptions::default()).unwrap();
        assert_eq!(rep.protected, RangeSet::single(r), "{mode}");
        assert_eq!(bit57(r), RangeSet::single(r), "{mode}");

        let page = pages(r, 5, 6);
        let data = vec![0xa5u8; P as usize];
        let src = source(&data);
        let w = read_fixed_serving_faults(&mut ring, &src, 0, page.start(), P as u32, 0, mm.uffd())
            .unwrap();
        assert_eq!(w.bytes, P as u32, "{mode}: READ_FIXED read the whole page");
        let mut back = vec![0u8; P as usize];
        ring.memory()[0].read(page.start(), &mut back).unwrap();
        assert_eq!(back, data, "{mode}: the data landed in the protected page");
        assert_eq!(
            w.wp_faults, 0,
            "{mode}: the kernel now raises a uffd-wp fault for a write through an io_uring \
             pin: the hazard of shared/kernel-notes.md is fixed on this kernel; revisit pins"
        );
        assert!(mm.read_events(16).unwrap().is_empty(), "{mode}: no event");
        assert_eq!(
            bit57(r),
            RangeSet::single(r),
            "{mode}: bit 57 still says protected although the page was written"
        );
        assert!(
            written(&mm, r).is_empty(),
            "{mode}: PAGE_IS_WRITTEN stays 0 for the page written through the pin"
        );
    }
}

/// skip_pinned skips exactly the known pins: io_uring buffers discovered in
/// /proc/self/fdinfo (two rings) and a declared pin, clipped to the request; once a ring is
/// unregistered its pages are protected again.
#[test]
fn skip_pinned_skips_exactly_the_discovered_and_declared_pins() {
    let Some(mm) = common::need("userfaultfd", LinuxMm::open()) else {
        return;
    };
    let Some(mut ring_a) = ring() else { return };
    let Some(mut ring_b) = ring() else { return };
    // One 64-page mapping: ring A takes it over with buffers [3, 5) and [10, 11); a declared
    // pin [20, 24) half inside the request [2, 22).
    let m = Mapping::new(64 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let r = m.range();
    m.touch(r, 1).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    ring_a.adopt(m);
    ring_a
        .register_buffers(&[pages(r, 3, 5), pages(r, 10, 11)])
        .unwrap();
    let declared = mm.pin(pages(r, 20, 24));
    let opts = WpOptions {
        skip_pinned: true,
        on_error: OnError::Stop,
    };
    let req = pages(r, 2, 22);
    let rep = write_protect(&mm, req, &opts).unwrap();
    assert_eq!(rep.skipped, set(r, &[(3, 5), (10, 11), (20, 22)]));
    assert_eq!(rep.protected, set(r, &[(2, 3), (5, 10), (11, 20)]));
    assert!(rep.not_protected.is_empty());
    assert_eq!(rep.bytes_not_protected(), 0, "skipped counts as protected");
    assert_eq!(bit57(r), rep.protected, "report equals pagemap bit 57");

    // The registry names the sources.
    let pins = mm.pins().pins_in(req);
    let fd = ring_a.raw_fd();
    let sources: Vec<(Range, String)> = pins
        .iter()
        .map(|p| (p.range, p.source.to_string()))
        .collect();
    assert!(sources.contains(&(pages(r, 3, 5), format!("io_uring fd {fd} buffer 0"))));
    assert!(sources.contains(&(pages(r, 10, 11), format!("io_uring fd {fd} buffer 1"))));
    assert!(sources.contains(&(pages(r, 20, 22), "declared".to_string())));
    let view = mm.pins().view(req);
    assert_eq!(view.long_term, set(r, &[(3, 5), (10, 11)]));
    assert_eq!(view.declared, set(r, &[(20, 22)]));
    let d = mm.pins().last_discovery().unwrap();
    let ours = d
        .rings
        .iter()
        .find(|g| g.fd == fd)
        .expect("ring A discovered");
    assert_eq!(
        ours.accounted_pages, 3,
        "io_uring accounts 3 pages in VmPin"
    );
    assert!(d.vm_pin_bytes >= 3 * P);

    // Ring B: a second mapping, buffer over all of it.
    let m2 = Mapping::new(8 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let r2 = m2.range();
    m2.touch(r2, 1).unwrap();
    mm.register(r2, RegisterMode::WP).unwrap();
    ring_b.adopt(m2);
    ring_b.register_buffers(&[pages(r2, 2, 6)]).unwrap();
    let rep2 = write_protect(&mm, r2, &opts).unwrap();
    assert_eq!(rep2.skipped, set(r2, &[(2, 6)]));
    assert_eq!(bit57(r2), set(r2, &[(0, 2), (6, 8)]));

    // Unregistering unpins at once: the next protect covers the pages.
    ring_b.unregister_buffers().unwrap();
    drop(declared);
    let rep3 = write_protect(&mm, r2, &opts).unwrap();
    assert!(rep3.skipped.is_empty(), "{:?}", rep3.skipped);
    assert_eq!(bit57(r2), RangeSet::single(r2));
    let rep4 = write_protect(&mm, req, &opts).unwrap();
    assert_eq!(
        rep4.skipped,
        set(r, &[(3, 5), (10, 11)]),
        "the declared pin is gone"
    );
}

/// Declared pins are skipped while their guard lives, released on drop and when a panic
/// unwinds through the guard.
#[test]
fn declared_pin_guards_release_on_drop_and_on_panic() {
    let Some(mm) = common::need("userfaultfd", LinuxMm::open()) else {
        return;
    };
    let mm = Arc::new(mm);
    let m = Mapping::new(16 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let r = m.range();
    m.touch(r, 1).unwrap();
    mm.register(r, RegisterMode::WP).unwrap();
    let opts = WpOptions {
        skip_pinned: true,
        on_error: OnError::Stop,
    };
    let g = mm.pin(pages(r, 2, 4));
    assert_eq!(g.pin().kind, PinKind::Declared);
    assert_eq!(g.pin().source, PinSource::Declared);
    let rep = write_protect(mm.as_ref(), r, &opts).unwrap();
    assert_eq!(rep.skipped, set(r, &[(2, 4)]));
    drop(g);
    let rep = write_protect(mm.as_ref(), r, &opts).unwrap();
    assert!(rep.skipped.is_empty());
    assert_eq!(bit57(r), RangeSet::single(r));

    let mm2 = Arc::clone(&mm);
    let pin = pages(r, 8, 12);
    let res = std::panic::catch_unwind(move || {
        let _g = mm2.pin(pin);
        assert_eq!(mm2.pinned(pin).unwrap(), RangeSet::single(pin));
        panic!("the I/O this pin covered failed");
    });
    assert!(res.is_err());
    assert!(mm.pinned(r).unwrap().is_empty(), "released while unwinding");
}

/// PinnedRing declares its buffers (long-term) for exactly as long as they are registered;
/// discovery sees the same buffers; O_DIRECT declares the buffer pinned only during the system
/// call: observed while the call is blocked on a uffd-wp fault (its FOLL_WRITE pin faults
/// first, since the page was protected before the pin).
#[test]
fn pin_aware_io_declares_for_exactly_its_lifetime() {
    let Some(mm) = common::need("userfaultfd", LinuxMm::open()) else {
        return;
    };
    let Some(_) = ring() else { return };
    let reg = Arc::clone(mm.pins());
    let mut pr = PinnedRing::new(&reg, 8).unwrap();
    let m = Mapping::new(8 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let r = m.range();
    m.touch(r, 1).unwrap();
    pr.adopt(m);
    let buf = pages(r, 1, 3);
    pr.register(&[buf]).unwrap();
    let v = reg.view(r);
    assert_eq!(v.declared, RangeSet::single(buf));
    assert_eq!(v.long_term, RangeSet::single(buf), "declared long-term");
    assert_eq!(mm.pinned(r).unwrap(), RangeSet::single(buf));
    let sources: Vec<String> = reg
        .pins_in(r)
        .iter()
        .map(|p| p.source.to_string())
        .collect();
    assert!(sources.contains(&"declared".to_string()));
    assert!(sources.contains(&format!("io_uring fd {} buffer 0", pr.raw_fd())));
    // A write through the ring lands.
    let data = vec![0x3cu8; P as usize];
    let src = source(&data);
    assert_eq!(
        pr.fixed(&src, FixedIo::read(0, buf.start(), P as u32, 0))
            .unwrap(),
        P as u32
    );
    let mut back = vec![0u8; P as usize];
    pr.memory()[0].read(buf.start(), &mut back).unwrap();
    assert_eq!(back, data);
    // And back out through the ring into another file.
    let dst = source(&vec![0u8; P as usize]);
    assert_eq!(
        pr.fixed(&dst, FixedIo::write(0, buf.start(), P as u32, 0))
            .unwrap(),
        P as u32
    );
    let mut out = vec![0u8; P as usize];
    rustix::io::pread(&dst, &mut out, 0).unwrap();
    assert_eq!(out, data);
    // Outside the buffer: a typed error, nothing submitted.
    let e = pr
        .fixed(&src, FixedIo::read(0, pages(r, 5, 6).start(), P as u32, 0))
        .unwrap_err();
    assert_eq!(e.errno(), rustix::io::Errno::FAULT);
    pr.unregister().unwrap();
    assert!(
        reg.view(r).declared.is_empty(),
        "released with the registration"
    );
    assert!(mm.pinned(r).unwrap().is_empty(), "and no longer discovered");
    drop(pr);

    // O_DIRECT.
    let path = std::env::temp_dir().join(format!("uffd-wp-pins-{}.bin", std::process::id()));
    let f = match DirectFile::open(&reg, &path, true) {
        Ok(f) => f,
        Err(e) => {
            let _ = common::need::<(), _>("O_DIRECT on the temp directory", Err(e));
            return;
        }
    };
    let mut out = Mapping::new(4 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let or = out.range();
    out.write(or.start(), &vec![0x5au8; (4 * P) as usize])
        .unwrap();
    assert_eq!(f.write_from(&mut out, or, 0).unwrap(), (4 * P) as usize);
    assert!(reg.view(or).declared.is_empty(), "released after the write");

    let mut into = Mapping::new(4 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let ir = into.range();
    into.touch(ir, 1).unwrap();
    mm.register(ir, RegisterMode::WP).unwrap();
    write_protect(&mm, ir, &WpOptions::default()).unwrap();
    let dst = pages(ir, 1, 3);
    std::thread::scope(|s| {
        let reader = s.spawn(|| f.read_into(&mut into, dst, 0));
        // The read's pin faults on the protected page: the reader blocks inside pread until
        // the fault is served. (The poll interval only paces the loop; nothing is timed.)
        while !mm.wait_event(50).unwrap() {
            assert!(
                !reader.is_finished(),
                "the O_DIRECT read into a protected page finished without a WP fault: {:?}",
                reader.join()
            );
        }
        let ev = mm.read_events(1).unwrap();
        assert_eq!(ev.len(), 1, "one WP fault from the O_DIRECT pin");
        assert_eq!(
            reg.view(ir).declared,
            RangeSet::single(dst),
            "declared while the call runs"
        );
        uffd_wp::unprotect(&mm, dst, OnError::Stop).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), (2 * P) as usize);
    });
    assert!(reg.view(ir).declared.is_empty(), "released after the read");
    let mut back = vec![0u8; (2 * P) as usize];
    into.read(dst.start(), &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a), "the O_DIRECT read landed");
    let _ = std::fs::remove_file(&path);
}

/// `uffd-wp scenario pinned-io-uring` on the real kernel: `trusting` documents the hazard,
/// `skip-pinned` skips exactly the buffer; both verified against pagemap.
#[test]
fn pinned_io_uring_scenario_shapes() {
    if common::lab(true).is_none() || ring().is_none() {
        return;
    }
    let out = scenario::run("pinned-io-uring", &LinuxLabs).unwrap();
    assert!(out.all_verified());
    let t = &out.results[0];
    assert_eq!(t.label, "trusting");
    let r = t.report.requested;
    assert_eq!(r.pages(), scenario::PINNED_PAGES);
    assert_eq!(t.report.protected, RangeSet::single(r));
    assert!(t.report.skipped.is_empty());
    for s in [
        "data landed: true",
        "WP faults raised: 0",
        "still reads back as protected: true",
    ] {
        assert!(t.note.contains(s), "{s:?} not in {:?}", t.note);
    }
    let k = &out.results[1];
    assert_eq!(k.label, "skip-pinned");
    let r = k.report.requested;
    let (b0, b1) = scenario::PINNED_BUFFER;
    assert_eq!(k.report.skipped, set(r, &[(b0, b1)]));
    assert_eq!(
        k.report.protected,
        set(r, &[(0, b0), (b1, scenario::PINNED_PAGES)])
    );
    assert_eq!(k.report.bytes_not_protected(), 0);
    let j = serde_json::to_value(&out).unwrap();
    assert_eq!(j["results"][1]["report"]["skipped"][0][0], b0 * P);
}

/// Discovery of this process finds its own ring with the buffer addresses the kernel lists.
#[test]
fn discovery_of_self_lists_registered_buffers() {
    let Some(mut ring) = ring() else { return };
    let m = Mapping::new(8 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let r = m.range();
    ring.adopt(m);
    ring.register_buffers(&[pages(r, 0, 2), pages(r, 5, 8)])
        .unwrap();
    let d = discover(std::process::id()).unwrap();
    let fd = ring.raw_fd();
    let mine: Vec<(Range, PinSource)> = d
        .pins
        .iter()
        .filter(|p| matches!(p.source, PinSource::IoUring { fd: f, .. } if f == fd))
        .map(|p| (p.range, p.source))
        .collect();
    assert_eq!(
        mine,
        vec![
            (pages(r, 0, 2), PinSource::IoUring { fd, index: 0 }),
            (pages(r, 5, 8), PinSource::IoUring { fd, index: 1 }),
        ]
    );
    assert!(d.pins.iter().all(|p| p.kind == PinKind::LongTerm));
}

/// A pid that names no process: a typed error with the pid, the path and ENOENT.
#[test]
fn scanning_a_missing_process_is_a_typed_error() {
    // A child that has exited and been reaped: its pid names no process (pids are not reused
    // before the counter wraps).
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    match discover(pid) {
        Err(PinScanError::ProcessGone {
            pid: p,
            path,
            errno,
        }) => {
            assert_eq!(p, pid);
            assert_eq!(path, format!("/proc/{pid}"));
            assert_eq!(errno, rustix::io::Errno::NOENT);
        }
        other => panic!("{other:?}"),
    }
}

/// A snapshot of memory holding an io_uring fixed buffer: the buffer is never write-protected
/// (a write through the pin would raise no fault), so while the copier runs its pages are
/// writable and every other page is protected; it is copied last and counted in
/// `pinned_pages`; nothing is left protected afterwards.
#[test]
fn snapshots_skip_pinned_buffers_copy_them_last_and_count_them() {
    use uffd_wp::engine::snapshot::{self, SnapshotOptions, Source};
    use uffd_wp::seam::FnQuiesce;
    let Some(mm) = common::need("userfaultfd", LinuxMm::open()) else {
        return;
    };
    let Some(_) = ring() else { return };
    let reg = Arc::clone(mm.pins());
    let mut pr = PinnedRing::new(&reg, 8).unwrap();
    let m = Mapping::new(64 * P, P, Backing::Anon, Thp::NoHuge).unwrap();
    let r = m.range();
    for (i, p) in r.page_iter().enumerate() {
        m.write(p.start(), &[i as u8 + 1; 64]).unwrap();
    }
    pr.adopt(m);
    let buf = pages(r, 16, 24);
    pr.register(&[buf]).unwrap();
    let mapping = &pr.memory()[0];
    let mut during = None;
    let (img, rep) = snapshot::take(
        &mm,
        &RangeSet::single(r),
        Source::Mapping(mapping),
        &FnQuiesce(|| {}, || {}),
        &SnapshotOptions::default(),
        |_, _| {
            // Before the first release: everything still as the pause left it.
            if during.is_none() {
                during = Some(bit57(r));
            }
        },
    )
    .unwrap();
    let during = during.expect("the copier reported progress");
    assert_eq!(
        during,
        RangeSet::single(r).difference(&RangeSet::single(buf)),
        "during the copy every page but the pinned ones is protected"
    );
    assert_eq!(rep.pinned_pages, 8, "{rep:?}");
    assert_eq!(rep.pages, 64);
    assert!(rep.not_captured.is_empty());
    for (i, p) in r.page_iter().enumerate() {
        assert_eq!(
            img.page(p.start()).unwrap()[..64],
            [i as u8 + 1; 64],
            "page {i}"
        );
    }
    assert!(bit57(r).is_empty(), "nothing left protected");
}

//! Pin discovery in another process, against a real holder of io_uring registered buffers
//! (this test binary re-executed: [`pin_holder_entry`]): its buffers are found, `VmPin` no fd
//! explains is reported (and refused under the strict option), a process exiting mid-scan and
//! a scan without permission are typed errors that change nothing.
//!
//! One test drops a thread's credentials to `nobody` (Linux credentials are per thread), which
//! marks this whole process non-dumpable: these tests have their own binary.

mod common;

use rustix::io::Errno;
use rustix::process::{Gid, Uid};
use uffd_wp::backend::pins::{
    PinKind, PinRegistry, PinScanError, PinSource, PinTarget, Refresh, RegistryOptions,
    ScanOptions, ScanPoint, discover, discover_with,
};
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::testing::holder::{Holder, HolderConfig, maybe_run_holder};

const P: u64 = PAGE_SIZE;
/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// Not a test: the holder process the other tests start (`--ignored --exact
/// pin_holder_entry`). Without the holder environment it returns at once.
#[test]
#[ignore = "helper process for the other tests"]
fn pin_holder_entry() {
    maybe_run_holder();
}

/// A holder of `buffers` (page spans of a `pages`-page mapping), or a skip without io_uring.
fn holder(pages: u64, buffers: &[[u64; 2]], hide: bool) -> Option<Holder> {
    let exe = std::env::current_exe().unwrap();
    let cfg = HolderConfig {
        pages,
        buffers: buffers.to_vec(),
        hide,
    };
    common::need(
        "io_uring registered buffers in a child process",
        Holder::spawn_with_args(
            &exe,
            &["--ignored", "--exact", "pin_holder_entry", "--nocapture"],
            &cfg,
        ),
    )
}

fn ranges(h: &Holder) -> Vec<Range> {
    h.ready
        .buffers
        .iter()
        .map(|&[a, l]| Range::new(a, l).unwrap())
        .collect()
}

fn registry(pid: u32, strict: bool) -> std::sync::Arc<PinRegistry> {
    PinRegistry::new(
        PinTarget::Pid(pid),
        RegistryOptions {
            refresh: Refresh::OnQuery,
            strict,
        },
    )
}

#[test]
fn discovery_finds_the_buffers_of_another_process() {
    let Some(h) = holder(16, &[[2, 4], [10, 11]], false) else {
        return;
    };
    let fd = h.ready.ring_fd.expect("ring fd");
    let want = ranges(&h);
    let d = discover(h.pid()).unwrap();
    assert_eq!(d.pid, h.pid());
    let got: Vec<(Range, PinSource, PinKind)> =
        d.pins.iter().map(|p| (p.range, p.source, p.kind)).collect();
    assert_eq!(
        got,
        vec![
            (
                want[0],
                PinSource::IoUring { fd, index: 0 },
                PinKind::LongTerm
            ),
            (
                want[1],
                PinSource::IoUring { fd, index: 1 },
                PinKind::LongTerm
            ),
        ]
    );
    assert_eq!(
        d.vm_pin_bytes,
        3 * P,
        "VmPin of the holder: its 3 pinned pages"
    );
    assert_eq!(d.explained_bytes, 3 * P);
    assert_eq!(d.unexplained_bytes, 0);
    assert!(!d.fd_walk_skipped);
    // Through a registry: the same pins, clipped to a query.
    let reg = registry(h.pid(), true);
    let all = Range::from_bounds(want[0].start() - 2 * P, want[1].end() + 5 * P);
    assert_eq!(
        reg.pinned(all).unwrap(),
        want.iter().copied().collect::<RangeSet>()
    );
    assert_eq!(reg.view(all).long_term.pages(), 3);
}

/// The holder hands its ring to a keeper child and closes its own fd: its VmPin stays, no fd
/// of it names the ring. The bytes are reported unexplained; the strict option refuses; a
/// declared long-term pin over them explains them.
#[test]
fn unexplained_vm_pin_is_reported_and_strict_refuses() {
    let Some(h) = holder(8, &[[0, 4]], true) else {
        return;
    };
    assert!(h.ready.ring_fd.is_none());
    let d = discover(h.pid()).unwrap();
    assert!(d.pins.is_empty(), "no fd names the ring: {:?}", d.pins);
    assert_eq!(d.vm_pin_bytes, 4 * P);
    assert_eq!(d.unexplained_bytes, 4 * P);

    let strict = registry(h.pid(), true);
    match strict.refresh() {
        Err(PinScanError::Unexplained {
            pid,
            vm_pin_bytes,
            unexplained_bytes,
        }) => {
            assert_eq!(pid, h.pid());
            assert_eq!(vm_pin_bytes, 4 * P);
            assert_eq!(unexplained_bytes, 4 * P);
        }
        other => panic!("strict must refuse: {other:?}"),
    }
    let r = Range::new(h.ready.buffers[0][0], h.ready.buffers[0][1]).unwrap();
    assert_eq!(
        strict.pinned(r).unwrap_err().errno(),
        Errno::BUSY,
        "as an errno (Mm::pinned): EBUSY"
    );
    let lax = registry(h.pid(), false);
    assert!(lax.pinned(r).unwrap().is_empty(), "nothing known to skip");
    assert_eq!(lax.view(r).unexplained_bytes, 4 * P, "but the view says so");
    // The application declares the pin it knows about: explained.
    let _g = strict.declare_pin(r, PinKind::LongTerm, true);
    assert_eq!(strict.pinned(r).unwrap(), RangeSet::single(r));
    assert_eq!(strict.unexplained_bytes(), 0);

    // The exact engine says so too: a remote backend on the holder finds nothing to skip, and
    // its report carries the pinned bytes nobody can place.
    if let Some(mm) = common::need(
        "ptrace and pidfd_getfd (attach to another process)",
        uffd_wp::backend::linux::LinuxMm::attach(
            h.pid(),
            uffd_wp::backend::linux::Config::default(),
        ),
    ) {
        use uffd_wp::seam::RegisterMode;
        use uffd_wp::seam::prelude::*;
        mm.register(r, RegisterMode::WP).unwrap();
        let opts = uffd_wp::WpOptions {
            skip_pinned: true,
            on_error: uffd_wp::OnError::Stop,
        };
        let rep = uffd_wp::write_protect(&mm, r, &opts).unwrap();
        assert!(rep.skipped.is_empty(), "nothing known to skip");
        assert_eq!(rep.unexplained_pinned_bytes, 4 * P);
        assert_eq!(rep.to_json()["unexplained_pinned_bytes"], 4 * P);
        let plain = uffd_wp::write_protect(&mm, r, &uffd_wp::WpOptions::default()).unwrap();
        assert_eq!(
            plain.unexplained_pinned_bytes, 0,
            "only skip_pinned looks at pins"
        );
        uffd_wp::unprotect(&mm, r, uffd_wp::OnError::Stop).unwrap();
    }

    // The keeper holds the ring: its fdinfo lists the buffer (of the holder's address space),
    // its own VmPin is 0, and the fast path does not even walk its fds.
    let keeper = h.ready.keeper_pid.expect("keeper");
    let k = discover(keeper).unwrap();
    assert_eq!(k.vm_pin_bytes, 0);
    assert_eq!(k.pins.iter().map(|p| p.range).collect::<Vec<_>>(), vec![r]);
    assert_eq!(k.unexplained_bytes, 0);
    let fast = discover_with(
        keeper,
        &ScanOptions {
            skip_without_vm_pin: true,
            ..ScanOptions::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(fast.fd_walk_skipped && fast.pins.is_empty());
}

/// The holder is killed (and reaped) after the fds are listed, before its fdinfo is read: a
/// typed error naming the pid, the file and the errno; a registry keeps what it knew.
#[test]
fn a_process_exiting_mid_scan_is_a_typed_error_and_changes_nothing() {
    let Some(mut h) = holder(8, &[[1, 3]], false) else {
        return;
    };
    let pid = h.pid();
    let fd = h.ready.ring_fd.unwrap();
    let reg = registry(pid, false);
    let before = reg.refresh().unwrap();
    assert_eq!(before.pins.len(), 1);

    let res = discover_with(pid, &ScanOptions::default(), &mut |p| {
        if let ScanPoint::Listed { io_uring_fds } = p {
            assert_eq!(io_uring_fds, &[fd]);
            h.kill();
        }
    });
    match res {
        Err(PinScanError::ProcessGone {
            pid: p,
            path,
            errno,
        }) => {
            assert_eq!(p, pid);
            assert_eq!(path, format!("/proc/{pid}/fdinfo/{fd}"));
            assert!(matches!(errno, Errno::NOENT | Errno::SRCH), "{errno:?}");
        }
        other => panic!("expected ProcessGone, got {other:?}"),
    }
    let again = reg.refresh().unwrap_err();
    assert!(
        matches!(again, PinScanError::ProcessGone { .. }),
        "{again:?}"
    );
    assert_eq!(
        reg.last_discovery(),
        Some(before),
        "the previous state is kept"
    );
}

/// Holders killed at arbitrary points of a scan: every scan gives the exact pins or
/// ProcessGone, nothing else.
#[test]
fn scans_racing_with_exits_give_exact_pins_or_process_gone() {
    for _ in 0..10 {
        let Some(mut h) = holder(4, &[[0, 2]], false) else {
            return;
        };
        let pid = h.pid();
        let want = ranges(&h);
        std::thread::scope(|s| {
            let scan = s.spawn(|| discover(pid));
            h.kill();
            match scan.join().unwrap() {
                Ok(d) => assert_eq!(d.pins.iter().map(|p| p.range).collect::<Vec<_>>(), want),
                Err(PinScanError::ProcessGone { pid: p, .. }) => assert_eq!(p, pid),
                Err(e) => panic!("unexpected {e:?}"),
            }
        });
    }
}

/// Scanning root's process from a thread running as `nobody` (or from this thread when the
/// tests are not root): NoPermission with the pid, `/proc/PID/fd` and EACCES; a registry for
/// it keeps its declarations and records nothing.
#[test]
fn scanning_without_permission_is_a_typed_error_and_changes_nothing() {
    let Some(h) = holder(4, &[[0, 1]], false) else {
        return;
    };
    let pid = h.pid();
    let buf = h.ready.buffers[0][0];
    let scan = move || {
        let reg = registry(pid, false);
        let r = Range::new(buf, P).unwrap();
        let g = reg.declare(Range::from_bounds(r.end(), r.end() + P));
        let res = reg.refresh();
        assert_eq!(reg.declared().len(), 1, "declarations kept");
        assert!(reg.last_discovery().is_none(), "nothing recorded");
        assert_eq!(reg.pinned(r).unwrap_err(), res.clone().unwrap_err());
        drop(g);
        (discover(pid), res.map(|_| ()))
    };
    let (direct, via_registry) = if rustix::process::geteuid().is_root() {
        std::thread::spawn(move || {
            rustix::thread::set_thread_res_gid(
                Gid::from_raw(NOBODY),
                Gid::from_raw(NOBODY),
                Gid::from_raw(NOBODY),
            )
            .expect("setresgid(nobody) for this thread");
            rustix::thread::set_thread_res_uid(
                Uid::from_raw(NOBODY),
                Uid::from_raw(NOBODY),
                Uid::from_raw(NOBODY),
            )
            .expect("setresuid(nobody) for this thread");
            scan()
        })
        .join()
        .expect("the unprivileged thread")
    } else {
        scan()
    };
    for res in [direct.map(|_| ()), via_registry] {
        match res {
            Err(PinScanError::NoPermission {
                pid: p,
                path,
                errno,
            }) => {
                assert_eq!(p, pid);
                assert_eq!(path, format!("/proc/{pid}/fd"));
                assert!(matches!(errno, Errno::ACCESS | Errno::PERM), "{errno:?}");
            }
            other => panic!("expected NoPermission, got {other:?}"),
        }
    }
}

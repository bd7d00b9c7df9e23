//! Real page-allocation failures on demand (`backend::linux::fail_nth`), on a kernel with
//! fault injection: kernel/run's test kernels (their guest sets UFFD_WP_REQUIRE_TEST_KERNEL=1,
//! under which these tests fail instead of skipping). This machine's own kernel has none.

mod common;

use uffd_wp::backend::linux::fail_nth::FailNth;
use uffd_wp::scenario::{self, LinuxLabs};
use uffd_wp::seam::Errno;
use uffd_wp::testing::need_test_kernel;

fn fail_nth() -> Option<FailNth> {
    if !FailNth::available() {
        return need_test_kernel::<FailNth, _>(
            "fault injection (FAIL_PAGE_ALLOC, debugfs, /proc/thread-self/fail-nth)",
            Err("/sys/kernel/debug/fail_page_alloc is missing"),
        );
    }
    Some(FailNth::open().expect("setting fail_page_alloc up"))
}

/// A pipe write allocates one page for its buffer: armed with 0 allowed it fails with ENOMEM,
/// with 5 allowed it succeeds and the armed failure stays unfired until disarmed, after
/// which nothing fails.
#[test]
fn fail_nth_fails_exactly_the_armed_page_allocation() {
    let Some(mut f) = fail_nth() else {
        return;
    };
    let write = || {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let res = rustix::io::write(&w, b"x");
        drop((r, w));
        res
    };
    f.arm(0).unwrap();
    assert_eq!(write(), Err(Errno::NOMEM));
    assert!(f.disarm().unwrap(), "the armed failure fired");
    f.arm(5).unwrap();
    assert_eq!(write(), Ok(1));
    assert!(
        !f.disarm().unwrap(),
        "one allocation of five allowed: not fired"
    );
    for _ in 0..10 {
        assert_eq!(write(), Ok(1), "disarmed: nothing fails");
    }
}

/// lost-enomem with the page-table limit from fault injection, in this process: the raw call
/// loses the ENOMEM on a stock kernel (0, with the hole) or reports it on the patched one
/// (the library's report either way), and every step's report equals the read-back.
#[test]
fn lost_enomem_runs_in_process_under_fault_injection_and_verifies() {
    if fail_nth().is_none() || common::lab(true).is_none() {
        return;
    }
    let out = scenario::run("lost-enomem", &LinuxLabs).expect("lost-enomem");
    assert_eq!(out.results.len(), 3, "{out:?}");
    for s in &out.results {
        assert!(
            s.verified,
            "{}: report differs from pagemap: {s:?}",
            s.label
        );
    }
    let engine = &out.results[1];
    assert_eq!(engine.kernel_errno, Some(Errno::NOMEM), "{engine:?}");
    assert!(!engine.report.not_protected.is_empty(), "{engine:?}");
    let resume = &out.results[2];
    assert!(resume.report.not_protected.is_empty(), "{resume:?}");
}

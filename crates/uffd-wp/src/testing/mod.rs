//! Test fixtures (feature `testing`): skipping or failing on a missing kernel feature, a
//! Linux lab, and the pin-holder helper process. Not part of the library's API.

pub mod holder;

/// The pages of `r` (memory of this process) whose pagemap bit 57 (uffd-wp) is set, read
/// directly from /proc/self/pagemap: the kernel's own word, independent of any engine.
pub fn bit57(r: crate::range::Range) -> crate::range::RangeSet {
    use crate::range::{PAGE_SIZE, Range};
    use crate::sys::pagemap::{Pagemap, bits};
    let e = Pagemap::open_self()
        .expect("/proc/self/pagemap")
        .entries(r.start(), r.pages())
        .expect("pagemap entries");
    e.iter()
        .enumerate()
        .filter(|(_, x)| *x & bits::UFFD_WP != 0)
        .map(|(i, _)| {
            let a = r.start() + i as u64 * PAGE_SIZE;
            Range::from_bounds(a, a + PAGE_SIZE)
        })
        .collect()
}

/// A `/proc/PID/status` field in kB (`VmPTE`, `VmRSS`, ...), for process `pid` (or `self`).
pub fn status_kb(pid: &str, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Whether a missing kernel feature must fail the test (CI) instead of skipping it.
pub fn require_kernel() -> bool {
    std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1")
}

/// Skips the test (returns `None`) with a message naming `feature`, or panics when
/// `UFFD_WP_REQUIRE_KERNEL=1`.
pub fn need<T, E: std::fmt::Display>(feature: &str, r: Result<T, E>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if require_kernel() => {
            panic!("kernel feature {feature} is required (UFFD_WP_REQUIRE_KERNEL=1): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: needs kernel feature {feature}: {e}");
            None
        }
    }
}

/// Whether the tests run on one of kernel/run's test kernels (`UFFD_WP_REQUIRE_TEST_KERNEL=1`,
/// set by its guest): what only those kernels have (fault injection) is then required too.
pub fn require_test_kernel() -> bool {
    std::env::var("UFFD_WP_REQUIRE_TEST_KERNEL").is_ok_and(|v| v == "1")
}

/// Like [`need`] for a feature only the test kernels of kernel/run have (fault injection):
/// skips with a message naming it, or panics under `UFFD_WP_REQUIRE_TEST_KERNEL=1`.
pub fn need_test_kernel<T, E: std::fmt::Display>(feature: &str, r: Result<T, E>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if require_test_kernel() => {
            panic!("test-kernel feature {feature} is required (UFFD_WP_REQUIRE_TEST_KERNEL=1): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: needs {feature}, which kernel/run's test kernels have: {e}");
            None
        }
    }
}

/// A Linux lab, or a skip when userfaultfd is unavailable.
pub fn lab(wp_unpopulated: bool) -> Option<crate::backend::linux::lab::LinuxLab> {
    need(
        if wp_unpopulated {
            "userfaultfd with UFFD_FEATURE_WP_UNPOPULATED"
        } else {
            "userfaultfd with UFFD_FEATURE_PAGEFAULT_FLAG_WP"
        },
        crate::backend::linux::lab::LinuxLab::open(crate::seam::lab::LabConfig {
            wp_unpopulated,
            async_wp: false,
        }),
    )
}

/// Transparent huge pages on `madvise` or `always`, or a skip naming them.
pub fn thp() -> Option<()> {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map_err(|e| e.to_string())
        .and_then(|s| {
            if s.contains("[never]") {
                Err(format!("THP is off: {}", s.trim()))
            } else {
                Ok(())
            }
        });
    need("transparent huge pages (madvise or always)", mode)
}

//! `uffd-wp compare`: the reference model agrees with the real kernel on 2,000 random
//! operation sequences as the machine is (the CI figure), and on 2,000 more with swap
//! set up by the test (root: a swapfile in the temporary directory, removed afterwards even on
//! a panic). 20,000+ are run by hand, see docs/benchmarks.md.

use std::process::Command;
use std::sync::Mutex;

use uffd_wp_compare::MachineSetup;

/// The tests change the machine (swap): one at a time.
static MACHINE: Mutex<()> = Mutex::new(());

fn require_kernel() -> bool {
    std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1")
}

/// Skips (or fails under UFFD_WP_REQUIRE_KERNEL=1) naming `feature`.
fn skip(feature: &str) {
    assert!(
        !require_kernel(),
        "{feature} is required (UFFD_WP_REQUIRE_KERNEL=1)"
    );
    eprintln!("SKIPPED: needs {feature}");
}

fn compare(cases: u32, seed: u32) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_uffd-wp"))
        .args([
            "compare",
            "--cases",
            &cases.to_string(),
            "--seed",
            &seed.to_string(),
            "--json",
        ])
        .output()
        .expect("run uffd-wp compare");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["cases"], cases);
    assert!(v["ops"].as_u64().unwrap() > u64::from(cases) * 5, "{v}");
    assert_eq!(
        v["mismatches"], 0,
        "first mismatch: {:#}",
        v["first_mismatch"]
    );
    assert!(out.status.success());
    v
}

#[test]
fn model_matches_the_kernel_on_2000_random_cases() {
    let _one = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    if uffd_wp::linux::LinuxMm::open().is_err() {
        return skip("kernel feature userfaultfd");
    }
    compare(2000, 2026);
}

#[test]
fn model_matches_the_kernel_with_swap() {
    let _one = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    if uffd_wp::linux::LinuxMm::open().is_err() {
        return skip("kernel feature userfaultfd");
    }
    // Restored when dropped, panic or not.
    let mut setup = MachineSetup::new();
    if let Err(e) = setup.swap(&std::env::temp_dir(), 256) {
        return skip(&format!("swap (a 256 MiB swapfile: {e})"));
    }
    let v = compare(2000, 2027);
    assert_eq!(v["swap"], true, "{v}");
    setup.restore().expect("swapoff and remove the swapfile");
}

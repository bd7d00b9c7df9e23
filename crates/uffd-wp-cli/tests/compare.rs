//! `uffd-wp compare`: the reference model agrees with the real kernel on 2,000 random
//! operation sequences (the CI figure; 20,000+ are run by hand, see the notes).

use std::process::Command;

fn require_kernel() -> bool {
    std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1")
}

#[test]
fn model_matches_the_kernel_on_2000_random_cases() {
    if uffd_wp::linux::LinuxMm::open().is_err() {
        assert!(
            !require_kernel(),
            "userfaultfd is required (UFFD_WP_REQUIRE_KERNEL=1)"
        );
        eprintln!("SKIPPED: needs kernel feature userfaultfd");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_uffd-wp"))
        .args(["compare", "--cases", "2000", "--seed", "2026", "--json"])
        .output()
        .expect("run uffd-wp compare");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["cases"], 2000);
    assert!(v["ops"].as_u64().unwrap() > 10_000, "{v}");
    assert_eq!(
        v["mismatches"], 0,
        "first mismatch: {:#}",
        v["first_mismatch"]
    );
    assert!(out.status.success());
}

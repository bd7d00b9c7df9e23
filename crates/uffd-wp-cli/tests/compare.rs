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
    if uffd_wp::backend::linux::LinuxMm::open().is_err() {
        return skip("kernel feature userfaultfd");
    }
    compare(2000, 2026);
}

#[test]
fn model_matches_the_kernel_with_swap() {
    let _one = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    if uffd_wp::backend::linux::LinuxMm::open().is_err() {
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

/// A run killed before it could undo its set-up leaves its swapfile on; the next `--setup`
/// turns it off and removes it (its pid is gone) instead of taking it for the machine's swap.
#[test]
fn setup_reaps_a_killed_runs_swapfile() {
    let _one = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    if uffd_wp::backend::linux::LinuxMm::open().is_err() {
        return skip("kernel feature userfaultfd");
    }
    // No process has pid 4194304 (above pid_max's largest possible value, 2^22).
    let stale = std::env::temp_dir().join("uffd-wp-compare-4194304.swap");
    let made = (|| -> Result<(), String> {
        std::fs::write(&stale, vec![0u8; 16 << 20]).map_err(|e| e.to_string())?;
        for (cmd, args) in [("chmod", ["600"]), ("mkswap", ["-q"]), ("swapon", ["--"])] {
            let st = Command::new(cmd).args(args).arg(&stale).status();
            if !st.is_ok_and(|s| s.success()) {
                return Err(format!("{cmd} failed"));
            }
        }
        Ok(())
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_file(&stale);
        return skip(&format!(
            "swap (root, a swapfile in the temporary directory: {e})"
        ));
    }
    let listed = || {
        std::fs::read_to_string("/proc/swaps")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().next() == stale.to_str())
    };
    assert!(listed(), "the stale swapfile is on");
    let out = Command::new(env!("CARGO_BIN_EXE_uffd-wp"))
        .args(["compare", "--setup", "--cases", "20", "--json"])
        .output()
        .expect("run uffd-wp compare --setup");
    let reaped = !listed() && !stale.exists();
    if !reaped {
        let _ = Command::new("swapoff").arg(&stale).status();
        let _ = std::fs::remove_file(&stale);
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reaped, "the stale swapfile was left on");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["swap"], true, "its own swapfile ran the cases: {v}");
}

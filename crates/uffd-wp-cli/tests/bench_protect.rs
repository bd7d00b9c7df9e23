//! `uffd-wp bench protect --json` on a small range: the issue's flat fields (raw_ms, exact_ms,
//! ratio, partial_*) at the top level beside each page kind's figures, the ratios as measured
//! (each measurement is checked against pagemap inside the bench, which fails otherwise).

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_uffd-wp"))
        .args(["bench", "protect"])
        .args(args)
        .output()
        .expect("run uffd-wp");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bench_protect_json_has_the_issue_fields_for_both_kinds() {
    if let Err(e) = uffd_wp::linux::LinuxMm::open() {
        assert!(
            std::env::var("UFFD_WP_REQUIRE_KERNEL").as_deref() != Ok("1"),
            "bench protect needs kernel feature userfaultfd: {e}"
        );
        eprintln!("SKIPPED bench protect: needs kernel feature userfaultfd: {e}");
        return;
    }
    let (code, out, err) = bench(&["--size", "8M", "--runs", "2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["bench"], "protect");
    assert_eq!(v["headline_kind"], "4k");
    for k in [
        "raw_ms",
        "exact_ms",
        "ratio",
        "partial_raw_ms",
        "partial_exact_ms",
        "partial_ratio",
    ] {
        let top = v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        assert!(top > 0.0, "{k}");
        assert_eq!(v[k], v["4k"][k], "the top level is the 4k figures");
        assert!(v["thp"][k].as_f64().unwrap() > 0.0, "thp {k}");
    }
    let r = v["exact_ms"].as_f64().unwrap() / v["raw_ms"].as_f64().unwrap();
    assert!((r - v["ratio"].as_f64().unwrap()).abs() < 1e-9);
    // The partial run's read-back covers the half the injected failure left uncertain.
    assert_eq!(v["4k"]["partial_read_back_bytes"], 4 << 20);

    let (code, out, err) = bench(&["--size", "4M", "--runs", "1", "--kind", "thp", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["headline_kind"], "thp");
    assert_eq!(v["ratio"], v["thp"]["ratio"]);
    assert!(v.get("4k").is_none());
}

#[test]
fn bench_protect_refuses_bad_sizes() {
    let (code, _, err) = bench(&["--size", "3M", "--json"]);
    assert_eq!(code, 2);
    assert!(err.contains("multiple of 2 MiB"), "{err}");
}

//! `uffd-wp track --json` on the real kernel: every epoch of the built-in workload equals the
//! writers' ground truth, with each available method; bad input is refused.

use std::process::Command;

use serde_json::Value;
use uffd_wp::engine::track::{Method, Selection};

fn track(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_uffd-wp"))
        .arg("track")
        .args(args)
        .output()
        .expect("run uffd-wp");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn track_epochs_equal_ground_truth() {
    for method in [Method::AsyncWp, Method::SyncWp] {
        if let Err(e) = Selection::probe(Some(method)) {
            if std::env::var("UFFD_WP_REQUIRE_KERNEL").as_deref() == Ok("1") {
                panic!("uffd-wp track --method {method} needs a kernel feature: {e}");
            }
            eprintln!("SKIPPED track --method {method}: needs kernel feature: {e}");
            continue;
        }
        let (code, v, err) = track(&[
            "--size",
            "32M",
            "--epochs",
            "4",
            "--interval-ms",
            "20",
            "--method",
            method.name(),
            "--json",
        ]);
        assert_eq!(code, 0, "{method}: {err}");
        assert_eq!(v["method"], method.name());
        assert_eq!(v["exact"], true);
        let epochs = v["epochs"].as_array().unwrap();
        assert_eq!(epochs.len(), 4);
        for e in epochs {
            assert_eq!(e["exact"], true, "{e}");
            assert_eq!(e["dirty_pages"], e["truth_pages"], "{e}");
            assert_eq!(e["missed_pages"], 0);
            assert_eq!(e["extra_pages"], 0);
        }
        let written: u64 = epochs
            .iter()
            .map(|e| e["truth_pages"].as_u64().unwrap())
            .sum();
        assert!(written > 0, "{method}: the writers wrote");
    }
}

#[test]
fn track_refuses_bad_input() {
    for args in [
        &["--size", "3M"][..],
        &["--size", "0"],
        &["--epochs", "0"],
        &["--method", "mprotect"],
    ] {
        let (code, _, err) = track(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.is_empty());
    }
}

//! What the commands share in printing: a report as JSON under `--json` or as text otherwise,
//! and the progress bars shown meanwhile (on a terminal only, never under `--json`).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::print_json;

/// Prints `out` as pretty JSON if `json`, else as text with `text`.
pub fn emit<T: Serialize>(json: bool, out: &T, text: impl FnOnce(&T)) {
    if json {
        print_json(out);
    } else {
        text(out);
    }
}

/// Whether to draw progress: only on a terminal, and never under `--json`.
pub fn show_progress(json: bool) -> bool {
    !json && std::io::stdout().is_terminal()
}

/// A bar of `len` steps in `template` (filled with `=> `) showing `msg`; hidden unless `show`.
pub fn bar(show: bool, len: u64, template: &str, msg: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(template)
            .expect("progress template")
            .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

/// Bytes as an exact count and, from 1 KiB on, the largest binary unit with two decimals.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    match UNITS.iter().find(|(_, u)| n >= *u) {
        Some((name, u)) if n % u == 0 => format!("{n} bytes ({} {name})", n / u),
        Some((name, u)) => format!("{n} bytes ({:.2} {name})", n as f64 / *u as f64),
        None => format!("{n} bytes"),
    }
}

#[cfg(test)]
mod bytes_tests {
    use super::fmt_bytes;

    #[test]
    fn bytes_are_exact() {
        assert_eq!(fmt_bytes(4096), "4096 bytes (4 KiB)");
        assert_eq!(fmt_bytes(512 << 10), "524288 bytes (512 KiB)");
        assert_eq!(fmt_bytes(3 << 19), "1572864 bytes (1.50 MiB)");
        assert_eq!(fmt_bytes(100), "100 bytes");
    }
}

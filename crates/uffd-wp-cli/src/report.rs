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

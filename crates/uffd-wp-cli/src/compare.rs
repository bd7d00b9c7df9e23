//! `uffd-wp compare`: the reference model against the real kernel on random operation
//! sequences.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use uffd_wp_compare::{Worker, compare};

use crate::{CliError, print_json};

/// Arguments of `uffd-wp compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Random cases to run.
    #[arg(long, default_value_t = 500)]
    cases: u64,
    /// Seed of the case generator (the same seed gives the same cases).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Usage(format!("locating the uffd-wp binary: {e}")))?;
    let cmd = vec![exe.to_string_lossy().into_owned(), "compare-worker".into()];
    let mut worker = Worker::spawn(&cmd).map_err(|e| CliError::Usage(e.to_string()))?;
    let bar = if std::io::stderr().is_terminal() && !a.json {
        let b = ProgressBar::new(a.cases);
        b.set_style(
            ProgressStyle::with_template("comparing {bar:40} {pos}/{len} cases {elapsed}")
                .expect("progress template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let report = compare(a.cases, a.seed, &mut worker, |n| bar.set_position(n))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    bar.finish_and_clear();
    if a.json {
        print_json(&report);
    } else {
        println!(
            "{} cases, {} operations on each side, {} mismatches",
            report.cases, report.ops, report.mismatches
        );
        if let Some(m) = &report.first_mismatch {
            println!("first mismatch, shrunk:");
            println!("{}", serde_json::to_string_pretty(m).expect("mismatch"));
        }
    }
    if report.mismatches == 0 {
        Ok(())
    } else {
        Err(CliError::Unverified(format!(
            "{} of {} cases differ between the kernel and the model",
            report.mismatches, report.cases
        )))
    }
}

/// The hidden worker: runs cases on the real kernel for `compare`.
pub fn worker() -> ! {
    uffd_wp_compare::worker_main()
}

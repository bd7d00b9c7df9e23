//! `uffd-wp compare`: the reference model against the real kernel on random operation
//! sequences.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use uffd_wp_compare::{Env, Worker, compare};

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
    /// Set the machine up first (root): enable a 256 MiB swapfile in the temporary directory
    /// if no swap is active, so that swap cases run. Undone when the run ends.
    #[arg(long)]
    setup: bool,
    /// Run the one case in this JSON file (as printed in a mismatch's `case`) on both sides
    /// and print both sides' observations step by step.
    #[arg(long, value_name = "FILE")]
    replay: Option<std::path::PathBuf>,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    let mut setup = uffd_wp_compare::MachineSetup::new();
    if a.setup {
        setup
            .swap(&std::env::temp_dir(), 256)
            .map_err(|e| CliError::Compare {
                operation: "--setup",
                message: e.to_string(),
            })?;
    }
    // /proc/self/exe names the running image even if the file was replaced since.
    let exe = std::path::Path::new("/proc/self/exe");
    let mut worker = Worker::spawn(exe).map_err(|e| CliError::Compare {
        operation: "starting the kernel worker",
        message: e.to_string(),
    })?;
    if let Some(path) = &a.replay {
        return replay(path, &mut worker);
    }
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
    let env = Env::detect();
    if !env.swap {
        eprintln!(
            "note: no active swap (/proc/swaps): swap cases skipped (MADV_PAGEOUT runs without swap); --setup makes a swapfile (root)"
        );
    }
    let report =
        compare(a.cases, a.seed, env, &mut worker, |n| bar.set_position(n)).map_err(|e| {
            CliError::Compare {
                operation: "running the cases",
                message: e.to_string(),
            }
        })?;
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

/// `--replay FILE`: one case on both sides, every step side by side.
fn replay(path: &std::path::Path, worker: &mut Worker) -> Result<(), CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
        operation: "reading",
        path: path.display().to_string(),
        source,
    })?;
    let case: uffd_wp_compare::Case = serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("{}: not a case: {e}", path.display())))?;
    let (kernel, model) =
        uffd_wp_compare::replay(&case, worker).map_err(|e| CliError::Compare {
            operation: "replaying the case",
            message: e.to_string(),
        })?;
    let kernel = kernel.map_err(|e| CliError::Unverified(format!("kernel side: {e}")))?;
    let mut same = kernel == model;
    for (i, op) in case.ops.iter().enumerate() {
        let (k, m) = (&kernel.steps[i], &model.steps[i]);
        println!("{i:3} {op:?}");
        if k == m {
            println!(
                "    both   {} {:?} {:?} {}",
                k.result, k.faults, k.scan, k.pages
            );
        } else {
            println!(
                "    kernel {} {:?} {:?} {}",
                k.result, k.faults, k.scan, k.pages
            );
            println!(
                "    model  {} {:?} {:?} {}",
                m.result, m.faults, m.scan, m.pages
            );
        }
    }
    if kernel.content != model.content {
        println!("content kernel {:?}", kernel.content);
        println!("content model  {:?}", model.content);
    }
    same &= kernel.content == model.content;
    println!("{}", if same { "same" } else { "DIFFERENT" });
    if same {
        Ok(())
    } else {
        Err(CliError::Unverified(
            "the kernel and the model differ".into(),
        ))
    }
}

/// The `compare-worker` helper (see `uffd_wp::helper`): runs cases on the real kernel.
pub fn worker() -> ! {
    uffd_wp_compare::worker_main()
}

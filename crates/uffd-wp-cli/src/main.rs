//! `uffd-wp`: exact, pin-aware userfaultfd write-protection from the command line.

mod bench;
mod compare;
mod dump;
mod error;
mod pins;
mod probe;
mod report;
mod scenario;
mod snapshot;
mod track;
mod workload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use uffd_wp::helper;

pub use error::CliError;

/// Exact, pin-aware userfaultfd write-protection.
#[derive(Debug, Parser)]
#[command(name = "uffd-wp", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what this kernel offers: userfaultfd features, ioctls, PAGEMAP_SCAN, THP, ...
    Probe(probe::Args),
    /// Run a built-in scenario and print each step's exact report.
    Scenario(scenario::Args),
    /// Run random operation sequences on the real kernel and on the model and compare them.
    Compare(compare::Args),
    /// List the pins of a process (io_uring buffers) and the unexplained part of its VmPin.
    Pins(pins::Args),
    /// An ELF core of a whole running process at one instant, taken live (gdb reads it). Without a PID: a built-in target, dumped and checked.
    Dump(dump::Args),
    /// Take a live copy-on-write snapshot of the built-in workload and check it with its oracle.
    Snapshot(snapshot::Args),
    /// Benchmarks, each against its alternative in the same run: `bench protect`, `bench track`, `bench snapshot`, `bench dump`, `bench plot`.
    Bench(bench::Args),
    /// Dirty-tracking epochs over the built-in workload, each beside the writers' ground truth.
    Track(track::Args),
}

/// Runs this process as the helper `kind` (see [`uffd_wp::helper`]); returns its exit code.
fn serve_helper(kind: helper::Kind) -> i32 {
    use helper::Kind;
    match kind {
        Kind::LimitedScenario => uffd_wp::scenario::limited::helper_main(),
        Kind::PinHolder | Kind::PinKeeper => uffd_wp::testing::holder::holder_main(kind),
        Kind::CompareWorker => compare::worker(),
        Kind::Workload => workload::helper_main(),
    }
}

fn main() -> ExitCode {
    // `uffd-wp ... --json | head` ends quietly, like any Unix tool, instead of panicking.
    let _ = uffd_wp::sys::signal::default_sigpipe();
    if let Some(kind) = helper::entry(&helper::Kind::ALL) {
        return ExitCode::from(serve_helper(kind) as u8);
    }
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Probe(a) => probe::run(&a),
        Command::Scenario(a) => scenario::run(&a),
        Command::Compare(a) => compare::run(&a),
        Command::Pins(a) => pins::run(&a),
        Command::Dump(a) => dump::run(&a),
        Command::Snapshot(a) => snapshot::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Track(a) => track::run(&a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if error::json_requested() {
                print_json(&serde_json::json!({ "error": e.report() }));
            }
            eprintln!("uffd-wp: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON serialization")
    );
}

//! `uffd-wp scenario`.

use uffd_wp::linux::lab::LinuxLabs;
use uffd_wp::range::PAGE_SIZE;
use uffd_wp::scenario::{self, LabFactory, Outcome, SCENARIOS};
use uffd_wp::sys::errno_name;

use crate::{CliError, print_json};

/// Arguments of `uffd-wp scenario`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The scenario to run (see --list).
    name: Option<String>,
    /// List the scenarios.
    #[arg(long)]
    list: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    if a.list {
        for s in SCENARIOS {
            println!("{:<20} {}", s.name, s.about);
        }
        return Ok(());
    }
    let Some(name) = &a.name else {
        return Err(CliError::Usage(
            "name a scenario, or --list to see them".into(),
        ));
    };
    let factory: &dyn LabFactory = &LinuxLabs;
    let out = scenario::run(name, factory)?;
    if a.json {
        print_json(&out);
    } else {
        print_table(&out);
    }
    if out.all_verified() {
        Ok(())
    } else {
        Err(CliError::Unverified(format!(
            "scenario {name}: a report did not match the page tables"
        )))
    }
}

fn pages(set: &uffd_wp::RangeSet, base: u64) -> String {
    if set.is_empty() {
        return "-".into();
    }
    set.offsets_from(base)
        .iter()
        .map(|[a, b]| format!("[{}, {})", a / PAGE_SIZE, b / PAGE_SIZE))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_table(o: &Outcome) {
    println!(
        "scenario {} on {}{} (ranges in pages of {} bytes)",
        o.scenario,
        o.backend,
        o.semantics
            .as_ref()
            .map(|s| format!(" ({s} semantics)"))
            .unwrap_or_default(),
        o.page_size
    );
    for s in &o.results {
        let r = &s.report;
        let base = r.requested.start();
        println!("\n  step {}: {}", s.label, s.note);
        println!(
            "    raw kernel result  {}{}",
            s.kernel_errno.map_or("success".to_string(), errno_name),
            if s.injected { " (injected)" } else { "" }
        );
        println!("    requested          [0, {})", r.requested.pages());
        println!("    protected          {}", pages(&r.protected, base));
        println!("    skipped            {}", pages(&r.skipped, base));
        println!("    not protected      {}", pages(&r.not_protected, base));
        println!("    bytes not protected {}", r.bytes_not_protected());
        if let Some(e) = &r.error {
            println!(
                "    error              {} {} at page {}{}",
                e.kind(),
                errno_name(e.errno()),
                (e.addr().saturating_sub(base)) / PAGE_SIZE,
                if r.rolled_back { ", rolled back" } else { "" }
            );
        }
        println!(
            "    verified           {}",
            if s.verified {
                "yes (matches pagemap bit 57)"
            } else {
                "NO: the report differs from pagemap bit 57"
            }
        );
    }
}

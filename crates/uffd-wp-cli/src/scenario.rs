//! `uffd-wp scenario`: on the real kernel (default) or on the reference model.

use uffd_wp::range::PAGE_SIZE;
use uffd_wp::scenario::LinuxLabs;
use uffd_wp::scenario::{self, LabFactory, Outcome, SCENARIOS};
use uffd_wp::sys::errno_name;
use uffd_wp_model::Semantics;
use uffd_wp_model::lab::{ModelLabs, model_scenarios};

use crate::{CliError, print_json};

/// Where a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The real kernel, in this process.
    Linux,
    /// The reference model of the kernel side (crate uffd-wp-model).
    Model,
}

/// The model's semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SemanticsArg {
    /// What Linux 6.18 does, the lost ENOMEM included.
    Linux,
    /// The seed thread's proposal: bytes not protected, skip-pinned mode.
    Proposed,
}

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
    /// Run on the real kernel or on the model.
    #[arg(long, value_enum, default_value = "linux")]
    backend: Backend,
    /// The model's semantics (with --backend model).
    #[arg(long, value_enum)]
    semantics: Option<SemanticsArg>,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    if a.list {
        for s in SCENARIOS {
            println!("{:<20} {}", s.name, s.about);
        }
        for s in model_scenarios() {
            println!("{:<20} (model only) {}", s.name, s.about);
        }
        return Ok(());
    }
    let Some(name) = &a.name else {
        return Err(CliError::Usage(
            "name a scenario, or --list to see them".into(),
        ));
    };
    let out = match a.backend {
        Backend::Linux => {
            if a.semantics.is_some() {
                return Err(CliError::Usage(
                    "--semantics chooses the model's semantics: use it with --backend model".into(),
                ));
            }
            if model_scenarios().iter().any(|s| s.name == name) {
                return Err(CliError::Usage(format!(
                    "scenario {name} runs only on the model: add --backend model"
                )));
            }
            let factory: &dyn LabFactory = &LinuxLabs;
            scenario::run(name, factory)?
        }
        Backend::Model => {
            let semantics = match a.semantics.unwrap_or(SemanticsArg::Linux) {
                SemanticsArg::Linux => Semantics::Linux,
                SemanticsArg::Proposed => Semantics::Proposed,
            };
            uffd_wp_model::lab::run(name, &ModelLabs::new(semantics))?
        }
    };
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
        if let Some(k) = s.detail.as_ref().map(|d| &d["kernel_returned"]) {
            println!(
                "    kernel call        {}{}",
                k["call"].as_str().unwrap_or("?"),
                match (k["done"].as_u64(), k["pinned"].as_u64()) {
                    (Some(d), Some(p)) => format!(": done {d}, pinned {p}"),
                    _ => String::new(),
                }
            );
        } else {
            let path = match r.provenance.kernel {
                Some(k) => format!(
                    "kernel report ({} UFFDIO_WRITEPROTECT_REPORT calls, done {}, pinned {})",
                    k.calls, k.done, k.pinned
                ),
                None => "read-back (UFFDIO_WRITEPROTECT per PUD)".to_string(),
            };
            println!("    exact by           {path}");
        }
        println!("    requested          [0, {})", r.requested.pages());
        println!("    protected          {}", pages(&r.protected, base));
        println!("    skipped            {}", pages(&r.skipped, base));
        if !r.skipped.is_empty() {
            let p = &r.provenance;
            println!(
                "    skipped by         declared {}, discovered {}, kernel {} (pages)",
                p.skipped_declared.pages(),
                p.skipped_discovered.pages(),
                p.skipped_kernel.pages()
            );
        }
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
        let truth = if o.backend == "model" {
            "the model's page tables"
        } else {
            "pagemap bit 57"
        };
        println!(
            "    verified           {}",
            if s.verified {
                format!("yes (matches {truth})")
            } else {
                format!("NO: the report differs from {truth}")
            }
        );
    }
}

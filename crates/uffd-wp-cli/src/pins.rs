//! `uffd-wp pins`: the pins of a process, with their source, and the unexplained remainder of
//! its `VmPin`.

use serde::Serialize;
use uffd_wp::backend::pins::{Pin, discover};

use crate::{CliError, print_json};

/// Arguments of `uffd-wp pins`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process (default: this one).
    #[arg(long)]
    pid: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    pid: u32,
    pins: Vec<Pin>,
    vm_pin_bytes: u64,
    explained_bytes: u64,
    unexplained_bytes: u64,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    let pid = a.pid.unwrap_or_else(std::process::id);
    let d = discover(pid)?;
    let r = Report {
        pid,
        pins: d.pins,
        vm_pin_bytes: d.vm_pin_bytes,
        explained_bytes: d.explained_bytes,
        unexplained_bytes: d.unexplained_bytes,
    };
    if a.json {
        print_json(&r);
        return Ok(());
    }
    println!(
        "process {}: VmPin {} bytes, {} explained by io_uring buffers, {} unexplained",
        r.pid, r.vm_pin_bytes, r.explained_bytes, r.unexplained_bytes
    );
    if r.pins.is_empty() {
        println!("  no io_uring registered buffers");
    } else {
        println!("  {:<18} {:>12}  source", "start", "len");
        for p in &r.pins {
            println!(
                "  {:<#18x} {:>12}  {}",
                p.range.start(),
                p.range.len(),
                p.source
            );
        }
    }
    if r.unexplained_bytes > 0 {
        println!(
            "  {} long-term pinned bytes have no known source (RDMA, vfio, a ring held by \
             another process, ...): pages may be written without a fault",
            r.unexplained_bytes
        );
    }
    Ok(())
}

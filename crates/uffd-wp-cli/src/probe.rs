//! `uffd-wp probe`.

use crate::{CliError, print_json};

/// Arguments of `uffd-wp probe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    let p = uffd_wp::features::probe();
    if a.json {
        print_json(&p);
        return Ok(());
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("kernel            {}", p.kernel);
    println!(
        "userfaultfd       syscall: {}, /dev/userfaultfd: {}",
        yes(p.uffd.syscall),
        yes(p.uffd.dev)
    );
    println!("ioctls            {}", p.ioctls.join(" "));
    println!("PAGEMAP_SCAN      {}", yes(p.pagemap_scan));
    println!("pagemap WP bit    {}", yes(p.pagemap_wp_bit));
    println!("soft-dirty        {}", yes(p.soft_dirty));
    println!("io_uring          {}", yes(p.io_uring));
    println!("THP               {}", p.thp);
    println!("ptrace            {}", yes(p.ptrace));
    let w = &p.wp_report;
    println!(
        "WP report         report: {}, skip_pinned: {} (engine: {}, {})",
        yes(w.report),
        yes(w.skip_pinned),
        w.engine_call,
        w.exactness
    );
    if let Some(t) = &w.trial {
        println!(
            "  trial           {} mode {} on {} bytes: {}, done {}, pinned {}, protected {}",
            t.command,
            t.mode,
            t.len,
            t.errno.as_deref().unwrap_or("0 (success)"),
            t.done,
            t.pinned,
            yes(t.protected)
        );
    }
    println!("features:");
    for name in uffd_wp::features::FEATURE_NAMES {
        println!(
            "  {:<20} {}",
            name,
            yes(p.features.get(name).copied().unwrap_or(false))
        );
    }
    Ok(())
}

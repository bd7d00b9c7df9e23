//! The built-in workload in a process of its own, forever: a helper of kind
//! [`Kind::Workload`](uffd_wp::helper::Kind::Workload) (see [`uffd_wp::helper`]), the target of
//! the remote backend (`uffd-wp snapshot --pid`) and its tests.
//!
//! Configured by a [`Target`]; answers `{"pid":..,"start":..,"len":..,"threads":..,
//! "versions":..}` (the address of its page-version table) once the writers run, then
//! `{"writes":N,"max_gap_us":G,"t_ns":T}` every `interval_ms`, until killed or until its stdout
//! is closed: N total page writes so far, G the longest gap between two consecutive page writes
//! of any writer that ended since the previous line (the writers' longest stall), T the
//! `CLOCK_MONOTONIC` time of the line in ns (the parent lines it up with its own measurements:
//! `uffd-wp bench dump`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uffd_wp::helper::Parent;
use uffd_wp_bench::workload::{Workload, WorkloadConfig, monotonic_ns};
use uffd_wp_bench::zoo::{Zoo, ZooConfig};

/// The workload process's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// Size of the region in bytes (a non-zero multiple of the page size).
    pub size: u64,
    /// Writer threads (at least 1).
    pub threads: usize,
    /// Back the region with transparent huge pages.
    #[serde(default)]
    pub thp: bool,
    /// Milliseconds between two write-count lines.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Run the zoo instead ([`uffd_wp_bench::zoo`]: every kind of memory, and mapping changes
    /// on command): `size` is its `anon` region. Answers a header line
    /// `{"pid","zoo":true,"directory","max_writers","slabs":{name: addr},"spinners":[..]}`, then one line per
    /// command `{"op": NAME}` read on stdin (`{"op","ok":true,"addr","len","from","writes"}` or
    /// `{"op","error"}`); `{"op":"exit"}` or end of file ends it with exit code 0.
    #[serde(default)]
    pub zoo: bool,
    /// The zoo's spinner threads (registers known at every instant, see
    /// [`uffd_wp_bench::sys::spin`]), listed in the header's `spinners` (tid, registers, loop
    /// bounds, `rsp`).
    #[serde(default)]
    pub spinners: usize,
}

fn default_interval() -> u64 {
    100
}

/// Runs the workload helper; returns its exit code (only once its stdout is closed).
pub fn helper_main() -> i32 {
    match Parent::connect::<Target>().and_then(|(p, t)| serve(p, &t)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("workload: {e}");
            2
        }
    }
}

fn serve(mut parent: Parent, t: &Target) -> Result<(), String> {
    if t.size < uffd_wp::PAGE_SIZE || t.size % uffd_wp::PAGE_SIZE != 0 || t.threads == 0 {
        return Err(format!(
            "size {} must be a non-zero multiple of the page size and threads {} at least 1",
            t.size, t.threads
        ));
    }
    if t.zoo {
        return serve_zoo(parent, t);
    }
    let w = Workload::start(WorkloadConfig {
        size: t.size,
        threads: t.threads,
        thp: t.thp,
        ..WorkloadConfig::default()
    })
    .map_err(|errno| format!("starting the workload: {}", uffd_wp::sys::errno_name(errno)))?;
    w.resume();
    let head = serde_json::json!({
        "pid": std::process::id(),
        "start": w.range().start(),
        "len": w.range().len(),
        "threads": t.threads,
        "versions": w.versions_addr(),
    });
    if !parent.send(&head) {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(t.interval_ms.max(1)));
        let line = serde_json::json!({
            "writes": w.writes(),
            "max_gap_us": w.take_max_gap().as_secs_f64() * 1e6,
            "t_ns": monotonic_ns(),
        });
        if !parent.send(&line) {
            return Ok(());
        }
    }
}

fn serve_zoo(mut parent: Parent, t: &Target) -> Result<(), String> {
    let z = Zoo::start(ZooConfig {
        anon: t.size,
        writers: t.threads,
        spinners: t.spinners,
    })
    .map_err(|errno| format!("starting the zoo: {}", uffd_wp::sys::errno_name(errno)))?;
    let slabs: serde_json::Map<String, serde_json::Value> = z
        .slab_addrs()
        .into_iter()
        .map(|(n, a)| (n, a.into()))
        .collect();
    let head = serde_json::json!({
        "pid": std::process::id(),
        "zoo": true,
        "directory": z.directory_addr(),
        "max_writers": z.max_writers(),
        "slabs": slabs,
        "spinners": z.spinners(),
    });
    if !parent.send(&head) {
        return Ok(());
    }
    while let Some(cmd) = parent.recv::<serde_json::Value>() {
        let cmd = cmd?;
        let op = cmd["op"].as_str().unwrap_or("").to_string();
        if op == "exit" {
            break;
        }
        let line = match z.op(&op) {
            Ok(r) => serde_json::json!({
                "op": op, "ok": true, "addr": r.addr, "len": r.len, "from": r.from,
                "writes": z.writes(),
            }),
            Err(errno) => serde_json::json!({"op": op, "error": uffd_wp::sys::errno_name(errno)}),
        };
        if !parent.send(&line) {
            break;
        }
    }
    Ok(())
}

//! A capture as an ELF core: its threads, its process facts and its mappings handed to the
//! core writer ([`super::core_file`]), the captured bytes read through [`Captured::read`].

use std::fs::File;
use std::path::PathBuf;

use super::core_file::{CoreMapping, CoreMemory, CoreStats, CoreThread, write_core as write_file};
use super::plan::Method;
use super::{Captured, DumpError};
use crate::range::Range;
use crate::seam::Errno;

impl CoreMemory for Captured {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        Captured::read(self, addr, buf)
    }

    fn data_in(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        Captured::data_in(self, Range::from_bounds(start, end))
            .iter()
            .map(|r| (r.start(), r.end()))
            .collect()
    }
}

/// Writes `cap` as an ELF core into `out`; `progress(done, total)` counts bytes.
pub fn write_core(
    cap: &Captured,
    out: &File,
    progress: impl FnMut(u64, u64),
) -> Result<CoreStats, DumpError> {
    let threads: Vec<CoreThread> = cap
        .threads
        .iter()
        .map(|t| CoreThread {
            tid: t.tid,
            gpregs: t.gpregs.clone(),
            fpregs: t.fpregs.clone(),
            xstate: t.xstate.clone(),
        })
        .collect();
    let maps: Vec<CoreMapping> = cap.plan.iter().map(core_mapping).collect();
    Ok(write_file(
        out,
        &cap.process,
        &threads,
        &maps,
        &cap.auxv,
        cap,
        progress,
    )?)
}

fn core_mapping(p: &super::plan::Planned) -> CoreMapping {
    let perm = |i: usize, c: u8| p.map.perms.as_bytes().get(i) == Some(&c);
    let file = p
        .map
        .name
        .starts_with('/')
        .then(|| (PathBuf::from(&p.map.name), p.map.offset));
    CoreMapping {
        start: p.map.start,
        end: p.map.end,
        read: perm(0, b'r'),
        write: perm(1, b'w'),
        exec: perm(2, b'x'),
        file,
        dump_bytes: match p.method {
            Method::Omitted(_) | Method::Skipped(_) => 0,
            _ => p.dump_bytes(),
        },
    }
}

//! The ELF core file of a captured process (x86_64), laid out as the kernel lays out its own
//! core dumps, so that gdb (and anything else that reads kernel cores) reads it the same way.
//!
//! This module only writes: the capture (freezing the threads, their registers, a consistent
//! copy of the memory) hands it plain data ([`CoreProcess`], [`CoreThread`], [`CoreMapping`])
//! and a [`CoreMemory`] to read the captured bytes from.
//!
//! # Layout (fs/binfmt_elf.c, `elf_core_dump`, 6.12)
//! ```text
//! ELF header        ET_CORE, EM_X86_64, ELFOSABI_NONE
//! program headers   PT_NOTE, then one PT_LOAD per mapping in address order
//!                   (p_flags from r/w/x, p_align 4096, p_memsz the mapping's length,
//!                   p_filesz the same or 0 for a mapping that is not dumped)
//! [section header]  only with 0xffff program headers or more: e_phnum is PN_XNUM and the
//!                   one null section header's sh_info holds the real count
//! notes             first thread: NT_PRSTATUS, then the process-wide NT_PRPSINFO,
//!                   NT_SIGINFO, NT_AUXV, NT_FILE, then its NT_PRFPREG and NT_X86_XSTATE;
//!                   every other thread: NT_PRSTATUS, NT_PRFPREG, NT_X86_XSTATE;
//!                   last NT_X86_XSAVE_LAYOUT (6.12+: where each XSAVE component is)
//!                   (names "CORE", "LINUX" for the x86 ones; 4-byte aligned)
//! segment data      from the next page boundary, each segment right after the one before
//!                   (so every segment starts on a page boundary); all-zero pages are holes
//! ```
//! gdb attaches NT_PRFPREG and NT_X86_XSTATE to the NT_PRSTATUS before them, and takes the
//! first NT_PRSTATUS as the current thread: the order is the kernel's for that reason.
//!
//! # Where this differs from a kernel core, and why
//! - `NT_SIGINFO` is all zeros and `pr_cursig` 0: the process was not killed by a signal, and a
//!   capture through `PTRACE_INTERRUPT` stops it with none (gdb then prints no "terminated
//!   with signal" line). gdb's `gcore` writes the SIGSTOP its `PTRACE_ATTACH` sent instead.
//! - `pr_sigpend`, `pr_sighold`, the CPU times in `NT_PRSTATUS` and `pr_nice`, `pr_flag` in
//!   `NT_PRPSINFO` are 0 (gdb shows none of them).
//! - `NT_X86_XSAVE_LAYOUT` describes the CPU this runs on (`CPUID` leaf 0xD), as the kernel's
//!   describes the one it runs on: the dumped process runs here too. The components are those
//!   of the XCR0 the kernel stores in the XSAVE area's software bytes.
//! - No `NT_X86_SHSTK`/`NT_386_IOPERM` (shadow stacks, I/O permission bitmaps: not captured).
//! - A mapping is dumped whole or not at all; the kernel may dump only the first page of an
//!   ELF file's mapping (`coredump_filter` bit 4).
//!
//! The payloads are the x86_64 layouts of include/linux/elfcore.h, written byte by byte
//! (little endian); the ELF and program headers come from [`object::write::elf::Writer`].

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use object::Endianness;
use object::elf;
use object::write::elf::{FileHeader, ProgramHeader, Writer};

use crate::range::PAGE_SIZE;
use crate::seam::Errno;
use crate::sys::{cpu, errno_name};

/// Size of `struct user_regs_struct` on x86_64: 27 registers of 8 bytes.
pub const GPREGS_SIZE: usize = 216;
/// Size of `struct user_fpregs_struct` on x86_64 (the FXSAVE area).
pub const FPREGS_SIZE: usize = 512;
/// The smallest XSAVE area: the 512-byte legacy region and the 64-byte XSAVE header.
pub const XSTATE_MIN_SIZE: usize = 576;

/// How many bytes of captured memory are read (and checked for zero pages) at a time.
const CHUNK: usize = 1 << 20;
/// The page: the unit of holes, of segment alignment and of NT_FILE offsets.
const PAGE: usize = PAGE_SIZE as usize;

/// `sizeof(struct elf_prstatus)` on x86_64.
const PRSTATUS_SIZE: usize = 336;
/// `sizeof(struct elf_prpsinfo)` on x86_64.
const PRPSINFO_SIZE: usize = 136;
/// `sizeof(siginfo_t)`.
const SIGINFO_SIZE: usize = 128;
/// Where the XSAVE area holds the process's XCR0 (the first word of `sw_reserved`, in the
/// legacy area's bytes 464..512: `xstate_fx_sw_bytes[USER_XSTATE_XCR0_WORD]`).
const XSTATE_XCR0: usize = 464;

/// Offsets in `struct elf_prstatus` (x86_64): `pr_info` (3 ints) at 0, `pr_cursig` (short)
/// at 12, `pr_sigpend` and `pr_sighold` (longs) at 16 and 24, then the ids, four
/// `struct __kernel_old_timeval` (16 bytes each) from 48, `pr_reg` at 112, `pr_fpvalid` after
/// it, padded to 8.
mod prstatus {
    pub const PID: usize = 32;
    pub const PPID: usize = 36;
    pub const PGRP: usize = 40;
    pub const SID: usize = 44;
    pub const REG: usize = 112;
    pub const FPVALID: usize = 328;
}

/// Offsets in `struct elf_prpsinfo` (x86_64): four chars, `pr_flag` (long) at 8, 32-bit uid
/// and gid, the ids, `pr_fname[16]` and `pr_psargs[80]`.
mod prpsinfo {
    pub const STATE: usize = 0;
    pub const SNAME: usize = 1;
    pub const ZOMB: usize = 2;
    pub const UID: usize = 16;
    pub const GID: usize = 20;
    pub const PID: usize = 24;
    pub const PPID: usize = 28;
    pub const PGRP: usize = 32;
    pub const SID: usize = 36;
    pub const FNAME: usize = 40;
    pub const FNAME_LEN: usize = 16;
    pub const PSARGS: usize = 56;
    pub const PSARGS_LEN: usize = 80;
}

/// Note types (include/uapi/linux/elf.h).
mod nt {
    pub const PRSTATUS: u32 = 1;
    pub const PRFPREG: u32 = 2;
    pub const PRPSINFO: u32 = 3;
    pub const AUXV: u32 = 6;
    pub const SIGINFO: u32 = 0x5349_4749;
    pub const FILE: u32 = 0x4649_4c45;
    pub const X86_XSTATE: u32 = 0x202;
    pub const X86_XSAVE_LAYOUT: u32 = 0x205;
}

/// One thread of the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreThread {
    /// Its thread id (`pr_pid` of its `NT_PRSTATUS`; gdb's "LWP").
    pub tid: i32,
    /// `struct user_regs_struct` bytes as `PTRACE_GETREGSET(NT_PRSTATUS)` returns them
    /// ([`GPREGS_SIZE`] on x86_64).
    pub gpregs: Vec<u8>,
    /// `struct user_fpregs_struct` bytes (`NT_PRFPREG`, [`FPREGS_SIZE`] on x86_64).
    pub fpregs: Vec<u8>,
    /// The XSAVE area (`NT_X86_XSTATE`) if the kernel gave one (at least
    /// [`XSTATE_MIN_SIZE`] bytes).
    pub xstate: Option<Vec<u8>>,
}

/// The process-wide facts of `NT_PRPSINFO`: the target's identity as /proc gives it (`comm`
/// is cut to 15 bytes as the kernel's `TASK_COMM_LEN` does, the command line to 79 as the
/// kernel cuts `pr_psargs`).
pub use super::target::ProcessInfo as CoreProcess;

/// One mapping: one `PT_LOAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreMapping {
    /// Start address (page aligned).
    pub start: u64,
    /// End address, exclusive (page aligned, above `start`).
    pub end: u64,
    /// Readable (`PF_R`).
    pub read: bool,
    /// Writable (`PF_W`).
    pub write: bool,
    /// Executable (`PF_X`).
    pub exec: bool,
    /// The file mapped and the byte offset in it (page aligned); `NT_FILE` lists these.
    pub file: Option<(PathBuf, u64)>,
    /// How many of its bytes, from its start, are in the core: 0 for what `coredump_filter`
    /// leaves out (`p_filesz` 0, as the kernel does), one page for an ELF file's header, or
    /// its length (anything above counts as its length).
    pub dump_bytes: u64,
}

impl CoreMapping {
    fn len(&self) -> u64 {
        self.end - self.start
    }

    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.read {
            f |= elf::PF_R.0;
        }
        if self.write {
            f |= elf::PF_W.0;
        }
        if self.exec {
            f |= elf::PF_X.0;
        }
        f
    }

    /// `p_filesz`: the bytes of this mapping in the file.
    fn file_size(&self) -> u64 {
        self.dump_bytes.min(self.len())
    }
}

/// Where the writer reads the captured bytes of dumped mappings.
pub trait CoreMemory {
    /// Fills `buf` with the captured bytes at `addr..addr + buf.len()` (always inside one
    /// dumped mapping), or fails with the errno that explains why it cannot.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;

    /// The parts of `[start, end)` (inside one dumped mapping, page aligned) that may hold
    /// bytes other than zero: the rest is left as holes without being read (sparse memory
    /// whose image was never written). All of it by default.
    fn data_in(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        vec![(start, end)]
    }
}

/// What [`write_core`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CoreStats {
    /// The length of the core file.
    pub file_size: u64,
    /// Bytes actually written: headers, notes, and the pages of dumped mappings that are not
    /// all zero.
    pub bytes_written: u64,
    /// Bytes of dumped mappings left as holes (all-zero pages, not written).
    pub hole_bytes: u64,
    /// `PT_LOAD` segments (one per mapping, dumped or not).
    pub segments: usize,
    /// Notes in the `PT_NOTE` segment.
    pub notes: usize,
}

/// Why an input cannot be written as a core (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadInput {
    /// No thread: a core needs at least one `NT_PRSTATUS`.
    #[error("no thread")]
    NoThreads,
    /// A register set of a thread has the wrong size.
    #[error("thread {tid}: {set} is {len} bytes, expected {expected}")]
    Registers {
        /// The thread.
        tid: i32,
        /// The register set (`NT_PRSTATUS`, `NT_PRFPREG`, `NT_X86_XSTATE`).
        set: &'static str,
        /// Its size as given.
        len: usize,
        /// The size it must have (`at least N` for the XSAVE area).
        expected: String,
    },
    /// A mapping that is empty, not page aligned, out of address order or overlapping the
    /// one before, or whose file offset is not page aligned.
    #[error("mapping {start:#x}-{end:#x}: {why}")]
    Mapping {
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The auxiliary vector is not a whole number of (type, value) pairs of 8-byte words.
    #[error("auxv is {0} bytes, not a multiple of 16")]
    Auxv(usize),
    /// A note (`NT_FILE` with every mapped file's name, `NT_AUXV`, `NT_X86_XSTATE`) larger
    /// than a note can be (4 GiB).
    #[error("the {name} note would be {len} bytes")]
    NoteTooLarge {
        /// The note type.
        name: &'static str,
        /// Its size.
        len: usize,
    },
}

/// Why a core file could not be written. After an `Io` or `Memory` error the file holds a
/// partial core: the caller removes it.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Writing or sizing the core file failed.
    #[error("{op} of the core file (offset {offset}): {source}")]
    Io {
        /// What was being done (`writing the headers and notes`, `writing segment data`,
        /// `truncating`, `setting the length`).
        op: &'static str,
        /// The file offset it was done at.
        offset: u64,
        /// The error of the write or `ftruncate`.
        #[source]
        source: io::Error,
    },
    /// [`CoreMemory::read`] failed for a chunk of a dumped mapping.
    #[error("reading {len} bytes of captured memory at {addr:#x}: {}", errno_name(*errno))]
    Memory {
        /// The chunk's address.
        addr: u64,
        /// The chunk's length.
        len: usize,
        /// What the read failed with.
        errno: Errno,
    },
    /// The input cannot be written as a core; the file was not touched.
    #[error("bad core input: {0}")]
    BadInput(#[from] BadInput),
}

impl CoreError {
    /// The errno that explains it.
    pub fn errno(&self) -> Errno {
        match self {
            CoreError::Io { source, .. } => source
                .raw_os_error()
                .map_or(Errno::IO, Errno::from_raw_os_error),
            CoreError::Memory { errno, .. } => *errno,
            CoreError::BadInput(_) => Errno::INVAL,
        }
    }
}

/// Writes the ELF core of process `p` to `out`: `threads` (the first one is the current
/// thread in gdb), `maps` (in address order, one `PT_LOAD` each), the `auxv` bytes as
/// /proc/PID/auxv gives them, and the bytes of every dumped mapping read from `mem` in
/// chunks of 1 MiB. All-zero pages are left as holes (the file is sparse). `progress(done,
/// total)` is called after each chunk with the bytes of dumped mappings done and in all.
///
/// `out` must be a regular file open for writing; it is truncated first, so that no earlier
/// content shows through the holes. The input is checked before anything is written.
pub fn write_core(
    out: &File,
    p: &CoreProcess,
    threads: &[CoreThread],
    maps: &[CoreMapping],
    auxv: &[u8],
    mem: &dyn CoreMemory,
    mut progress: impl FnMut(u64, u64),
) -> Result<CoreStats, CoreError> {
    check_input(threads, maps, auxv)?;
    let notes = build_notes(p, threads, maps, auxv)?;
    let layout = layout(maps, &notes.buf)?;
    let io = |op, offset| move |source| CoreError::Io { op, offset, source };
    out.set_len(0).map_err(io("truncating", 0))?;
    out.write_all_at(&layout.headers, 0)
        .map_err(io("writing the headers and notes", 0))?;
    let mut stats = CoreStats {
        file_size: layout.file_size,
        bytes_written: layout.headers.len() as u64,
        hole_bytes: 0,
        segments: maps.len(),
        notes: notes.count,
    };
    let total: u64 = maps.iter().map(CoreMapping::file_size).sum();
    let mut done = 0;
    let mut buf = vec![0u8; CHUNK];
    for (m, &offset) in maps.iter().zip(&layout.offsets) {
        let end = m.start + m.file_size();
        if end == m.start {
            continue;
        }
        let mut data_bytes = 0;
        for (start, stop) in mem.data_in(m.start, end) {
            let mut addr = start;
            while addr < stop {
                let n = (stop - addr).min(CHUNK as u64) as usize;
                let chunk = &mut buf[..n];
                mem.read(addr, chunk).map_err(|errno| CoreError::Memory {
                    addr,
                    len: n,
                    errno,
                })?;
                write_sparse(out, chunk, offset + (addr - m.start), &mut stats)?;
                addr += n as u64;
                done += n as u64;
                progress(done, total);
            }
            data_bytes += stop - start;
        }
        // What holds no data was not read: holes too.
        if data_bytes < m.file_size() {
            stats.hole_bytes += m.file_size() - data_bytes;
            done += m.file_size() - data_bytes;
            progress(done, total);
        }
    }
    out.set_len(layout.file_size)
        .map_err(io("setting the length", layout.file_size))?;
    Ok(stats)
}

/// Writes `data` at `offset`, skipping every all-zero page (one write per run of pages that
/// are not), and counts both in `stats`.
fn write_sparse(
    out: &File,
    data: &[u8],
    offset: u64,
    stats: &mut CoreStats,
) -> Result<(), CoreError> {
    let pages: Vec<&[u8]> = data.chunks(PAGE).collect();
    let mut i = 0;
    while i < pages.len() {
        if is_zero(pages[i]) {
            stats.hole_bytes += pages[i].len() as u64;
            i += 1;
            continue;
        }
        let run = i;
        while i < pages.len() && !is_zero(pages[i]) {
            i += 1;
        }
        let from = run * PAGE;
        let to = (i * PAGE).min(data.len());
        let at = offset + from as u64;
        out.write_all_at(&data[from..to], at)
            .map_err(|source| CoreError::Io {
                op: "writing segment data",
                offset: at,
                source,
            })?;
        stats.bytes_written += (to - from) as u64;
    }
    Ok(())
}

/// Whether every byte of `page` is zero (64 bytes at a time, which the compiler vectorizes).
fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    blocks.all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Checks what the ELF layouts need; see [`BadInput`].
fn check_input(threads: &[CoreThread], maps: &[CoreMapping], auxv: &[u8]) -> Result<(), BadInput> {
    if threads.is_empty() {
        return Err(BadInput::NoThreads);
    }
    for t in threads {
        let bad = |set, len, expected: String| BadInput::Registers {
            tid: t.tid,
            set,
            len,
            expected,
        };
        if t.gpregs.len() != GPREGS_SIZE {
            return Err(bad("NT_PRSTATUS", t.gpregs.len(), GPREGS_SIZE.to_string()));
        }
        if t.fpregs.len() != FPREGS_SIZE {
            return Err(bad("NT_PRFPREG", t.fpregs.len(), FPREGS_SIZE.to_string()));
        }
        if let Some(x) = t.xstate.as_ref() {
            if x.len() < XSTATE_MIN_SIZE {
                let expected = format!("at least {XSTATE_MIN_SIZE}");
                return Err(bad("NT_X86_XSTATE", x.len(), expected));
            }
            fits_a_note("NT_X86_XSTATE", x.len())?;
        }
    }
    let mut prev_end = 0;
    for m in maps {
        let bad = |why| BadInput::Mapping {
            start: m.start,
            end: m.end,
            why,
        };
        if m.start >= m.end || m.start % PAGE_SIZE != 0 || m.end % PAGE_SIZE != 0 {
            return Err(bad("empty or not page aligned"));
        }
        if m.start < prev_end {
            return Err(bad(
                "out of address order, or overlapping the mapping before",
            ));
        }
        if m.file.as_ref().is_some_and(|(_, off)| off % PAGE_SIZE != 0) {
            return Err(bad("file offset not page aligned"));
        }
        prev_end = m.end;
    }
    if auxv.len() % 16 != 0 {
        return Err(BadInput::Auxv(auxv.len()));
    }
    fits_a_note("NT_AUXV", auxv.len())
}

/// A note's payload size is a 32-bit field.
fn fits_a_note(name: &'static str, len: usize) -> Result<(), BadInput> {
    match u32::try_from(len) {
        Ok(_) => Ok(()),
        Err(_) => Err(BadInput::NoteTooLarge { name, len }),
    }
}

/// The notes of a core, as the bytes of the `PT_NOTE` segment.
#[derive(Debug, Default)]
struct Notes {
    buf: Vec<u8>,
    count: usize,
}

impl Notes {
    /// Appends one note: `Elf64_Nhdr`, the name with its NUL, the payload, each padded to 4
    /// bytes (`writenote` in fs/binfmt_elf.c). The payload must be smaller than 4 GiB.
    fn push(&mut self, name: &[u8], ty: u32, desc: &[u8]) {
        let word = |v: usize| {
            u32::try_from(v)
                .expect("note sizes are checked")
                .to_le_bytes()
        };
        self.buf.extend_from_slice(&word(name.len() + 1));
        self.buf.extend_from_slice(&word(desc.len()));
        self.buf.extend_from_slice(&ty.to_le_bytes());
        self.buf.extend_from_slice(name);
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(desc);
        self.pad();
        self.count += 1;
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }
}

/// All notes, in the kernel's order (`write_note_info`): the process-wide notes come after
/// the first thread's `NT_PRSTATUS`, before its other register sets.
fn build_notes(
    p: &CoreProcess,
    threads: &[CoreThread],
    maps: &[CoreMapping],
    auxv: &[u8],
) -> Result<Notes, BadInput> {
    let files = file_note(maps)?;
    let mut notes = Notes::default();
    for (i, t) in threads.iter().enumerate() {
        notes.push(b"CORE", nt::PRSTATUS, &prstatus(p, t));
        if i == 0 {
            notes.push(b"CORE", nt::PRPSINFO, &prpsinfo(p));
            notes.push(b"CORE", nt::SIGINFO, &[0; SIGINFO_SIZE]);
            notes.push(b"CORE", nt::AUXV, auxv);
            notes.push(b"CORE", nt::FILE, &files);
        }
        notes.push(b"CORE", nt::PRFPREG, &t.fpregs);
        if let Some(x) = &t.xstate {
            notes.push(b"LINUX", nt::X86_XSTATE, x);
        }
    }
    if let Some(x) = threads.iter().find_map(|t| t.xstate.as_deref()) {
        notes.push(b"LINUX", nt::X86_XSAVE_LAYOUT, &xsave_layout(x));
    }
    Ok(notes)
}

/// `NT_X86_XSAVE_LAYOUT` (`elf_coredump_extra_notes_write`, arch/x86/kernel/fpu/xstate.c):
/// for each extended component (bit 2 and up) of the XCR0 stored in `xstate`, a `struct
/// x86_xfeat_component`: its number, size and offset in the standard format, flags 0.
fn xsave_layout(xstate: &[u8]) -> Vec<u8> {
    let word = xstate[XSTATE_XCR0..XSTATE_XCR0 + 8].try_into();
    let xcr0 = u64::from_le_bytes(word.expect("the XSAVE area is checked to hold it"));
    let mut b = Vec::new();
    for i in (2..64).filter(|i| xcr0 & (1 << i) != 0) {
        let (size, offset) = cpu::xsave_component(i);
        for v in [i, size, offset, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// Writes `v` little endian at `at`.
fn put(buf: &mut [u8], at: usize, v: &[u8]) {
    buf[at..at + v.len()].copy_from_slice(v);
}

/// `struct elf_prstatus` of thread `t` (`fill_prstatus`): its tid as `pr_pid`, the process's
/// parent, group and session, its registers, `pr_fpvalid` 1 (an `NT_PRFPREG` follows).
fn prstatus(p: &CoreProcess, t: &CoreThread) -> [u8; PRSTATUS_SIZE] {
    let mut b = [0u8; PRSTATUS_SIZE];
    put(&mut b, prstatus::PID, &t.tid.to_le_bytes());
    put(&mut b, prstatus::PPID, &p.ppid.to_le_bytes());
    put(&mut b, prstatus::PGRP, &p.pgrp.to_le_bytes());
    put(&mut b, prstatus::SID, &p.sid.to_le_bytes());
    put(&mut b, prstatus::REG, &t.gpregs);
    put(&mut b, prstatus::FPVALID, &1i32.to_le_bytes());
    b
}

/// `struct elf_prpsinfo` (`fill_psinfo`): `pr_state` is the state letter's index in
/// "RSDTZW" (0 for others, as gdb's gcore does), `pr_sname` the letter; the names cut to
/// their fields, NUL-terminated.
fn prpsinfo(p: &CoreProcess) -> [u8; PRPSINFO_SIZE] {
    use prpsinfo::*;
    let mut b = [0u8; PRPSINFO_SIZE];
    let state = b"RSDTZW"
        .iter()
        .position(|&c| c == p.state as u8)
        .unwrap_or(0);
    b[STATE] = state as u8;
    b[SNAME] = p.state as u8;
    b[ZOMB] = u8::from(p.state == 'Z');
    put(&mut b, UID, &p.uid.to_le_bytes());
    put(&mut b, GID, &p.gid.to_le_bytes());
    put(&mut b, PID, &p.pid.to_le_bytes());
    put(&mut b, PPID, &p.ppid.to_le_bytes());
    put(&mut b, PGRP, &p.pgrp.to_le_bytes());
    put(&mut b, SID, &p.sid.to_le_bytes());
    let fname = p.comm.as_bytes();
    put(&mut b, FNAME, &fname[..fname.len().min(FNAME_LEN - 1)]);
    let args = p.cmdline.as_bytes();
    put(&mut b, PSARGS, &args[..args.len().min(PSARGS_LEN - 1)]);
    b
}

/// `NT_FILE` (`fill_files_note`): the count of file mappings, the page size, then (start,
/// end, offset in pages) for each, then their names, each NUL-terminated.
fn file_note(maps: &[CoreMapping]) -> Result<Vec<u8>, BadInput> {
    let files: Vec<(&CoreMapping, &PathBuf, u64)> = maps
        .iter()
        .filter_map(|m| m.file.as_ref().map(|(path, off)| (m, path, *off)))
        .collect();
    let mut b = Vec::new();
    b.extend_from_slice(&(files.len() as u64).to_le_bytes());
    b.extend_from_slice(&PAGE_SIZE.to_le_bytes());
    for (m, _, off) in &files {
        b.extend_from_slice(&m.start.to_le_bytes());
        b.extend_from_slice(&m.end.to_le_bytes());
        b.extend_from_slice(&(off / PAGE_SIZE).to_le_bytes());
    }
    for (_, path, _) in &files {
        b.extend_from_slice(path.as_os_str().as_bytes());
        b.push(0);
    }
    fits_a_note("NT_FILE", b.len())?;
    Ok(b)
}

/// Where everything goes.
#[derive(Debug)]
struct Layout {
    /// The ELF header, the program headers, the notes (and the null section header).
    headers: Vec<u8>,
    /// The file offset of each mapping's segment.
    offsets: Vec<u64>,
    /// The length of the file.
    file_size: u64,
}

/// Lays the file out as `elf_core_dump` does and encodes the headers and notes.
fn layout(maps: &[CoreMapping], notes: &[u8]) -> Result<Layout, BadInput> {
    let segments = u32::try_from(maps.len() + 1).map_err(|_| BadInput::Mapping {
        start: maps[0].start,
        end: maps[maps.len() - 1].end,
        why: "more mappings than program headers can number (2^32 - 1)",
    })?;
    let mut headers = Vec::new();
    let mut w = Writer::new(Endianness::Little, true, &mut headers);
    w.reserve_file_header();
    w.reserve_program_headers(segments);
    let notes_offset = w.reserve(notes.len() as u64, 4);
    let extended = segments >= u32::from(elf::PN_XNUM);
    if extended {
        w.reserve_null_section_index();
        w.reserve_section_headers();
    }
    let data_offset = w.reserved_len().next_multiple_of(PAGE_SIZE);
    let mut offsets = Vec::with_capacity(maps.len());
    let mut end = data_offset;
    for m in maps {
        offsets.push(end);
        end += m.file_size();
    }
    write_headers(&mut w, maps, &offsets, notes_offset, notes, extended);
    drop(w);
    Ok(Layout {
        headers,
        offsets,
        file_size: end,
    })
}

/// The second pass of `layout`: encodes what it reserved.
fn write_headers(
    w: &mut Writer<'_>,
    maps: &[CoreMapping],
    offsets: &[u64],
    notes_offset: u64,
    notes: &[u8],
    extended: bool,
) {
    w.write_file_header(&FileHeader {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_type: elf::ET_CORE,
        e_machine: elf::EM_X86_64,
        e_entry: 0,
        e_flags: elf::FileFlags(0),
    })
    .expect("a reserved header with section headers when e_phnum overflows");
    w.write_align_program_headers();
    w.write_program_header(&ProgramHeader {
        p_type: elf::PT_NOTE,
        p_flags: elf::ProgramFlags(0),
        p_offset: notes_offset,
        p_vaddr: 0,
        p_paddr: 0,
        p_filesz: notes.len() as u64,
        p_memsz: 0,
        p_align: 4,
    });
    for (m, &offset) in maps.iter().zip(offsets) {
        w.write_program_header(&ProgramHeader {
            p_type: elf::PT_LOAD,
            p_flags: elf::ProgramFlags(m.flags()),
            p_offset: offset,
            p_vaddr: m.start,
            p_paddr: 0,
            p_filesz: m.file_size(),
            p_memsz: m.len(),
            p_align: PAGE_SIZE,
        });
    }
    w.write_align(4);
    w.write(notes);
    if extended {
        w.write_null_section_header();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use object::read::elf::{FileHeader as _, ProgramHeader as _};

    use super::*;

    type Header = elf::FileHeader64<Endianness>;

    /// Offset of `rip` in `struct user_regs_struct` (the 17th register).
    const RIP: usize = 16 * 8;

    /// A file in the temporary directory, removed on drop (kept, to look at, when
    /// `UFFD_WP_KEEP_CORES` is set).
    struct Temp(PathBuf);

    impl Temp {
        fn new(tag: &str) -> Temp {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let name = format!("uffd-wp-core-{}-{tag}-{n}", std::process::id());
            Temp(std::env::temp_dir().join(name))
        }

        fn open(&self) -> File {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.0)
                .expect("open the temporary core file")
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            if std::env::var_os("UFFD_WP_KEEP_CORES").is_some() {
                eprintln!("kept {}", self.0.display());
                return;
            }
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Captured memory in vectors, by start address; a read covering `fail_at` fails with EIO.
    #[derive(Default)]
    struct VecMem {
        regions: BTreeMap<u64, Vec<u8>>,
        fail_at: Option<u64>,
    }

    impl CoreMemory for VecMem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
            let end = addr + buf.len() as u64;
            if self.fail_at.is_some_and(|a| (addr..end).contains(&a)) {
                return Err(Errno::IO);
            }
            let (start, bytes) = self
                .regions
                .range(..=addr)
                .next_back()
                .ok_or(Errno::FAULT)?;
            let from = (addr - start) as usize;
            let src = bytes.get(from..from + buf.len()).ok_or(Errno::FAULT)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn thread(tid: i32, xstate: bool) -> CoreThread {
        let mut gpregs: Vec<u8> = (0..GPREGS_SIZE).map(|i| i as u8 ^ tid as u8).collect();
        gpregs[RIP..RIP + 8].copy_from_slice(&(0x40_1000 + tid as u64).to_le_bytes());
        CoreThread {
            tid,
            gpregs,
            fpregs: vec![tid as u8; FPREGS_SIZE],
            xstate: xstate.then(|| {
                let mut x = vec![0xa5; 1088];
                x[XSTATE_XCR0..XSTATE_XCR0 + 8].copy_from_slice(&7u64.to_le_bytes());
                x
            }),
        }
    }

    fn mapping(start: u64, pages: u64, perms: &str, file: Option<(&str, u64)>) -> CoreMapping {
        CoreMapping {
            start,
            end: start + pages * PAGE_SIZE,
            read: perms.contains('r'),
            write: perms.contains('w'),
            exec: perms.contains('x'),
            file: file.map(|(p, off)| (PathBuf::from(p), off)),
            dump_bytes: u64::MAX,
        }
    }

    /// Three pages of text, 2 MiB + 3 pages of mostly zero data (three chunks), a file
    /// mapping left out, one all-zero page; two threads, the first with an XSAVE area.
    fn sample() -> (
        CoreProcess,
        Vec<CoreThread>,
        Vec<CoreMapping>,
        Vec<u8>,
        VecMem,
    ) {
        let p = CoreProcess {
            pid: 100,
            ppid: 1,
            pgrp: 100,
            sid: 7,
            uid: 1000,
            gid: 1001,
            state: 'S',
            comm: "a-very-long-command-name".into(),
            cmdline: "prog ".repeat(30),
        };
        let threads = vec![thread(101, true), thread(100, false)];
        let mut maps = vec![
            mapping(0x40_0000, 3, "r-x", Some(("/usr/bin/prog", 0x1000))),
            mapping(0x60_0000, 512 + 3, "rw-", None),
            mapping(0x90_0000, 16, "r--", Some(("/lib/libz.so", 0))),
            mapping(0xa0_0000, 1, "rw-", None),
        ];
        maps[2].dump_bytes = 0;
        let mut mem = VecMem::default();
        let text: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251) as u8 + 1).collect();
        mem.regions.insert(0x40_0000, text);
        let mut data = vec![0u8; (512 + 3) * PAGE];
        data[PAGE + 17] = 0x11;
        data[(512 + 2) * PAGE] = 0x22;
        mem.regions.insert(0x60_0000, data);
        mem.regions.insert(0xa0_0000, vec![0; PAGE]);
        let auxv = [6u64, 4096, 0, 0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        (p, threads, maps, auxv, mem)
    }

    /// A note as read back: name, type, payload.
    type Note = (Vec<u8>, u32, Vec<u8>);

    /// A `PT_LOAD` as read back.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Load {
        flags: u32,
        offset: u64,
        vaddr: u64,
        filesz: u64,
        memsz: u64,
        align: u64,
    }

    /// A core as read back: its notes, where they end, its `PT_LOAD`s.
    struct Parsed {
        notes: Vec<Note>,
        notes_end: u64,
        loads: Vec<Load>,
    }

    /// Reads a core back with `object`, after checking the ELF header and that the first
    /// program header is the one `PT_NOTE`.
    fn parse(data: &[u8]) -> Parsed {
        let h = Header::parse(data).expect("an ELF64 header");
        let e = h.endian().expect("an endianness");
        assert_eq!(e, Endianness::Little);
        assert_eq!(h.e_type(e), elf::ET_CORE);
        assert_eq!(h.e_machine(e), elf::EM_X86_64);
        let phdrs = h.program_headers(e, data).expect("program headers");
        assert_eq!(phdrs[0].p_type(e), elf::PT_NOTE, "PT_NOTE comes first");
        let notes_end = phdrs[0].p_offset(e) + phdrs[0].p_filesz(e);
        let mut notes = Vec::new();
        let mut it = phdrs[0]
            .notes(e, data)
            .expect("notes")
            .expect("a note segment");
        while let Some(n) = it.next().expect("a well-formed note") {
            notes.push((n.name().to_vec(), n.n_type(e).0, n.desc().to_vec()));
        }
        let loads = phdrs[1..]
            .iter()
            .map(|ph| {
                assert_eq!(ph.p_type(e), elf::PT_LOAD);
                Load {
                    flags: ph.p_flags(e).0,
                    offset: ph.p_offset(e),
                    vaddr: ph.p_vaddr(e),
                    filesz: ph.p_filesz(e),
                    memsz: ph.p_memsz(e),
                    align: ph.p_align(e),
                }
            })
            .collect();
        Parsed {
            notes,
            notes_end,
            loads,
        }
    }

    fn le32(b: &[u8], at: usize) -> i32 {
        i32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The notes: the kernel's order and names, each thread's registers in its own
    /// `NT_PRSTATUS`, the process's facts, `NT_FILE` and `NT_AUXV` as given.
    fn check_notes(notes: &[Note], p: &CoreProcess, threads: &[CoreThread], auxv: &[u8]) {
        let kinds: Vec<(&[u8], u32)> = notes.iter().map(|(n, t, _)| (&n[..], *t)).collect();
        let expected: Vec<(&[u8], u32)> = vec![
            (b"CORE", nt::PRSTATUS),
            (b"CORE", nt::PRPSINFO),
            (b"CORE", nt::SIGINFO),
            (b"CORE", nt::AUXV),
            (b"CORE", nt::FILE),
            (b"CORE", nt::PRFPREG),
            (b"LINUX", nt::X86_XSTATE),
            (b"CORE", nt::PRSTATUS),
            (b"CORE", nt::PRFPREG),
            (b"LINUX", nt::X86_XSAVE_LAYOUT),
        ];
        assert_eq!(kinds, expected);
        let (size, offset) = cpu::xsave_component(2);
        let layout: Vec<u8> = [2, size, offset, 0]
            .iter()
            .flat_map(|v: &u32| v.to_le_bytes())
            .collect();
        assert_eq!(
            notes[9].2, layout,
            "XCR0 7: AVX, the one extended component"
        );
        for (status, t) in [(&notes[0].2, &threads[0]), (&notes[7].2, &threads[1])] {
            assert_eq!(status.len(), PRSTATUS_SIZE);
            assert_eq!(le32(status, prstatus::PID), t.tid);
            assert_eq!(le32(status, prstatus::PPID), p.ppid);
            assert_eq!(le32(status, prstatus::PGRP), p.pgrp);
            assert_eq!(le32(status, prstatus::SID), p.sid);
            assert_eq!(
                &status[prstatus::REG..prstatus::REG + GPREGS_SIZE],
                &t.gpregs[..]
            );
            assert_eq!(le32(status, prstatus::FPVALID), 1);
            assert_eq!(&status[..16], &[0; 16], "no signal");
        }
        assert_eq!(notes[5].2, threads[0].fpregs);
        assert_eq!(Some(&notes[6].2), threads[0].xstate.as_ref());
        assert_eq!(notes[8].2, threads[1].fpregs);
        let ps = &notes[1].2;
        assert_eq!(ps.len(), PRPSINFO_SIZE);
        assert_eq!(
            (ps[0], ps[1], ps[2]),
            (1, b'S', 0),
            "state S is 1 in RSDTZW"
        );
        assert_eq!(le32(ps, 16) as u32, p.uid);
        assert_eq!(le32(ps, 20) as u32, p.gid);
        assert_eq!(
            [le32(ps, 24), le32(ps, 28), le32(ps, 32), le32(ps, 36)],
            [100, 1, 100, 7]
        );
        assert_eq!(&ps[40..56], b"a-very-long-com\0", "comm cut to 15 bytes");
        assert_eq!(&ps[56..135], &p.cmdline.as_bytes()[..79]);
        assert_eq!(ps[135], 0, "psargs cut to 79 bytes and NUL-terminated");
        assert_eq!(notes[2].2, vec![0; SIGINFO_SIZE]);
        assert_eq!(notes[3].2, auxv);
        let f = &notes[4].2;
        assert_eq!((le64(f, 0), le64(f, 8)), (2, PAGE_SIZE), "two files, pages");
        assert_eq!(
            (le64(f, 16), le64(f, 24), le64(f, 32)),
            (0x40_0000, 0x40_3000, 1)
        );
        assert_eq!(
            (le64(f, 40), le64(f, 48), le64(f, 56)),
            (0x90_0000, 0x91_0000, 0)
        );
        assert_eq!(&f[64..], b"/usr/bin/prog\0/lib/libz.so\0");
    }

    /// The core of synthetic data reads back as written: header, notes, one page-aligned
    /// `PT_LOAD` per mapping with the bytes `mem` gave, zero pages as holes (over earlier
    /// content of the file, which is truncated), the progress and the stats.
    #[test]
    fn a_core_of_synthetic_data_reads_back_as_written() {
        let (p, threads, maps, auxv, mem) = sample();
        let tmp = Temp::new("synthetic");
        std::fs::write(&tmp.0, vec![0xff; 4 << 20]).expect("fill the file");
        let out = tmp.open();
        let mut calls = Vec::new();
        let stats = write_core(&out, &p, &threads, &maps, &auxv, &mem, |d, t| {
            calls.push((d, t))
        })
        .expect("write_core");
        let data = std::fs::read(&tmp.0).expect("read the core back");
        let Parsed {
            notes,
            notes_end,
            loads,
        } = parse(&data);
        check_notes(&notes, &p, &threads, &auxv);

        assert_eq!(loads.len(), maps.len());
        let note_align = Header::parse(&*data)
            .unwrap()
            .program_headers(Endianness::Little, &*data);
        assert_eq!(note_align.unwrap()[0].p_align(Endianness::Little), 4);
        let mut next = loads[0].offset;
        assert_eq!(next % PAGE_SIZE, 0, "data starts on a page");
        for (l, m) in loads.iter().zip(&maps) {
            assert_eq!((l.vaddr, l.memsz, l.align), (m.start, m.len(), PAGE_SIZE));
            assert_eq!(l.flags, m.flags());
            assert_eq!(l.filesz, m.dump_bytes.min(m.len()));
            assert_eq!(l.offset, next, "segments follow each other");
            next += l.filesz;
            if m.dump_bytes > 0 {
                let got = &data[l.offset as usize..(l.offset + l.filesz) as usize];
                assert!(got == &mem.regions[&m.start][..], "bytes of {:#x}", m.start);
            }
        }
        assert_eq!(loads[0].flags, elf::PF_R.0 | elf::PF_X.0);
        assert_eq!(loads[1].flags, elf::PF_R.0 | elf::PF_W.0);
        assert_eq!(
            data.len() as u64,
            next,
            "the file ends with the last segment"
        );

        let zero_pages = 512 + 3 - 2 + 1;
        assert_eq!(stats.file_size, next);
        assert_eq!(stats.hole_bytes, zero_pages * PAGE_SIZE);
        assert_eq!(
            stats.bytes_written,
            notes_end + 5 * PAGE_SIZE,
            "headers, 5 data pages"
        );
        assert_eq!((stats.segments, stats.notes), (4, 10));
        check_holes(&out, &loads, &stats);

        let total = (3 + 512 + 3 + 1) * PAGE_SIZE;
        assert_eq!(calls.len(), 5, "one call per chunk: {calls:?}");
        assert!(calls.windows(2).all(|w| w[0].0 < w[1].0 && w[1].1 == total));
        assert_eq!(calls.last(), Some(&(total, total)));
    }

    /// A failed read of captured memory is an error naming the chunk (the second 1 MiB chunk
    /// of the data mapping here).
    #[test]
    fn a_failed_memory_read_names_the_chunk() {
        let (p, threads, maps, auxv, mut mem) = sample();
        mem.fail_at = Some(0x60_0000 + (1 << 20) + 5 * PAGE_SIZE);
        let tmp = Temp::new("failed-read");
        let mut done = 0;
        let err = write_core(&tmp.open(), &p, &threads, &maps, &auxv, &mem, |d, _| {
            done = d
        })
        .expect_err("the read fails");
        match err {
            CoreError::Memory { addr, len, errno } => {
                assert_eq!((addr, len, errno), (0x70_0000, CHUNK, Errno::IO));
            }
            e => panic!("expected a memory error, got {e}"),
        }
        assert_eq!(
            done,
            (3 + 256) * PAGE_SIZE,
            "the text and the first chunk were done"
        );
        let msg = format!(
            "{}",
            CoreError::Memory {
                addr: 0x70_0000,
                len: 4096,
                errno: Errno::IO
            }
        );
        assert_eq!(
            msg,
            "reading 4096 bytes of captured memory at 0x700000: EIO"
        );
    }

    /// Input that cannot be a core is refused, naming what is wrong, before the file is
    /// touched.
    #[test]
    fn bad_input_is_refused_before_anything_is_written() {
        let (p, threads, maps, auxv, mem) = sample();
        let tmp = Temp::new("bad-input");
        std::fs::write(&tmp.0, b"earlier content").unwrap();
        let out = tmp.open();
        let why = |threads: &[CoreThread], maps: &[CoreMapping], auxv: &[u8]| match write_core(
            &out,
            &p,
            threads,
            maps,
            auxv,
            &mem,
            |_, _| {},
        ) {
            Err(CoreError::BadInput(b)) => b.to_string(),
            other => panic!("expected bad input, got {other:?}"),
        };
        assert_eq!(why(&[], &maps, &auxv), "no thread");
        let mut t = threads.clone();
        t[1].gpregs.truncate(200);
        assert_eq!(
            why(&t, &maps, &auxv),
            "thread 100: NT_PRSTATUS is 200 bytes, expected 216"
        );
        let mut t = threads.clone();
        t[0].fpregs.push(0);
        assert_eq!(
            why(&t, &maps, &auxv),
            "thread 101: NT_PRFPREG is 513 bytes, expected 512"
        );
        let mut t = threads.clone();
        t[0].xstate = Some(vec![0; 512]);
        let b = why(&t, &maps, &auxv);
        assert_eq!(
            b,
            "thread 101: NT_X86_XSTATE is 512 bytes, expected at least 576"
        );
        let mut m = maps.clone();
        m.swap(0, 1);
        let b = why(&threads, &m, &auxv);
        assert!(
            b.starts_with("mapping 0x400000-0x403000: out of address order"),
            "{b}"
        );
        let mut m = maps.clone();
        m[3].end -= 1;
        let b = why(&threads, &m, &auxv);
        assert_eq!(b, "mapping 0xa00000-0xa00fff: empty or not page aligned");
        let mut m = maps.clone();
        m[0].file.as_mut().unwrap().1 = 12;
        let b = why(&threads, &m, &auxv);
        assert_eq!(b, "mapping 0x400000-0x403000: file offset not page aligned");
        assert_eq!(
            why(&threads, &maps, &auxv[..12]),
            "auxv is 12 bytes, not a multiple of 16"
        );
        assert_eq!(std::fs::read(&tmp.0).unwrap(), b"earlier content");
    }

    /// With 0xffff program headers or more, e_phnum is PN_XNUM and the null section header
    /// holds the count, as the kernel writes it (`fill_extnum_info`).
    #[test]
    fn more_than_0xfffe_mappings_use_extended_numbering() {
        let (p, threads, _, auxv, mem) = sample();
        let maps: Vec<CoreMapping> = (0..0xffffu64)
            .map(|i| CoreMapping {
                dump_bytes: 0,
                ..mapping(0x1000_0000 + 2 * i * PAGE_SIZE, 1, "r--", None)
            })
            .collect();
        let tmp = Temp::new("xnum");
        let stats = write_core(&tmp.open(), &p, &threads, &maps, &auxv, &mem, |_, _| {})
            .expect("write_core");
        assert_eq!(stats.segments, 0xffff);
        let data = std::fs::read(&tmp.0).unwrap();
        let h = Header::parse(&*data).unwrap();
        let e = h.endian().unwrap();
        assert_eq!(h.e_phnum(e), elf::PN_XNUM);
        assert_eq!(h.e_shnum(e), 1);
        assert_eq!(h.phnum(e, &*data).unwrap(), 0x10000);
        let Parsed { notes, loads, .. } = parse(&data);
        assert_eq!(notes.len(), 10);
        assert_eq!(loads.len(), 0xffff);
        assert_eq!(loads[0xfffe].vaddr, 0x1000_0000 + 2 * 0xfffe * PAGE_SIZE);
        assert_eq!(stats.file_size, data.len() as u64);
        assert_eq!(
            data.len() as u64 % PAGE_SIZE,
            0,
            "ends at the page-aligned data start"
        );
    }

    /// The zero pages are holes: `SEEK_HOLE` finds one at a zero page, `SEEK_DATA` skips to
    /// the next written page, and the file takes fewer blocks than its length.
    fn check_holes(out: &File, loads: &[Load], stats: &CoreStats) {
        use rustix::fs::{SeekFrom, seek};
        let b = loads[1].offset;
        assert_eq!(
            seek(out, SeekFrom::Hole(b)).unwrap(),
            b,
            "page 0 of B is a hole"
        );
        assert_eq!(seek(out, SeekFrom::Data(b)).unwrap(), b + PAGE_SIZE);
        let hole = seek(out, SeekFrom::Hole(b + PAGE_SIZE)).unwrap();
        assert_eq!(
            hole,
            b + 2 * PAGE_SIZE,
            "page 1 of B holds data, page 2 not"
        );
        let last = b + (512 + 2) * PAGE_SIZE;
        assert_eq!(seek(out, SeekFrom::Data(b + 2 * PAGE_SIZE)).unwrap(), last);
        let meta = out.metadata().unwrap();
        assert_eq!(meta.len(), stats.file_size);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated + stats.hole_bytes / 2 < meta.len(),
            "{allocated} bytes allocated for a {}-byte core with {} bytes of holes",
            meta.len(),
            stats.hole_bytes
        );
    }

    /// A real process stopped with ptrace, dumped through this module, read by gdb, and
    /// compared with gdb's `gcore` of the same process and the kernel's own core of a twin.
    mod live {
        use std::collections::BTreeSet;
        use std::os::unix::process::ExitStatusExt;
        use std::path::Path;
        use std::process::{Child, Command, Stdio};
        use std::sync::mpsc;
        use std::time::{Duration, Instant};

        use super::*;
        use crate::backend::procfs;
        use crate::sys::ptrace::{self, WaitStatus};

        /// Upper bound for anything awaited (a failure, not a measurement).
        const PATIENCE: Duration = Duration::from_secs(60);

        /// Skips with a message naming what is missing, or fails under
        /// `UFFD_WP_REQUIRE_KERNEL=1`.
        fn skip(what: &str) {
            if std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1") {
                panic!("core dump test needs {what} (UFFD_WP_REQUIRE_KERNEL=1)");
            }
            eprintln!("SKIPPED core dump test: needs {what}");
        }

        /// Runs `timeout 60 argv...`; its status and its stdout and stderr together.
        fn run(argv: &[&str]) -> Option<(bool, String)> {
            let out = Command::new("timeout")
                .arg(PATIENCE.as_secs().to_string())
                .args(argv)
                .stdin(Stdio::null())
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
            Some((out.status.success(), text.into_owned()))
        }

        /// A directory in the temporary directory, removed with what it holds on drop.
        struct TempDir(PathBuf);

        impl TempDir {
            fn new(tag: &str) -> TempDir {
                let d = TempDir(Temp::new(tag).0.clone());
                std::fs::create_dir(&d.0).expect("create a temporary directory");
                d
            }
        }

        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        /// The child: its seized threads detached, then it is killed and reaped, on drop. A
        /// watchdog kills it if the test is still running after twice [`PATIENCE`], so that
        /// no `waitpid` on it blocks for ever.
        struct Target {
            child: Child,
            pid: i32,
            seized: Vec<i32>,
            watchdog: Option<mpsc::Sender<()>>,
        }

        impl Target {
            /// Starts `cmd` and waits until its command name is `comm` and `threads` threads
            /// of it sleep.
            fn spawn(mut cmd: Command, comm: &str, threads: usize) -> Target {
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn the target");
                let pid = child.id() as i32;
                let (tx, rx) = mpsc::channel::<()>();
                std::thread::spawn(move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(2 * PATIENCE) {
                        let _ = ptrace::tgkill(pid, pid, libc::SIGKILL);
                    }
                });
                let t = Target {
                    child,
                    pid,
                    seized: Vec::new(),
                    watchdog: Some(tx),
                };
                let start = Instant::now();
                while !t.asleep(comm, threads) {
                    assert!(start.elapsed() < PATIENCE, "{cmd:?} did not start");
                    std::thread::sleep(Duration::from_millis(20));
                }
                t
            }

            fn asleep(&self, comm: &str, threads: usize) -> bool {
                let name = procfs::read(&procfs::path(self.pid, "comm")).unwrap_or_default();
                let tids = procfs::thread_ids(self.pid).unwrap_or_default();
                name.trim() == comm
                    && tids.len() == threads
                    && tids
                        .iter()
                        .all(|&t| procfs::thread_state(self.pid, t) == Some('S'))
            }

            /// Seizes every thread and stops it with `PTRACE_INTERRUPT`; the thread ids.
            fn stop(&mut self) -> Result<Vec<i32>, Errno> {
                let tids = procfs::thread_ids(self.pid)?;
                for &t in &tids {
                    ptrace::seize(t, 0)?;
                    self.seized.push(t);
                }
                for &t in &tids {
                    ptrace::interrupt(t)?;
                }
                for &t in &tids {
                    loop {
                        match ptrace::wait(t)? {
                            WaitStatus::Event {
                                event: ptrace::EVENT_STOP,
                                ..
                            } => break,
                            WaitStatus::Signal(sig) => ptrace::cont(t, sig)?,
                            other => panic!("thread {t} of the target: {other:?}"),
                        }
                    }
                }
                Ok(tids)
            }

            fn detach(&mut self) {
                for t in self.seized.drain(..) {
                    let _ = ptrace::detach(t, 0);
                }
            }
        }

        impl Drop for Target {
            fn drop(&mut self) {
                self.detach();
                self.watchdog.take();
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }

        /// A stopped thread's register sets.
        fn registers(tid: i32) -> CoreThread {
            let mut gpregs = vec![0; GPREGS_SIZE];
            let n = ptrace::get_regset(tid, ptrace::nt::PRSTATUS, &mut gpregs).expect("gpregs");
            assert_eq!(n, GPREGS_SIZE);
            let mut fpregs = vec![0; FPREGS_SIZE];
            let n = ptrace::get_regset(tid, ptrace::nt::PRFPREG, &mut fpregs).expect("fpregs");
            assert_eq!(n, FPREGS_SIZE);
            let mut x = vec![0; 64 << 10];
            let xstate = match ptrace::get_regset(tid, ptrace::nt::X86_XSTATE, &mut x) {
                Ok(n) => {
                    assert!(
                        (XSTATE_MIN_SIZE..x.len()).contains(&n),
                        "xstate of {n} bytes"
                    );
                    x.truncate(n);
                    Some(x)
                }
                Err(Errno::NODEV) => None,
                Err(e) => panic!("NT_X86_XSTATE of {tid}: {e}"),
            };
            CoreThread {
                tid,
                gpregs,
                fpregs,
                xstate,
            }
        }

        /// NT_PRPSINFO's facts from /proc/PID.
        fn process(pid: i32) -> CoreProcess {
            let stat = procfs::read(&procfs::path(pid, "stat")).expect("stat");
            let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
            let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let status = procfs::read(&procfs::path(pid, "status")).expect("status");
            let id = |key| -> u32 {
                let v = procfs::status_field(&status, key).expect(key);
                v.split_whitespace().next().unwrap().parse().unwrap()
            };
            let mut args = std::fs::read(procfs::path(pid, "cmdline")).expect("cmdline");
            args.iter_mut().filter(|b| **b == 0).for_each(|b| *b = b' ');
            CoreProcess {
                pid,
                ppid: f[1].parse().unwrap(),
                pgrp: f[2].parse().unwrap(),
                sid: f[3].parse().unwrap(),
                uid: id("Uid"),
                gid: id("Gid"),
                state: f[0].chars().next().unwrap_or('?'),
                comm: stat[open + 1..close].to_string(),
                cmdline: String::from_utf8_lossy(&args).into_owned(),
            }
        }

        /// Every mapping of /proc/PID/maps, dumped when readable except `[vvar*]` (I/O
        /// memory the kernel leaves out too) and `[vsyscall]`.
        fn mappings(pid: i32) -> Vec<CoreMapping> {
            let maps = procfs::read_maps(pid).expect("maps");
            maps.into_iter()
                .map(|m| {
                    let p = m.perms.as_bytes();
                    let special = m.name.starts_with("[vvar") || m.name == "[vsyscall]";
                    CoreMapping {
                        start: m.start,
                        end: m.end,
                        read: p[0] == b'r',
                        write: p[1] == b'w',
                        exec: p[2] == b'x',
                        file: (m.inode != 0).then(|| (PathBuf::from(&m.name), m.offset)),
                        dump_bytes: if p[0] == b'r' && !special {
                            u64::MAX
                        } else {
                            0
                        },
                    }
                })
                .collect()
        }

        /// The memory of a stopped process, read with process_vm_readv.
        struct ProcMem(i32);

        impl CoreMemory for ProcMem {
            fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
                match ptrace::process_vm_read(self.0, addr, buf)? {
                    n if n == buf.len() => Ok(()),
                    _ => Err(Errno::FAULT),
                }
            }
        }

        /// gdb's reading of `core`: `info registers rip`, `bt`, `info threads`.
        fn gdb(exe: &Path, core: &Path) -> String {
            let (exe, core) = (exe.to_str().unwrap(), core.to_str().unwrap());
            let argv = [
                "gdb",
                "-batch",
                "-nx",
                "-ex",
                "info registers rip",
                "-ex",
                "bt",
                "-ex",
                "info threads",
                exe,
                core,
            ];
            run(&argv).expect("run gdb").1
        }

        /// The lines of gdb's output where it complains (warnings, unreadable memory or
        /// registers, not a core), thread ids and addresses replaced by `N`.
        fn complaints(text: &str) -> BTreeSet<String> {
            let bad = [
                "warning",
                "not a core dump",
                "format not recognized",
                "Couldn't find",
                "Cannot access memory",
                "Unexpected size",
            ];
            let numbers = |l: &str| {
                let mut out = String::new();
                for c in l.chars() {
                    match (c.is_ascii_hexdigit(), out.ends_with('N')) {
                        (true, true) => {}
                        (true, false) => out.push('N'),
                        _ => out.push(c),
                    }
                }
                out
            };
            text.lines()
                .filter(|l| bad.iter().any(|b| l.contains(b)))
                .map(numbers)
                .collect()
        }

        /// gdb's `rip` in its output.
        fn gdb_rip(text: &str) -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix("rip"))
                .and_then(|l| l.split_whitespace().next()?.strip_prefix("0x"))
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or_else(|| panic!("no rip in gdb's output:\n{text}"))
        }

        /// gcore's core of process `pid`, if gcore runs.
        fn gcore(pid: i32) -> Option<Parsed> {
            let prefix = Temp::new("gcore");
            let file = Temp(PathBuf::from(format!("{}.{pid}", prefix.0.display())));
            let (ok, text) = run(&["gcore", "-o", prefix.0.to_str()?, &pid.to_string()])?;
            if !ok {
                eprintln!("gcore failed:\n{text}");
                return None;
            }
            Some(parse(&std::fs::read(&file.0).ok()?))
        }

        /// Every segment gcore dumped is one of ours with the same address, length and flags,
        /// and dumped, but for the vsyscall page and `PROT_NONE` mappings, which we leave
        /// out and gcore dumps (zeros read through /proc/PID/mem, marked readable). gcore
        /// writes the same kinds of notes as we do (an `NT_SIGINFO` per thread, not one), but
        /// for its target description, and lacks the kernel's XSAVE layout.
        fn compare_with_gcore(ours: &Parsed, theirs: &Parsed) {
            let dumped = theirs
                .loads
                .iter()
                .filter(|l| l.filesz > 0 && l.vaddr < 0xffff_ffff_ff60_0000);
            for l in dumped {
                let mine = ours.loads.iter().find(|m| m.vaddr == l.vaddr);
                let mine =
                    mine.unwrap_or_else(|| panic!("gcore dumped {:#x}, we did not", l.vaddr));
                if mine.flags == 0 {
                    continue;
                }
                assert_eq!(
                    (mine.memsz, mine.flags),
                    (l.memsz, l.flags),
                    "{:#x}",
                    l.vaddr
                );
                assert_eq!(mine.filesz, mine.memsz, "{:#x} is dumped", l.vaddr);
            }
            let types = |p: &Parsed, skip: u32| -> BTreeSet<u32> {
                p.notes.iter().map(|n| n.1).filter(|&t| t != skip).collect()
            };
            let gdb_tdesc = 0xff00_0000;
            assert_eq!(types(theirs, gdb_tdesc), types(ours, nt::X86_XSAVE_LAYOUT));
        }

        /// The kernel's own core of a twin of the target.
        struct KernelCore {
            /// The directory the twin ran in, holding the core.
            _dir: TempDir,
            /// The core file.
            path: PathBuf,
            parsed: Parsed,
        }

        /// The kernel's own core of `argv` (killed with SIGABRT once `threads` threads sleep),
        /// or `None` (with a message) where core_pattern does not write a plain file.
        fn kernel_core(argv: &[&str], comm: &str, threads: usize) -> Option<KernelCore> {
            let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").ok()?;
            let pattern = pattern.trim();
            if pattern.contains(['|', '/', '%']) {
                eprintln!("kernel core not compared: core_pattern is {pattern:?}");
                return None;
            }
            let dir = TempDir::new("kernel");
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", "ulimit -c unlimited && exec \"$0\" \"$@\""])
                .args(argv)
                .current_dir(&dir.0);
            let mut target = Target::spawn(cmd, comm, threads);
            ptrace::tgkill(target.pid, target.pid, libc::SIGABRT).expect("SIGABRT");
            let status = target.child.wait().expect("wait for the aborted target");
            if !status.core_dumped() {
                eprintln!("kernel core not compared: no core dumped ({status:?})");
                return None;
            }
            let entries = std::fs::read_dir(&dir.0).ok()?.flatten();
            let path = entries.map(|e| e.path()).find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(pattern)
            })?;
            let parsed = parse(&std::fs::read(&path).ok()?);
            Some(KernelCore {
                _dir: dir,
                path,
                parsed,
            })
        }

        /// The same notes as the kernel's (names, types, sizes, in order; the XSAVE layout byte
        /// for byte) and, if `maps_repeat`, the same segments (lengths, flags, alignment, in
        /// order).
        fn compare_with_kernel(ours: &Parsed, kernel: &Parsed, maps_repeat: bool) {
            let shape = |p: &Parsed| -> Vec<(String, u32, usize)> {
                let name = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
                p.notes
                    .iter()
                    .map(|(n, t, d)| (name(n), *t, d.len()))
                    .collect()
            };
            assert_eq!(shape(ours), shape(kernel), "notes: ours, the kernel's");
            let layout = |p: &Parsed| {
                p.notes
                    .iter()
                    .find(|n| n.1 == nt::X86_XSAVE_LAYOUT)
                    .cloned()
            };
            assert_eq!(layout(ours), layout(kernel), "NT_X86_XSAVE_LAYOUT");
            if !maps_repeat {
                return;
            }
            let shape = |p: &Parsed| -> Vec<(u64, u32, u64)> {
                p.loads
                    .iter()
                    .map(|l| (l.memsz, l.flags, l.align))
                    .collect()
            };
            assert_eq!(shape(ours), shape(kernel), "segments: ours, the kernel's");
        }

        /// Our core of a stopped process, as gdb reads it.
        struct Dumped {
            core: Temp,
            exe: PathBuf,
            threads: Vec<CoreThread>,
            gcore: Option<Parsed>,
        }

        /// Stops `argv`, dumps it (its threads in reverse order, so that the first is not the
        /// first of /proc), detaches and has gcore dump it too.
        fn dump(argv: &[&str], comm: &str, threads: usize) -> Option<Dumped> {
            let mut cmd = Command::new(argv[0]);
            cmd.args(&argv[1..]);
            let mut target = Target::spawn(cmd, comm, threads);
            let pid = target.pid;
            let tids = match target.stop() {
                Ok(t) => t,
                Err(e) => {
                    skip(&format!("ptrace of a child ({})", errno_name(e)));
                    return None;
                }
            };
            let order: Vec<i32> = tids.iter().rev().copied().collect();
            let threads: Vec<CoreThread> = order.iter().map(|&t| registers(t)).collect();
            let (p, maps) = (process(pid), mappings(pid));
            let auxv = std::fs::read(procfs::path(pid, "auxv")).expect("auxv");
            let exe = std::fs::read_link(procfs::path(pid, "exe")).expect("exe");
            let core = Temp::new("live");
            let mem = ProcMem(pid);
            let stats = write_core(&core.open(), &p, &threads, &maps, &auxv, &mem, |_, _| {})
                .expect("write_core");
            eprintln!("{comm}: {stats:?}");
            assert!(stats.hole_bytes > 0 && stats.bytes_written < stats.file_size);
            target.detach();
            let gcore = gcore(pid);
            Some(Dumped {
                core,
                exe,
                threads,
                gcore,
            })
        }

        /// gdb reads our core of `argv`: the `rip` captured, a backtrace, every thread, the
        /// first one current, and no complaint it does not also make about the kernel's own
        /// core of the same program. The segments and notes agree with gcore's and the
        /// kernel's (its segments only if `maps_repeat`: two runs of the program map the same
        /// in the same order).
        fn dump_and_read_with_gdb(argv: &[&str], comm: &str, threads: usize, maps_repeat: bool) {
            if run(&["gdb", "--version"]).is_none_or(|(ok, _)| !ok) {
                return skip("gdb");
            }
            let Some(d) = dump(argv, comm, threads) else {
                return;
            };
            let text = gdb(&d.exe, &d.core.0);
            assert_eq!(gdb_rip(&text), le64(&d.threads[0].gpregs, RIP), "{text}");
            assert!(text.contains("\n#1 "), "no backtrace:\n{text}");
            let lwp = |line: &str, tid: i32| {
                let tag = format!("LWP {tid}");
                line.match_indices(&tag)
                    .any(|(i, _)| !line[i + tag.len()..].starts_with(|c: char| c.is_ascii_digit()))
            };
            for t in &d.threads {
                let shown = text.lines().any(|l| lwp(l, t.tid));
                assert!(shown, "no thread {}:\n{text}", t.tid);
            }
            let current = text.lines().find(|l| l.starts_with("* "));
            let current = current.expect("a current thread");
            assert!(lwp(current, d.threads[0].tid), "{text}");
            let ours = parse(&std::fs::read(&d.core.0).unwrap());
            match &d.gcore {
                Some(g) => compare_with_gcore(&ours, g),
                None => eprintln!("gcore's core not compared"),
            }
            // What gdb may complain about: what it complains about for the kernel's own core of
            // the same program; without one, only what gdb 13 says on AMD CPUs with AVX-512
            // (no MPX area): it assumes Intel's XSAVE layout, and finds the kernel's
            // NT_X86_XSTATE too small.
            let allowed = match kernel_core(argv, comm, threads) {
                Some(k) => {
                    compare_with_kernel(&ours, &k.parsed, maps_repeat);
                    let (n, l) = (k.parsed.notes.len(), k.parsed.loads.len());
                    eprintln!("{comm}: {n} notes and {l} segments as in the kernel's core");
                    complaints(&gdb(&d.exe, &k.path))
                }
                None => BTreeSet::from([
                    "warning: Section `.reg-xstate/N' in core file too small.".to_string(),
                ]),
            };
            let ours = complaints(&text);
            let extra: Vec<&String> = ours.difference(&allowed).collect();
            assert!(extra.is_empty(), "gdb complained: {extra:?}\n{text}");
        }

        /// `sleep`, one thread.
        #[test]
        fn gdb_reads_the_core_of_a_stopped_sleep() {
            dump_and_read_with_gdb(&["/bin/sleep", "120"], "sleep", 1, true);
        }

        /// A Python process with three threads, all asleep (its thread arenas and stacks are
        /// placed and grown differently from one run to the next).
        #[test]
        fn gdb_reads_the_core_of_a_stopped_threaded_python() {
            let script = "import threading, time\n\
                          for _ in range(2): threading.Thread(target=time.sleep, args=(120,)).start()\n\
                          time.sleep(120)\n";
            if !Path::new("/usr/bin/python3").exists() {
                return skip("/usr/bin/python3");
            }
            dump_and_read_with_gdb(&["/usr/bin/python3", "-c", script], "python3", 3, false);
        }
    }
}

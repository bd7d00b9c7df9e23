//! The freeze of a dump: besides stopping every thread ([`RemoteQuiesce`]), it records each
//! thread's registers and copies the mappings the kernel will not write-protect, so that all
//! of it belongs to the instant the snapshot engine protects the rest.

use std::sync::Mutex;
use std::time::Instant;

use crate::backend::linux::RemoteQuiesce;
use crate::backend::linux::remote::read_remote;
use crate::backend::procfs::read_mem_no_wait;
use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::seam::{Errno, Quiesce};
use crate::sys::ptrace::{get_regset, nt};

use super::DumpError;
use super::precopy::{self, Now, PreCopy};
use super::tracked::Tracked;

/// One thread's registers at the freeze, as `PTRACE_GETREGSET` gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadRegs {
    /// Thread id.
    pub tid: i32,
    /// `struct user_regs_struct` (`NT_PRSTATUS`).
    pub gpregs: Vec<u8>,
    /// `struct user_fpregs_struct` (`NT_PRFPREG`).
    pub fpregs: Vec<u8>,
    /// The XSAVE area (`NT_X86_XSTATE`), if the kernel gives one.
    pub xstate: Option<Vec<u8>>,
}

/// A range the freeze copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreezeCopy {
    /// Where.
    pub range: Range,
    /// Read without ever waiting for a userfaultfd handler (`/proc/PID/mem`): pages only the
    /// target's own handler could fill are left zero (the target registered the range with a
    /// userfaultfd of its own, and the freeze stops its handler).
    pub populated_only: bool,
}

/// What the freeze captured.
#[derive(Debug, Default)]
pub struct Frozen {
    /// Every thread, the main thread first when it is alive (gdb's current thread).
    pub threads: Vec<ThreadRegs>,
    /// The mappings copied inside the freeze, with their bytes.
    pub copies: Vec<(Range, Vec<u8>)>,
    /// Pages of `copies` that were unmapped by the target before the freeze (left zero).
    pub gone: RangeSet,
    /// Bytes read from the target inside the freeze.
    pub copied_bytes: u64,
    /// For each copy made before the freeze: whether it was still valid in it (else it was
    /// redone, in `copies`).
    pub pre_valid: Vec<bool>,
    /// Bytes of mappings pre-copied with their writes tracked, and of those copied again
    /// inside the freeze (counted in `copied_bytes` too).
    pub tracked_bytes: (u64, u64),
    /// Microseconds spent capturing inside the freeze (registers and copies).
    pub capture_us: f64,
    /// The first failure, if any (the freeze still resumes the target).
    pub error: Option<DumpError>,
}

/// A [`Quiesce`] that freezes with `inner`, then captures the registers and the `in_freeze`
/// ranges before returning.
#[derive(Debug)]
pub struct DumpQuiesce<'a> {
    inner: &'a RemoteQuiesce,
    pid: i32,
    in_freeze: Vec<FreezeCopy>,
    pre: Vec<PreCopy>,
    tracked: Mutex<Vec<Tracked>>,
    frozen: Mutex<Frozen>,
}

impl<'a> DumpQuiesce<'a> {
    /// Captures `in_freeze` of process `pid` at each freeze of `inner`, checks the copies
    /// made before it (`pre`), redoing those no longer valid, and copies again what was
    /// written of the `tracked` ones.
    pub fn new(
        inner: &'a RemoteQuiesce,
        pid: i32,
        in_freeze: Vec<FreezeCopy>,
        (pre, tracked): (Vec<PreCopy>, Vec<Tracked>),
    ) -> Self {
        DumpQuiesce {
            inner,
            pid,
            in_freeze,
            pre,
            tracked: Mutex::new(tracked),
            frozen: Mutex::new(Frozen::default()),
        }
    }

    /// What the (last) freeze captured, and the copies made before it.
    pub fn into_parts(self) -> (Frozen, Vec<PreCopy>, Vec<Tracked>) {
        let f = self.frozen.into_inner().expect("dump freeze lock");
        let t = self.tracked.into_inner().expect("tracked copies lock");
        (f, self.pre, t)
    }

    fn capture(&self) -> Frozen {
        let t0 = Instant::now();
        let mut f = Frozen::default();
        let mut tids = self.inner.frozen_threads();
        if tids.is_empty() {
            f.error = Some(DumpError::Freeze(self.inner.last_error()));
            return f;
        }
        tids.sort_by_key(|t| (*t != self.pid, *t));
        // One buffer for every read: a fresh 64 KiB one per thread cost 33 us of page faults
        // each (501 threads: 24 ms of a 34 ms pause), the calls themselves 2 us.
        let mut scratch = vec![0u8; XSTATE_MAX];
        let regs = tids
            .into_iter()
            .map(|t| thread_regs(t, &mut scratch))
            .collect();
        match regs {
            Ok(r) => f.threads = r,
            Err(e) => f.error = Some(e),
        }
        let mut tracked = self.tracked.lock().expect("tracked copies lock");
        // Nothing read inside the freeze when nothing was copied before it.
        let now = (!self.pre.is_empty() || !tracked.is_empty()).then(|| Now::read(self.pid));
        let redo = now
            .as_ref()
            .map(|now| self.invalid_pre_copies(&mut f, now))
            .unwrap_or_default();
        if let Some(now) = &now {
            self.patch_tracked(&mut tracked, now, &mut f);
        }
        drop(tracked);
        for c in self.in_freeze.iter().chain(&redo) {
            let r = c.range;
            let mut buf = vec![0u8; r.len() as usize];
            let copied = if c.populated_only {
                read_mem_no_wait(self.pid, r.start(), &mut buf)
                    .map(|unread| r.len() - unread.bytes())
            } else {
                self.copy_whole(r, &mut buf, &mut f.gone)
            };
            match copied {
                Ok(n) => f.copied_bytes += n,
                Err(errno) => {
                    f.error.get_or_insert(DumpError::Copy {
                        addr: r.start(),
                        len: r.len(),
                        errno,
                    });
                }
            }
            f.copies.push((r, buf));
        }
        f.capture_us = t0.elapsed().as_secs_f64() * 1e6;
        f
    }

    /// Checks the copies made before the freeze (`f.pre_valid`); returns those to redo.
    fn invalid_pre_copies(&self, f: &mut Frozen, now: &Now) -> Vec<FreezeCopy> {
        f.pre_valid = precopy::still_valid(self.pid, &self.pre, now);
        self.pre
            .iter()
            .zip(&f.pre_valid)
            .filter(|(_, ok)| !**ok)
            .map(|(p, _)| FreezeCopy {
                range: p.range(),
                populated_only: false,
            })
            .collect()
    }
}

impl DumpQuiesce<'_> {
    /// Copies again what changed of the tracked copies (all of a copy whose mapping or file
    /// changed, or that cannot tell).
    fn patch_tracked(&self, tracked: &mut [Tracked], now: &Now, f: &mut Frozen) {
        for t in tracked.iter_mut() {
            let r = t.range();
            f.tracked_bytes.0 += r.len();
            let again = now
                .pagemap
                .as_ref()
                .and_then(|pm| t.to_recopy(self.pid, &now.maps, pm));
            let parts = again.unwrap_or_else(|| RangeSet::single(r));
            for p in parts.iter() {
                let off = (p.start() - r.start()) as usize;
                let buf = &mut t.bytes[off..off + p.len() as usize];
                match self.copy_whole(*p, buf, &mut f.gone) {
                    Ok(n) => {
                        f.copied_bytes += n;
                        f.tracked_bytes.1 += n;
                    }
                    Err(errno) => {
                        f.error.get_or_insert(DumpError::Copy {
                            addr: p.start(),
                            len: p.len(),
                            errno,
                        });
                    }
                }
            }
        }
    }

    /// Copies `r` into `buf`; returns the bytes read. Pages unmapped since the plan are left
    /// zero and added to `gone`.
    fn copy_whole(&self, r: Range, buf: &mut [u8], gone: &mut RangeSet) -> Result<u64, Errno> {
        match read_remote(self.pid, r.start(), buf) {
            Ok(()) => Ok(r.len()),
            // Unmapped since it was planned: what is left, page by page.
            Err(Errno::FAULT) => {
                let lost = self.copy_pages(r, buf);
                gone.extend(&lost);
                Ok(r.len() - lost.bytes())
            }
            Err(errno) => Err(errno),
        }
    }

    /// Copies `r` into `buf` page by page; returns the pages that are gone.
    fn copy_pages(&self, r: Range, buf: &mut [u8]) -> RangeSet {
        let mut gone = RangeSet::new();
        for (p, chunk) in r.page_iter().zip(buf.chunks_mut(PAGE_SIZE as usize)) {
            if read_remote(self.pid, p.start(), chunk).is_err() {
                chunk.fill(0);
                gone.insert(p);
            }
        }
        gone
    }
}

impl Quiesce for DumpQuiesce<'_> {
    fn freeze(&self) {
        self.inner.freeze();
        let f = self.capture();
        *self.frozen.lock().expect("dump freeze lock") = f;
    }

    fn resume(&self) {
        self.inner.resume();
    }
}

/// Room for the largest register set: the XSAVE area is a few KiB (about 11 KiB with AMX).
const XSTATE_MAX: usize = 64 << 10;

/// The registers of a stopped thread, each set read into `scratch` (at least
/// [`XSTATE_MAX`] bytes) and copied out at its length.
fn thread_regs(tid: i32, scratch: &mut [u8]) -> Result<ThreadRegs, DumpError> {
    let mut get = |nt: u32| -> Result<Vec<u8>, Errno> {
        let n = get_regset(tid, nt, scratch)?;
        Ok(scratch[..n].to_vec())
    };
    let err = |errno| DumpError::Registers { tid, errno };
    Ok(ThreadRegs {
        tid,
        gpregs: get(nt::PRSTATUS).map_err(err)?,
        fpregs: get(nt::PRFPREG).map_err(err)?,
        // Absent on old CPUs.
        xstate: get(nt::X86_XSTATE).ok(),
    })
}

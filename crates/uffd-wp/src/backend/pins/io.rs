//! Pin-aware I/O for the application's own buffers: the pin is declared in a [`PinRegistry`]
//! for exactly as long as the kernel holds it, so write-protection (`skip_pinned`), dirty
//! tracking and snapshots never trust a page the I/O may write unseen.
//!
//! - [`PinnedRing`]: io_uring fixed buffers (the `io-uring` crate). Each buffer is declared
//!   before `IORING_REGISTER_BUFFERS` pins it and released after `IORING_UNREGISTER_BUFFERS`
//!   unpinned it (or the ring is dropped). Discovery also finds these buffers in
//!   `/proc/self/fdinfo`; the declaration makes them known without a scan, at once.
//! - [`DirectFile`]: `O_DIRECT` reads and writes. The kernel pins the buffer for the duration
//!   of the system call; the declaration covers exactly that call.
//!
//! The raw parts (registration, submission, the `O_DIRECT` system calls) are in
//! [`crate::sys::uring`] and [`crate::sys::direct`].

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{PinGuard, PinKind, PinRegistry};
use crate::range::Range;
use crate::seam::Event;
use crate::sys::mem::Mapping;
use crate::sys::uring::{Completion, FixedIo, FixedRing};
use crate::sys::{Errno, direct, errno_name};

/// Why a pin-aware I/O operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinIoError {
    /// Setting up or registering with the ring failed.
    #[error("io_uring {op}: {}", errno_name(*errno))]
    Ring {
        /// What was being done (`io_uring_setup`, `IORING_REGISTER_BUFFERS`, ...).
        op: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// A buffer is not inside memory the ring or mapping owns, or an I/O range is not inside
    /// its buffer (EFAULT).
    #[error("{op}: {len:#x} bytes at {addr:#x} are not inside an owned buffer (EFAULT)")]
    NotOwned {
        /// The operation.
        op: &'static str,
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The I/O itself failed.
    #[error("{op} of {len:#x} bytes at {addr:#x}: {}", errno_name(*errno))]
    Io {
        /// The operation (`READ_FIXED`, `O_DIRECT pread`, ...).
        op: &'static str,
        /// First byte of the memory side.
        addr: u64,
        /// Length.
        len: u64,
        /// The errno.
        errno: Errno,
    },
    /// Opening a file for `O_DIRECT` failed.
    #[error("opening {} with O_DIRECT: {}", .path.display(), errno_name(*errno))]
    Open {
        /// The file.
        path: PathBuf,
        /// The errno.
        errno: Errno,
    },
}

impl PinIoError {
    /// The errno.
    pub fn errno(&self) -> Errno {
        match self {
            PinIoError::NotOwned { .. } => Errno::FAULT,
            PinIoError::Ring { errno, .. }
            | PinIoError::Io { errno, .. }
            | PinIoError::Open { errno, .. } => *errno,
        }
    }
}

/// An io_uring ring whose fixed buffers are declared pins for as long as they are registered.
/// Dropping it waits for in-flight requests, unregisters, then releases the declarations.
#[derive(Debug)]
pub struct PinnedRing {
    // Drop order: the ring (unregisters, unpins) before the declarations.
    ring: FixedRing,
    guards: Vec<PinGuard>,
    registry: Arc<PinRegistry>,
}

impl PinnedRing {
    /// A ring with `entries` submission entries whose pins go to `registry`.
    pub fn new(registry: &Arc<PinRegistry>, entries: u32) -> Result<PinnedRing, PinIoError> {
        let ring = FixedRing::new(entries).map_err(|errno| PinIoError::Ring {
            op: "io_uring_setup",
            errno,
        })?;
        Ok(PinnedRing {
            ring,
            guards: Vec::new(),
            registry: Arc::clone(registry),
        })
    }

    /// Hands `m` to the ring; its buffers must lie in memory the ring owns.
    pub fn adopt(&mut self, m: Mapping) {
        self.ring.adopt(m);
    }

    /// Declares every buffer, then registers them (`IORING_REGISTER_BUFFERS`). On failure the
    /// declarations are withdrawn and nothing is registered.
    pub fn register(&mut self, bufs: &[Range]) -> Result<(), PinIoError> {
        let guards: Vec<PinGuard> = bufs
            .iter()
            .map(|b| self.registry.declare_pin(*b, PinKind::LongTerm, true))
            .collect();
        match self.ring.register_buffers(bufs) {
            Ok(()) => {
                self.guards = guards;
                Ok(())
            }
            Err(Errno::FAULT) => {
                let b = bufs.first().copied();
                Err(PinIoError::NotOwned {
                    op: "IORING_REGISTER_BUFFERS",
                    addr: b.map_or(0, |b| b.start()),
                    len: b.map_or(0, |b| b.len()),
                })
            }
            Err(errno) => Err(PinIoError::Ring {
                op: "IORING_REGISTER_BUFFERS",
                errno,
            }),
        }
    }

    /// Unregisters the buffers (`IORING_UNREGISTER_BUFFERS`: the pages are unpinned on return),
    /// then withdraws the declarations. EBUSY while requests are in flight.
    pub fn unregister(&mut self) -> Result<(), PinIoError> {
        self.ring
            .unregister_buffers()
            .map_err(|errno| PinIoError::Ring {
                op: "IORING_UNREGISTER_BUFFERS",
                errno,
            })?;
        self.guards.clear();
        Ok(())
    }

    /// Gives the memory back (after [`PinnedRing::unregister`]).
    pub fn take_memory(&mut self) -> Result<Vec<Mapping>, PinIoError> {
        self.ring.take_memory().map_err(|errno| PinIoError::Ring {
            op: "take memory",
            errno,
        })
    }

    /// The registered buffers.
    pub fn buffers(&self) -> &[Range] {
        self.ring.buffers()
    }

    /// The memory the ring owns (read it with [`Mapping::read`]).
    pub fn memory(&self) -> &[Mapping] {
        self.ring.memory()
    }

    /// The ring's fd number.
    pub fn raw_fd(&self) -> i32 {
        self.ring.raw_fd()
    }

    /// The ring, for polling its fd.
    pub fn ring(&self) -> &FixedRing {
        &self.ring
    }

    fn io_err(io: FixedIo) -> impl FnOnce(Errno) -> PinIoError {
        let (op, addr, len) = (io.op.name(), io.addr, io.len);
        move |errno| match errno {
            Errno::FAULT => PinIoError::NotOwned {
                op,
                addr,
                len: len.into(),
            },
            errno => PinIoError::Io {
                op,
                addr,
                len: len.into(),
                errno,
            },
        }
    }

    /// A fixed-buffer request on `file`, waiting for it: bytes transferred.
    pub fn fixed(&mut self, file: impl AsFd, io: FixedIo) -> Result<u32, PinIoError> {
        self.ring.fixed(file.as_fd(), io).map_err(Self::io_err(io))
    }

    /// Submits a fixed-buffer request without waiting; returns its `user_data`.
    pub fn submit_fixed(&mut self, file: impl AsFd, io: FixedIo) -> Result<u64, PinIoError> {
        self.ring
            .submit_fixed(file.as_fd(), io)
            .map_err(Self::io_err(io))
    }

    /// A completion, if one is ready.
    pub fn try_complete(&mut self) -> Option<Completion> {
        self.ring.try_complete()
    }
}

/// A file opened with `O_DIRECT` whose reads and writes declare their buffer pinned for the
/// duration of the system call.
#[derive(Debug)]
pub struct DirectFile {
    fd: OwnedFd,
    path: PathBuf,
    registry: Arc<PinRegistry>,
}

impl DirectFile {
    /// Opens `path` with `O_DIRECT` (read-write and created when `write`).
    pub fn open(
        registry: &Arc<PinRegistry>,
        path: &Path,
        write: bool,
    ) -> Result<DirectFile, PinIoError> {
        let fd = direct::open_direct(path, write).map_err(|errno| PinIoError::Open {
            path: path.to_path_buf(),
            errno,
        })?;
        Ok(DirectFile {
            fd,
            path: path.to_path_buf(),
            registry: Arc::clone(registry),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `r.len()` bytes at `offset` into the pages `r` of `m` (page aligned, as O_DIRECT
    /// wants), `r` declared pinned (device writes) until the call returns. If `r` is
    /// write-protected, the kernel's `FOLL_WRITE` pin faults first (a sync-mode monitor must
    /// serve it from another thread).
    pub fn read_into(&self, m: &mut Mapping, r: Range, offset: u64) -> Result<usize, PinIoError> {
        let _pin = self.registry.declare_pin(r, PinKind::Declared, true);
        direct::pread_into(self.fd.as_fd(), m, r.start(), r.len() as usize, offset).map_err(
            |errno| match errno {
                Errno::FAULT => PinIoError::NotOwned {
                    op: "O_DIRECT pread",
                    addr: r.start(),
                    len: r.len(),
                },
                errno => PinIoError::Io {
                    op: "O_DIRECT pread",
                    addr: r.start(),
                    len: r.len(),
                    errno,
                },
            },
        )
    }

    /// Writes the pages `r` of `m` to the file at `offset`, `r` declared pinned (the device
    /// only reads it) until the call returns.
    pub fn write_from(&self, m: &mut Mapping, r: Range, offset: u64) -> Result<usize, PinIoError> {
        let _pin = self.registry.declare_pin(r, PinKind::Declared, false);
        direct::pwrite_from(self.fd.as_fd(), m, r.start(), r.len() as usize, offset).map_err(
            |errno| match errno {
                Errno::FAULT => PinIoError::NotOwned {
                    op: "O_DIRECT pwrite",
                    addr: r.start(),
                    len: r.len(),
                },
                errno => PinIoError::Io {
                    op: "O_DIRECT pwrite",
                    addr: r.start(),
                    len: r.len(),
                    errno,
                },
            },
        )
    }
}

/// What a write through a pin did ([`read_fixed_serving_faults`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThroughPin {
    /// Bytes `READ_FIXED` reported read into the buffer.
    pub bytes: u32,
    /// uffd-wp faults raised while it ran (each served by un-protecting the page).
    pub wp_faults: u32,
}

/// Runs `IORING_OP_READ_FIXED` of `len` bytes of `file` at `offset` into `addr` (inside buffer
/// `index` of `ring`) while serving the uffd-wp faults it may raise on `uffd` (each faulting
/// page is un-protected, which wakes the faulting context), so that it completes whatever the
/// kernel does, and counts them. Waits on both fds with `poll(2)`: no timeout decides anything.
///
/// On Linux 6.18 the copy goes through the pin's bio vectors and raises no fault
/// (shared/kernel-notes.md, "Pinned pages"): `wp_faults` is 0 and the page stays protected.
pub fn read_fixed_serving_faults(
    ring: &mut FixedRing,
    file: impl AsFd,
    index: u16,
    addr: u64,
    len: u32,
    offset: u64,
    uffd: &crate::sys::uffd::Uffd,
) -> Result<ThroughPin, PinIoError> {
    use rustix::event::{PollFd, PollFlags, poll};
    let io = FixedIo::read(index, addr, len, offset);
    let ud = ring
        .submit_fixed(file.as_fd(), io)
        .map_err(PinnedRing::io_err(io))?;
    let mut wp_faults = 0;
    loop {
        while let Some(c) = ring.try_complete() {
            if c.user_data == ud {
                let bytes = c.result.map_err(PinnedRing::io_err(io))?;
                return Ok(ThroughPin { bytes, wp_faults });
            }
        }
        let mut fds = [
            PollFd::new(ring, PollFlags::IN),
            PollFd::new(uffd, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(errno) => {
                return Err(PinIoError::Io {
                    op: "poll(io_uring, uffd)",
                    addr,
                    len: len.into(),
                    errno,
                });
            }
        }
        let msgs = uffd.read_msgs(16).map_err(|errno| PinIoError::Io {
            op: "reading uffd events",
            addr,
            len: len.into(),
            errno,
        })?;
        for m in &msgs {
            if let Event::PageFault { address, .. } = Event::decode(m) {
                wp_faults += 1;
                let page = address & !(crate::range::PAGE_SIZE - 1);
                uffd.writeprotect(page, crate::range::PAGE_SIZE, 0)
                    .map_err(|errno| PinIoError::Io {
                        op: "UFFDIO_WRITEPROTECT (serving a fault)",
                        addr: page,
                        len: crate::range::PAGE_SIZE,
                        errno,
                    })?;
            }
        }
    }
}

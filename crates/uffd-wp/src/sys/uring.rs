//! io_uring fixed buffers over memory the ring owns, through the [`io_uring`] crate.
//!
//! `IORING_REGISTER_BUFFERS` pins the buffers' pages long-term (`FOLL_WRITE | FOLL_LONGTERM`,
//! counted in `VmPin`), and `IORING_OP_READ_FIXED` then writes into those pages through the pin,
//! never through the page tables: no write fault, no uffd-wp fault, whatever the protection
//! (shared/kernel-notes.md, "Pinned pages"). A [`FixedRing`] owns the [`Mapping`]s its buffers
//! live in, so the memory stays valid for as long as the kernel may write into it, and no Rust
//! reference ever points into it (a [`Mapping`] is only accessed by copies).
//!
//! See [io_uring_register(2)](https://man7.org/linux/man-pages/man2/io_uring_register.2.html).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};
use linux_raw_sys::general::iovec;

use super::mem::Mapping;
use super::{Errno, errno_of};
use crate::range::Range;

/// Which way a fixed-buffer request moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixed {
    /// `IORING_OP_READ_FIXED`: from the file into memory, which the kernel writes through
    /// the buffer's pin.
    Read,
    /// `IORING_OP_WRITE_FIXED`: from memory into the file.
    Write,
}

impl Fixed {
    /// The opcode's name, for errors.
    pub fn name(self) -> &'static str {
        match self {
            Fixed::Read => "READ_FIXED",
            Fixed::Write => "WRITE_FIXED",
        }
    }
}

/// One fixed-buffer request: `len` bytes at `addr`, inside registered buffer `index`, to or
/// from a file at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedIo {
    /// Direction.
    pub op: Fixed,
    /// Registered buffer index.
    pub index: u16,
    /// Memory address (inside the buffer).
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// File offset.
    pub offset: u64,
}

impl FixedIo {
    /// A read of `len` bytes of the file at `offset` into `addr` (inside buffer `index`).
    pub fn read(index: u16, addr: u64, len: u32, offset: u64) -> FixedIo {
        FixedIo {
            op: Fixed::Read,
            index,
            addr,
            len,
            offset,
        }
    }

    /// A write of `[addr, addr + len)` (inside buffer `index`) to the file at `offset`.
    pub fn write(index: u16, addr: u64, len: u32, offset: u64) -> FixedIo {
        FixedIo {
            op: Fixed::Write,
            ..FixedIo::read(index, addr, len, offset)
        }
    }
}

/// The outcome of one completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The request's `user_data`.
    pub user_data: u64,
    /// Bytes transferred, or the request's errno.
    pub result: Result<u32, Errno>,
}

/// An io_uring instance whose fixed buffers lie in memory it owns.
///
/// Dropping it waits for the requests still in flight, unregisters the buffers (which unpins
/// their pages at once: `IORING_UNREGISTER_BUFFERS` releases a buffer synchronously when no
/// request holds it), closes the ring, and only then unmaps the memory.
pub struct FixedRing {
    // Field order is drop order: the ring goes before the memory it may write into.
    ring: IoUring,
    buffers: Vec<Range>,
    memory: Vec<Mapping>,
    inflight: u32,
    next_user_data: u64,
    detached: bool,
}

impl fmt::Debug for FixedRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedRing")
            .field("fd", &self.ring.as_raw_fd())
            .field("buffers", &self.buffers)
            .field("memory", &self.memory)
            .field("inflight", &self.inflight)
            .finish()
    }
}

impl AsFd for FixedRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by `self.ring`, which keeps it open for as long as `self`
        // lives, i.e. for the whole lifetime of the borrow.
        unsafe { BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }
    }
}

/// Whether `r` lies in memory one of `memory`'s mappings owns (inside it, no hole).
fn owned_by(memory: &[Mapping], r: Range) -> bool {
    memory
        .iter()
        .any(|m| m.range().intersect(&r) == Some(r) && m.holes().clip(r).is_empty())
}

impl FixedRing {
    /// A ring with `entries` submission entries (`io_uring_setup(2)`).
    pub fn new(entries: u32) -> Result<FixedRing, Errno> {
        let ring = IoUring::new(entries).map_err(|e| errno_of(&e))?;
        Ok(FixedRing {
            ring,
            buffers: Vec::new(),
            memory: Vec::new(),
            inflight: 0,
            next_user_data: 1,
            detached: false,
        })
    }

    /// The ring's file descriptor number (as `/proc/PID/fdinfo` names it).
    pub fn raw_fd(&self) -> i32 {
        self.ring.as_raw_fd()
    }

    /// Hands `m` to the ring: it stays mapped until the ring is dropped or
    /// [`FixedRing::take_memory`] gives it back.
    pub fn adopt(&mut self, m: Mapping) {
        self.memory.push(m);
    }

    /// The memory the ring owns.
    pub fn memory(&self) -> &[Mapping] {
        &self.memory
    }

    /// The registered buffers, by index.
    pub fn buffers(&self) -> &[Range] {
        &self.buffers
    }

    /// Requests submitted and not yet completed.
    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    /// Registers `bufs` as the ring's fixed buffers (`IORING_REGISTER_BUFFERS`): a long-term pin
    /// of every page. Each buffer must lie in memory the ring owns (EFAULT otherwise); a ring
    /// registers once (EBUSY while buffers are registered); at most `u16::MAX + 1` buffers
    /// (`buf_index` is 16 bits).
    pub fn register_buffers(&mut self, bufs: &[Range]) -> Result<(), Errno> {
        if !self.buffers.is_empty() {
            return Err(Errno::BUSY);
        }
        if bufs.is_empty() || bufs.len() > usize::from(u16::MAX) + 1 {
            return Err(Errno::INVAL);
        }
        if !bufs.iter().all(|b| owned_by(&self.memory, *b)) {
            return Err(Errno::FAULT);
        }
        let iov: Vec<iovec> = bufs
            .iter()
            .map(|b| iovec {
                iov_base: b.start() as *mut core::ffi::c_void,
                iov_len: b.len() as _,
            })
            .collect();
        // SAFETY: `linux_raw_sys::general::iovec` and `libc::iovec` (the type the io-uring crate
        // asks for, inferred here) are both the kernel's `struct iovec` with `#[repr(C)]`:
        // a pointer then a `size_t`, same size and alignment, so the slice reinterpretation is
        // sound. The crate's contract (each iovec valid until unregistered or the ring is
        // destroyed) holds: every buffer lies in a `Mapping` in `self.memory`, which is only
        // given back by `take_memory` once the buffers are unregistered, is dropped after the
        // ring, and is leaked by `detach`. No Rust reference points into that memory (a
        // `Mapping` is accessed only by copies), so the kernel writing it behind Rust's back is
        // not a data race on Rust-visible data.
        let res = unsafe {
            self.ring
                .submitter()
                .register_buffers(std::slice::from_raw_parts(iov.as_ptr().cast(), iov.len()))
        };
        res.map_err(|e| errno_of(&e))?;
        self.buffers = bufs.to_vec();
        Ok(())
    }

    /// Unregisters every buffer (`IORING_UNREGISTER_BUFFERS`), unpinning their pages. EBUSY
    /// while requests are in flight (they hold the buffers, so the pages would stay pinned);
    /// ENXIO when none are registered.
    pub fn unregister_buffers(&mut self) -> Result<(), Errno> {
        if self.inflight > 0 {
            return Err(Errno::BUSY);
        }
        if self.buffers.is_empty() {
            return Err(Errno::NXIO);
        }
        self.ring
            .submitter()
            .unregister_buffers()
            .map_err(|e| errno_of(&e))?;
        self.buffers.clear();
        Ok(())
    }

    /// Gives the memory back. EBUSY while buffers are registered.
    pub fn take_memory(&mut self) -> Result<Vec<Mapping>, Errno> {
        if !self.buffers.is_empty() {
            return Err(Errno::BUSY);
        }
        Ok(std::mem::take(&mut self.memory))
    }

    /// Checks that `[addr, addr + len)` lies inside buffer `index`.
    fn check_in_buffer(&self, index: u16, addr: u64, len: u32) -> Result<(), Errno> {
        let b = self.buffers.get(usize::from(index)).ok_or(Errno::FAULT)?;
        let end = addr.checked_add(u64::from(len)).ok_or(Errno::FAULT)?;
        if len == 0 || addr < b.start() || end > b.end() {
            return Err(Errno::FAULT);
        }
        Ok(())
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> Result<u64, Errno> {
        let user_data = self.next_user_data;
        self.next_user_data += 1;
        let entry = entry.user_data(user_data);
        // SAFETY: the entry's buffer lies inside a registered buffer (checked by the callers
        // with `check_in_buffer`), i.e. inside memory this ring owns and keeps mapped until every
        // request completed (`Drop` waits for them; `take_memory` refuses while buffers are
        // registered, `unregister_buffers` while requests are in flight). The file is looked up
        // by number at issue time, so a closed fd only fails the request (EBADF).
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| Errno::BUSY)?;
        match self.ring.submit() {
            Ok(_) => {
                self.inflight += 1;
                Ok(user_data)
            }
            Err(e) => Err(errno_of(&e)),
        }
    }

    /// Submits a fixed-buffer request on `file`; `[io.addr, io.addr + io.len)` must lie
    /// inside buffer `io.index` (EFAULT otherwise). For a read the kernel writes the memory
    /// through the pin. Returns the request's `user_data`.
    pub fn submit_fixed(&mut self, file: BorrowedFd<'_>, io: FixedIo) -> Result<u64, Errno> {
        self.check_in_buffer(io.index, io.addr, io.len)?;
        let fd = types::Fd(file.as_raw_fd());
        let e = match io.op {
            Fixed::Read => opcode::ReadFixed::new(fd, io.addr as *mut u8, io.len, io.index)
                .offset(io.offset)
                .build(),
            Fixed::Write => opcode::WriteFixed::new(fd, io.addr as *const u8, io.len, io.index)
                .offset(io.offset)
                .build(),
        };
        self.push(e)
    }

    /// A completed request, if one is ready (never blocks).
    pub fn try_complete(&mut self) -> Option<Completion> {
        let cqe = self.ring.completion().next()?;
        self.inflight = self.inflight.saturating_sub(1);
        let res = cqe.result();
        Some(Completion {
            user_data: cqe.user_data(),
            result: if res < 0 {
                Err(Errno::from_raw_os_error(-res))
            } else {
                Ok(res as u32)
            },
        })
    }

    /// Waits for a completion. EINVAL if nothing is in flight.
    pub fn wait_complete(&mut self) -> Result<Completion, Errno> {
        loop {
            if let Some(c) = self.try_complete() {
                return Ok(c);
            }
            if self.inflight == 0 {
                return Err(Errno::INVAL);
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if errno_of(&e) == Errno::INTR => {}
                Err(e) => return Err(errno_of(&e)),
            }
        }
    }

    /// Waits for the completion of `user_data` (other completions are dropped).
    fn wait_for(&mut self, user_data: u64) -> Result<u32, Errno> {
        loop {
            let c = self.wait_complete()?;
            if c.user_data == user_data {
                return c.result;
            }
        }
    }

    /// A fixed-buffer request, waiting for its completion: bytes transferred.
    pub fn fixed(&mut self, file: BorrowedFd<'_>, io: FixedIo) -> Result<u32, Errno> {
        let ud = self.submit_fixed(file, io)?;
        self.wait_for(ud)
    }

    /// Closes this process's ring fd while the registration lives on in whatever else holds
    /// the ring (a child that inherited the fd): the pins stay, accounted to this process's
    /// `VmPin`, while `/proc/self/fd` no longer lists the ring. The memory is leaked (never
    /// unmapped) since the kernel may still write into it. For test helpers that need pins
    /// no source explains.
    pub fn detach(mut self) {
        self.detached = true;
        std::mem::forget(std::mem::take(&mut self.memory));
    }
}

impl Drop for FixedRing {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        while self.inflight > 0 {
            if self.wait_complete().is_err() {
                break;
            }
        }
        if !self.buffers.is_empty() && self.inflight == 0 {
            let _ = self.ring.submitter().unregister_buffers();
            self.buffers.clear();
        }
    }
}

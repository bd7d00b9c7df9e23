//! `O_DIRECT` reads and writes between a file and memory a [`Mapping`] owns.
//!
//! With `O_DIRECT` the kernel pins the user pages (`pin_user_pages`, `FOLL_WRITE` for a read) for
//! the duration of the I/O and the device transfers to or from them directly: a page pinned
//! before it is write-protected can be written without a fault. The callers in `pins::io`
//! declare the pin around each call. See [open(2)](https://man7.org/linux/man-pages/man2/open.2.html),
//! "O_DIRECT".

use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use super::Errno;
use super::mem::Mapping;
use crate::range::{PAGE_SIZE, Range};

/// The pages covering `[addr, addr + len)` lie in memory `m` owns: EFAULT otherwise.
fn check_owned(m: &Mapping, addr: u64, len: usize) -> Result<(), Errno> {
    if len == 0 {
        return Ok(());
    }
    let end = addr.checked_add(len as u64).ok_or(Errno::FAULT)?;
    let first = addr & !(PAGE_SIZE - 1);
    let last = end
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or(Errno::FAULT)?;
    let pages = Range::from_bounds(first, last);
    if m.range().intersect(&pages) == Some(pages) && m.holes().clip(pages).is_empty() {
        Ok(())
    } else {
        Err(Errno::FAULT)
    }
}

/// Opens `path` with `O_DIRECT | O_CLOEXEC` (and `O_RDWR | O_CREAT` when `write`).
pub fn open_direct(path: &Path, write: bool) -> Result<std::os::fd::OwnedFd, Errno> {
    let flags = OFlags::DIRECT
        | OFlags::CLOEXEC
        | if write {
            OFlags::RDWR | OFlags::CREATE
        } else {
            OFlags::RDONLY
        };
    rustix::fs::open(path, flags, Mode::from_raw_mode(0o600))
}

/// `pread(2)` of `len` bytes at `offset` into `[addr, addr + len)` inside `m`. Takes `&mut`
/// so that nothing else in this process accesses the mapping while the kernel writes it.
pub fn pread_into(
    fd: BorrowedFd<'_>,
    m: &mut Mapping,
    addr: u64,
    len: usize,
    offset: u64,
) -> Result<usize, Errno> {
    check_owned(m, addr, len)?;
    // SAFETY: `[addr, addr + len)` lies in memory `m` owns and keeps mapped (checked above);
    // `m` is borrowed exclusively for the call, and a `Mapping` never hands out references into
    // its memory, so this is the only reference to those bytes while it lives. The slice is of
    // `MaybeUninit<u8>`, so it asserts nothing about the contents.
    let buf = unsafe { std::slice::from_raw_parts_mut(addr as *mut MaybeUninit<u8>, len) };
    let (done, _) = rustix::io::pread(fd, buf, offset)?;
    Ok(done.len())
}

/// `pwrite(2)` of `[addr, addr + len)` inside `m` to the file at `offset`.
pub fn pwrite_from(
    fd: BorrowedFd<'_>,
    m: &mut Mapping,
    addr: u64,
    len: usize,
    offset: u64,
) -> Result<usize, Errno> {
    check_owned(m, addr, len)?;
    // SAFETY: the bytes lie in memory `m` owns and keeps mapped (checked above), always
    // initialised (anonymous or memfd pages read as zero until written); `m` is borrowed
    // exclusively, so nothing in this process writes them while the shared slice lives.
    let buf = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    rustix::io::pwrite(fd, buf, offset)
}

//! Memory mappings owned by RAII guards, and safe access to the bytes they own.
//!
//! A [`Mapping`] owns `[addr, addr+len)` minus the holes punched into it; every accessor checks
//! that the bytes it touches are inside what the mapping owns, so callers never handle raw
//! pointers. See [mmap(2)](https://man7.org/linux/man-pages/man2/mmap.2.html),
//! [madvise(2)](https://man7.org/linux/man-pages/man2/madvise.2.html).

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::mm::{Advice, MapFlags, MsyncFlags, ProtFlags};

use super::Errno;
use crate::range::{PAGE_SIZE, Range, RangeSet};

/// What backs a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`.
    Anon,
    /// `MAP_PRIVATE | MAP_ANONYMOUS` with `MADV_HUGEPAGE` (for [`Mapping::new_at`]; `new` takes
    /// its THP advice separately).
    AnonHuge,
    /// `MAP_SHARED` of a memfd (shmem).
    Memfd,
    /// `MAP_SHARED | MAP_ANONYMOUS` (shmem too, named `/dev/zero (deleted)` in the maps).
    SharedAnon,
    /// A new, unnamed regular file (`O_TMPFILE` in the temporary directory), mapped shared or
    /// private. uffd-wp cannot register it (only anonymous, shmem and hugetlb memory): kept for
    /// tests that check the kernel says so.
    File {
        /// `MAP_SHARED` (else `MAP_PRIVATE`).
        shared: bool,
    },
}

/// The file behind a mapping of `len` bytes of `backing`, and whether it is mapped shared.
fn backing_file(backing: Backing, len: u64) -> Result<Option<(OwnedFd, bool)>, Errno> {
    use rustix::fs::{Mode, OFlags};
    let fd = match backing {
        Backing::Anon | Backing::AnonHuge | Backing::SharedAnon => return Ok(None),
        Backing::Memfd => rustix::fs::memfd_create("uffd-wp", rustix::fs::MemfdFlags::CLOEXEC)?,
        Backing::File { .. } => rustix::fs::open(
            std::env::temp_dir(),
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?,
    };
    rustix::fs::ftruncate(&fd, len)?;
    let shared = !matches!(backing, Backing::File { shared: false });
    Ok(Some((fd, shared)))
}

/// An owned mapping. Unmaps what it still owns when dropped.
#[derive(Debug)]
pub struct Mapping {
    range: Range,
    holes: RangeSet,
    backing: Backing,
    _file: Option<OwnedFd>,
    /// False after [`Mapping::make_read_only`]: every method that writes it refuses.
    writable: bool,
}

/// Transparent huge pages for a new anonymous mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thp {
    /// Leave the system default.
    Default,
    /// `MADV_HUGEPAGE`.
    Huge,
    /// `MADV_NOHUGEPAGE`.
    NoHuge,
}

impl Mapping {
    /// A new read-write mapping of `len` bytes whose start is a multiple of `align` (a power of
    /// two, at least a page). `MAP_NORESERVE`, so large address-space reservations cost nothing
    /// until touched.
    pub fn new(len: u64, align: u64, backing: Backing, thp: Thp) -> Result<Mapping, Errno> {
        let len_us = usize::try_from(len).map_err(|_| Errno::NOMEM)?;
        if len == 0 || len % PAGE_SIZE != 0 || !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(Errno::INVAL);
        }
        let file = backing_file(backing, len)?;
        // Reserve len + align of address space, then place the real mapping at an aligned
        // address inside it with MAP_FIXED, and give back the rest.
        let slack = if align > PAGE_SIZE { align } else { 0 };
        let reserve_len = len_us.checked_add(slack as usize).ok_or(Errno::NOMEM)?;
        // SAFETY: a fresh PROT_NONE reservation at an address the kernel chooses overlaps
        // nothing that Rust owns.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                reserve_len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }? as u64;
        let start = (base + align - 1) & !(align - 1);
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        let placed = match &file {
            // SAFETY: [start, start+len) lies inside the reservation made above, which this
            // function owns; MAP_FIXED replaces only that reservation.
            None => unsafe {
                rustix::mm::mmap_anonymous(
                    start as *mut c_void,
                    len_us,
                    prot,
                    share(backing == Backing::SharedAnon) | MapFlags::FIXED | MapFlags::NORESERVE,
                )
            },
            // SAFETY: as above; the file is at least `len` bytes long.
            Some((fd, shared)) => unsafe {
                rustix::mm::mmap(
                    start as *mut c_void,
                    len_us,
                    prot,
                    share(*shared) | MapFlags::FIXED,
                    fd,
                    0,
                )
            },
        };
        // Give back the unused head and tail of the reservation (and everything on failure).
        let give_back = |a: u64, b: u64| {
            if b > a {
                // SAFETY: [a, b) is part of the reservation this function made and nothing
                // else maps there.
                let _ = unsafe { rustix::mm::munmap(a as *mut c_void, (b - a) as usize) };
            }
        };
        if let Err(e) = placed {
            give_back(base, base + reserve_len as u64);
            return Err(e);
        }
        give_back(base, start);
        give_back(start + len, base + reserve_len as u64);
        let m = Mapping {
            range: Range::from_bounds(start, start + len),
            holes: RangeSet::new(),
            backing,
            _file: file.map(|(fd, _)| fd),
            writable: true,
        };
        match thp {
            Thp::Default => {}
            Thp::Huge => m.madvise(m.range, Advice::LinuxHugepage)?,
            Thp::NoHuge => m.madvise(m.range, Advice::LinuxNoHugepage)?,
        }
        Ok(m)
    }

    /// A new mapping at exactly `addr` (`MAP_FIXED_NOREPLACE`: fails with EEXIST if anything is
    /// mapped there), THP off for [`Backing::Anon`], on for [`Backing::AnonHuge`].
    pub fn new_at(addr: u64, len: u64, backing: Backing) -> Result<Mapping, Errno> {
        let r = Range::new(addr, len).map_err(|_| Errno::INVAL)?;
        let file = backing_file(backing, len)?;
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        let placed = match &file {
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so nothing Rust
            // owns can be affected; the new mapping is owned by the returned guard.
            None => unsafe {
                rustix::mm::mmap_anonymous(
                    addr as *mut c_void,
                    len as usize,
                    prot,
                    share(backing == Backing::SharedAnon)
                        | MapFlags::FIXED_NOREPLACE
                        | MapFlags::NORESERVE,
                )
            },
            // SAFETY: as above; the file is `len` bytes long.
            Some((fd, shared)) => unsafe {
                rustix::mm::mmap(
                    addr as *mut c_void,
                    len as usize,
                    prot,
                    share(*shared) | MapFlags::FIXED_NOREPLACE,
                    fd,
                    0,
                )
            },
        }?;
        let m = Mapping {
            range: r,
            holes: RangeSet::new(),
            backing,
            _file: file.map(|(fd, _)| fd),
            writable: true,
        };
        if placed as u64 != addr {
            // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat it as a hint.
            return Err(Errno::EXIST);
        }
        match backing {
            Backing::Anon => m.madvise(r, Advice::LinuxNoHugepage)?,
            Backing::AnonHuge => m.madvise(r, Advice::LinuxHugepage)?,
            _ => {}
        }
        Ok(m)
    }

    /// An anonymous private mapping, page aligned, THP left to the system default.
    pub fn anon(len: u64) -> Result<Mapping, Errno> {
        Self::new(len, PAGE_SIZE, Backing::Anon, Thp::Default)
    }

    /// The whole range the mapping was created with (holes included).
    pub fn range(&self) -> Range {
        self.range
    }

    /// What backs it.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The file it maps (memfd or regular file), if any.
    pub fn file(&self) -> Option<BorrowedFd<'_>> {
        self._file.as_ref().map(|f| f.as_fd())
    }

    /// Holes punched with [`Mapping::punch`].
    pub fn holes(&self) -> &RangeSet {
        &self.holes
    }

    fn check_owned(&self, r: Range) -> Result<(), Errno> {
        let owned = self.range.intersect(&r) == Some(r)
            && self.holes.intersection(&RangeSet::single(r)).is_empty();
        if owned { Ok(()) } else { Err(Errno::FAULT) }
    }

    fn check_bytes(&self, addr: u64, len: usize) -> Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        let end = addr.checked_add(len as u64).ok_or(Errno::FAULT)?;
        let first = addr & !(PAGE_SIZE - 1);
        let last = (end + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        self.check_owned(Range::from_bounds(first, last))
    }

    /// `madvise(2)` on a part of the mapping.
    pub fn madvise(&self, r: Range, advice: Advice) -> Result<(), Errno> {
        self.check_owned(r)?;
        // SAFETY: `r` is inside this mapping; no Rust reference points into it (access goes
        // through copies made by `read`/`write`), so dropping or replacing its pages is sound.
        unsafe { rustix::mm::madvise(r.start() as *mut c_void, r.len() as usize, advice) }
    }

    /// Makes the whole mapping read-only (`mprotect(2)` to `PROT_READ`); every method that
    /// writes it then fails with EACCES.
    pub fn make_read_only(&mut self) -> Result<(), Errno> {
        self.writable = false;
        // SAFETY: the range is this mapping's own and no Rust reference points into it; the
        // methods that write it check `writable` first.
        unsafe {
            rustix::mm::mprotect(
                self.range.start() as *mut c_void,
                self.range.len() as usize,
                rustix::mm::MprotectFlags::READ,
            )
        }
    }

    fn check_writable(&self) -> Result<(), Errno> {
        if self.writable {
            Ok(())
        } else {
            Err(Errno::ACCESS)
        }
    }

    /// Unmaps a part of the mapping, leaving a hole (the VMA layout changes).
    pub fn punch(&mut self, r: Range) -> Result<(), Errno> {
        self.check_owned(r)?;
        // SAFETY: `r` is inside this mapping and owned by it; it is recorded as a hole so it is
        // never accessed or unmapped again.
        unsafe { rustix::mm::munmap(r.start() as *mut c_void, r.len() as usize) }?;
        self.holes.insert(r);
        Ok(())
    }

    /// Moves the mapping to a new place and makes it `new_len` bytes long (`mremap(2)` with
    /// `MREMAP_MAYMOVE | MREMAP_FIXED` onto a fresh reservation, so it always moves); what grows
    /// is new memory. Fails (changing nothing) on a mapping with holes.
    pub fn move_and_resize(&mut self, new_len: u64) -> Result<(), Errno> {
        if !self.holes.is_empty() || new_len == 0 || new_len % PAGE_SIZE != 0 {
            return Err(Errno::INVAL);
        }
        let new_us = usize::try_from(new_len).map_err(|_| Errno::NOMEM)?;
        // SAFETY: a fresh PROT_NONE reservation at an address the kernel chooses overlaps
        // nothing that Rust owns.
        let to = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                new_us,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        // SAFETY: the source is this mapping, which owns it and has no holes; the destination
        // is the reservation made above, which MREMAP_FIXED replaces. Nothing refers to the
        // old addresses afterwards: the range is updated below.
        let moved = unsafe {
            rustix::mm::mremap_fixed(
                self.range.start() as *mut c_void,
                self.range.len() as usize,
                new_us,
                rustix::mm::MremapFlags::MAYMOVE,
                to,
            )
        };
        match moved {
            Ok(at) => {
                self.range = Range::new(at as u64, new_len).map_err(|_| Errno::INVAL)?;
                Ok(())
            }
            Err(e) => {
                // SAFETY: the reservation is ours and nothing else maps there.
                let _ = unsafe { rustix::mm::munmap(to, new_us) };
                Err(e)
            }
        }
    }

    /// Copies `data` to `addr` (inside the mapping). A write to a write-protected page blocks
    /// until a monitor resolves the fault (sync mode), so never call this from the thread that
    /// serves the faults.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        self.check_writable()?;
        self.check_bytes(addr, data.len())?;
        // SAFETY: the destination is inside memory this mapping owns and keeps mapped; it is
        // plain bytes, and no Rust reference to it exists.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
        Ok(())
    }

    /// Copies from `addr` (inside the mapping) into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.check_bytes(addr, buf.len())?;
        // SAFETY: the source is inside memory this mapping owns and keeps mapped (reading an
        // untouched anonymous page maps the zero page).
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// `process_vm_readv(2)` of up to `len` bytes at `remote` in process `pid` straight into
    /// `[addr, addr + len)` of this mapping. Returns the bytes read (short when the remote
    /// range runs into unmapped memory).
    pub fn read_from_process(
        &self,
        addr: u64,
        pid: i32,
        remote: u64,
        len: usize,
    ) -> Result<usize, Errno> {
        self.check_bytes(addr, len)?;
        let local = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: remote as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: the local iovec lies inside memory this mapping owns and keeps mapped (checked
        // above), plain bytes no Rust reference points to; the remote one is only an address in
        // the other process, checked by the kernel.
        let rc = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if rc < 0 {
            return Err(super::errno_of(&std::io::Error::last_os_error()));
        }
        Ok(rc as usize)
    }

    /// `pread(2)` of up to `len` bytes of `file` at `offset` straight into `[addr, addr + len)`
    /// of this mapping. Returns the bytes read.
    pub fn read_from_file(
        &self,
        addr: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> Result<usize, Errno> {
        self.check_bytes(addr, len)?;
        let offset = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
        // SAFETY: the destination lies inside memory this mapping owns and keeps mapped (checked
        // above), plain bytes no Rust reference points to; `file` is a live descriptor.
        let rc = unsafe {
            libc::pread(
                file.as_raw_fd(),
                addr as *mut libc::c_void,
                len,
                offset as libc::off_t,
            )
        };
        if rc < 0 {
            return Err(super::errno_of(&std::io::Error::last_os_error()));
        }
        Ok(rc as usize)
    }

    /// Checks that `len` bytes at `src_addr` in `src` can be copied to `dst_addr` in this
    /// mapping: both inside memory their mappings own, the mappings distinct.
    fn check_copy(
        &self,
        dst_addr: u64,
        src: &Mapping,
        src_addr: u64,
        len: usize,
    ) -> Result<(), Errno> {
        self.check_writable()?;
        self.check_bytes(dst_addr, len)?;
        src.check_bytes(src_addr, len)?;
        if self.range.intersect(&src.range).is_some() {
            return Err(Errno::INVAL);
        }
        Ok(())
    }

    /// Copies `len` bytes from `src_addr` in `src` to `dst_addr` in this mapping with the C
    /// library's `memcpy` (no kernel call). A write-protected source page is read without a
    /// fault.
    pub fn memcpy_from(
        &self,
        dst_addr: u64,
        src: &Mapping,
        src_addr: u64,
        len: usize,
    ) -> Result<(), Errno> {
        self.check_copy(dst_addr, src, src_addr, len)?;
        // SAFETY: both byte ranges are inside memory their mappings own and keep mapped, and
        // the two mappings are distinct so the ranges do not overlap; the bytes are plain data
        // never referenced as Rust objects.
        unsafe { std::ptr::copy_nonoverlapping(src_addr as *const u8, dst_addr as *mut u8, len) };
        Ok(())
    }

    /// Copies like [`Mapping::memcpy_from`], but with non-temporal (streaming) stores on
    /// x86_64 when the destination is 16-byte aligned and the length a multiple of 64: the
    /// destination's cache lines are not read first nor kept in the cache. For a copy made of
    /// many medium pieces (a snapshot copies 128-256 KiB at a time) this runs at the speed of
    /// one large `memcpy`, which streams by itself above a size threshold, while `memcpy` of
    /// the pieces does not (measured here: 9.7-11.5 GB/s against 6.4-7.6 GB/s for 128 KiB-2 MiB
    /// pieces and 11.4-12.2 GB/s for one 1 GiB `memcpy`). The stores are fenced before it
    /// returns, so they are visible to any thread that later learns the copy is done.
    pub fn copy_from(
        &self,
        dst_addr: u64,
        src: &Mapping,
        src_addr: u64,
        len: usize,
    ) -> Result<(), Errno> {
        self.check_copy(dst_addr, src, src_addr, len)?;
        #[cfg(target_arch = "x86_64")]
        if dst_addr % 16 == 0 && len % 64 == 0 {
            // SAFETY: as in `memcpy_from`: both byte ranges are owned, mapped and disjoint;
            // the destination is 16-byte aligned, as the streaming stores require.
            unsafe { stream_copy(dst_addr as *mut u8, src_addr as *const u8, len) };
            return Ok(());
        }
        self.memcpy_from(dst_addr, src, src_addr, len)
    }

    /// Populates every page of the mapping for write now (`MADV_POPULATE_WRITE`), so later
    /// writes take no page fault.
    pub fn populate(&self) -> Result<(), Errno> {
        self.madvise(self.range, Advice::LinuxPopulateWrite)
    }

    /// Writes one byte in every page of `r` (faulting each page in for write).
    pub fn touch(&self, r: Range, value: u8) -> Result<(), Errno> {
        self.check_writable()?;
        self.check_owned(r)?;
        for p in r.page_iter() {
            // SAFETY: the page is inside memory this mapping owns; a volatile write so the
            // fault is really taken.
            unsafe { std::ptr::write_volatile(p.start() as *mut u8, value) };
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        for r in self.holes.complement_in(self.range).iter() {
            // SAFETY: this is memory the mapping still owns; after drop nothing refers to it.
            let _ = unsafe { rustix::mm::munmap(r.start() as *mut c_void, r.len() as usize) };
        }
    }
}

fn share(shared: bool) -> MapFlags {
    if shared {
        MapFlags::SHARED
    } else {
        MapFlags::PRIVATE
    }
}

/// Whether every byte of `r` is mapped in this process: `msync(MS_ASYNC)` walks the VMAs of the
/// range (no page tables, no I/O since 2.6.19) and fails with ENOMEM on a gap.
pub fn fully_mapped(r: Range) -> Result<bool, Errno> {
    // SAFETY: MS_ASYNC neither reads nor writes the memory; an unmapped range is reported as
    // ENOMEM, not faulted on.
    match unsafe {
        rustix::mm::msync(
            r.start() as *mut c_void,
            r.len() as usize,
            MsyncFlags::ASYNC,
        )
    } {
        Ok(()) => Ok(true),
        Err(Errno::NOMEM) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Copies `len` bytes (a multiple of 64) from `src` to `dst` with SSE2 loads and non-temporal
/// stores (SSE2 is part of x86_64), then `sfence`.
///
/// # Safety
/// `src..src+len` must be readable and `dst..dst+len` writable, the two must not overlap, and
/// `dst` must be 16-byte aligned.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let mut i = 0;
    while i < len {
        // SAFETY: i + 64 <= len (len is a multiple of 64), so every 16-byte load and store
        // stays inside the ranges the caller vouches for; `dst + i` is 16-byte aligned since
        // `dst` is and `i` is a multiple of 64.
        unsafe {
            let s = src.add(i).cast::<__m128i>();
            let d = dst.add(i).cast::<__m128i>();
            let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
            let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: sfence has no preconditions; it orders the streaming stores before later ones.
    unsafe { _mm_sfence() };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::PAGE_SIZE;

    /// The streaming copy and its memcpy fallback (an unaligned destination, a length that is
    /// not a multiple of 64) copy exactly the bytes asked for and nothing around them.
    #[test]
    fn copy_from_streams_or_falls_back_and_copies_exactly() {
        let src = Mapping::new(16 * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
        let dst = Mapping::new(16 * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
        let data: Vec<u8> = (0..16 * PAGE_SIZE).map(|i| (i % 253) as u8 + 1).collect();
        src.write(src.range().start(), &data).unwrap();
        let (s0, d0) = (src.range().start(), dst.range().start());
        // (source offset, destination offset, length): streamed, then the two fallbacks.
        for (so, doff, len) in [(0, 0, 8 * PAGE_SIZE), (64, 3, 4096), (7, 4096, 4000)] {
            dst.write(d0, &vec![0u8; (16 * PAGE_SIZE) as usize])
                .unwrap();
            dst.copy_from(d0 + doff, &src, s0 + so, len as usize)
                .unwrap();
            let mut back = vec![0u8; (16 * PAGE_SIZE) as usize];
            dst.read(d0, &mut back).unwrap();
            let (a, b) = (doff as usize, (doff + len) as usize);
            assert_eq!(back[a..b], data[so as usize..so as usize + len as usize]);
            assert!(
                back[..a].iter().chain(&back[b..]).all(|x| *x == 0),
                "{so} {doff} {len}"
            );
        }
        // Past the end of the destination: refused (EFAULT) before any copy.
        assert_eq!(
            dst.copy_from(d0 + 15 * PAGE_SIZE, &src, s0, 2 * PAGE_SIZE as usize),
            Err(Errno::FAULT)
        );
    }
}

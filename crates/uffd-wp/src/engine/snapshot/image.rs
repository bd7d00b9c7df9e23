//! The snapshot image: in memory while it is taken, and its file format.
//!
//! # File format (version 1, little endian)
//! ```text
//! magic        8 bytes  "UFFDWPIM"
//! version      u32      1
//! page_size    u32      4096
//! range_count  u64      R
//! ranges       R x (start u64, len u64)            ascending, disjoint, page aligned
//! bitmaps      R x ceil(pages/8) bytes              bit i of range r set: page i is stored
//! pages        stored pages, page_size bytes each, in address order
//! ```
//! Pages whose bit is clear were all zero at the snapshot point and are not stored.

use std::io::{self, Read, Write};

use crate::range::{PAGE_SIZE, Range, RangeSet};
use crate::sys::Errno;
use crate::sys::mem::{Backing, Mapping, Thp};

const MAGIC: &[u8; 8] = b"UFFDWPIM";
const VERSION: u32 = 1;

/// Why an image file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// I/O error.
    #[error("image I/O: {0}")]
    Io(#[from] io::Error),
    /// Not an image, or a version this code does not read.
    #[error("not a uffd-wp image (bad magic or version {0})")]
    Format(u32),
    /// Allocating the in-memory image failed.
    #[error("allocating the image: {}", crate::sys::errno_name(*.0))]
    Alloc(Errno),
}

/// A captured copy of some ranges, held in one anonymous mapping (huge pages, populated before
/// the snapshot so copying takes no page fault), but for its sparse part.
#[derive(Debug)]
pub struct Image {
    ranges: Vec<Range>,
    offsets: Vec<u64>,
    buf: Mapping,
    /// Captured addresses whose image pages are allocated as they are first written, 4 KiB at
    /// a time: sparse memory, where few pages are ever copied.
    lazy: RangeSet,
}

impl Image {
    /// An all-zero image of `ranges`, populated.
    pub fn new(ranges: &RangeSet) -> Result<Image, Errno> {
        Image::with_lazy(ranges, &RangeSet::new())
    }

    /// An all-zero image of `ranges`, populated but for `lazy` (captured addresses whose pages
    /// are allocated when first written, without huge pages: the image of sparse memory
    /// costs what is copied into it).
    pub fn with_lazy(ranges: &RangeSet, lazy: &RangeSet) -> Result<Image, Errno> {
        let list: Vec<Range> = ranges.iter().copied().collect();
        let mut offsets = Vec::with_capacity(list.len());
        let mut total = 0;
        for r in &list {
            offsets.push(total);
            total += r.len();
        }
        let buf = Mapping::new(total.max(PAGE_SIZE), 2 << 20, Backing::Anon, Thp::Huge)?;
        let img = Image {
            ranges: list,
            offsets,
            buf,
            lazy: lazy.intersection(ranges),
        };
        if img.lazy.is_empty() {
            img.buf.populate()?;
            return Ok(img);
        }
        for r in ranges.iter() {
            for part in RangeSet::single(*r).difference(&img.lazy).iter() {
                img.buf
                    .madvise(img.slots(*part), rustix::mm::Advice::LinuxPopulateWrite)?;
            }
        }
        for part in img.lazy.iter() {
            img.buf
                .madvise(img.slots(*part), rustix::mm::Advice::LinuxNoHugepage)?;
        }
        Ok(img)
    }

    /// The image buffer's range holding `r` (inside one captured range).
    fn slots(&self, r: Range) -> Range {
        let start = self.slot(r.start()).expect("inside the image");
        Range::from_bounds(start, start + r.len())
    }

    /// The parts of `r` (inside one captured range) whose image pages may hold data: all of
    /// it but the pages of lazy memory nothing was ever written to, which read as zero.
    pub fn data_in(&self, r: Range) -> RangeSet {
        let lazy = self.lazy.clip(r);
        let mut data = RangeSet::single(r).difference(&lazy);
        for part in lazy.iter() {
            let slots = self.slots(*part);
            let Ok(written) = present_in_self(slots) else {
                data.insert(*part); // cannot tell: read it all
                continue;
            };
            for w in written.iter() {
                let at = part.start() + (w.start() - slots.start());
                data.insert(Range::from_bounds(at, at + w.len()));
            }
        }
        data
    }

    /// The captured ranges.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(Range::len).sum()
    }

    /// The address in the image buffer that holds `addr` of the captured address space.
    pub fn slot(&self, addr: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|r| r.end() <= addr);
        let r = self.ranges.get(i).filter(|r| r.contains(addr))?;
        Some(self.buf.range().start() + self.offsets[i] + (addr - r.start()))
    }

    /// Copies `len` bytes at `addr` of `src` (a mapping of this process) into the image, with
    /// streaming stores ([`Mapping::copy_from`]: the image is not read again soon).
    pub fn copy_from_mapping(&self, src: &Mapping, addr: u64, len: u64) -> Result<(), Errno> {
        let dst = self.slot(addr).ok_or(Errno::FAULT)?;
        self.buf.copy_from(dst, src, addr, len as usize)
    }

    /// Copies like [`Image::copy_from_mapping`] with the C library's `memcpy` (the
    /// benchmarks' baseline).
    pub fn memcpy_from_mapping(&self, src: &Mapping, addr: u64, len: u64) -> Result<(), Errno> {
        let dst = self.slot(addr).ok_or(Errno::FAULT)?;
        self.buf.memcpy_from(dst, src, addr, len as usize)
    }

    /// Copies `len` bytes at `addr` of `mm`'s address space into the image, straight into its
    /// slot where the backend can ([`Mm::read_memory_into`]).
    pub fn copy_from_mm<M: crate::seam::Mm + ?Sized>(
        &self,
        mm: &M,
        addr: u64,
        len: u64,
    ) -> Result<(), Errno> {
        let dst = self.slot(addr).ok_or(Errno::FAULT)?;
        mm.read_memory_into(addr, &self.buf, dst, len)
    }

    /// [`Image::copy_from_mm`] of memory the process moved (`mremap`): `len` bytes read at
    /// `src` of `mm`'s address space are stored as the content at `addr`.
    pub fn copy_moved_from_mm<M: crate::seam::Mm + ?Sized>(
        &self,
        mm: &M,
        src: u64,
        addr: u64,
        len: u64,
    ) -> Result<(), Errno> {
        let dst = self.slot(addr).ok_or(Errno::FAULT)?;
        mm.read_memory_into(src, &self.buf, dst, len)
    }

    /// Stores `data` as the content at `addr`.
    pub fn store(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        let dst = self.slot(addr).ok_or(Errno::FAULT)?;
        self.buf.write(dst, data)
    }

    /// Reads `buf.len()` captured bytes at `addr` (all inside one captured range).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let i = self.ranges.partition_point(|r| r.end() <= addr);
        let r = self
            .ranges
            .get(i)
            .filter(|r| r.contains(addr))
            .ok_or(Errno::FAULT)?;
        if addr + buf.len() as u64 > r.end() {
            return Err(Errno::FAULT);
        }
        self.buf.read(
            self.buf.range().start() + self.offsets[i] + (addr - r.start()),
            buf,
        )
    }

    /// The captured page at `addr`.
    pub fn page(&self, addr: u64) -> Option<Vec<u8>> {
        let src = self.slot(addr & !(PAGE_SIZE - 1))?;
        let mut out = vec![0; PAGE_SIZE as usize];
        self.buf.read(src, &mut out).ok()?;
        Some(out)
    }

    /// Writes the image in the documented format; returns (stored pages, zero pages).
    pub fn write_to(&self, mut w: impl Write) -> io::Result<(u64, u64)> {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(PAGE_SIZE as u32).to_le_bytes())?;
        w.write_all(&(self.ranges.len() as u64).to_le_bytes())?;
        for r in &self.ranges {
            w.write_all(&r.start().to_le_bytes())?;
            w.write_all(&r.len().to_le_bytes())?;
        }
        let mut bitmaps = Vec::new();
        for r in &self.ranges {
            let mut bits = vec![0u8; r.pages().div_ceil(8) as usize];
            for (i, p) in r.page_iter().enumerate() {
                if self
                    .page(p.start())
                    .is_some_and(|d| d.iter().any(|b| *b != 0))
                {
                    bits[i / 8] |= 1 << (i % 8);
                }
            }
            bitmaps.push(bits);
        }
        let (mut stored, mut zero) = (0, 0);
        for b in &bitmaps {
            w.write_all(b)?;
        }
        for (r, bits) in self.ranges.iter().zip(&bitmaps) {
            for (i, p) in r.page_iter().enumerate() {
                if bits[i / 8] & (1 << (i % 8)) != 0 {
                    w.write_all(&self.page(p.start()).expect("page in image"))?;
                    stored += 1;
                } else {
                    zero += 1;
                }
            }
        }
        w.flush()?;
        Ok((stored, zero))
    }

    /// Reads an image written by [`Image::write_to`].
    pub fn read_from(mut r: impl Read) -> Result<Image, ImageError> {
        let mut head = [0u8; 24];
        r.read_exact(&mut head)?;
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if &head[..8] != MAGIC || version != VERSION {
            return Err(ImageError::Format(version));
        }
        let n = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
        let mut u64s = |count: u64| -> Result<Vec<u64>, ImageError> {
            let mut b = vec![0u8; (count * 8) as usize];
            r.read_exact(&mut b)?;
            Ok(b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect())
        };
        let raw = u64s(n.checked_mul(2).ok_or(ImageError::Format(version))?)?;
        let ranges: Vec<Range> = raw
            .chunks_exact(2)
            .map(|c| Range::new(c[0], c[1]).map_err(|_| ImageError::Format(version)))
            .collect::<Result<_, _>>()?;
        let img = Image::new(&ranges.iter().copied().collect()).map_err(ImageError::Alloc)?;
        let mut bitmaps = Vec::new();
        for rg in &ranges {
            let mut bits = vec![0u8; rg.pages().div_ceil(8) as usize];
            r.read_exact(&mut bits)?;
            bitmaps.push(bits);
        }
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for (rg, bits) in ranges.iter().zip(&bitmaps) {
            for (i, p) in rg.page_iter().enumerate() {
                if bits[i / 8] & (1 << (i % 8)) != 0 {
                    r.read_exact(&mut page)?;
                    img.store(p.start(), &page).map_err(ImageError::Alloc)?;
                }
            }
        }
        Ok(img)
    }
}

/// The pages of `r`, memory of this process, that are present and not the zero page (which a
/// read of a page never written maps): a `PAGEMAP_SCAN` of /proc/self/pagemap.
fn present_in_self(r: Range) -> Result<RangeSet, Errno> {
    use crate::sys::pagemap::{Pagemap, category};
    let pm = Pagemap::open_self()?;
    let req = crate::seam::ScanRequest {
        start: r.start(),
        end: r.end(),
        category_inverted: category::PFNZERO,
        category_mask: category::PRESENT | category::PFNZERO,
        return_mask: category::PRESENT,
        ..Default::default()
    };
    let found = crate::seam::scan_all(&req, |q, n| crate::backend::linux::scan_once(&pm, q, n))?;
    Ok(found
        .regions
        .iter()
        .map(|g| Range::from_bounds(g.start, g.end))
        .collect())
}

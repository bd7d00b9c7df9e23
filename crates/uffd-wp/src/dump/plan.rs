//! Which mappings a dump captures, and how: the kernel's own rules (fs/binfmt_elf.c
//! `vma_dump_size()`, steered by `/proc/PID/coredump_filter`), seen from outside the process.
//!
//! | mapping | filter bit | captured |
//! |---|---|---|
//! | private anonymous (heap, stacks, `[anon:..]`) | 0 anon private | whole, write-protected |
//! | private anonymous, less than half populated (thread stacks, reservations) | 0 anon private | its 2 MiB blocks with a populated page write-protected and copied; the rest had nothing mapped, is zero, and is left alone ([`crate::engine::snapshot::ProcessRanges::sparse`]) |
//! | shared anonymous, shmem, memfd, SysV | 1 anon shared | whole, write-protected |
//! | private file-backed with written pages (`.data`, `.bss`, relro) | 0 anon private | whole, copied inside the freeze (sync WP refuses private file memory) |
//! | private file-backed, never written | 2 mapped private | whole, else the first page if it is an ELF header (bit 4) |
//! | shared file-backed | 3 mapped shared | whole |
//! | private file-backed, written, 1 MiB or more (a JVM's CDS archive) | as above | copied before the freeze while a second, async-WP userfaultfd tracks the process's writes to it; inside the freeze only the pages written since (or dropped back to the file's) copied again ([`super::precopy`]) |
//! | file-backed, read-only, never written by the process (a JVM's `lib/modules`, libraries' text when bit 2 is on) | as above | copied before the freeze and checked unchanged inside it (else copied there) |
//! | `[vvar]`, `[vvar_vclock]`, `[vsyscall]` | - | never: the kernel's own pages, unreadable (VM_IO/PFNMAP) |
//! | any of the above that the target registered with a userfaultfd of its own for missing or minor faults (smaps `um`, `ui`) | as above | its populated pages, copied inside the freeze through `/proc/PID/mem`; the missing ones are holes (only the target's own handler, stopped by the freeze, could fill them) |
//! | any of the above marked `MADV_DONTDUMP` (`VmFlags` `dd`) | - | never, as in the kernel's core and gcore's |
//!
//! A mapping left out still gets its `PT_LOAD` (with no bytes), as in kernel cores.

use crate::backend::procfs::MapEntry;
use crate::range::{PAGE_SIZE, Range, RangeSet};

use super::IN_FREEZE_LIMIT;

/// `/proc/PID/coredump_filter` bits (see core(5)).
pub mod filter {
    /// Private anonymous memory (and the written pages of private file mappings).
    pub const ANON_PRIVATE: u32 = 1 << 0;
    /// Shared anonymous memory.
    pub const ANON_SHARED: u32 = 1 << 1;
    /// Private file-backed memory.
    pub const MAPPED_PRIVATE: u32 = 1 << 2;
    /// Shared file-backed memory.
    pub const MAPPED_SHARED: u32 = 1 << 3;
    /// The first page of ELF file mappings.
    pub const ELF_HEADERS: u32 = 1 << 4;
    /// Private hugetlb memory.
    pub const HUGETLB_PRIVATE: u32 = 1 << 5;
    /// Shared hugetlb memory.
    pub const HUGETLB_SHARED: u32 = 1 << 6;
    /// The kernel's default (0x33).
    pub const DEFAULT: u32 = ANON_PRIVATE | ANON_SHARED | ELF_HEADERS | HUGETLB_PRIVATE;
}

/// How a mapping is captured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "method", content = "why")]
pub enum Method {
    /// Registered for sync write-protection: protected in the pause, copied after it with
    /// faults served first (the snapshot engine).
    WriteProtect,
    /// [`Method::WriteProtect`] of sparse private anonymous memory: only its 2 MiB blocks
    /// with a populated page are protected and copied, the rest is zero (why: how much of it
    /// is populated).
    WriteProtectPopulated(String),
    /// Copied inside the freeze (memory the kernel will not write-protect, all small).
    InFreeze,
    /// Read-only file memory the process has not written: copied before the freeze, checked
    /// unchanged inside it, else copied again there ([`super::precopy`]).
    PreCopied,
    /// Private file memory the process writes (1 MiB or more): copied before the freeze while
    /// an async-WP userfaultfd tracks its writes; inside the freeze only the pages written
    /// since are copied again ([`super::precopy`]).
    PreCopiedTracked,
    /// Copied inside the freeze, its populated pages only: the target registered it with a
    /// userfaultfd of its own, and a missing page only the target's own handler (stopped by
    /// the freeze) could fill; such pages are holes, as in the kernel's core.
    InFreezePopulated(String),
    /// Only its first page, the ELF header, copied (it never changes).
    ElfHeader,
    /// In the core with no bytes: the coredump filter (or `--range`) leaves it out.
    Omitted(String),
    /// Not in the core: nobody can read it.
    Skipped(String),
}

/// One mapping of the target and how it is captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The mapping, clipped to `--range` when one was given.
    pub map: MapEntry,
    /// How.
    pub method: Method,
    /// Bytes the dump holds in memory for it until the core is written.
    pub held: u64,
}

impl Planned {
    /// Its range.
    pub fn range(&self) -> Range {
        Range::from_bounds(self.map.start, self.map.end)
    }

    /// Write-protected and `MAP_SHARED`: memory other processes (a child forked during the
    /// copy, any process mapping it already) can write.
    pub fn shared_wp(&self) -> bool {
        self.method.write_protected() && self.map.perms.ends_with('s')
    }

    /// The bytes it puts in the core (all of it, one page, or none).
    pub fn dump_bytes(&self) -> u64 {
        match self.method {
            Method::WriteProtect
            | Method::WriteProtectPopulated(_)
            | Method::InFreeze
            | Method::PreCopied
            | Method::PreCopiedTracked
            | Method::InFreezePopulated(_) => self.map.end - self.map.start,
            Method::ElfHeader => PAGE_SIZE,
            Method::Omitted(_) | Method::Skipped(_) => 0,
        }
    }
}

impl Method {
    /// Captured by the snapshot engine (write-protected during the copy).
    pub fn write_protected(&self) -> bool {
        matches!(
            self,
            Method::WriteProtect | Method::WriteProtectPopulated(_)
        )
    }
}

/// What a mapping is, from its name and permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    KernelPages,
    Vdso,
    Anon { shared: bool, huge: bool },
    File { shared: bool },
}

fn kind(m: &MapEntry) -> Kind {
    let shared = m.perms.as_bytes().get(3) == Some(&b's');
    let n = m.name.as_str();
    if matches!(n, "[vvar]" | "[vvar_vclock]" | "[vsyscall]") {
        return Kind::KernelPages;
    }
    if n == "[vdso]" {
        return Kind::Vdso;
    }
    // Files with no name left (memfd, SysV shm, /dev/zero, deleted files) count as anonymous
    // shared memory, as the kernel's `i_nlink == 0` test makes them.
    let unlinked = n.starts_with("/memfd:")
        || n.starts_with("/SYSV")
        || n.starts_with("/dev/zero")
        || n.ends_with(" (deleted)");
    let huge = n.starts_with("/anon_hugepage");
    if n.is_empty() || n.starts_with('[') || huge || (shared && unlinked) {
        Kind::Anon { shared, huge }
    } else {
        Kind::File { shared }
    }
}

/// What the plan needs to know of a mapping beyond its line in /proc/PID/maps.
pub trait MapFacts {
    /// A private file mapping with pages of its own (smaps `Anonymous:` above zero).
    fn written(&self, m: &MapEntry) -> bool;
    /// A file mapping at offset 0 that starts with an ELF header (reads the target).
    fn elf(&self, m: &MapEntry) -> bool;
    /// Its resident bytes, when the target registered it with a userfaultfd of its own for
    /// missing or minor faults (smaps `VmFlags` `um`, `ui`).
    fn own_uffd(&self, m: &MapEntry) -> Option<u64>;
    /// Marked `MADV_DONTDUMP` (smaps `VmFlags` `dd`, `VM_DONTDUMP`).
    fn dont_dump(&self, m: &MapEntry) -> bool;
    /// Its populated bytes: resident or swapped out (smaps `Rss:` + `Swap:`).
    fn populated(&self, m: &MapEntry) -> u64;
}

/// Plans every mapping of `maps` under `filter`; `only` narrows the dump to some ranges.
pub fn plan(
    maps: &[MapEntry],
    filter: u32,
    only: Option<&RangeSet>,
    facts: &impl MapFacts,
) -> Vec<Planned> {
    let mut out = Vec::new();
    for m in maps {
        let vma = OfVma { vma: m, facts };
        for map in clip(m, only) {
            let method = match only {
                Some(o) if !o.covers(&Range::from_bounds(map.start, map.end)) => {
                    Method::Omitted("outside --range".into())
                }
                _ => method(&map, filter, &vma),
            };
            let held = held(&map, &method, &vma);
            out.push(Planned { map, method, held });
        }
    }
    out
}

/// `m`, or its parts inside and outside `only`.
fn clip(m: &MapEntry, only: Option<&RangeSet>) -> Vec<MapEntry> {
    let whole = Range::from_bounds(m.start, m.end);
    let Some(only) = only else {
        return vec![m.clone()];
    };
    let inside = only.clip(whole);
    let outside = RangeSet::single(whole).difference(&inside);
    let mut parts: Vec<Range> = inside.iter().chain(outside.iter()).copied().collect();
    parts.sort();
    parts
        .into_iter()
        .map(|r| MapEntry {
            start: r.start(),
            end: r.end(),
            // A file-backed piece maps the file from further in.
            offset: if m.inode != 0 {
                m.offset + (r.start() - m.start)
            } else {
                m.offset
            },
            ..m.clone()
        })
        .collect()
}

/// The facts of a piece of `vma` (`--range` cuts mappings): smaps knows mappings by their
/// start, so what it says of the whole mapping is asked of the whole mapping.
struct OfVma<'a, F> {
    vma: &'a MapEntry,
    facts: &'a F,
}

impl<F: MapFacts> MapFacts for OfVma<'_, F> {
    fn written(&self, _: &MapEntry) -> bool {
        self.facts.written(self.vma)
    }
    fn elf(&self, piece: &MapEntry) -> bool {
        self.facts.elf(piece)
    }
    fn own_uffd(&self, _: &MapEntry) -> Option<u64> {
        self.facts.own_uffd(self.vma)
    }
    fn dont_dump(&self, _: &MapEntry) -> bool {
        self.facts.dont_dump(self.vma)
    }
    fn populated(&self, _: &MapEntry) -> u64 {
        self.facts.populated(self.vma)
    }
}

impl<F: MapFacts> OfVma<'_, F> {
    /// Sparse private anonymous memory: less than half of its mapping populated.
    fn sparse(&self, m: &MapEntry) -> bool {
        matches!(
            kind(m),
            Kind::Anon {
                shared: false,
                huge: false
            }
        ) && self.populated(m) * 2 < self.vma.end - self.vma.start
    }
}

/// What the dump holds for `m` captured by `method`: its image, and for sparse memory the
/// populated bytes of its mapping (at most its own length) and the engine's page states.
fn held<F: MapFacts>(m: &MapEntry, method: &Method, vma: &OfVma<'_, F>) -> u64 {
    let len = m.end - m.start;
    match method {
        Method::WriteProtectPopulated(_) => {
            vma.populated(m).min(len)
                + len / PAGE_SIZE * crate::engine::snapshot::STATE_BYTES_PER_PAGE
        }
        Method::WriteProtect => {
            len + len / PAGE_SIZE * crate::engine::snapshot::STATE_BYTES_PER_PAGE
        }
        Method::InFreeze
        | Method::PreCopied
        | Method::PreCopiedTracked
        | Method::InFreezePopulated(_) => len,
        Method::ElfHeader => PAGE_SIZE,
        Method::Omitted(_) | Method::Skipped(_) => 0,
    }
}

fn method<F: MapFacts>(m: &MapEntry, filter: u32, facts: &OfVma<'_, F>) -> Method {
    if !m.perms.starts_with('r') {
        return Method::Omitted("not readable".into());
    }
    // As vma_dump_size(): the vDSO is always dumped, the rest of VM_DONTDUMP never (gdb's
    // gcore too). Sanitizers' shadow memory and caches a program keeps out of its cores.
    if facts.dont_dump(m) && !matches!(kind(m), Kind::Vdso | Kind::KernelPages) {
        return Method::Omitted("MADV_DONTDUMP (VmFlags dd): no core holds it".into());
    }
    let Some(resident) = facts.own_uffd(m) else {
        return match by_kind(m, filter, facts, true) {
            Method::InFreeze if unchanging(m, facts) => Method::PreCopied,
            Method::InFreeze if trackable(m) => Method::PreCopiedTracked,
            Method::WriteProtect if facts.sparse(m) => Method::WriteProtectPopulated(format!(
                "sparse: {} KiB of its {} KiB mapping populated; only the 2 MiB blocks \
                 holding a populated page are write-protected and copied",
                facts.populated(m) >> 10,
                (facts.vma.end - facts.vma.start) >> 10
            )),
            other => other,
        };
    };
    // Its first bytes are not read for an ELF header: they may be missing.
    match by_kind(m, filter, facts, false) {
        Method::WriteProtect | Method::InFreeze if resident <= IN_FREEZE_LIMIT => {
            Method::InFreezePopulated(
                "registered with the target's own userfaultfd: its populated pages, copied \
                 inside the freeze; the missing ones only its handler can fill"
                    .into(),
            )
        }
        Method::WriteProtect | Method::InFreeze => Method::Skipped(format!(
            "registered with the target's own userfaultfd, {} MiB resident: above the {} MiB \
             copied inside the freeze",
            resident >> 20,
            IN_FREEZE_LIMIT >> 20
        )),
        other => other,
    }
}

/// Read-only file memory with no page of the process's own: it changes only if the file does
/// or the process first changes the mapping.
fn unchanging(m: &MapEntry, facts: &impl MapFacts) -> bool {
    matches!(kind(m), Kind::File { .. }) && !m.perms.contains('w') && !facts.written(m)
}

/// Private file memory large enough that copying it inside the freeze shows in the pause.
fn trackable(m: &MapEntry) -> bool {
    matches!(kind(m), Kind::File { shared: false }) && m.end - m.start >= super::TRACK_MIN
}

/// The method by the kind of mapping and the filter; `may_read` allows reading its first page.
fn by_kind(m: &MapEntry, filter: u32, facts: &impl MapFacts, may_read: bool) -> Method {
    let on = |bit: u32| filter & bit != 0;
    let off = |what: &str| Method::Omitted(format!("coredump_filter leaves out {what}"));
    match kind(m) {
        Kind::KernelPages => Method::Skipped("kernel pages no process can read (VM_IO)".into()),
        Kind::Vdso => Method::InFreeze,
        Kind::Anon { shared, huge } => {
            let bit = match (shared, huge) {
                (false, false) => filter::ANON_PRIVATE,
                (true, false) => filter::ANON_SHARED,
                (false, true) => filter::HUGETLB_PRIVATE,
                (true, true) => filter::HUGETLB_SHARED,
            };
            if on(bit) {
                Method::WriteProtect
            } else {
                off("this kind of anonymous memory")
            }
        }
        Kind::File { shared: true } if on(filter::MAPPED_SHARED) => Method::InFreeze,
        Kind::File { shared: true } => off("shared file mappings"),
        Kind::File { shared: false } if on(filter::ANON_PRIVATE) && facts.written(m) => {
            Method::InFreeze
        }
        Kind::File { shared: false } if on(filter::MAPPED_PRIVATE) => Method::InFreeze,
        Kind::File { shared: false } if on(filter::ELF_HEADERS) && may_read && facts.elf(m) => {
            Method::ElfHeader
        }
        Kind::File { shared: false } => off("unwritten private file mappings"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::procfs::parse_maps;

    const MAPS: &str = "\
55d0a0000000-55d0a0002000 r--p 00000000 fd:01 123 /usr/bin/prog
55d0a0002000-55d0a0004000 r-xp 00002000 fd:01 123 /usr/bin/prog
55d0a0004000-55d0a0005000 rw-p 00004000 fd:01 123 /usr/bin/prog
55d0a1000000-55d0a1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 ---p 00000000 00:00 0
7f0000001000-7f0000800000 rw-p 00000000 00:00 0
7f0000800000-7f0000900000 rw-s 00000000 00:01 77 /memfd:shm (deleted)
7f0000900000-7f0000a00000 rw-s 00000000 fd:01 99 /var/data.bin
7f0000a00000-7f0000a01000 r--p 00000000 fd:01 124 /usr/lib/libc.so.6
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
7ffc00100000-7ffc00104000 r--p 00000000 00:00 0 [vvar]
7ffc00104000-7ffc00106000 r-xp 00000000 00:00 0 [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
";

    /// Written: every writable mapping; ELF: libc; the target's own uffd: `own` (start,
    /// resident bytes).
    struct Facts {
        own: Vec<(u64, u64)>,
        dont_dump: Vec<u64>,
        /// Mappings with one page populated (the others, all of it).
        sparse: Vec<u64>,
    }

    impl MapFacts for Facts {
        fn written(&self, m: &MapEntry) -> bool {
            m.perms.contains('w')
        }
        fn elf(&self, m: &MapEntry) -> bool {
            assert!(
                self.own_uffd(m).is_none(),
                "read a mapping registered with the target's own uffd"
            );
            m.name.ends_with(".6")
        }
        fn own_uffd(&self, m: &MapEntry) -> Option<u64> {
            self.own.iter().find(|(s, _)| *s == m.start).map(|x| x.1)
        }
        fn dont_dump(&self, m: &MapEntry) -> bool {
            self.dont_dump.contains(&m.start)
        }
        fn populated(&self, m: &MapEntry) -> u64 {
            if self.sparse.contains(&m.start) {
                PAGE_SIZE
            } else {
                m.end - m.start
            }
        }
    }

    fn methods(filter: u32, only: Option<&RangeSet>) -> Vec<(u64, Method)> {
        methods_with(filter, only, Vec::new())
    }

    fn methods_with(
        filter: u32,
        only: Option<&RangeSet>,
        own: Vec<(u64, u64)>,
    ) -> Vec<(u64, Method)> {
        let maps = parse_maps(MAPS);
        let facts = Facts {
            own,
            dont_dump: Vec::new(),
            sparse: Vec::new(),
        };
        plan(&maps, filter, only, &facts)
            .into_iter()
            .map(|p| (p.map.start, p.method))
            .collect()
    }

    #[test]
    fn memory_the_target_registered_itself_is_read_only_where_populated() {
        let own = vec![
            (0x7f0000001000, 1 << 20),
            (0x7f0000800000, IN_FREEZE_LIMIT + 1),
            (0x7f0000a00000, 4096),
            (0x55d0a0000000, 0),
        ];
        let m = methods_with(filter::DEFAULT, None, own);
        let of = |a: u64| m.iter().find(|(s, _)| *s == a).unwrap().1.clone();
        assert!(
            matches!(of(0x7f0000001000), Method::InFreezePopulated(_)),
            "anonymous, 1 MiB resident"
        );
        assert!(
            matches!(of(0x7f0000800000), Method::Skipped(ref why) if why.contains("resident")),
            "too much resident to copy in the freeze"
        );
        assert!(
            matches!(of(0x7f0000a00000), Method::Omitted(_)),
            "libc's first page is not read for its ELF header"
        );
        assert!(
            matches!(of(0x55d0a0000000), Method::Omitted(_)),
            "the filter still decides first"
        );
        assert_eq!(of(0x55d0a1000000), Method::WriteProtect, "others unchanged");
    }

    #[test]
    fn a_piece_cut_by_a_range_keeps_what_smaps_says_of_its_whole_mapping() {
        // The middle of an anonymous mapping the target registered itself.
        let only = RangeSet::single(Range::from_bounds(0x7f0000100000, 0x7f0000200000));
        let m = methods_with(
            filter::DEFAULT,
            Some(&only),
            vec![(0x7f0000001000, 1 << 20)],
        );
        let of = |a: u64| m.iter().find(|(s, _)| *s == a).unwrap().1.clone();
        assert!(
            matches!(of(0x7f0000100000), Method::InFreezePopulated(_)),
            "never registered for WP, never read with process_vm_readv"
        );
        let prog = &parse_maps(MAPS)[0];
        let second_page = RangeSet::single(Range::from_bounds(0x55d0a0001000, 0x55d0a0002000));
        let pieces = clip(prog, Some(&second_page));
        assert_eq!(
            pieces[1].offset, 0x1000,
            "a file piece maps the file from further in"
        );
    }

    #[test]
    fn what_the_target_marked_dontdump_is_left_out_but_the_vdso() {
        let maps = parse_maps(MAPS);
        let facts = Facts {
            own: Vec::new(),
            dont_dump: vec![0x7f0000001000, 0x7ffc00104000, 0x55d0a0004000],
            sparse: Vec::new(),
        };
        let all = filter::DEFAULT | filter::MAPPED_PRIVATE | filter::MAPPED_SHARED;
        let p = plan(&maps, all, None, &facts);
        let of = |a: u64| p.iter().find(|x| x.map.start == a).unwrap().method.clone();
        assert!(
            matches!(of(0x7f0000001000), Method::Omitted(ref why) if why.contains("DONTDUMP")),
            "anonymous"
        );
        assert!(matches!(of(0x55d0a0004000), Method::Omitted(_)), ".data");
        assert_eq!(of(0x7ffc00104000), Method::InFreeze, "the vDSO always");
        assert_eq!(of(0x55d0a1000000), Method::WriteProtect, "[heap] unmarked");
        // A piece cut by --range asks about its whole mapping.
        let only = RangeSet::single(Range::from_bounds(0x7f0000100000, 0x7f0000200000));
        let p = plan(&maps, all, Some(&only), &facts);
        assert!(
            p.iter()
                .filter(|x| (0x7f0000001000..0x7f0000800000).contains(&x.map.start))
                .all(|x| matches!(x.method, Method::Omitted(_)))
        );
    }

    #[test]
    fn sparse_private_anonymous_memory_is_protected_where_populated() {
        let maps = parse_maps(MAPS);
        let facts = Facts {
            own: Vec::new(),
            dont_dump: Vec::new(),
            sparse: vec![0x7f0000001000, 0x7f0000800000, 0x7ffc00000000],
        };
        let p = plan(&maps, filter::DEFAULT, None, &facts);
        let of = |a: u64| p.iter().find(|x| x.map.start == a).unwrap();
        let anon = of(0x7f0000001000);
        assert!(
            matches!(anon.method, Method::WriteProtectPopulated(ref why) if why.contains("4 KiB of its 8188 KiB")),
            "{:?}",
            anon.method
        );
        assert!(anon.method.write_protected());
        assert_eq!(anon.dump_bytes(), 0x7ff000, "the core holds all of it");
        assert_eq!(anon.held, PAGE_SIZE + 0x7ff, "one page and its page states");
        assert_eq!(
            of(0x7f0000800000).method,
            Method::WriteProtect,
            "shared memory can hold pages with nothing mapped"
        );
        assert!(matches!(
            of(0x7ffc00000000).method,
            Method::WriteProtectPopulated(_)
        ));
        let heap = of(0x55d0a1000000);
        assert_eq!(heap.method, Method::WriteProtect, "populated");
        assert_eq!(heap.held, 0x21000 + 0x21);
        // A piece of a sparse mapping is judged by its mapping.
        let only = RangeSet::single(Range::from_bounds(0x7f0000100000, 0x7f0000200000));
        let p = plan(&maps, filter::DEFAULT, Some(&only), &facts);
        let piece = p.iter().find(|x| x.map.start == 0x7f0000100000).unwrap();
        assert!(matches!(piece.method, Method::WriteProtectPopulated(_)));
        assert_eq!(piece.held, PAGE_SIZE + 0x100);
    }

    #[test]
    fn the_default_filter_follows_the_kernel() {
        let m = methods(filter::DEFAULT, None);
        let of = |a: u64| m.iter().find(|(s, _)| *s == a).unwrap().1.clone();
        assert_eq!(
            of(0x55d0a0000000),
            Method::Omitted("coredump_filter leaves out unwritten private file mappings".into())
        );
        assert_eq!(
            of(0x55d0a0004000),
            Method::InFreeze,
            ".data: written private file memory"
        );
        assert_eq!(of(0x55d0a1000000), Method::WriteProtect, "[heap]");
        assert_eq!(
            of(0x7f0000000000),
            Method::Omitted("not readable".into()),
            "a guard page"
        );
        assert_eq!(of(0x7f0000001000), Method::WriteProtect, "anonymous");
        assert_eq!(
            of(0x7f0000800000),
            Method::WriteProtect,
            "memfd: anonymous shared"
        );
        assert!(
            matches!(of(0x7f0000900000), Method::Omitted(_)),
            "shared file: bit 3 off"
        );
        assert_eq!(
            of(0x7f0000a00000),
            Method::ElfHeader,
            "a library's first page"
        );
        assert_eq!(of(0x7ffc00000000), Method::WriteProtect, "[stack]");
        assert!(matches!(of(0x7ffc00100000), Method::Skipped(_)), "[vvar]");
        assert_eq!(of(0x7ffc00104000), Method::InFreeze, "[vdso]");
        assert!(
            matches!(of(0xffffffffff600000), Method::Omitted(_)),
            "[vsyscall] is --xp"
        );
    }

    #[test]
    fn filter_bits_turn_kinds_on_and_off() {
        let m = methods(filter::MAPPED_SHARED | filter::MAPPED_PRIVATE, None);
        let of = |a: u64| m.iter().find(|(s, _)| *s == a).unwrap().1.clone();
        assert!(
            matches!(of(0x55d0a1000000), Method::Omitted(_)),
            "anon private off"
        );
        assert_eq!(of(0x7f0000900000), Method::InFreeze, "shared file on");
        assert_eq!(
            of(0x55d0a0000000),
            Method::PreCopied,
            "private file on: read-only and unwritten, copied before the freeze"
        );
        assert_eq!(
            of(0x55d0a0004000),
            Method::InFreeze,
            "private file on: writable, copied in the freeze"
        );
    }

    #[test]
    fn a_range_narrows_and_splits_mappings() {
        let r = Range::from_bounds(0x7f0000100000, 0x7f0000200000);
        let m = methods(filter::DEFAULT, Some(&RangeSet::single(r)));
        let anon: Vec<_> = m
            .iter()
            .filter(|(s, _)| (0x7f0000001000..0x7f0000800000).contains(s))
            .collect();
        assert_eq!(anon.len(), 3, "before, inside, after: {anon:?}");
        assert_eq!(anon[1], &(r.start(), Method::WriteProtect));
        assert!(matches!(anon[0].1, Method::Omitted(_)));
        assert!(matches!(anon[2].1, Method::Omitted(_)));
        assert!(
            m.iter()
                .filter(|(s, _)| *s == 0x55d0a1000000)
                .all(|(_, x)| matches!(x, Method::Omitted(_))),
            "the heap is outside the range"
        );
    }
}

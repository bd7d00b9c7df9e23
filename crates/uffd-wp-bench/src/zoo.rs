//! A richer dump target: writer threads keep versioned page records (as in
//! [`crate::workload`]) in every kind of memory a process has, and the process changes its
//! mappings when told to.
//!
//! Kinds ("slabs"): a private anonymous region (`anon`), a static in `.data` (`data`), a
//! zeroed static in `.bss` (`bss`), the heap (`heap`, a `Box`), a `MAP_SHARED` anonymous region
//! (`shared-anon`), a memfd (`memfd`), 2 MiB of a private file mapping (`file-private`), each writer's own stack (`stack-N`), and slabs made for
//! the mapping changes (`unmap`, `move`, `grow`, `dontneed`, `thread`, and those `mmap` adds).
//!
//! Everything the oracle needs is in the process's memory, so a dump is checked against
//! itself: a directory of slabs on the heap ([`Zoo::directory_addr`], [`DIR_WORDS`] words per
//! entry: state, kind, base, pages, version table) and one version table per slab. A slab
//! being changed is marked [`CHANGING`] first (the oracle skips it), and the writers never
//! touch a slab while it changes (a lock per slab).
//!
//! Optionally, spinner threads ([`ZooConfig::spinners`], [`crate::sys::spin`]) hold chosen
//! values in `rbx` and `r12`-`r15` at every instant, with `rip` inside a known loop and a known
//! `rsp` ([`Zoo::spinners`]): the register oracle of a dump.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::mm::Advice;
use serde::Serialize;
use uffd_wp::range::PAGE_SIZE;
use uffd_wp::seam::RegisterMode;
use uffd_wp::sys::Errno;
use uffd_wp::sys::mem::{Backing, Mapping, Thp};
use uffd_wp::sys::uffd::Uffd;

use crate::workload::{PageVerdict, check_page, fill};

const WORDS: usize = (PAGE_SIZE / 8) as usize;

/// Directory slots.
pub const MAX_SLABS: usize = 64;
/// Words per directory entry: state, kind, base, pages, version table address.
pub const DIR_WORDS: usize = 5;
/// A directory entry's state: unused.
pub const EMPTY: u64 = 0;
/// Live: the slab's pages hold what its version table says.
pub const LIVE: u64 = 1;
/// Being changed (unmapped, moved, dropped): the oracle skips it.
pub const CHANGING: u64 = 2;
/// Gone (unmapped, or its thread exited).
pub const DEAD: u64 = 3;

/// The kinds of memory, as the directory codes them.
pub const KINDS: [&str; 9] = [
    "anon",
    "data",
    "bss",
    "heap",
    "shared-anon",
    "memfd",
    "stack",
    "changes",
    "file-private",
];

/// One page of words, page aligned (statics, heap, stacks).
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct PageWords([AtomicU64; WORDS]);

impl PageWords {
    const fn zero() -> PageWords {
        PageWords([const { AtomicU64::new(0) }; WORDS])
    }
    fn write(&self, v: u64, p: u64) {
        self.0[0].store(v, Ordering::Relaxed);
        self.0[1].store(p, Ordering::Relaxed);
        for (i, w) in self.0.iter().enumerate().skip(2) {
            w.store(fill(v, p, i as u64), Ordering::Relaxed);
        }
    }
}

const DATA_PAGES: usize = 4;
const fn data_page() -> PageWords {
    let mut p = PageWords::zero();
    // Non-zero, so that the static is initialised data (`.data`), not `.bss`.
    p.0[WORDS - 1] = AtomicU64::new(0x5eed);
    p
}
static DATA: [PageWords; DATA_PAGES] = [const { data_page() }; DATA_PAGES];
static BSS: [PageWords; DATA_PAGES] = [const { PageWords::zero() }; DATA_PAGES];
/// The statics are one process's: one zoo at a time.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Where a slab's pages are.
#[derive(Debug)]
enum Mem {
    Words(&'static [PageWords]),
    Map(Mapping),
    /// A thread's stack: written by that thread only.
    Stack,
    /// Unmapped.
    Gone,
}

/// A slab: its memory, its directory slot and its version table.
#[derive(Debug)]
struct Slab {
    name: String,
    slot: usize,
    mem: RwLock<Mem>,
    versions: &'static [AtomicU64],
    /// Writer that owns its pages (stacks), or any.
    owner: Option<u64>,
}

/// How to build a zoo.
#[derive(Debug, Clone, Copy)]
pub struct ZooConfig {
    /// The `anon` region's size in bytes.
    pub anon: u64,
    /// Writer threads.
    pub writers: usize,
    /// Spinner threads (registers known at every instant): the even ones spin in user mode,
    /// the odd ones sleep 1 ms per round in `nanosleep(2)`.
    pub spinners: usize,
}

/// A spinner thread's registers, loop and stack, as it recorded them.
#[derive(Debug, Clone, Serialize)]
pub struct SpinnerRecord {
    /// Its thread id.
    pub tid: i32,
    /// `spin` (user mode) or `sleep` (mostly in `nanosleep(2)`).
    pub how: &'static str,
    /// The values of `rbx`, `r12`, `r13`, `r14`, `r15`.
    pub rbx: u64,
    /// `r12`.
    pub r12: u64,
    /// `r13`.
    pub r13: u64,
    /// `r14`.
    pub r14: u64,
    /// `r15`.
    pub r15: u64,
    /// `rip` is in `loop_start..loop_end` at every instant.
    pub loop_start: u64,
    /// The end of the loop.
    pub loop_end: u64,
    /// `rsp` in the loop.
    pub rsp: u64,
    /// The address of a local variable of the thread (taken by Rust code, not the loop): its
    /// stack mapping is the one holding this address.
    pub stack_local: u64,
}

/// A running spinner.
#[derive(Debug)]
struct Spinner {
    record: SpinnerRecord,
    stop: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

/// The values spinner `i` loads into `rbx`, `r12`..`r15`: distinct per thread and register.
pub fn spinner_regs(i: usize) -> [u64; 5] {
    let i = i as u64;
    core::array::from_fn(|k| 0x5a17_0000_0000_0000 | (i + 1) << 32 | (k as u64 + 1) << 16 | 0xbeef)
}

/// The running zoo.
#[derive(Debug)]
pub struct Zoo {
    dir: &'static [AtomicU64],
    slabs: Arc<RwLock<Vec<Arc<Slab>>>>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    writers: usize,
    /// The transient thread (`thread-start`/`thread-exit`).
    transient: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
    next_slot: Mutex<usize>,
    spinners: Vec<Spinner>,
    /// Children of `fork-sleep`, killed and reaped when dropped.
    sleepers: Mutex<Vec<crate::sys::fork::SleepingChild>>,
    /// Memory of `own-uffd` and the userfaultfd it is registered with.
    own_uffd: Mutex<Vec<(Uffd, Mapping)>>,
    /// `file-churn`'s mapping and writer.
    churn: Mutex<Option<Churn>>,
}

/// The `file-churn` mapping, kept mapped, and its writer thread.
#[derive(Debug)]
struct Churn {
    _map: Mapping,
    stop: Arc<AtomicBool>,
    writer: JoinHandle<()>,
}

/// Pages of the `file-churn` file.
pub const CHURN_PAGES: u64 = 8;
/// The `file-churn` writer's next value, stored before each `pwrite(2)` of it.
static CHURN_NEXT: AtomicU64 = AtomicU64::new(0);

/// The value after `n` in the `file-churn` sequence 1, 2, ..., 255, 1, ...
pub fn churn_after(n: u8) -> u8 {
    n.wrapping_add(1).max(1)
}

/// What `own-uffd` writes over the resident half of its memory.
pub const OWN_UFFD_BYTE: u8 = 0x5a;
/// Pages of `own-uffd` memory: the first half resident, the second half missing.
pub const OWN_UFFD_PAGES: u64 = 16;

/// What an operation did.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    /// The slab's address after the operation (for `mmap`, `mremap`), or the address it had.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The address before (`mremap`).
    pub from: u64,
}

fn leak_table(n: usize) -> &'static [AtomicU64] {
    Box::leak(
        (0..n)
            .map(|_| AtomicU64::new(0))
            .collect::<Box<[AtomicU64]>>(),
    )
}

impl Zoo {
    /// Builds every slab, writes version 1 of every page, starts the writers.
    pub fn start(cfg: ZooConfig) -> Result<Zoo, Errno> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return Err(Errno::BUSY);
        }
        let dir = leak_table(MAX_SLABS * DIR_WORDS);
        let mut z = Zoo {
            dir,
            slabs: Arc::new(RwLock::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            writes: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
            writers: cfg.writers.max(1),
            transient: Mutex::new(None),
            next_slot: Mutex::new(0),
            spinners: Vec::new(),
            sleepers: Mutex::new(Vec::new()),
            own_uffd: Mutex::new(Vec::new()),
            churn: Mutex::new(None),
        };
        // The change slabs first: mmap places later mappings below them, so a dump's copier
        // (in address order) reaches them last.
        // Shared memory a child writes during the copy (`fork-write-shared`): the very last.
        z.add_map("shared-late", 4, 8 * PAGE_SIZE, Backing::SharedAnon)?;
        for name in ["unmap", "move", "grow", "dontneed"] {
            z.add_map(name, 7, 8 * PAGE_SIZE, Backing::Anon)?;
        }
        z.add_map("anon", 0, cfg.anon, Backing::Anon)?;
        z.add_map("shared-anon", 4, 8 * PAGE_SIZE, Backing::SharedAnon)?;
        z.add_map("memfd", 5, 8 * PAGE_SIZE, Backing::Memfd)?;
        // Written private file memory large enough to be pre-copied with its writes tracked
        // (a JVM's CDS archive): the kernel will not sync-write-protect it.
        z.add_map("file-private", 8, 2 << 20, Backing::File { shared: false })?;
        z.add_words("data", 1, &DATA);
        z.add_words("bss", 2, &BSS);
        let heap: &'static [PageWords] = Box::leak(
            (0..8)
                .map(|_| PageWords::zero())
                .collect::<Box<[PageWords]>>(),
        );
        z.add_words("heap", 3, heap);
        for s in z.slabs.read().expect("slabs").iter() {
            for p in 0..s.pages() {
                s.write_page(p, None);
            }
        }
        for id in 0..z.writers as u64 {
            let slot = z.slot();
            let (slabs, stop, writes) = (z.slabs.clone(), z.stop.clone(), z.writes.clone());
            let (dir, n) = (z.dir, z.writers as u64);
            let (tx, rx) = std::sync::mpsc::channel();
            z.threads.push(std::thread::spawn(move || {
                writer(id, n, (dir, slot), &slabs, &stop, &writes, Some(tx))
            }));
            rx.recv_timeout(Duration::from_secs(10))
                .map_err(|_| Errno::TIMEDOUT)?;
        }
        for i in 0..cfg.spinners {
            z.spinners.push(start_spinner(i)?);
        }
        Ok(z)
    }

    /// The spinner threads' records.
    pub fn spinners(&self) -> Vec<SpinnerRecord> {
        self.spinners.iter().map(|s| s.record.clone()).collect()
    }

    fn slot(&self) -> usize {
        let mut n = self.next_slot.lock().expect("slots");
        *n += 1;
        (*n - 1).min(MAX_SLABS - 1)
    }

    fn publish(dir: &[AtomicU64], slot: usize, kind: u64, base: u64, pages: u64, table: u64) {
        let e = &dir[slot * DIR_WORDS..(slot + 1) * DIR_WORDS];
        e[0].store(CHANGING, Ordering::SeqCst);
        e[1].store(kind, Ordering::SeqCst);
        e[2].store(base, Ordering::SeqCst);
        e[3].store(pages, Ordering::SeqCst);
        e[4].store(table, Ordering::SeqCst);
        e[0].store(LIVE, Ordering::SeqCst);
    }

    fn set_state(&self, slot: usize, state: u64) {
        self.dir[slot * DIR_WORDS].store(state, Ordering::SeqCst);
    }

    fn add(&self, name: &str, kind: u64, mem: Mem, base: u64, pages: u64, cap: u64) -> usize {
        let slot = self.slot();
        let versions = leak_table(cap as usize);
        Self::publish(self.dir, slot, kind, base, pages, versions.as_ptr() as u64);
        self.slabs.write().expect("slabs").push(Arc::new(Slab {
            name: name.to_string(),
            slot,
            mem: RwLock::new(mem),
            versions,
            owner: None,
        }));
        slot
    }

    fn add_map(&self, name: &str, kind: u64, len: u64, b: Backing) -> Result<u64, Errno> {
        let m = Mapping::new(len, PAGE_SIZE, b, Thp::NoHuge)?;
        let base = m.range().start();
        // Room for `grow` to double.
        self.add(
            name,
            kind,
            Mem::Map(m),
            base,
            len / PAGE_SIZE,
            2 * len / PAGE_SIZE,
        );
        Ok(base)
    }

    fn add_words(&self, name: &str, kind: u64, w: &'static [PageWords]) {
        let base = w.as_ptr() as u64;
        self.add(
            name,
            kind,
            Mem::Words(w),
            base,
            w.len() as u64,
            w.len() as u64,
        );
    }

    /// The directory's address ([`MAX_SLABS`] entries of [`DIR_WORDS`] words).
    pub fn directory_addr(&self) -> u64 {
        self.dir.as_ptr() as u64
    }

    /// Threads that may be mid-write at any instant (the writers and the transient thread).
    pub fn max_writers(&self) -> u64 {
        self.writers as u64 + 1
    }

    /// Each live slab's name and address (the stacks' included).
    pub fn slab_addrs(&self) -> Vec<(String, u64)> {
        self.slabs
            .read()
            .expect("slabs")
            .iter()
            .map(|s| {
                let a = self.dir[s.slot * DIR_WORDS + 2].load(Ordering::SeqCst);
                (s.name.clone(), a)
            })
            .collect()
    }

    /// Page writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn find(&self, name: &str) -> Result<Arc<Slab>, Errno> {
        self.slabs
            .read()
            .expect("slabs")
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or(Errno::NOENT)
    }

    /// Runs one operation on the process's mappings: `munmap`, `mremap-move`, `mremap-grow`,
    /// `dontneed` (each on the slab of that name), `mmap` (a new slab), `fork` (a child that
    /// writes its copy of `anon` and exits), `fork-write-shared` (a child that writes the first
    /// page of `shared-late`, memory it shares with this process, and exits), `fork-sleep` (a
    /// child that sleeps, mapping the
    /// shared slabs too, until `end-sleepers`; its pid in `addr`), `thread-start`,
    /// `thread-exit`, `touch-all` (every live page written once: the process can write
    /// everywhere), `own-uffd` (memory registered with a userfaultfd of the process's own:
    /// [`Zoo::own_uffd`]), `file-churn` (a file mapped read-only that a thread keeps
    /// rewriting: [`Zoo::file_churn`]).
    pub fn op(&self, op: &str) -> Result<OpReport, Errno> {
        match op {
            "munmap" => self.change("unmap", |m, _| {
                *m = Mem::Gone; // drops the mapping: munmap
                Ok(DEAD)
            }),
            "mremap-move" => self.change("move", |m, s| remap(m, s, 1)),
            "mremap-grow" => self.change("grow", |m, s| remap(m, s, 2)),
            "dontneed" => self.change("dontneed", |m, s| {
                let Mem::Map(map) = m else {
                    return Err(Errno::INVAL);
                };
                map.madvise(map.range(), Advice::LinuxDontNeed)?;
                for v in s.versions {
                    v.store(0, Ordering::SeqCst);
                }
                Ok(LIVE)
            }),
            "mmap" => {
                let n = self.slabs.read().expect("slabs").len();
                let addr = self.add_map(&format!("mmap-{n}"), 7, 4 * PAGE_SIZE, Backing::Anon)?;
                Ok(OpReport {
                    addr,
                    len: 4 * PAGE_SIZE,
                    from: addr,
                })
            }
            "fork" => self.fork_writer("anon", 64 << 10),
            // Shared: the child's bytes land in this process's page too, behind the version
            // table's back; a dump must hold the page as it was at its freeze.
            "fork-write-shared" => self.fork_writer("shared-late", PAGE_SIZE),
            "fork-sleep" | "end-sleepers" => self.sleepers(op),
            "own-uffd" => self.own_uffd(),
            "file-churn" => self.file_churn(),
            "thread-start" => self.thread_start(),
            "thread-exit" => self.thread_exit(),
            "touch-all" => {
                let slabs = self.slabs.read().expect("slabs").clone();
                let mut n = 0;
                for s in slabs.iter().filter(|s| s.owner.is_none()) {
                    for p in 0..s.pages() {
                        n += u64::from(s.write_page(p, None));
                    }
                }
                Ok(OpReport {
                    addr: 0,
                    len: n * PAGE_SIZE,
                    from: 0,
                })
            }
            _ => Err(Errno::INVAL),
        }
    }

    /// [`OWN_UFFD_PAGES`] pages of anonymous memory registered for missing faults with a
    /// userfaultfd of the process's own, as a VMM or a lazy-restored process has: the first
    /// half holds [`OWN_UFFD_BYTE`], the second half is missing. Nothing serves its faults, so
    /// nothing here touches it again (it is not a slab). Where it is in `addr`.
    fn own_uffd(&self) -> Result<OpReport, Errno> {
        let len = OWN_UFFD_PAGES * PAGE_SIZE;
        let m = Mapping::new(len, PAGE_SIZE, Backing::Anon, Thp::NoHuge)?;
        let start = m.range().start();
        m.write(start, &vec![OWN_UFFD_BYTE; (len / 2) as usize])?;
        // Not UFFD_USER_MODE_ONLY: a VMM's uffd also takes the kernel's own accesses (a
        // remote read of a missing page then waits for the handler instead of failing).
        let u = Uffd::create(false, false)?;
        u.api(0)?;
        u.register(start, len, RegisterMode::MISSING.0)?;
        self.own_uffd.lock().expect("own uffd").push((u, m));
        Ok(OpReport {
            addr: start,
            len,
            from: start,
        })
    }

    /// A new file of [`CHURN_PAGES`] pages mapped read-only and private, and a thread that
    /// rewrites the whole file every millisecond with one `pwrite(2)`, every byte the same
    /// value ([`churn_after`] the last), stored first in a static. Wherever the process is
    /// stopped, every byte of the mapping is equal, and the static holds that value or the
    /// next. The mapping is in `addr`, the static (a `u64`) in `from`.
    fn file_churn(&self) -> Result<OpReport, Errno> {
        let len = CHURN_PAGES * PAGE_SIZE;
        let mut m = Mapping::new(len, PAGE_SIZE, Backing::File { shared: false }, Thp::NoHuge)?;
        let fd = rustix::io::dup(m.file().ok_or(Errno::INVAL)?)?;
        rustix::io::pwrite(&fd, &vec![1u8; len as usize], 0)?;
        m.make_read_only()?;
        let start = m.range().start();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut n: u8 = 1;
            while !s.load(Ordering::Relaxed) {
                n = churn_after(n);
                CHURN_NEXT.store(u64::from(n), Ordering::SeqCst);
                let _ = rustix::io::pwrite(&fd, &vec![n; len as usize], 0);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        *self.churn.lock().expect("churn") = Some(Churn {
            _map: m,
            stop,
            writer,
        });
        Ok(OpReport {
            addr: start,
            len,
            from: &CHURN_NEXT as *const AtomicU64 as u64,
        })
    }

    /// Changes slab `name` under its lock, marked [`CHANGING`] meanwhile; `f` returns the
    /// state after.
    fn change(
        &self,
        name: &str,
        f: impl FnOnce(&mut Mem, &Slab) -> Result<u64, Errno>,
    ) -> Result<OpReport, Errno> {
        let s = self.find(name)?;
        let e = s.slot * DIR_WORDS;
        let from = self.dir[e + 2].load(Ordering::SeqCst);
        self.set_state(s.slot, CHANGING);
        let mut m = s.mem.write().expect("slab");
        let res = f(&mut m, &s);
        let (addr, len) = match &*m {
            Mem::Map(map) => (map.range().start(), map.range().len()),
            _ => (from, 0),
        };
        if let Mem::Map(_) = &*m {
            self.dir[e + 2].store(addr, Ordering::SeqCst);
            self.dir[e + 3].store(len / PAGE_SIZE, Ordering::SeqCst);
        }
        let state = *res.as_ref().unwrap_or(&LIVE);
        self.set_state(s.slot, state);
        res.map(|_| OpReport { addr, len, from })
    }

    /// A child that writes `0xcc` over the first `len` bytes of slab `name` (its copy of a
    /// private slab; the process's own page of a shared one) and exits, waited for.
    fn fork_writer(&self, name: &str, len: u64) -> Result<OpReport, Errno> {
        let s = self.find(name)?;
        let m = s.mem.read().expect("slab");
        let Mem::Map(map) = &*m else {
            return Err(Errno::INVAL);
        };
        let a = map.range().start();
        let len = len.min(map.range().len());
        crate::sys::fork::fork_write_exit(map, a, len, 0xcc, Duration::from_secs(20))?;
        Ok(OpReport {
            addr: a,
            len,
            from: a,
        })
    }

    /// `fork-sleep` (one more sleeping child, its pid in `addr`) or `end-sleepers`.
    fn sleepers(&self, op: &str) -> Result<OpReport, Errno> {
        let mut all = self.sleepers.lock().expect("sleepers");
        let mut addr = 0;
        if op == "fork-sleep" {
            let child = crate::sys::fork::SleepingChild::fork()?;
            addr = child.pid().into();
            all.push(child);
        } else {
            all.clear();
        }
        Ok(OpReport {
            addr,
            len: 0,
            from: 0,
        })
    }

    fn thread_start(&self) -> Result<OpReport, Errno> {
        let mut t = self.transient.lock().expect("transient");
        if t.is_some() {
            return Err(Errno::EXIST);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let slot = self.slot();
        let (slabs, st, writes) = (self.slabs.clone(), stop.clone(), self.writes.clone());
        let dir = self.dir;
        let id = self.writers as u64; // owns nothing shared: its stack only
        let (tx, rx) = std::sync::mpsc::channel();
        let h =
            std::thread::spawn(move || writer(id, 0, (dir, slot), &slabs, &st, &writes, Some(tx)));
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| Errno::TIMEDOUT)?;
        *t = Some((stop, h));
        Ok(OpReport {
            addr,
            len: STACK_PAGES as u64 * PAGE_SIZE,
            from: addr,
        })
    }

    fn thread_exit(&self) -> Result<OpReport, Errno> {
        let (stop, h) = self
            .transient
            .lock()
            .expect("transient")
            .take()
            .ok_or(Errno::NOENT)?;
        stop.store(true, Ordering::Release);
        let _ = h.join();
        Ok(OpReport {
            addr: 0,
            len: 0,
            from: 0,
        })
    }
}

/// Starts spinner `i` and waits (bounded) until its loop runs.
fn start_spinner(i: usize) -> Result<Spinner, Errno> {
    use crate::sys::spin::{Loop, Recorded, spin};
    let how = if i % 2 == 0 { Loop::Spin } else { Loop::Sleep };
    let regs = spinner_regs(i);
    let stop = Arc::new(AtomicU64::new(0));
    let rec = Arc::new(Recorded::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (st, r) = (stop.clone(), rec.clone());
    let thread = std::thread::spawn(move || {
        let local = 0u64;
        let _ = tx.send((
            rustix::thread::gettid().as_raw_nonzero().get(),
            std::hint::black_box(&local) as *const u64 as u64,
        ));
        if let Err(e) = spin(regs, how, &r, &st) {
            eprintln!("zoo: spinner {i}: {e}");
        }
    });
    let (tid, stack_local) = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| Errno::TIMEDOUT)?;
    let t0 = std::time::Instant::now();
    while rec.ready.load(Ordering::SeqCst) == 0 {
        if thread.is_finished() {
            return Err(Errno::NOSYS);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(Errno::TIMEDOUT);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let record = SpinnerRecord {
        tid,
        how: if how == Loop::Spin { "spin" } else { "sleep" },
        rbx: regs[0],
        r12: regs[1],
        r13: regs[2],
        r14: regs[3],
        r15: regs[4],
        loop_start: rec.loop_start.load(Ordering::SeqCst),
        loop_end: rec.loop_end.load(Ordering::SeqCst),
        rsp: rec.rsp.load(Ordering::SeqCst),
        stack_local,
    };
    Ok(Spinner {
        record,
        stop,
        thread,
    })
}

impl Drop for Zoo {
    fn drop(&mut self) {
        for s in self.spinners.drain(..) {
            s.stop.store(1, Ordering::Release);
            let _ = s.thread.join();
        }
        let _ = self.thread_exit();
        if let Some(c) = self.churn.lock().expect("churn").take() {
            c.stop.store(true, Ordering::Release);
            let _ = c.writer.join();
        }
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Moves the mapping (and doubles it when `factor` is 2); new pages are zero (version 0).
fn remap(m: &mut Mem, _s: &Slab, factor: u64) -> Result<u64, Errno> {
    let Mem::Map(map) = m else {
        return Err(Errno::INVAL);
    };
    let len = map.range().len() * factor;
    map.move_and_resize(len)?;
    Ok(LIVE)
}

impl Slab {
    fn pages(&self) -> u64 {
        match &*self.mem.read().expect("slab") {
            Mem::Words(w) => w.len() as u64,
            Mem::Map(m) => m.range().len() / PAGE_SIZE,
            Mem::Stack | Mem::Gone => 0,
        }
    }

    /// Writes the next version of page `p` (or into `stack`), then records it. False if the
    /// slab is gone or `p` is past its end.
    fn write_page(&self, p: u64, stack: Option<&[PageWords]>) -> bool {
        let m = self.mem.read().expect("slab");
        let Some(ver) = self.versions.get(p as usize) else {
            return false;
        };
        let v = ver.load(Ordering::Relaxed) + 1;
        let ok = match (&*m, stack) {
            (Mem::Words(w), _) => w.get(p as usize).map(|pg| pg.write(v, p)).is_some(),
            (Mem::Map(map), _) if p < map.range().len() / PAGE_SIZE => map
                .write(
                    map.range().start() + p * PAGE_SIZE,
                    &crate::workload::page_image(v, p),
                )
                .is_ok(),
            (Mem::Stack, Some(st)) => st.get(p as usize).map(|pg| pg.write(v, p)).is_some(),
            _ => false,
        };
        if ok {
            ver.store(v, Ordering::Release);
        }
        ok
    }
}

const STACK_PAGES: usize = 4;

/// Writer `id` of `n` (`n` 0: its stack only): each round writes a page of its stack, then a
/// page it owns (`p % n == id`) of a random slab. Its stack slab is published at `slot`, and
/// its address sent on `ready`.
fn writer(
    id: u64,
    n: u64,
    (dir, slot): (&'static [AtomicU64], usize),
    slabs: &RwLock<Vec<Arc<Slab>>>,
    stop: &AtomicBool,
    writes: &AtomicU64,
    ready: Option<std::sync::mpsc::Sender<u64>>,
) {
    let stack = [const { PageWords::zero() }; STACK_PAGES];
    let base = stack.as_ptr() as u64;
    let me = Arc::new(Slab {
        name: format!("stack-{id}"),
        slot,
        mem: RwLock::new(Mem::Stack),
        versions: leak_table(STACK_PAGES),
        owner: Some(id),
    });
    for p in 0..STACK_PAGES as u64 {
        me.write_page(p, Some(&stack));
    }
    Zoo::publish(
        dir,
        slot,
        6,
        base,
        STACK_PAGES as u64,
        me.versions.as_ptr() as u64,
    );
    slabs.write().expect("slabs").push(me.clone());
    if let Some(tx) = ready {
        let _ = tx.send(base);
    }
    let mut seed = (id + 1).wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    while !stop.load(Ordering::Acquire) {
        me.write_page(next() % STACK_PAGES as u64, Some(&stack));
        writes.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        let s = {
            let all = slabs.read().expect("slabs");
            let shared: Vec<&Arc<Slab>> = all.iter().filter(|s| s.owner.is_none()).collect();
            // Half of the writes go to `anon` (the bulk), half to the small slabs.
            let pick = if next() % 2 == 0 {
                shared.iter().find(|s| s.name == "anon")
            } else {
                shared.get((next() % shared.len().max(1) as u64) as usize)
            };
            pick.map(|s| Arc::clone(s))
        };
        let Some(s) = s else { continue };
        let pages = s.pages();
        let mine = pages.saturating_sub(id).div_ceil(n);
        if mine == 0 {
            continue;
        }
        let p = (next() % mine) * n + id;
        if s.write_page(p, None) {
            writes.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Gone with its thread: its stack is no longer its record.
    dir[slot * DIR_WORDS].store(DEAD, Ordering::SeqCst);
    let _ = &stack;
}

/// What [`check`] found, per kind of memory and in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ZooVerdict {
    /// Pages holding the version their table records.
    pub consistent: u64,
    /// Pages caught mid-write (at most one per writer).
    pub in_flight: u64,
    /// Pages no single instant explains.
    pub inconsistent: u64,
    /// Pages the dump reports as not captured (skipped).
    pub not_captured: u64,
    /// Slabs skipped: being changed at the snapshot point.
    pub changing_slabs: u64,
    /// Per kind: (kind, pages checked, inconsistent).
    pub kinds: Vec<(String, u64, u64)>,
    /// The inconsistent pages: (slab base, page, expected, found) (at most 20).
    pub bad: Vec<(u64, u64, u64, u64)>,
}

/// Checks a capture of a zoo process against itself: the directory at `dir` (from the header)
/// and everything it points to are read with `read(addr, buf)` from the capture; pages for
/// which `captured(addr)` is false are skipped.
pub fn check(
    dir: u64,
    max_writers: u64,
    read: impl Fn(u64, &mut [u8]) -> bool,
    captured: impl Fn(u64) -> bool,
) -> ZooVerdict {
    let word = |a: u64| {
        let mut b = [0u8; 8];
        read(a, &mut b).then(|| u64::from_ne_bytes(b))
    };
    let mut v = ZooVerdict::default();
    let mut kinds: Vec<(String, u64, u64)> = KINDS.iter().map(|k| (k.to_string(), 0, 0)).collect();
    for slot in 0..MAX_SLABS as u64 {
        let e = dir + slot * DIR_WORDS as u64 * 8;
        let f = |i: u64| word(e + i * 8).unwrap_or(0);
        match f(0) {
            LIVE => {}
            CHANGING => {
                v.changing_slabs += 1;
                continue;
            }
            _ => continue,
        }
        let (kind, base, pages, table) = (f(1), f(2), f(3), f(4));
        let k = &mut kinds[(kind as usize).min(KINDS.len() - 1)];
        for p in 0..pages {
            let a = base + p * PAGE_SIZE;
            if !captured(a) {
                v.not_captured += 1;
                continue;
            }
            let expected = word(table + p * 8).unwrap_or(u64::MAX);
            let mut page = vec![0u8; PAGE_SIZE as usize];
            let verdict = if read(a, &mut page) {
                check_page(p, expected, &page)
            } else {
                PageVerdict::Torn
            };
            k.1 += 1;
            match verdict {
                PageVerdict::Consistent => v.consistent += 1,
                PageVerdict::WrongVersion { found, .. } if found == expected + 1 => {
                    v.in_flight += 1
                }
                PageVerdict::Torn => v.in_flight += 1,
                PageVerdict::WrongVersion { found, .. } => {
                    v.inconsistent += 1;
                    k.2 += 1;
                    if v.bad.len() < 20 {
                        v.bad.push((base, p, expected, found));
                    }
                }
            }
        }
    }
    if v.in_flight > max_writers {
        v.inconsistent += v.in_flight - max_writers;
        v.in_flight = max_writers;
    }
    v.kinds = kinds.into_iter().filter(|k| k.1 > 0).collect();
    v
}

//! `uffd-wp dump` of the zoo target (every kind of memory: anonymous, `.data`, `.bss`, heap,
//! `MAP_SHARED` anonymous, memfd, thread stacks), checked against the target's own record of
//! the snapshot point, which is inside the dump: while the process maps, unmaps, moves, grows,
//! drops memory, forks, starts and ends threads during the copy, and 50 times under load; gdb
//! reading the memory at known addresses and every thread's registers (spinner threads whose
//! registers are known at every instant) from a core.
//!
//! The dumps run in this test process through the library, so that a mapping change can be
//! made at a chosen moment: from the copier's progress callback, after the pause, with most of
//! the copy still to do (the copier waits for the target's answer). The register test and
//! the signal tests run `uffd-wp dump PID` itself: what a user runs, stopped by INT, TERM or
//! KILL in its copy.
//!
//! Needs root (ptrace and a uffd inside another process) and gdb: each test is skipped with a
//! message without them, or fails under `UFFD_WP_REQUIRE_KERNEL=1`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uffd_wp::dump::{self, Captured, DumpOptions};
use uffd_wp::helper::{Helper, Kind};
use uffd_wp::range::{PAGE_SIZE, Range};
use uffd_wp_bench::zoo::{self, DIR_WORDS, LIVE, ZooVerdict};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_uffd-wp");

fn skip(what: &str) -> bool {
    if std::env::var("UFFD_WP_REQUIRE_KERNEL").as_deref() == Ok("1") {
        panic!("dump test needs {what} (UFFD_WP_REQUIRE_KERNEL=1)");
    }
    eprintln!("SKIPPED dump test: needs {what}");
    true
}

fn not_root() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            l.split_whitespace().nth(2).map(|u| u == "0")
        })
        .unwrap_or(false);
    !root && skip("root")
}

/// A zoo process (killed when dropped).
struct Target {
    h: Helper,
    pid: u32,
    dir: u64,
    max_writers: u64,
}

impl Target {
    fn start(anon: u64, writers: usize) -> Target {
        Target::start_with(anon, writers, 0).0
    }

    /// A zoo with `spinners` spinner threads too; also returns its header.
    fn start_with(anon: u64, writers: usize, spinners: usize) -> (Target, Value) {
        let cfg = json!({"size": anon, "threads": writers, "zoo": true, "spinners": spinners});
        let mut h = Helper::spawn(Path::new(BIN), &[], Kind::Workload, &cfg).unwrap();
        let head: Value = h.recv(Duration::from_secs(60)).unwrap();
        let t = Target {
            pid: head["pid"].as_u64().unwrap() as u32,
            dir: head["directory"].as_u64().unwrap(),
            max_writers: head["max_writers"].as_u64().unwrap(),
            h,
        };
        (t, head)
    }

    /// Runs one operation in the target, bounded.
    fn op(&mut self, op: &str) -> Value {
        self.h.send(&json!({ "op": op })).unwrap();
        let r: Value = self.h.recv(Duration::from_secs(60)).unwrap();
        assert_eq!(r["ok"], true, "{op}: {r}");
        r
    }

    /// Dumps the target; `during` runs in it at the copier's first progress call.
    fn dump(&mut self, during: &[&str]) -> (Captured, Vec<Value>, Duration) {
        let mut replies = Vec::new();
        let t0 = Instant::now();
        let pid = self.pid;
        let cap = dump::capture(pid, &DumpOptions::default(), |done, _| {
            if done > 0 && replies.is_empty() {
                for op in during {
                    replies.push(self.op(op));
                }
            }
        })
        .unwrap();
        (cap, replies, t0.elapsed())
    }

    fn verdict(&self, cap: &Captured) -> ZooVerdict {
        let nc = not_captured(cap);
        zoo::check(
            self.dir,
            self.max_writers,
            |a, b| cap.read(a, b).is_ok(),
            |a| !nc.iter().any(|r| r[0] <= a && a < r[1]),
        )
    }

    /// The target runs on: it writes every page it has (no page left write-protected, no
    /// fault left unanswered), is neither traced nor stopped, and exits 0 when told.
    fn runs_on_and_exits(mut self) {
        let t0 = Instant::now();
        let r = self.op("touch-all");
        assert!(r["len"].as_u64().unwrap() > 0, "{r}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "touch-all took {:?}",
            t0.elapsed()
        );
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        assert!(status.contains("TracerPid:\t0"), "{status}");
        assert!(!status.contains("State:\tt"), "{status}");
        self.h.send(&json!({"op": "exit"})).unwrap();
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = self.h.try_wait() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the target did not exit"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.success(), "the target exited {st}");
    }
}

/// The method of the mapping the dump found at `addr`, as its JSON report names it.
fn method_at(cap: &Captured, addr: u64) -> String {
    let m = cap.report.mappings.iter().find(|m| m.start == addr);
    let v = serde_json::to_value(&m.expect("a mapping there").method).unwrap();
    v["method"].as_str().unwrap_or_default().to_string()
}

/// Memory the target registered for missing faults with a userfaultfd of its own (a VMM, a
/// lazily restored process): UFFDIO_REGISTER(WP) refuses it (EBUSY), and reading one of its
/// missing pages with process_vm_readv waits for the target's handler, stopped by the freeze
/// (without the fix this test times out). The dump reads its populated pages inside the
/// freeze, leaves the missing ones zero, ends, and leaves the registration to the target.
#[test]
fn memory_the_target_registered_itself_is_dumped_where_populated_without_waiting_on_it() {
    if not_root() {
        return;
    }
    let mut t = Target::start(1 << 20, 1);
    let addr = t.op("own-uffd")["addr"].as_u64().unwrap();
    let half = (zoo::OWN_UFFD_PAGES / 2 * PAGE_SIZE) as usize;
    let pid = t.pid;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(dump::capture(pid, &DumpOptions::default(), |_, _| {}));
    });
    let cap = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the dump did not end in 120 s: it waits on the target's own userfaultfd")
        .unwrap();
    assert_eq!(method_at(&cap, addr), "in-freeze-populated");
    let mut got = vec![0u8; 2 * half];
    cap.read(addr, &mut got).unwrap();
    assert!(
        got[..half].iter().all(|&b| b == zoo::OWN_UFFD_BYTE),
        "the populated half"
    );
    assert!(
        got[half..].iter().all(|&b| b == 0),
        "the missing half: a hole"
    );
    assert!(cap.report.in_freeze_bytes >= half as u64);
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let flags = smaps
        .split(&format!("{addr:x}-"))
        .nth(1)
        .and_then(|e| e.lines().find(|l| l.starts_with("VmFlags:")))
        .unwrap()
        .to_string();
    assert!(flags.split_whitespace().any(|f| f == "um"), "{flags}");
    t.runs_on_and_exits();
}

/// With file mappings asked for (as a JVM asks, by its coredump_filter), read-only ones are
/// copied before the freeze and checked in it: the core holds each one's file bytes, none is
/// copied inside the freeze, and the pause does not grow with them.
#[test]
fn read_only_file_memory_is_copied_before_the_freeze_as_the_file_holds_it() {
    if not_root() {
        return;
    }
    let t = Target::start(1 << 20, 1);
    let opts = DumpOptions {
        filter: Some(0x3f),
        ..DumpOptions::default()
    };
    let cap = dump::capture(t.pid, &opts, |_, _| {}).unwrap();
    let pre: Vec<_> = cap
        .report
        .mappings
        .iter()
        .filter(|m| method_at(&cap, m.start) == "pre-copied")
        .collect();
    assert!(pre.len() >= 3, "{:?}", cap.report.mappings);
    assert_eq!(cap.report.pre_copies_redone, 0);
    let total: u64 = pre.iter().map(|m| m.end - m.start).sum();
    assert_eq!(cap.report.pre_copied_bytes, total);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    let mut checked = 0;
    for m in pre.iter().filter(|m| m.name.starts_with('/')) {
        let offset = maps
            .lines()
            .find(|l| l.starts_with(&format!("{:x}-", m.start)))
            .and_then(|l| u64::from_str_radix(l.split_whitespace().nth(2)?, 16).ok())
            .unwrap();
        let file = std::fs::read(&m.name).unwrap();
        let len = ((m.end - m.start) as usize).min(file.len().saturating_sub(offset as usize));
        let mut got = vec![0u8; len];
        cap.read(m.start, &mut got).unwrap();
        assert!(
            got == file[offset as usize..offset as usize + len],
            "{} at {:#x}: the core differs from the file",
            m.name,
            m.start
        );
        checked += len;
    }
    assert!(checked >= 1 << 20, "only {checked} bytes checked");
    t.runs_on_and_exits();
}

/// Written private file memory (the zoo's 2 MiB `file-private` slab, which its writers keep
/// writing): the kernel will not sync-write-protect it, so it is copied before the freeze
/// while a second, async-WP uffd tracks the writes, and inside the freeze only the pages
/// written meanwhile are copied again. Every page of it must hold what the target's version
/// table (in the same core) says, in every dump; and less than all of it may be copied inside
/// the freeze.
#[test]
fn written_private_file_memory_is_pre_copied_and_only_what_was_written_again() {
    if not_root() {
        return;
    }
    let mut t = Target::start(4 << 20, 2);
    let base = slab_addr(&t, "file-private");
    let mut partial = 0;
    for i in 0..5 {
        let (cap, _, _) = t.dump(&[]);
        assert_eq!(method_at(&cap, base), "pre-copied-tracked", "dump {i}");
        let r = &cap.report;
        assert_eq!(r.tracked_bytes, 2 << 20, "dump {i}: {r:?}");
        assert!(r.tracked_recopied_bytes <= r.tracked_bytes);
        partial += u64::from(r.tracked_recopied_bytes < r.tracked_bytes);
        let v = t.verdict(&cap);
        assert_eq!(v.inconsistent, 0, "dump {i}: {v:?}");
        let k = v
            .kinds
            .iter()
            .find(|k| k.0 == "file-private")
            .expect("checked");
        assert_eq!(
            (k.1, k.2),
            (512, 0),
            "dump {i}: all 512 pages checked, none wrong"
        );
    }
    assert!(
        partial >= 3,
        "only {partial} of 5 dumps copied less than all of it again"
    );
    t.runs_on_and_exits();
}

/// Cancels once, at the first step after the first attach is done: inside the second (the
/// async-WP uffd that tracks `file-private`); the freeze after it would go on.
#[derive(Debug, Default)]
struct CancelSecondAttach {
    detached: std::sync::atomic::AtomicU32,
    cancelled: std::sync::atomic::AtomicBool,
}

impl uffd_wp::backend::linux::remote::Observer for CancelSecondAttach {
    fn at(
        &self,
        step: uffd_wp::backend::linux::remote::Step,
    ) -> Result<(), uffd_wp::backend::linux::remote::Cancel> {
        use std::sync::atomic::Ordering;
        use uffd_wp::backend::linux::remote::{Cancel, Step};
        if self.detached.load(Ordering::SeqCst) == 1 && !self.cancelled.swap(true, Ordering::SeqCst)
        {
            return Err(Cancel);
        }
        if step == Step::Detached {
            self.detached.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A stop signal during the second attach (the writes tracker's) ends the dump as one during
/// the first does: an error, the target released and running (not a dump that goes on
/// without the tracker, as it would for a tracker the kernel refused).
#[test]
fn a_cancel_during_the_trackers_attach_ends_the_dump_cleanly() {
    if not_root() {
        return;
    }
    let t = Target::start(1 << 20, 1);
    let obs = std::sync::Arc::new(CancelSecondAttach::default());
    let opts = DumpOptions {
        observer: Some(obs.clone()),
        ..DumpOptions::default()
    };
    let err = dump::capture(t.pid, &opts, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("cancel"), "{err}");
    assert_eq!(err.errno(), uffd_wp::sys::Errno::INTR, "{err}");
    assert_released(t.pid, "after a cancelled second attach");
    t.runs_on_and_exits();
}

/// The address of the zoo slab `name`, from the target's own directory (read from /proc/PID/mem).
fn slab_addr(t: &Target, name: &str) -> u64 {
    let code = zoo::KINDS.iter().position(|k| *k == name).unwrap() as u64;
    let mem = std::fs::File::open(format!("/proc/{}/mem", t.pid)).unwrap();
    let word = |a: u64| {
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut b, a).unwrap();
        u64::from_ne_bytes(b)
    };
    (0..zoo::MAX_SLABS as u64)
        .map(|s| t.dir + s * zoo::DIR_WORDS as u64 * 8)
        .find(|e| word(*e) == zoo::LIVE && word(e + 8) == code)
        .map(|e| word(e + 16))
        .expect("the slab in the directory")
}

/// A read-only file mapping whose file a thread of the target rewrites every millisecond: the
/// copy made before the freeze is stale by the freeze (the file's times changed), so it is
/// copied again inside the freeze, and the core holds the file as it was at that instant:
/// every byte the value the writer stored last (in the core too) or the one before it; a
/// stale copy holds an older one, or a torn mix.
#[test]
fn a_pre_copy_the_file_changed_under_is_copied_again_inside_the_freeze() {
    if not_root() {
        return;
    }
    let mut t = Target::start(1 << 20, 1);
    let r = t.op("file-churn");
    let (addr, next_at) = (r["addr"].as_u64().unwrap(), r["from"].as_u64().unwrap());
    let opts = DumpOptions {
        filter: Some(0x3f),
        ..DumpOptions::default()
    };
    let mut redone = 0;
    for _ in 0..5 {
        let cap = dump::capture(t.pid, &opts, |_, _| {}).unwrap();
        assert_eq!(method_at(&cap, addr), "pre-copied");
        let mut got = vec![0u8; (zoo::CHURN_PAGES * PAGE_SIZE) as usize];
        cap.read(addr, &mut got).unwrap();
        assert!(
            got[0] > 0 && got.iter().all(|&b| b == got[0]),
            "torn: {:?}",
            &got[..8]
        );
        let mut next = [0u8; 8];
        cap.read(next_at, &mut next).unwrap();
        let next = u64::from_ne_bytes(next) as u8;
        assert!(
            got[0] == next || zoo::churn_after(got[0]) == next,
            "the file held {} at the freeze, the writer's last value was {next}",
            got[0]
        );
        redone += cap.report.pre_copies_redone;
    }
    assert!(
        redone >= 4,
        "only {redone} of 5 dumps redid the churned copy"
    );
    t.runs_on_and_exits();
}

/// A child forked by the target shares its `MAP_SHARED` anonymous slab and its memfd: the
/// report names the child's pid on exactly those mappings (the dump cannot stop its writes),
/// on no private one, and the target runs on.
#[test]
fn shared_memory_another_process_maps_is_reported_with_its_pid() {
    if not_root() {
        return;
    }
    let mut t = Target::start(1 << 20, 1);
    let child = t.op("fork-sleep")["addr"].as_u64().unwrap() as i32;
    let (cap, _, _) = t.dump(&[]);
    let wp_shared: Vec<_> = cap
        .report
        .mappings
        .iter()
        .filter(|m| m.perms.ends_with('s') && m.bytes > 0)
        .collect();
    assert!(wp_shared.len() >= 2, "{:?}", cap.report.mappings);
    for m in &wp_shared {
        assert!(
            m.shared_with.contains(&child),
            "{:#x} {} not shared with {child}: {:?}",
            m.start,
            m.name,
            m.shared_with
        );
    }
    for m in cap
        .report
        .mappings
        .iter()
        .filter(|m| m.perms.ends_with('p'))
    {
        assert!(m.shared_with.is_empty(), "{:#x} {}", m.start, m.name);
    }
    let text = serde_json::to_value(&cap.report).unwrap().to_string();
    assert!(text.contains("shared_with"), "{text}");
    t.op("end-sleepers");
    t.runs_on_and_exits();
}

fn not_captured(cap: &Captured) -> Vec<[u64; 2]> {
    cap.report
        .snapshot
        .as_ref()
        .map(|s| s.not_captured.iter().map(|n| n.range).collect())
        .unwrap_or_default()
}

fn in_ranges(ranges: &[[u64; 2]], a: u64, len: u64) -> bool {
    ranges.iter().any(|r| r[0] < a + len && a < r[1])
}

/// One line of what a dump did, for the test log (and the report).
fn summary(op: &str, cap: &Captured, v: &ZooVerdict, took: Duration) -> Value {
    let s = cap.report.snapshot.as_ref().unwrap();
    let nc: u64 = s.not_captured.iter().map(|n| n.range[1] - n.range[0]).sum();
    json!({
        "op": op, "took_ms": took.as_millis() as u64, "pause_us": cap.report.pause_us as u64,
        "consistent": v.consistent, "in_flight": v.in_flight, "inconsistent": v.inconsistent,
        "skipped_not_captured_pages": v.not_captured, "not_captured_bytes": nc,
        "events": s.events, "faults": s.faults_served, "kinds": v.kinds,
    })
}

#[test]
fn every_mapping_change_during_the_copy_keeps_the_dump_consistent() {
    if not_root() {
        return;
    }
    let mut t = Target::start(4 << 20, 2);
    let ops: [(&str, &str); 9] = [
        ("mmap", ""),
        ("munmap", "unmap"),
        ("mremap-move", "move"),
        ("mremap-grow", "grow"),
        ("dontneed", "dontneed"),
        ("fork", ""),
        ("fork-write-shared", ""),
        ("thread-start", ""),
        ("thread-exit", ""),
    ];
    for (op, slab) in ops {
        let (cap, replies, took) = t.dump(&[op]);
        assert_eq!(replies.len(), 1, "{op} ran during the copy");
        assert!(
            took < Duration::from_secs(60),
            "{op}: the dump took {took:?}"
        );
        let v = t.verdict(&cap);
        eprintln!("{}", summary(op, &cap, &v, took));
        assert_eq!(v.inconsistent, 0, "{op}: {v:?}");
        let s = cap.report.snapshot.as_ref().unwrap();
        let r = &replies[0];
        match op {
            // A mapping made after the snapshot point is not in the dump.
            "mmap" => {
                let mut b = [0u8; 8];
                assert!(
                    cap.read(r["addr"].as_u64().unwrap(), &mut b).is_err(),
                    "{r}"
                );
            }
            "munmap" => assert!(s.events.unmap >= 1, "{op}: {s:?}"),
            "mremap-move" | "mremap-grow" => assert!(s.events.remap >= 1, "{op}: {s:?}"),
            "dontneed" => assert!(s.events.remove >= 1, "{op}: {s:?}"),
            // The fork event was read (the child's uffd handled, then closed).
            "fork" => assert!(s.events.fork >= 1, "{op}: {s:?}"),
            // The child's write to shared memory waited on its own uffd until the shared
            // pages were copied: the page holds what it held at the freeze, not the child's
            // bytes (which the oracle would only count as a torn page).
            "fork-write-shared" => {
                assert!(s.events.fork >= 1, "{op}: {s:?}");
                let mut b = [0u8; 8];
                cap.read(r["addr"].as_u64().unwrap(), &mut b).unwrap();
                assert_ne!(u64::from_ne_bytes(b), 0xcccc_cccc_cccc_cccc, "{op}: {r}");
            }
            _ => {}
        }
        // The slab the operation changed: at its address at the snapshot point, every page
        // is its snapshot content (the oracle saw it) or reported as not captured.
        if !slab.is_empty() {
            let from = r["from"].as_u64().unwrap();
            let lost = in_ranges(&not_captured(&cap), from, 8 * PAGE_SIZE);
            eprintln!("  {op}: slab {slab} at {from:#x}: lost pages reported: {lost}");
        }
        assert!(v.consistent > 1000, "{v:?}");
        let kinds: Vec<&str> = v.kinds.iter().map(|k| k.0.as_str()).collect();
        for k in [
            "anon",
            "data",
            "bss",
            "heap",
            "shared-anon",
            "memfd",
            "stack",
        ] {
            assert!(kinds.contains(&k), "{op}: no {k} pages checked: {v:?}");
        }
    }
    t.runs_on_and_exits();
}

#[test]
fn fifty_dumps_under_load_are_consistent_across_every_kind_of_memory() {
    if not_root() {
        return;
    }
    let mut t = Target::start(4 << 20, 3);
    let repeatable = ["mmap", "fork", "thread-start", "thread-exit"];
    let mut pauses = Vec::new();
    let mut pages = 0;
    let t0 = Instant::now();
    for i in 0..50 {
        let during: Vec<&str> = if i % 5 == 4 {
            vec![repeatable[(i / 5) % repeatable.len()]]
        } else {
            vec![]
        };
        let (cap, _, took) = t.dump(&during);
        let v = t.verdict(&cap);
        assert_eq!(v.inconsistent, 0, "dump {i} ({during:?}): {v:?}");
        assert!(took < Duration::from_secs(60), "dump {i} took {took:?}");
        pages += v.consistent + v.in_flight;
        pauses.push(cap.report.pause_us);
    }
    pauses.sort_by(f64::total_cmp);
    eprintln!(
        "{}",
        json!({"dumps": 50, "pages_checked": pages, "inconsistent": 0,
               "pause_us_p50": pauses[25], "pause_us_max": pauses[49],
               "seconds": t0.elapsed().as_secs_f64()})
    );
    t.runs_on_and_exits();
}

fn gdb(core: &Path, cmds: &[String]) -> String {
    let mut c = Command::new("timeout");
    c.args(["120", "gdb", "-batch", "-nx"]);
    for x in cmds {
        c.args(["-ex", x]);
    }
    let o = c.arg(BIN).arg(core).output().expect("run gdb");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The words gdb printed for `x/Ngx` commands, in order.
fn words(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.split_once(":\t"))
        .flat_map(|(_, w)| {
            w.split_whitespace()
                .filter_map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// gdb reads the core at known addresses of every kind of memory: the directory entry, the
/// first two words of the slab's first page (version, page index) and its version-table
/// entry agree (equal, or the page one version ahead mid-write), for a core taken while the
/// target mapped one slab and unmapped another during the copy.
#[test]
fn gdb_reads_every_kind_of_memory_at_known_addresses_as_the_target_recorded_it() {
    if not_root() {
        return;
    }
    if Command::new("gdb").arg("--version").output().is_err() && skip("gdb") {
        return;
    }
    let mut t = Target::start(2 << 20, 2);
    // Mapped first, so that it cannot land in the hole the unmap leaves.
    let (cap, replies, _) = t.dump(&["mmap", "munmap"]);
    let dir = std::env::temp_dir().join(format!("uffd-wp-dump-zoo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let core = dir.join("core");
    let file = std::fs::File::create(&core).unwrap();
    dump::write_core(&cap, &file, |_, _| {}).unwrap();
    let nc = not_captured(&cap);
    // The directory, as gdb reads it from the core.
    let n = 16;
    let ent = words(&gdb(
        &core,
        &[format!("x/{}gx {:#x}", n * DIR_WORDS, t.dir)],
    ));
    assert_eq!(ent.len(), n * DIR_WORDS, "gdb read the directory");
    let mut cmds = Vec::new();
    let mut slabs = Vec::new();
    for e in ent.chunks(DIR_WORDS).filter(|e| e[0] == LIVE) {
        let (kind, base, table) = (e[1], e[2], e[4]);
        if in_ranges(&nc, base, PAGE_SIZE) {
            eprintln!("slab at {base:#x} (kind {kind}) reported not captured");
            continue;
        }
        cmds.push(format!("x/2gx {base:#x}"));
        cmds.push(format!("x/1gx {table:#x}"));
        slabs.push((zoo::KINDS[kind as usize], base));
    }
    let w = words(&gdb(&core, &cmds));
    assert_eq!(w.len(), slabs.len() * 3, "gdb read every slab");
    for (i, (kind, base)) in slabs.iter().enumerate() {
        let (v, p, rec) = (w[3 * i], w[3 * i + 1], w[3 * i + 2]);
        assert_eq!(p, 0, "{kind} at {base:#x}: page index");
        assert!(
            v == rec || v == rec + 1,
            "{kind} at {base:#x}: page holds version {v}, the table {rec}"
        );
    }
    let kinds: Vec<&str> = slabs.iter().map(|s| s.0).collect();
    for k in [
        "anon",
        "data",
        "bss",
        "heap",
        "shared-anon",
        "memfd",
        "stack",
    ] {
        assert!(kinds.contains(&k), "gdb checked no {k}: {kinds:?}");
    }
    // The slab unmapped during the copy: in the core as the snapshot had it, or reported.
    let unmapped = replies[1]["from"].as_u64().unwrap();
    let lost = in_ranges(&nc, unmapped, PAGE_SIZE);
    assert!(
        lost || slabs.iter().any(|s| s.1 == unmapped),
        "the unmapped slab is neither checked nor reported"
    );
    // The mapping made during the copy is not in the core.
    let made = replies[0]["addr"].as_u64().unwrap();
    let out = gdb(&core, &[format!("x/1gx {made:#x}")]);
    assert!(out.contains("Cannot access memory"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
    t.runs_on_and_exits();
}

/// `struct user_regs_struct` (x86_64): the index of each register the register test checks.
const REGS: [(&str, usize); 7] = [
    ("r15", 0),
    ("r14", 1),
    ("r13", 2),
    ("r12", 3),
    ("rbx", 5),
    ("rip", 16),
    ("rsp", 19),
];

/// Every `NT_PRSTATUS` note of a core, read directly: (`pr_pid`, `pr_reg` as 27 words).
fn prstatus_notes(core: &Path) -> Vec<(i32, Vec<u64>)> {
    use object::elf::FileHeader64;
    use object::read::elf::{FileHeader, ProgramHeader};
    let data = std::fs::read(core).unwrap();
    let h = FileHeader64::<object::Endianness>::parse(&*data).unwrap();
    let e = h.endian().unwrap();
    let mut out = Vec::new();
    for ph in h.program_headers(e, &*data).unwrap() {
        let Some(mut notes) = ph.notes(e, &*data).unwrap() else {
            continue;
        };
        while let Some(n) = notes.next().unwrap() {
            if n.name() != b"CORE" || n.n_type(e).0 != 1 {
                continue;
            }
            let d = n.desc();
            assert_eq!(d.len(), 336, "sizeof(struct elf_prstatus)");
            let tid = i32::from_ne_bytes(d[32..36].try_into().unwrap());
            let regs = d[112..112 + 27 * 8]
                .chunks_exact(8)
                .map(|w| u64::from_ne_bytes(w.try_into().unwrap()))
                .collect();
            out.push((tid, regs));
        }
    }
    out
}

/// gdb's `thread apply all info registers ...`: per LWP, each register's value.
fn gdb_registers(out: &str) -> BTreeMap<i32, BTreeMap<String, u64>> {
    let mut all: BTreeMap<i32, BTreeMap<String, u64>> = BTreeMap::new();
    let mut cur = None;
    for l in out.lines() {
        if l.starts_with("Thread ") {
            cur = l
                .split_once("(LWP ")
                .and_then(|(_, r)| r.split(')').next()?.trim().parse().ok());
            continue;
        }
        let mut w = l.split_whitespace();
        if let (Some(t), Some(name), Some(v)) = (cur, w.next(), w.next())
            && let Some(h) = v.strip_prefix("0x")
            && let Ok(v) = u64::from_str_radix(h, 16)
        {
            all.entry(t).or_default().insert(name.to_string(), v);
        }
    }
    all
}

/// The thread ids in /proc/PID/task, sorted.
fn tasks(pid: u32) -> Vec<i32> {
    let mut t: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    t.sort();
    t
}

/// The mapping of process `pid` holding `addr` (start, end), from /proc/PID/maps.
fn mapping_of(pid: u32, addr: u64) -> Option<(u64, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .find(|(a, b)| *a <= addr && addr < *b)
}

/// gdb opens a core taken by `uffd-wp dump PID` and sees every thread the target had at the
/// freeze, each with the registers of its `NT_PRSTATUS` note (read directly from the core);
/// for the spinner threads (callee-saved registers loaded with recorded constants, then a
/// loop that never touches them, one in user mode, one mostly inside `nanosleep(2)`) those
/// registers are the recorded values, `rip` is inside the loop and `rsp` is the recorded
/// value, inside the thread's stack mapping.
#[test]
fn gdb_sees_every_thread_with_the_registers_it_had_at_the_freeze() {
    if not_root() {
        return;
    }
    if Command::new("gdb").arg("--version").output().is_err() && skip("gdb") {
        return;
    }
    let t0 = Instant::now();
    let (t, head) = Target::start_with(1 << 20, 2, 2);
    let spinners = head["spinners"].as_array().unwrap().clone();
    assert_eq!(spinners.len(), 2, "{head}");
    let stacks: Vec<(u64, u64)> = spinners
        .iter()
        .map(|s| mapping_of(t.pid, s["stack_local"].as_u64().unwrap()).expect("stack mapping"))
        .collect();
    let dir = std::env::temp_dir().join(format!("uffd-wp-dump-regs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let core = dir.join("core");
    let before = tasks(t.pid);
    let o = Command::new("timeout")
        .args(["60", BIN, "dump", &t.pid.to_string(), "--json", "-o"])
        .arg(&core)
        .output()
        .unwrap();
    let after = tasks(t.pid);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // The zoo starts no thread on its own: the threads at the freeze are these.
    assert_eq!(
        before, after,
        "the target's threads changed during the dump"
    );
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["threads"], before.len(), "{report}");
    let notes = prstatus_notes(&core);
    let mut tids: Vec<i32> = notes.iter().map(|n| n.0).collect();
    assert_eq!(
        notes[0].0, t.pid as i32,
        "the main thread's note comes first"
    );
    tids.sort();
    assert_eq!(tids, before, "one NT_PRSTATUS per thread at the freeze");
    let cmd = "thread apply all info registers r12 r13 r14 r15 rbx rip rsp".to_string();
    let out = gdb(&core, &[cmd]);
    let seen = gdb_registers(&out);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        before,
        "gdb's threads:\n{out}"
    );
    // gdb's view of every thread is its note's.
    for (tid, regs) in &notes {
        for (name, i) in REGS {
            assert_eq!(
                seen[tid].get(name),
                Some(&regs[i]),
                "thread {tid} {name}: gdb against NT_PRSTATUS\n{out}"
            );
        }
    }
    // The spinners' registers are what they recorded.
    for (s, (lo, hi)) in spinners.iter().zip(&stacks) {
        let tid = s["tid"].as_i64().unwrap() as i32;
        let regs = &notes.iter().find(|n| n.0 == tid).expect("spinner note").1;
        let r = |name: &str| regs[REGS.iter().find(|x| x.0 == name).unwrap().1];
        for name in ["rbx", "r12", "r13", "r14", "r15"] {
            assert_eq!(
                r(name),
                s[name].as_u64().unwrap(),
                "spinner {tid} {name}: {s}"
            );
        }
        let (start, end) = (
            s["loop_start"].as_u64().unwrap(),
            s["loop_end"].as_u64().unwrap(),
        );
        assert!(
            (start..end).contains(&r("rip")),
            "spinner {tid}: rip {:#x} outside its loop {start:#x}..{end:#x}",
            r("rip")
        );
        assert_eq!(
            r("rsp"),
            s["rsp"].as_u64().unwrap(),
            "spinner {tid} rsp: {s}"
        );
        assert!(
            (*lo..*hi).contains(&r("rsp")),
            "spinner {tid}: rsp {:#x} outside its stack {lo:#x}..{hi:#x}",
            r("rsp")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    t.runs_on_and_exits();
    eprintln!(
        "{}",
        json!({"threads": before.len(), "spinners": 2, "seconds": t0.elapsed().as_secs_f64()})
    );
}

/// Whether the target shows nothing of a dump: no thread stopped or traced, no userfaultfd
/// among its fds, no mapping registered (`uw` in smaps) or page write-protected (pagemap bit
/// 57, read directly) anywhere in it; `Err` says what is left.
fn released(pid: u32) -> Result<(), String> {
    let states = common::thread_states(pid);
    if states.iter().any(|(_, s)| *s == 't' || *s == 'T') {
        return Err(format!("threads left stopped: {states:?}"));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    if !status.contains("TracerPid:\t0") {
        return Err("still traced".into());
    }
    if common::holds_uffd(pid) {
        return Err("a userfaultfd left in the target".into());
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for l in maps.lines().filter(|l| !l.ends_with("[vsyscall]")) {
        let (a, b) = l
            .split_whitespace()
            .next()
            .unwrap()
            .split_once('-')
            .unwrap();
        let r = Range::from_bounds(
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let n = common::bit57_pages(pid, r);
        if n > 0 || common::smaps_uw(pid, r) {
            return Err(format!("{n} pages write-protected (or VM_UFFD_WP) in {l}"));
        }
    }
    Ok(())
}

/// [`released`] within 2 s of the dumper's end.
fn assert_released(pid: u32, what: &str) {
    let until = Instant::now() + Duration::from_secs(2);
    let mut res = released(pid);
    while res.is_err() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
        res = released(pid);
    }
    if let Err(e) = res {
        panic!("{what}: {e}");
    }
}

/// A dumper started by [`dump_until_copy`]: the process, and its stderr as it is read.
struct Dumper {
    child: std::process::Child,
    stderr: std::thread::JoinHandle<String>,
}

/// Starts `uffd-wp dump PID --json -o core` and waits (bounded) until its copy has begun
/// (the `STEP copy` line it prints with `UFFD_WP_TRACE_STEPS` at its first progress call,
/// after the pause).
fn dump_until_copy(pid: u32, core: &Path) -> Dumper {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args(["dump", &pid.to_string(), "--json", "-o"])
        .arg(core)
        .env("UFFD_WP_TRACE_STEPS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if l.starts_with("uffd-wp: STEP copy ") {
                let _ = tx.send(());
            }
            all += &(l + "\n");
        }
        all
    });
    if let Err(e) = rx.recv_timeout(Duration::from_secs(120)) {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the dump never reached its copy ({e}): {}",
            stderr.join().unwrap()
        );
    }
    Dumper { child, stderr }
}

/// Waits at most 60 s for the dumper to end (else kills it and fails); its output, stderr
/// included.
fn wait_bounded(d: Dumper) -> std::process::Output {
    let Dumper { mut child, stderr } = d;
    let until = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            panic!("the dumper did not end within 60 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut o = child.wait_with_output().unwrap();
    o.stderr = stderr.join().unwrap().into_bytes();
    o
}

/// A scratch directory for cores, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("uffd-wp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    /// The files in it.
    fn files(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGINT and SIGTERM during `uffd-wp dump PID`'s copy (after the pause) end it with one
/// signal: exit code 128 + the signal, a JSON error of kind `Interrupted` that says the target
/// was released, no core file (nor a temporary one) left; the target is neither stopped nor
/// traced, holds no userfaultfd, has no page write-protected and no mapping registered, and
/// writes every page it has.
#[test]
fn a_stop_signal_during_the_copy_ends_the_dump_cleanly_with_no_core_left() {
    if not_root() {
        return;
    }
    let mut t = Target::start(256 << 20, 2);
    let dir = Scratch::new("dump-sig");
    let core = dir.0.join("core");
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let t0 = Instant::now();
        let c = dump_until_copy(t.pid, &core);
        let at = t0.elapsed();
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &c.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig}");
        let o = wait_bounded(c);
        let ended = t0.elapsed();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
            panic!(
                "SIG{sig}: no JSON: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        assert_eq!(o.status.code(), Some(code), "SIG{sig}: {v}");
        let e = &v["error"];
        assert_eq!(e["kind"], "Interrupted", "SIG{sig}: {v}");
        assert_eq!(e["errno"], "EINTR", "SIG{sig}: {v}");
        // After the pause: in the copy, or (on a fast machine) writing the core.
        let during = e["operation"].as_str().unwrap();
        assert!(["copy", "core write"].contains(&during), "SIG{sig}: {v}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("the target was released"),
            "{v}"
        );
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(
            text.contains("uffd-wp: error: interrupted by signal"),
            "the text error: {text}"
        );
        assert_eq!(dir.files(), Vec::<String>::new(), "SIG{sig}: files left");
        assert_released(t.pid, &format!("SIG{sig}"));
        let r = t.op("touch-all");
        assert!(r["len"].as_u64().unwrap() >= 256 << 20, "{r}");
        eprintln!(
            "{}",
            json!({"signal": sig, "during": during, "copy_began_s": at.as_secs_f64(),
                   "ended_s": ended.as_secs_f64()})
        );
    }
    t.runs_on_and_exits();
}

/// The dumper SIGKILLed in its copy: the kernel's release of its uffd leaves the target
/// running with nothing write-protected or registered, neither stopped nor traced, and no
/// core file (it had no name yet).
#[test]
fn a_dumper_killed_during_the_copy_leaves_the_target_whole_and_no_core() {
    if not_root() {
        return;
    }
    let mut t = Target::start(256 << 20, 2);
    let dir = Scratch::new("dump-kill");
    let core = dir.0.join("core");
    let mut c = dump_until_copy(t.pid, &core);
    c.child.kill().unwrap();
    let o = wait_bounded(c);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&o.status),
        Some(9),
        "the dumper died of SIGKILL"
    );
    assert_eq!(dir.files(), Vec::<String>::new(), "files left");
    assert_released(t.pid, "SIGKILL");
    let r = t.op("touch-all");
    assert!(r["len"].as_u64().unwrap() >= 256 << 20, "{r}");
    t.runs_on_and_exits();
}

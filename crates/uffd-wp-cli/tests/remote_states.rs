//! Issue #9, thread states: `uffd-wp snapshot --pid` of a target whose threads are blocked in
//! read(2), a futex, nanosleep(2), epoll_wait(2) with no timeout and ppoll(2) with a temporary
//! signal mask, one writing all along, also with its main thread exited and while stopped by
//! SIGSTOP. Each blocked call must return only when the test releases it, with its own
//! result (no EINTR, no early wake-up, the signal mask as it was). The target is a Python
//! program calling libc through ctypes (no EINTR retry in between). Also the kill at the
//! `rewound` step (an epoll thread), the one step tests/remote_kill.rs cannot reach.
//!
//! Needs root, python3 and pidfd_getfd; skips otherwise (fails under
//! `UFFD_WP_REQUIRE_KERNEL=1`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use uffd_wp::range::Range;

/// The target: prints `{"pid", "start", "len", "tids"}`, then one line per blocked call that
/// returns (`{"call", "rc", "errno", "elapsed", "mask_ok"}`); `go` on stdin releases them all;
/// `exit-main` makes the main thread exit (the others go on).
const TARGET: &str = r#"
import ctypes, json, mmap, os, signal, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(*a):
    return libc.syscall(*[ctypes.c_long(x) if isinstance(x, int) else x for x in a])
out_lock = threading.Lock()
def say(**kw):
    with out_lock:
        sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()
region = mmap.mmap(-1, 1 << 20)
start = ctypes.addressof(ctypes.c_char.from_buffer(region))
r1, w1 = os.pipe(); r2, w2 = os.pipe(); r3, w3 = os.pipe()
fut = ctypes.c_int(0)
tids = {}
def mask():
    m = ctypes.c_ulong(0); libc.pthread_sigmask(0, None, ctypes.byref(m)); return m.value
def run(name, f):
    def body():
        tids[name] = threading.get_native_id()
        m0 = mask(); t0 = time.monotonic()
        rc = f(); err = ctypes.get_errno()
        say(call=name, rc=rc, errno=err if rc < 0 else 0, elapsed=time.monotonic() - t0, mask_ok=mask() == m0)
    t = threading.Thread(target=body, daemon=True); t.start(); return t
buf = ctypes.create_string_buffer(8)
run("read", lambda: libc.read(r1, buf, 1))
run("futex", lambda: sc(202, ctypes.byref(fut), 0, 0, None))
class TS(ctypes.Structure): _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
run("nanosleep", lambda: libc.nanosleep(ctypes.byref(TS(3, 0)), None))
ep = libc.epoll_create1(0)
ev = (ctypes.c_uint8 * 12)(); ev[0] = 1
libc.epoll_ctl(ep, 1, r2, ev)
evs = (ctypes.c_uint8 * 12 * 4)()
run("epoll", lambda: libc.epoll_wait(ep, evs, 4, -1))
class PFD(ctypes.Structure): _fields_ = [("fd", ctypes.c_int), ("ev", ctypes.c_short), ("rev", ctypes.c_short)]
pfd = PFD(r3, 1, 0); pmask = ctypes.c_ulong(1 << (signal.SIGUSR1 - 1))
run("ppoll", lambda: sc(271, ctypes.byref(pfd), 1, None, ctypes.byref(pmask), 8))
def write_loop():
    tids["writer"] = threading.get_native_id(); i = 0
    while True:
        region[(i * 4096) % len(region)] = i & 0xff; i += 1
threading.Thread(target=write_loop, daemon=True).start()
time.sleep(0.2)
say(pid=os.getpid(), start=start, len=len(region), tids=tids)
for line in sys.stdin:
    if line.strip() == "go":
        os.write(w1, b"x"); os.write(w2, b"x"); os.write(w3, b"x")
        fut.value = 1; sc(202, ctypes.byref(fut), 1, 10)
    if line.strip() == "exit-main":
        sc(60, 0)
"#;

/// The Python target, its stdin, its lines as they come.
struct PyTarget {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Value>,
    pid: u32,
    range: Range,
    tids: Value,
    /// The nanosleep's report when it ended on its own (after its full 3 s).
    slept: Option<Value>,
}

impl PyTarget {
    /// Starts it; `None` (after a skip) without python3.
    fn spawn() -> Option<PyTarget> {
        let Ok(mut child) = Command::new("python3")
            .args(["-c", TARGET])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        else {
            skip("python3");
            return None;
        };
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str(&l).expect("a JSON line"));
            }
        });
        let head: Value = lines.recv_timeout(PATIENCE).expect("the target's header");
        let start = head["start"].as_u64().unwrap();
        let range = Range::from_bounds(start, start + head["len"].as_u64().unwrap());
        let pid = head["pid"].as_u64().unwrap() as u32;
        let tids = head["tids"].clone();
        Some(PyTarget {
            child,
            stdin,
            lines,
            pid,
            range,
            tids,
            slept: None,
        })
    }

    fn tid(&self, name: &str) -> u32 {
        self.tids[name].as_u64().expect("a thread id") as u32
    }

    /// Fails if a blocked call returned before the test released it (the nanosleep may end
    /// on its own, after its full 3 s: kept for [`PyTarget::release_and_check`]).
    fn assert_none_returned(&mut self, when: &str) {
        while let Ok(v) = self.lines.try_recv() {
            let full_sleep = v["call"] == "nanosleep"
                && v["rc"] == 0
                && v["elapsed"].as_f64().is_some_and(|e| e >= 3.0);
            if !full_sleep {
                panic!("{when}: a blocked call returned early: {v}");
            }
            self.slept = Some(v);
        }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("write to the target");
    }

    /// Releases the blocked calls and checks each returned its own result: read 1 byte,
    /// futex 0, nanosleep 0 after its full 3 s, epoll and ppoll 1 event; no EINTR; masks kept.
    fn release_and_check(&mut self, t0: Instant) {
        // The nanosleep (3 s from the start) must end on its own, not before.
        let sleep_left = Duration::from_secs(3).saturating_sub(t0.elapsed());
        std::thread::sleep(sleep_left.saturating_sub(Duration::from_millis(500)));
        self.assert_none_returned("before the release");
        self.send("go");
        let want = [
            ("read", 1),
            ("futex", 0),
            ("nanosleep", 0),
            ("epoll", 1),
            ("ppoll", 1),
        ];
        let mut got: Vec<Value> = self.slept.take().into_iter().collect();
        while got.len() < want.len() {
            let v = self.lines.recv_timeout(PATIENCE).expect("a call's report");
            got.push(v);
        }
        for (call, rc) in want {
            let v = got.iter().find(|v| v["call"] == call).expect("reported");
            assert_eq!(v["rc"].as_i64(), Some(rc), "{call}: {v}");
            assert_eq!(v["errno"].as_i64(), Some(0), "{call}: {v}");
            assert_eq!(
                v["mask_ok"].as_bool(),
                Some(true),
                "{call}: signal mask changed: {v}"
            );
        }
        let slept = got.iter().find(|v| v["call"] == "nanosleep").unwrap();
        assert!(
            slept["elapsed"].as_f64().unwrap() >= 3.0,
            "early wake-up: {slept}"
        );
    }
}

impl Drop for PyTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `uffd-wp snapshot --pid` of `t`'s region; its exit status and stderr.
fn snapshot(t: &PyTarget, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let range = format!("{:#x}:{}", t.range.start(), t.range.len());
    let out = Command::new(BIN)
        .args(["snapshot", "--pid", &t.pid.to_string(), "--range", &range])
        .args(extra)
        .output()
        .expect("run uffd-wp snapshot --pid");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every thread state at once: snapshot twice (the injected calls run by a thread in a call,
/// then by the epoll thread), every blocked call unaware of it.
#[test]
fn blocked_threads_see_nothing_of_a_snapshot() {
    if euid() != 0 {
        return skip("root");
    }
    let Some(mut t) = PyTarget::spawn() else {
        return;
    };
    let t0 = Instant::now();
    let (st, err) = snapshot(&t, &[]);
    assert!(st.success(), "snapshot failed: {err}");
    let epoll = t.tid("epoll").to_string();
    let (st, err) = snapshot(&t, &["--thread", &epoll]);
    assert!(
        st.success(),
        "snapshot through the epoll thread failed: {err}"
    );
    t.assert_none_returned("after the snapshots");
    assert!(!holds_uffd(t.pid));
    t.release_and_check(t0);
}

/// A target whose main thread exited (a zombie leader, other threads running) is attached.
#[test]
fn a_target_whose_main_thread_exited_is_attached() {
    if euid() != 0 {
        return skip("root");
    }
    let Some(mut t) = PyTarget::spawn() else {
        return;
    };
    t.send("exit-main");
    let until = Instant::now() + PATIENCE;
    while uffd_wp::backend::linux::remote::thread_state(t.pid as i32, t.pid as i32) != Some('Z') {
        assert!(Instant::now() < until, "the main thread never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (st, err) = snapshot(&t, &[]);
    assert!(
        st.success(),
        "snapshot of a target without its main thread: {err}"
    );
    // The main thread, which would release the calls, is gone: they are checked still
    // blocked, and the target not stopped.
    t.assert_none_returned("after the snapshot");
    let states = thread_states(t.pid);
    assert!(
        states.iter().all(|(_, s)| *s != 't' && *s != 'T'),
        "{states:?}"
    );
    assert!(!holds_uffd(t.pid));
}

/// A target stopped by SIGSTOP is snapshotted and stays stopped; after SIGCONT its calls
/// go on unaware.
#[test]
fn a_stopped_target_stays_stopped() {
    if euid() != 0 {
        return skip("root");
    }
    let Some(mut t) = PyTarget::spawn() else {
        return;
    };
    let t0 = Instant::now();
    let stop = Command::new("kill")
        .args(["-STOP", &t.pid.to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stop.success());
    std::thread::sleep(Duration::from_millis(50));
    let (st, err) = snapshot(&t, &[]);
    assert!(st.success(), "snapshot of a stopped target: {err}");
    let states = thread_states(t.pid);
    assert!(
        states.iter().all(|(_, s)| *s == 'T'),
        "the target must stay stopped: {states:?}"
    );
    let cont = Command::new("kill")
        .args(["-CONT", &t.pid.to_string()])
        .status()
        .expect("kill -CONT");
    assert!(cont.success());
    t.release_and_check(t0);
}

/// The kill at `rewound`: the epoll thread's EINTR rewound to its `syscall`, the monitor
/// SIGKILLed there; the epoll_wait goes on blocking and returns its event.
#[test]
fn monitor_killed_at_the_epoll_rewind() {
    if euid() != 0 {
        return skip("root");
    }
    let Some(mut t) = PyTarget::spawn() else {
        return;
    };
    let t0 = Instant::now();
    let range = format!("{:#x}:{}", t.range.start(), t.range.len());
    let epoll = t.tid("epoll").to_string();
    let mut mon = Command::new(BIN)
        .args(["snapshot", "--pid", &t.pid.to_string(), "--range", &range])
        .args(["--thread", &epoll, "--stall-at", "rewound"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the monitor");
    let mut err = BufReader::new(mon.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("STALLED at rewound") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the monitor never stalled"
        );
    }
    mon.kill().unwrap();
    mon.wait().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let states = thread_states(t.pid);
    assert!(states.iter().all(|(_, s)| *s != 't'), "{states:?}");
    t.assert_none_returned("after the kill");
    t.release_and_check(t0);
}

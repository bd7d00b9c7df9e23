//! THE KILL TESTS of issue #9: `uffd-wp snapshot --pid` SIGKILLed at every named step of the
//! attach/freeze/copy protocol (`--stall-at`), and at random instants of its first 5 ms; after
//! each kill the target is checked from outside: alive, no thread stopped, no pagemap bit 57,
//! no userfaultfd among its fds, its writers going on, its pages whole versions of themselves.
//!
//! Needs root and a kernel with pidfd_getfd (as tests/remote.rs); skips otherwise, or fails
//! under `UFFD_WP_REQUIRE_KERNEL=1`. `UFFD_WP_KILLS=N` sets the random test's kill count
//! (default 250).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use uffd_wp::backend::linux::RemoteQuiesce;
use uffd_wp::backend::linux::remote::{self, Step};
use uffd_wp::range::PAGE_SIZE;
use uffd_wp_bench::workload::{PageVerdict, check_page};

/// The steps of a thread in a system call (the workload's leader, in its sleep), then the
/// freeze and the copy.
const RIDE_STEPS: [&str; 17] = [
    "others-frozen",
    "seized",
    "interrupted",
    "event-stop",
    "riding",
    "entry-stop",
    "frame-written",
    "substituted",
    "uffd-exit-stop",
    "fd-taken",
    "close-entry-stop",
    "close-exit-stop",
    "restored",
    "detached",
    "freezing",
    "frozen",
    "copy",
];

/// The steps of a thread in user code (a busy writer), up to the detach.
const USER_STEPS: [&str; 14] = [
    "others-frozen",
    "seized",
    "interrupted",
    "event-stop",
    "frame-written",
    "manufactured",
    "entry-stop",
    "substituted",
    "uffd-exit-stop",
    "fd-taken",
    "close-entry-stop",
    "close-exit-stop",
    "restored",
    "detached",
];

/// Starts `uffd-wp snapshot --pid` on `w` with `extra` arguments, stderr piped, steps traced.
fn spawn_monitor(w: &Workload, extra: &[&str]) -> Child {
    spawn_monitor_to(w, extra, Stdio::null())
}

/// [`spawn_monitor`], its stdout to `stdout`.
fn spawn_monitor_to(w: &Workload, extra: &[&str], stdout: Stdio) -> Child {
    let range = format!("{}:{}", w.range.start(), w.range.len());
    Command::new(BIN)
        .args(["snapshot", "--pid", &w.pid.to_string(), "--range", &range])
        .args(extra)
        .env("UFFD_WP_TRACE_STEPS", "1")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the monitor")
}

/// Waits (bounded) for the monitor's `STALLED at {step}` marker; `Err` with its stderr if it
/// exited first.
fn await_stall(mon: &mut Child, step: &str) -> Result<(), String> {
    let err = mon.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let marker = format!("STALLED at {step}");
    let mut seen = String::new();
    let until = Instant::now() + PATIENCE;
    loop {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains(&marker) => return Ok(()),
            Ok(l) => seen += &(l + "\n"),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(seen),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no {marker:?} in time: {seen}"),
        }
    }
}

/// SIGKILLs the monitor and reaps it.
fn kill(mut mon: Child) {
    mon.kill().expect("SIGKILL the monitor");
    let status = mon.wait().expect("reap the monitor");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the monitor died of SIGKILL"
    );
}

/// Whether the target shows what the monitor's death must leave: no thread stopped, all
/// there, no userfaultfd among its fds, nothing write-protected; `Err` says what is wrong.
fn released(w: &Workload) -> Result<(), String> {
    let states = thread_states(w.pid);
    if states.iter().any(|(_, s)| *s == 't' || *s == 'T') {
        return Err(format!("target left stopped: {states:?}"));
    }
    if states.len() != w.threads + 1 {
        return Err(format!("a thread is gone: {states:?}"));
    }
    if holds_uffd(w.pid) {
        return Err("a userfaultfd left in the target".into());
    }
    match bit57_pages(w.pid, w.range) {
        0 if !smaps_uw(w.pid, w.range) => Ok(()),
        n => Err(format!("{n} pages left protected (or VM_UFFD_WP left)")),
    }
}

/// The target after the monitor's death (reaped: its exit released the uffd and detached its
/// tracees) is, or soon becomes (a thread killed inside the chain closes the injected fd when
/// it next runs), [`released`]; and it is alive. Waits at most 2 s.
fn assert_released(w: &mut Workload, what: &str) {
    let until = Instant::now() + Duration::from_secs(2);
    let mut res = released(w);
    while res.is_err() && Instant::now() < until {
        std::thread::sleep(Duration::from_micros(200));
        res = released(w);
    }
    if let Err(e) = res {
        panic!("{what}: {e}");
    }
    assert!(w.alive(), "{what}: the target died");
}

/// The target's pages, read while it is frozen, are each a whole version of themselves (at
/// most one per writer caught mid-write by the freeze).
fn assert_pages_whole(w: &Workload, what: &str) {
    let q = RemoteQuiesce::new(w.pid);
    q.try_freeze().expect("freeze the target");
    let mut buf = vec![0u8; w.range.len() as usize];
    let read = remote::read_remote(w.pid as i32, w.range.start(), &mut buf);
    q.try_resume().expect("resume the target");
    read.expect("read the target's pages");
    let torn = (0..w.range.pages())
        .filter(|&p| {
            let data = &buf[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize];
            let v0 = u64::from_ne_bytes(data[..8].try_into().unwrap());
            check_page(p, v0, data) != PageVerdict::Consistent
        })
        .count();
    assert!(torn <= w.threads, "{what}: {torn} pages not whole versions");
}

/// Stalls a monitor at `step` (its injected calls run by `thread`), kills it there, checks.
fn kill_at(w: &mut Workload, thread: u32, step: &str) {
    let mut mon = spawn_monitor(w, &["--stall-at", step, "--thread", &thread.to_string()]);
    if let Err(seen) = await_stall(&mut mon, step) {
        panic!("monitor never reached {step} on thread {thread}: {seen}");
    }
    kill(mon);
    let what = format!("killed at {step} (thread {thread})");
    assert_released(w, &what);
    w.assert_writing();
    assert_pages_whole(w, &what);
}

/// Every step, on both paths: the leader (in its sleep: the ride) and a writer (user code:
/// sent into the restorer). Together with `rewound` (tests/remote_states.rs, an epoll thread)
/// this is every `--stall-at` point.
#[test]
fn monitor_killed_at_every_step_leaves_the_target_intact() {
    let mut w = Workload::spawn("8M", 2);
    if !can_attach(&w) {
        return;
    }
    w.assert_writing();
    let writer = remote::thread_ids(w.pid as i32)
        .unwrap()
        .into_iter()
        .find(|t| *t != w.pid as i32)
        .expect("a writer") as u32;
    let leader = w.pid;
    for step in RIDE_STEPS {
        kill_at(&mut w, leader, step);
    }
    for step in USER_STEPS {
        kill_at(&mut w, writer, step);
    }
    let mut covered: Vec<&str> = RIDE_STEPS.iter().chain(&USER_STEPS).copied().collect();
    covered.push("rewound");
    for s in Step::ALL.iter().map(Step::name).chain(["copy"]) {
        assert!(covered.contains(&s), "step {s} not covered");
    }
    eprintln!(
        "killed at {} steps of the ride path and {} of the user-code path",
        RIDE_STEPS.len(),
        USER_STEPS.len()
    );
}

/// A small xorshift generator (the seed is printed).
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// One random kill: the monitor started, SIGKILLed `delay` after it reports step `anchor`
/// (`begin`: the beginning of the attach, after its start-up; `others-frozen`: the
/// injection's start), the injected calls run by `thread`; returns the last step it reported.
fn random_kill(w: &Workload, thread: u32, anchor: &str, delay: Duration) -> String {
    let anchor = anchor.to_string();
    let mut mon = spawn_monitor(w, &["--thread", &thread.to_string()]);
    let err = mon.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut last = "start".to_string();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("uffd-wp: STEP ") {
                let step = rest.split_whitespace().next().unwrap_or("");
                if step == anchor {
                    let _ = tx.send(());
                }
                last = step.to_string();
            } else if line.contains("snapshot of") {
                last = "done".into();
            }
        }
        last
    });
    if rx.recv_timeout(PATIENCE).is_ok() {
        std::thread::sleep(delay);
    }
    let _ = mon.kill();
    mon.wait().expect("reap the monitor");
    reader.join().expect("stderr reader")
}

/// Many kills at random instants of the first 5 ms of the attach, on a target that writes
/// all along.
#[test]
fn monitor_killed_at_random_instants_leaves_the_target_intact() {
    let n: usize = std::env::var("UFFD_WP_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let mut w = Workload::spawn("4M", 2);
    if !can_attach(&w) {
        return;
    }
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("random kills: {n}, seed {seed}");
    let writer = remote::thread_ids(w.pid as i32)
        .unwrap()
        .into_iter()
        .find(|t| *t != w.pid as i32)
        .expect("a writer") as u32;
    let mut last_steps: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        // Alternately the leader (in its sleep: the ride) and a writer (user code).
        let thread = if i / 2 % 2 == 0 { w.pid } else { writer };
        // Half of them in the first 5 ms of the attach, half in the first ms of the
        // injection proper (about 0.5 ms here), where the registers are changed.
        let (anchor, window) = if i % 2 == 0 {
            ("begin", 5000)
        } else {
            ("others-frozen", 1000)
        };
        let delay = Duration::from_micros(next(&mut seed) % window);
        let last = random_kill(&w, thread, anchor, delay);
        let what = format!("kill {i}, {delay:?} after {anchor} (last step {last})");
        assert_released(&mut w, &what);
        *last_steps.entry(last).or_default() += 1;
        if i % 50 == 49 {
            w.assert_writing();
        }
    }
    w.assert_writing();
    assert_pages_whole(&w, "after the random kills");
    eprintln!("random kills: {n} of {n} left the target intact; last step reached: {last_steps:?}");
}

/// Sends `sig` (a name for kill(1)) to `pid`.
fn send_signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill(1)");
    assert!(st.success(), "kill -{sig} {pid}");
}

/// A stop signal (INT, TERM, HUP, PIPE) during the attach, the freeze or the copy ends the
/// run cleanly: exit code 128 + the signal, a JSON error of kind `Interrupted`, the target
/// released (checked as after a kill).
#[test]
fn monitor_stopped_by_a_signal_releases_the_target_and_says_so() {
    let mut w = Workload::spawn("8M", 2);
    if !can_attach(&w) {
        return;
    }
    let cases = [
        ("substituted", "TERM", 143),
        ("entry-stop", "INT", 130),
        ("fd-taken", "PIPE", 141),
        ("close-exit-stop", "HUP", 129),
        ("frozen", "INT", 130),
        ("copy", "TERM", 143),
    ];
    for (step, sig, code) in cases {
        let mut mon = spawn_monitor_to(&w, &["--stall-at", step, "--json"], Stdio::piped());
        if let Err(seen) = await_stall(&mut mon, step) {
            panic!("monitor never reached {step}: {seen}");
        }
        send_signal(mon.id(), sig);
        let out = mon.wait_with_output().expect("the monitor's end");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
        assert_eq!(out.status.code(), Some(code), "SIG{sig} at {step}: {v}");
        assert_eq!(v["error"]["kind"], "Interrupted", "SIG{sig} at {step}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("target was released"),
            "{v}"
        );
        let what = format!("SIG{sig} at {step}");
        assert_released(&mut w, &what);
        w.assert_writing();
    }
}

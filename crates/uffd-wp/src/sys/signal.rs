//! Process-wide signal dispositions
//! ([signal(7)](https://man7.org/linux/man-pages/man7/signal.7.html)).

use super::Errno;

/// Gives `SIGPIPE` back its default action (terminate quietly), as a command-line tool whose
/// output may go to `head` or a closed pipe wants: Rust's runtime ignores it, so a write to a
/// closed pipe fails with `EPIPE` and `println!` panics with a backtrace instead.
pub fn default_sigpipe() -> Result<(), Errno> {
    // SAFETY: signal(2) with SIG_DFL installs no handler, so no code of ours can run in signal
    // context; it only changes how the kernel treats SIGPIPE for this process.
    let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if old == libc::SIG_ERR {
        Err(Errno::INVAL)
    } else {
        Ok(())
    }
}

/// The last signal caught by [`catch_stop_signals`]'s handler (0: none).
static CAUGHT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The signals a command line run is stopped with: `SIGINT` (Ctrl-C), `SIGTERM`, `SIGHUP`,
/// `SIGPIPE`.
pub const STOP_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE];

extern "C" fn record(sig: libc::c_int) {
    // An atomic store is async-signal-safe.
    CAUGHT.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// Makes [`STOP_SIGNALS`] non-fatal for the whole process: each is only recorded (an atomic
/// store, nothing else runs in signal context), for the program to see with
/// [`caught_signal`] and end cleanly. `SA_RESTART`: interrupted system calls resume.
pub fn catch_stop_signals() -> Result<(), Errno> {
    for sig in STOP_SIGNALS {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler is an
        // `extern "C" fn(c_int)` doing one atomic store, async-signal-safe.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = record as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa` is a live, initialised sigaction; the old action is not asked for.
        let rc = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(Errno::INVAL);
        }
    }
    Ok(())
}

/// Gives [`STOP_SIGNALS`] back their default action (terminate).
pub fn default_stop_signals() {
    for sig in STOP_SIGNALS {
        // SAFETY: signal(2) with SIG_DFL installs no handler.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// The last of [`STOP_SIGNALS`] caught since [`catch_stop_signals`], if any.
pub fn caught_signal() -> Option<i32> {
    match CAUGHT.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Blocks [`STOP_SIGNALS`] in the calling thread, and so in every thread it starts afterwards
/// (a new thread inherits its creator's mask): the kernel then hands a stop signal sent to
/// the process to a thread that does not block it, started before. A thread that spends
/// seconds in one system call (pre-faulting a large mapping, which no caught signal
/// interrupts) would otherwise hold a signal it was picked for until the call returns.
pub fn block_stop_signals() -> Result<(), Errno> {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t; sigemptyset and sigaddset only write into it.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not asked for. Blocking signals changes
    // only when this thread is interrupted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Errno::from_raw_os_error(rc));
    }
    Ok(())
}

/// Ends the process at once with `code` (`_exit(2)`: `exit_group`), skipping the C library's
/// and Rust's exit handlers, after flushing stdout and stderr. For a run ended by a stop
/// signal while another thread may sit in a long system call holding the mm's lock (a
/// `MADV_POPULATE_WRITE` of a large mapping holds it for seconds): `std::process::exit`'s
/// clean-up unmaps memory (the main thread's signal stack) and would wait for that lock.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit(2) ends every thread of the process; nothing of this process runs after
    // it, so no destructor or handler that is skipped can be relied on by later code.
    unsafe { libc::_exit(code) }
}

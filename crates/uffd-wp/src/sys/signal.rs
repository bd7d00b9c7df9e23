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

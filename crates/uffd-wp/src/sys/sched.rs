//! Scheduling of this process's own threads
//! ([setpriority(2)](https://man7.org/linux/man-pages/man2/setpriority.2.html): on Linux a
//! thread id names one thread, so a nice value set this way is the calling thread's alone).

use rustix::process::setpriority_process;
use rustix::thread::gettid;

use super::Errno;

/// The weakest nice value: a CPU-bound thread at this value gets about 1.5% of a CPU that a
/// nice-0 thread also wants (weights 15 against 1024, sched(7)).
pub const BACKGROUND_NICE: i32 = 19;

/// Sets the calling thread's nice value (threads it spawns afterwards inherit it). Raising it
/// needs no privilege; lowering it again needs CAP_SYS_NICE, so give it to a thread that ends.
pub fn set_this_thread_nice(nice: i32) -> Result<(), Errno> {
    setpriority_process(Some(gettid()), nice)
}

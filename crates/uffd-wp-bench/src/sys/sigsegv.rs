//! The classic dirty tracker, built on `mprotect(2)` and `SIGSEGV`: the baseline the uffd
//! tracker is benchmarked against.
//!
//! Arming makes a region read-only. The first write to a page raises `SIGSEGV`; the handler
//! makes that page writable again (`mprotect(PROT_READ|PROT_WRITE)`, which splits the VMA),
//! sets the page's bit in a bitmap and returns, so the write is retried and goes through. An
//! epoch takes the bitmap and re-arms, either page by page (one `mprotect(PROT_READ)` per dirty
//! run, merging the VMAs back) or over the whole region in one call.
//!
//! Signal handlers are per process, so one [`MprotectTracker`] may exist at a time (a second
//! one fails with EBUSY). A fault outside the tracked region goes to the handler that was
//! installed before (the Rust runtime's stack-overflow handler, or the default action). Not
//! atomic: a write between taking the bitmap and re-arming is lost, so epochs are exact only
//! with the writers quiet at the boundary. The kernel's own accesses to an armed page (a
//! `read(2)` into it) fail with EFAULT instead of raising the signal.
//!
//! `sigaction(2)` comes from `libc` (rustix exposes only the raw kernel call, which needs a
//! hand-written `sa_restorer` trampoline); `mprotect` from rustix.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use rustix::mm::MprotectFlags;

use super::Errno;
use uffd_wp::range::{PAGE_SIZE, Range, RangeSet};
use uffd_wp::sys::mem::Mapping;

/// A tracker exists (its handler is installed).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The tracked region `[START, END)`; `END == 0` when nothing is tracked.
static START: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);
/// One bit per page of the region.
static BITMAP: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
/// Faults handled in the region since the tracker was created.
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// Handlers running right now (the tracker waits for 0 before freeing what they use).
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);
/// The action installed before ours, to chain faults that are not ours.
static OLD_ACTION: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// Passes a fault that is not ours to the previous handler.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let old = OLD_ACTION.load(Ordering::SeqCst);
    // SAFETY: OLD_ACTION points to the saved action while our handler is installed (it is
    // freed only after the old action is restored and no handler runs).
    let Some(old) = (unsafe { old.as_ref() }) else {
        return;
    };
    let h = old.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Restore the default action and return: the access faults again and the process gets
        // the default SIGSEGV behaviour (ignoring SIGSEGV would spin on the fault forever).
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument; sigaction(2) is
        // async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut());
        }
    } else if old.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO, sa_sigaction holds a three-argument handler.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO, sa_sigaction holds a one-argument handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}

/// The SIGSEGV handler: async-signal-safe (atomics and one `mprotect` system call).
extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    IN_HANDLER.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; si_addr is the
    // faulting address for SIGSEGV.
    let addr = unsafe { (*info).si_addr() } as u64;
    let (start, end) = (START.load(Ordering::SeqCst), END.load(Ordering::SeqCst));
    let bitmap = BITMAP.load(Ordering::SeqCst);
    let mut handled = false;
    if addr >= start && addr < end && !bitmap.is_null() {
        let page = addr & !(PAGE_SIZE - 1);
        // SAFETY: the page lies in the region of the live tracker, which owns the mapping
        // (START/END are cleared before the mapping can go away); making it writable again
        // is what the faulting write needs.
        let ok = unsafe {
            rustix::mm::mprotect(
                page as *mut c_void,
                PAGE_SIZE as usize,
                MprotectFlags::READ | MprotectFlags::WRITE,
            )
        }
        .is_ok();
        if ok {
            let i = (page - start) / PAGE_SIZE;
            // SAFETY: the bitmap has one bit per page of [START, END) and lives until the
            // tracker has cleared START/END and seen IN_HANDLER drop to 0.
            let word = unsafe { &*bitmap.add((i / 64) as usize) };
            word.fetch_or(1 << (i % 64), Ordering::SeqCst);
            FAULTS.fetch_add(1, Ordering::Relaxed);
            handled = true;
        }
    }
    if !handled {
        chain(sig, info, ctx);
    }
    IN_HANDLER.fetch_sub(1, Ordering::SeqCst);
}

/// An mprotect/SIGSEGV dirty tracker over a mapping it owns. See the module docs.
#[derive(Debug)]
pub struct MprotectTracker {
    mapping: Mapping,
    bitmap: Box<[AtomicU64]>,
    old: Box<MaybeUninit<libc::sigaction>>,
}

impl MprotectTracker {
    /// Takes `mapping` and installs the SIGSEGV handler; nothing is armed yet.
    /// EBUSY when another tracker exists.
    pub fn new(mapping: Mapping) -> Result<MprotectTracker, Errno> {
        if ACTIVE
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(Errno::BUSY);
        }
        let r = mapping.range();
        let bitmap: Box<[AtomicU64]> = (0..r.pages().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let mut t = MprotectTracker {
            mapping,
            bitmap,
            old: Box::new(MaybeUninit::zeroed()),
        };
        BITMAP.store(t.bitmap.as_ptr().cast_mut(), Ordering::SeqCst);
        FAULTS.store(0, Ordering::SeqCst);
        START.store(r.start(), Ordering::SeqCst);
        END.store(r.end(), Ordering::SeqCst);
        // SAFETY: a zeroed sigaction is valid; we fill the handler, SA_SIGINFO (three-argument
        // handler) and SA_ONSTACK (run on the thread's alternate stack when it has one, as the
        // runtime's stack-overflow handler we chain to expects). `old` receives the previous
        // action and lives in a Box whose address is published before the handler can run.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_segv as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            OLD_ACTION.store(t.old.as_mut_ptr(), Ordering::SeqCst);
            libc::sigaction(libc::SIGSEGV, &act, t.old.as_mut_ptr())
        };
        if rc != 0 {
            let e = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO);
            t.clear_globals();
            ACTIVE.store(false, Ordering::SeqCst);
            // Nothing installed: skip Drop's restore.
            OLD_ACTION.store(std::ptr::null_mut(), Ordering::SeqCst);
            std::mem::forget(t);
            return Err(e);
        }
        Ok(t)
    }

    /// The mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The tracked range.
    pub fn range(&self) -> Range {
        self.mapping.range()
    }

    /// Faults handled since creation.
    pub fn faults(&self) -> u64 {
        FAULTS.load(Ordering::Relaxed)
    }

    fn protect(&self, r: Range, flags: MprotectFlags) -> Result<(), Errno> {
        if self.range().intersect(&r) != Some(r) {
            return Err(Errno::FAULT);
        }
        // SAFETY: `r` lies in the mapping this tracker owns; Rust code reaches that memory only
        // through the mapping's copying accessors, and a write to a read-only page is resolved
        // by the installed handler, so no access ever sees the protection change.
        unsafe { rustix::mm::mprotect(r.start() as *mut c_void, r.len() as usize, flags) }
    }

    /// Read-only over the whole region (the first epoch starts here); forgets recorded pages.
    pub fn arm(&self) -> Result<(), Errno> {
        self.protect(self.range(), MprotectFlags::READ)?;
        self.take_dirty();
        Ok(())
    }

    /// The pages written since the last call (bits cleared).
    pub fn take_dirty(&self) -> RangeSet {
        let base = self.range().start();
        let mut set = RangeSet::new();
        for (w, bits) in self.bitmap.iter().enumerate() {
            let mut b = bits.swap(0, Ordering::SeqCst);
            while b != 0 {
                let i = b.trailing_zeros() as u64;
                b &= b - 1;
                let a = base + (w as u64 * 64 + i) * PAGE_SIZE;
                set.insert(Range::from_bounds(a, a + PAGE_SIZE));
            }
        }
        set
    }

    /// Read-only again over `set` (one `mprotect` per run of pages).
    pub fn rearm_pages(&self, set: &RangeSet) -> Result<(), Errno> {
        set.iter()
            .try_for_each(|r| self.protect(*r, MprotectFlags::READ))
    }

    /// Read-only again over the whole region (one `mprotect`).
    pub fn rearm_range(&self) -> Result<(), Errno> {
        self.protect(self.range(), MprotectFlags::READ)
    }

    fn clear_globals(&self) {
        START.store(0, Ordering::SeqCst);
        END.store(0, Ordering::SeqCst);
        BITMAP.store(std::ptr::null_mut(), Ordering::SeqCst);
    }
}

impl Drop for MprotectTracker {
    /// Makes the region writable, stops claiming its faults, waits for running handlers, then
    /// restores the previous SIGSEGV action.
    fn drop(&mut self) {
        let _ = self.protect(self.range(), MprotectFlags::READ | MprotectFlags::WRITE);
        self.clear_globals();
        while IN_HANDLER.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        // SAFETY: `old` holds the action sigaction(2) returned when ours was installed.
        unsafe {
            libc::sigaction(libc::SIGSEGV, self.old.as_ptr(), std::ptr::null_mut());
        }
        while IN_HANDLER.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        OLD_ACTION.store(std::ptr::null_mut(), Ordering::SeqCst);
        ACTIVE.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uffd_wp::sys::mem::{Backing, Thp};

    /// First writes fault once each and are recorded; re-arming by pages or by range makes the
    /// next writes fault again; a second tracker is refused while one exists; after drop the
    /// region is writable and a new tracker can be made.
    #[test]
    fn records_first_writes_and_rearms() {
        let m = Mapping::new(64 * PAGE_SIZE, PAGE_SIZE, Backing::Anon, Thp::NoHuge).unwrap();
        let r = m.range();
        m.touch(r, 1).unwrap();
        let page =
            |i: u64| Range::from_bounds(r.start() + i * PAGE_SIZE, r.start() + (i + 1) * PAGE_SIZE);
        let t = MprotectTracker::new(m).unwrap();
        assert_eq!(
            MprotectTracker::new(Mapping::anon(PAGE_SIZE).unwrap()).unwrap_err(),
            Errno::BUSY
        );
        t.arm().unwrap();
        for i in [1, 2, 30, 63] {
            t.mapping().touch(page(i), 2).unwrap();
            t.mapping().touch(page(i), 3).unwrap(); // second write: no fault
        }
        assert_eq!(t.faults(), 4);
        let d = t.take_dirty();
        assert_eq!(d, [1, 2, 30, 63].into_iter().map(page).collect());
        t.rearm_pages(&d).unwrap();
        t.mapping().touch(page(2), 4).unwrap();
        t.mapping().touch(page(5), 4).unwrap();
        assert_eq!(t.take_dirty(), [2, 5].into_iter().map(page).collect());
        t.rearm_range().unwrap();
        t.mapping().touch(page(5), 5).unwrap();
        assert_eq!(t.take_dirty(), RangeSet::single(page(5)));
        assert_eq!(t.faults(), 7);
        let mut b = [0u8; 1];
        t.mapping().read(page(5).start(), &mut b).unwrap();
        assert_eq!(b[0], 5);
        drop(t);
        let m2 = Mapping::anon(PAGE_SIZE).unwrap();
        let t2 = MprotectTracker::new(m2).unwrap();
        t2.arm().unwrap();
        t2.mapping().touch(t2.range(), 1).unwrap();
        assert_eq!(t2.take_dirty(), RangeSet::single(t2.range()));
    }
}

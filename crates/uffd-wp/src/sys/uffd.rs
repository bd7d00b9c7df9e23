//! userfaultfd: creation, `UFFDIO_*` ioctls and event messages.
//!
//! See [userfaultfd(2)](https://man7.org/linux/man-pages/man2/userfaultfd.2.html) and
//! [ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html).
//! Each method is one kernel call and returns exactly the kernel's errno.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use linux_raw_sys::general as g;
use linux_raw_sys::ioctl as io;
use rustix::ioctl::ioctl;

use super::{Errno, ioctl_with};

/// `UFFDIO_WRITEPROTECT_MODE_WP`: set write protection (without it: clear).
pub const WP_MODE_WP: u64 = 1;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`: do not wake threads waiting on the range.
pub const WP_MODE_DONTWAKE: u64 = 2;
/// `UFFDIO_WRITEPROTECT_MODE_SKIP_PINNED` (kernel/README.md, only in
/// `UFFDIO_WRITEPROTECT_REPORT`, only with `MODE_WP`): leave pages whose folio may be
/// DMA-pinned writable, count them as done and in `pinned`.
pub const WP_MODE_SKIP_PINNED: u64 = 1 << 2;
/// `UFFDIO_WRITEPROTECT_REPORT` = `_IOWR(0xAA, _UFFDIO_WRITEPROTECT, struct
/// uffdio_writeprotect_report)`: the same ioctl number as `UFFDIO_WRITEPROTECT` (0xC018AA06),
/// the 40-byte struct's size in the command (kernel/README.md). A kernel without it answers
/// EINVAL (fs/userfaultfd.c, userfaultfd_ioctl(): `ret = -EINVAL` for an unknown command).
pub const UFFDIO_WRITEPROTECT_REPORT: u32 = 0xC028_AA06;
/// `UFFD_USER_MODE_ONLY`: handle only faults raised by user-mode accesses.
pub const USER_MODE_ONLY: u32 = g::UFFD_USER_MODE_ONLY;
/// `_IO(0xAA, 0)`: the `/dev/userfaultfd` ioctl that creates a userfaultfd.
const USERFAULTFD_IOC_NEW: u32 = 0xAA00;

/// How the userfaultfd was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The `userfaultfd(2)` syscall.
    Syscall,
    /// `/dev/userfaultfd` and `USERFAULTFD_IOC_NEW` (when the syscall is refused, for example by
    /// `vm.unprivileged_userfaultfd=0` for an unprivileged caller).
    Device,
    /// Created inside another process and copied here with `pidfd_getfd(2)`: it acts on that
    /// process's mm.
    Remote,
}

/// The kernel's answer to `UFFDIO_API`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiAnswer {
    /// Features enabled on this userfaultfd (`uffdio_api.features` after the call).
    pub features: u64,
    /// Bit mask of ioctls supported on the fd itself (`1 << _UFFDIO_*`).
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect_report` (kernel/README.md; not in linux-raw-sys): the request
/// of `UFFDIO_WRITEPROTECT_REPORT` and, in `done` and `pinned`, the kernel's answer, written
/// even when the call fails.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteprotectReportArg {
    /// `range.start`.
    pub start: u64,
    /// `range.len`.
    pub len: u64,
    /// `UFFDIO_WRITEPROTECT_MODE_*` bits, [`WP_MODE_SKIP_PINNED`] included.
    pub mode: u64,
    /// Out: bytes from `start` in the requested state (always a prefix of the range).
    pub done: u64,
    /// Out: bytes inside the prefix left writable because their folio may be DMA-pinned.
    pub pinned: u64,
}

const _: () = assert!(std::mem::size_of::<WriteprotectReportArg>() == 40);
const _: () =
    assert!(UFFDIO_WRITEPROTECT_REPORT == (io::UFFDIO_WRITEPROTECT & !(0x3fff << 16)) | (40 << 16));

/// What `UFFDIO_WRITEPROTECT_REPORT` answered: the ioctl's result and the two output fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportAnswer {
    /// 0 or the errno.
    pub result: Result<(), Errno>,
    /// Bytes from the start in the requested state.
    pub done: u64,
    /// Pinned bytes left writable inside the prefix.
    pub pinned: u64,
}

/// Size of `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

/// One raw `struct uffd_msg` (decoded by `crate::seam::Event::decode`).
pub type RawMsg = [u8; MSG_SIZE];

/// An owned userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    origin: Origin,
    /// The children's uffds that reading `UFFD_EVENT_FORK`s put in this process
    /// (`msg.arg.fork.ufd`, fs/userfaultfd.c `resolve_userfault_fork()`), owned here until
    /// [`Uffd::close_forked`], or until this uffd is dropped.
    forked: std::sync::Mutex<Vec<OwnedFd>>,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn range(start: u64, len: u64) -> g::uffdio_range {
    g::uffdio_range { start, len }
}

impl Uffd {
    /// Creates a userfaultfd (`O_CLOEXEC`, plus `O_NONBLOCK` if `nonblock`, plus
    /// `UFFD_USER_MODE_ONLY` if `user_mode_only`), by the syscall, falling back to
    /// `/dev/userfaultfd` when the syscall is refused (EPERM) or missing (ENOSYS).
    pub fn create(nonblock: bool, user_mode_only: bool) -> Result<Uffd, Errno> {
        let mut flags = g::O_CLOEXEC;
        if nonblock {
            flags |= g::O_NONBLOCK;
        }
        if user_mode_only {
            flags |= USER_MODE_ONLY;
        }
        match Self::create_syscall(flags) {
            Ok(u) => Ok(u),
            Err(e) if e == Errno::PERM || e == Errno::NOSYS => {
                Self::create_dev(flags).map_err(|_| e)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a userfaultfd by the `userfaultfd(2)` syscall only.
    pub fn create_syscall(flags: u32) -> Result<Uffd, Errno> {
        // SAFETY: creating a userfaultfd is sound in itself; rustix marks it unsafe because the
        // fd can later change how this process's memory faults. Every use of that power in
        // uffd-wp goes through the checked methods of this type.
        let fd = unsafe {
            rustix::mm::userfaultfd(rustix::mm::UserfaultfdFlags::from_bits_retain(flags))
        }?;
        Ok(Uffd {
            fd,
            origin: Origin::Syscall,
            forked: Default::default(),
        })
    }

    /// Creates a userfaultfd through `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`).
    pub fn create_dev(flags: u32) -> Result<Uffd, Errno> {
        let dev = rustix::fs::open(
            "/dev/userfaultfd",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        use std::os::fd::FromRawFd;
        let raw = dev_ioctl_new(&dev, flags)?;
        // SAFETY: `raw` was just returned by the kernel as a new descriptor that nothing else
        // owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Uffd {
            fd,
            origin: Origin::Device,
            forked: Default::default(),
        })
    }

    /// A userfaultfd created in another process and copied here with `pidfd_getfd(2)`
    /// (before its `UFFDIO_API`).
    pub fn from_remote(fd: OwnedFd) -> Uffd {
        Uffd {
            fd,
            origin: Origin::Remote,
            forked: Default::default(),
        }
    }

    /// How this fd was created.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// `UFFDIO_API`: the handshake. Asks for `features`; the kernel refuses (EINVAL) a feature
    /// it does not know. On success returns what it enabled.
    pub fn api(&self, features: u64) -> Result<ApiAnswer, Errno> {
        let mut a = g::uffdio_api {
            api: u64::from(g::UFFD_API),
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`, read and written back.
        unsafe { ioctl_with(&self.fd, io::UFFDIO_API, &mut a) }?;
        Ok(ApiAnswer {
            features: a.features,
            ioctls: a.ioctls,
        })
    }

    /// `UFFDIO_REGISTER` of `[start, start+len)` in `mode` (`UFFDIO_REGISTER_MODE_*`). Returns the
    /// mask of ioctls available on the range.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<u64, Errno> {
        let mut r = g::uffdio_register {
            range: range(start, len),
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`, read and written back.
        unsafe { ioctl_with(&self.fd, io::UFFDIO_REGISTER, &mut r) }?;
        Ok(r.ioctls)
    }

    /// `UFFDIO_UNREGISTER` of `[start, start+len)`.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = range(start, len);
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`, read only.
        unsafe { ioctl_with(&self.fd, io::UFFDIO_UNREGISTER, &mut r) }.map(drop)
    }

    /// `UFFDIO_WRITEPROTECT` of `[start, start+len)` with `mode` (`WP_MODE_*`).
    pub fn writeprotect(&self, start: u64, len: u64, mode: u64) -> Result<(), Errno> {
        let mut w = g::uffdio_writeprotect {
            range: range(start, len),
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`, read only.
        unsafe { ioctl_with(&self.fd, io::UFFDIO_WRITEPROTECT, &mut w) }.map(drop)
    }

    /// Whether a non-cooperative event is in flight (the context's `mmap_changing`): one
    /// `UFFDIO_WRITEPROTECT` of an empty range, which fs/userfaultfd.c answers with EAGAIN
    /// while an event is being prepared or waits to be read (the check comes first), and with
    /// EINVAL (len 0) otherwise. Changes nothing.
    pub fn mmap_changing(&self) -> Result<bool, Errno> {
        match self.writeprotect(0, 0, 0) {
            Err(Errno::AGAIN) => Ok(true),
            Err(Errno::INVAL) | Ok(()) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `UFFDIO_WRITEPROTECT_REPORT` of `[start, start+len)` with `mode` (`WP_MODE_*`,
    /// [`WP_MODE_SKIP_PINNED`] included). `done` and `pinned` are what the kernel wrote, even
    /// on failure; 0 when it wrote nothing (a kernel without the command, EFAULT).
    pub fn writeprotect_report(&self, start: u64, len: u64, mode: u64) -> ReportAnswer {
        let mut w = WriteprotectReportArg {
            start,
            len,
            mode,
            done: 0,
            pinned: 0,
        };
        // SAFETY: UFFDIO_WRITEPROTECT_REPORT takes a `struct uffdio_writeprotect_report`
        // (`WriteprotectReportArg`, `#[repr(C)]`, 40 bytes, checked above), read and written
        // back; it holds no pointer.
        let result = unsafe { ioctl_with(&self.fd, UFFDIO_WRITEPROTECT_REPORT, &mut w) }.map(drop);
        ReportAnswer {
            result,
            done: w.done,
            pinned: w.pinned,
        }
    }

    /// `UFFDIO_WAKE` of `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = range(start, len);
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`, read only.
        unsafe { ioctl_with(&self.fd, io::UFFDIO_WAKE, &mut r) }.map(drop)
    }

    /// `UFFDIO_CONTINUE` of `[start, start+len)` (minor faults). Returns bytes mapped.
    pub fn continue_(&self, start: u64, len: u64, mode: u64) -> Result<i64, Errno> {
        let mut c = g::uffdio_continue {
            range: range(start, len),
            mode,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE takes a `struct uffdio_continue`, read and written back.
        unsafe { ioctl_with(&self.fd, io::UFFDIO_CONTINUE, &mut c) }?;
        Ok(c.mapped)
    }

    /// Reads up to `max` pending events. With a non-blocking fd, returns an empty vector when
    /// none is pending (EAGAIN is not an error here). The descriptor of each fork event's child
    /// uffd is taken into this uffd's keeping ([`Uffd::close_forked`]).
    pub fn read_msgs(&self, max: usize) -> Result<Vec<RawMsg>, Errno> {
        let mut buf = vec![0u8; MSG_SIZE * max.max(1)];
        let n = match rustix::io::read(&self.fd, &mut buf) {
            Ok(n) => n,
            Err(Errno::AGAIN) => 0,
            Err(e) => return Err(e),
        };
        let msgs: Vec<RawMsg> = buf[..n]
            .chunks_exact(MSG_SIZE)
            .map(|c| c.try_into().expect("chunk of MSG_SIZE"))
            .collect();
        for m in msgs.iter().filter(|m| m[0] == g::UFFD_EVENT_FORK as u8) {
            let raw = i32::from_ne_bytes(m[8..12].try_into().expect("4 bytes"));
            // SAFETY: the read above installed this descriptor in our table for the fork
            // event (`resolve_userfault_fork()`); nothing else knows it yet, so this is its
            // one owner.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
            self.forked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(fd);
        }
        Ok(msgs)
    }

    /// Closes the child uffd a fork event read here named (`ufd`): the child's registrations
    /// and write protection go with it, and its threads waiting on a fault there go on. EBADF
    /// if this uffd holds no such descriptor.
    pub fn close_forked(&self, ufd: u32) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        let mut held = self.forked.lock().unwrap_or_else(|e| e.into_inner());
        let i = held
            .iter()
            .position(|f| i64::from(f.as_raw_fd()) == i64::from(ufd))
            .ok_or(Errno::BADF)?;
        drop(held.swap_remove(i));
        Ok(())
    }

    /// Waits until an event is readable or `timeout_ms` passes (-1: forever). Returns whether
    /// the fd is readable.
    pub fn poll(&self, timeout_ms: i32) -> Result<bool, Errno> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let ts = (timeout_ms >= 0).then(|| Timespec {
            tv_sec: i64::from(timeout_ms / 1000),
            tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
        });
        let n = poll(&mut fds, ts.as_ref())?;
        Ok(n > 0)
    }
}

/// `USERFAULTFD_IOC_NEW` on an open `/dev/userfaultfd`, returning the new raw fd.
fn dev_ioctl_new(dev: &OwnedFd, flags: u32) -> Result<i32, Errno> {
    struct New(u32);
    // SAFETY: USERFAULTFD_IOC_NEW is `_IO(0xAA, 0)`: its argument is the flags integer passed in
    // place of a pointer, which the kernel never dereferences; the return value is the new fd.
    unsafe impl rustix::ioctl::Ioctl for New {
        type Output = rustix::ioctl::IoctlOutput;
        const IS_MUTATING: bool = false;
        fn opcode(&self) -> rustix::ioctl::Opcode {
            USERFAULTFD_IOC_NEW
        }
        fn as_ptr(&mut self) -> *mut core::ffi::c_void {
            self.0 as usize as *mut core::ffi::c_void
        }
        unsafe fn output_from_ptr(
            out: rustix::ioctl::IoctlOutput,
            _: *mut core::ffi::c_void,
        ) -> rustix::io::Result<Self::Output> {
            Ok(out)
        }
    }
    // SAFETY: see the impl above: no memory is passed to the kernel.
    unsafe { ioctl(dev, New(flags)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A uffd closes only the fork descriptors its reads took in: any other number is EBADF,
    /// and a descriptor of this process it does not own (its own) stays open.
    #[test]
    fn close_forked_refuses_a_descriptor_no_fork_event_gave() {
        use std::os::fd::AsRawFd;
        let Ok(u) = Uffd::create(true, true) else {
            eprintln!("SKIPPED: no userfaultfd here");
            return;
        };
        let own = u.as_fd().as_raw_fd() as u32;
        assert_eq!(u.close_forked(own), Err(Errno::BADF));
        assert_eq!(u.close_forked(u32::MAX), Err(Errno::BADF));
        assert!(
            rustix::fs::fstat(u.as_fd()).is_ok(),
            "the uffd itself stays open"
        );
    }
}

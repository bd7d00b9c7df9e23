//! The raw kernel interface: the only module of uffd-wp with `unsafe` code.
//!
//! A thin typed layer over the syscalls and ioctls of userfaultfd(2) and /proc/PID/pagemap,
//! built on [`rustix`] and the constants and structs of [`linux_raw_sys`] (no bindgen step).
//! Every `unsafe` block states why it is sound in a `// SAFETY:` comment; every function here is
//! safe to call. Nothing in this module decides policy: it reports what the kernel said.
//!
//! - [`uffd`]: create a userfaultfd, `UFFDIO_API`, register, write-protect, wake, read events
//!   ([userfaultfd(2)](https://man7.org/linux/man-pages/man2/userfaultfd.2.html),
//!   [ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html)).
//! - [`pagemap`]: `/proc/PID/pagemap` entries and the `PAGEMAP_SCAN` ioctl
//!   ([pagemap docs](https://docs.kernel.org/admin-guide/mm/pagemap.html)).
//! - [`ptrace`]: ptrace, waitpid on tracees, process_vm_readv, pidfd_getfd (another process).
//! - [`mem`]: anonymous and memfd mappings owned by RAII guards, madvise, page touching.
//! - [`uring`]: io_uring fixed buffers over memory the ring owns (the `io-uring` crate).
//! - [`direct`]: `O_DIRECT` reads and writes into memory a mapping owns.
//! - [`signal`]: process-wide signal dispositions (`SIGPIPE` for the command line).
//! - [`sched`]: the nice value of the calling thread (a background copier).
//! - [`cpu`]: `CPUID` facts (the XSAVE layout a core file describes).
//! - [`file`]: unnamed files (`O_TMPFILE`), named once written (the core file).
#![allow(unsafe_code)]

pub mod cpu;
pub mod direct;
pub mod file;
pub mod mem;
pub mod pagemap;
pub mod ptrace;
pub mod sched;
pub mod signal;
pub mod uffd;
pub mod uring;

pub use rustix::io::Errno;

/// Serde for [`Errno`] as its raw number (`#[serde(with = "crate::sys::errno_serde")]`).
pub mod errno_serde {
    use super::Errno;

    /// Serializes the raw errno.
    pub fn serialize<S: serde::Serializer>(e: &Errno, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(e.raw_os_error())
    }

    /// Deserializes a raw errno.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Errno, D::Error> {
        <i32 as serde::Deserialize>::deserialize(d).map(Errno::from_raw_os_error)
    }

    /// The same for `Option<Errno>`.
    pub mod option {
        use super::Errno;

        /// Serializes the raw errno or null.
        pub fn serialize<S: serde::Serializer>(e: &Option<Errno>, s: S) -> Result<S::Ok, S::Error> {
            serde::Serialize::serialize(&e.map(Errno::raw_os_error), s)
        }

        /// Deserializes a raw errno or null.
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Errno>, D::Error> {
            <Option<i32> as serde::Deserialize>::deserialize(d)
                .map(|e| e.map(Errno::from_raw_os_error))
        }
    }
}

/// The symbolic name of an errno (`"ENOMEM"`), as reports print it.
pub fn errno_name(e: Errno) -> String {
    let name = match e {
        Errno::NOMEM => "ENOMEM",
        Errno::AGAIN => "EAGAIN",
        Errno::NOENT => "ENOENT",
        Errno::INVAL => "EINVAL",
        Errno::FAULT => "EFAULT",
        Errno::SRCH => "ESRCH",
        Errno::PERM => "EPERM",
        Errno::ACCESS => "EACCES",
        Errno::EXIST => "EEXIST",
        Errno::BUSY => "EBUSY",
        Errno::NOSYS => "ENOSYS",
        Errno::NOTTY => "ENOTTY",
        Errno::BADF => "EBADF",
        Errno::NOSPC => "ENOSPC",
        Errno::INTR => "EINTR",
        Errno::OPNOTSUPP => "EOPNOTSUPP",
        Errno::SPIPE => "ESPIPE",
        Errno::IO => "EIO",
        Errno::CHILD => "ECHILD",
        _ => return format!("E{}", e.raw_os_error()),
    };
    name.to_string()
}

/// The errno for a name printed by [`errno_name`] (used to parse reports and CLI flags).
pub fn errno_from_name(name: &str) -> Option<Errno> {
    const KNOWN: [Errno; 19] = [
        Errno::NOMEM,
        Errno::AGAIN,
        Errno::NOENT,
        Errno::INVAL,
        Errno::FAULT,
        Errno::SRCH,
        Errno::PERM,
        Errno::ACCESS,
        Errno::EXIST,
        Errno::BUSY,
        Errno::NOSYS,
        Errno::NOTTY,
        Errno::BADF,
        Errno::NOSPC,
        Errno::INTR,
        Errno::OPNOTSUPP,
        Errno::SPIPE,
        Errno::IO,
        Errno::CHILD,
    ];
    let upper = name.to_ascii_uppercase();
    KNOWN.into_iter().find(|e| errno_name(*e) == upper)
}

/// The errno of a `std::io::Error`, `EIO` when it carries none.
pub fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_io_error(e).unwrap_or(Errno::IO)
}

/// An ioctl whose argument is a struct the kernel reads and may write back, and whose return
/// value (not only success) matters, as for `PAGEMAP_SCAN`.
struct Ioctl<'a, T> {
    opcode: u32,
    arg: &'a mut T,
}

// SAFETY: `as_ptr` returns a pointer to a live `&mut T` for the whole call; every constructor in
// this module pairs an opcode with the exact struct type the kernel expects for it, and
// IS_MUTATING is true, so rustix treats the memory as written by the kernel.
unsafe impl<T> rustix::ioctl::Ioctl for Ioctl<'_, T> {
    type Output = rustix::ioctl::IoctlOutput;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> rustix::ioctl::Opcode {
        self.opcode
    }
    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        (self.arg as *mut T).cast()
    }
    unsafe fn output_from_ptr(
        out: rustix::ioctl::IoctlOutput,
        _: *mut core::ffi::c_void,
    ) -> rustix::io::Result<Self::Output> {
        Ok(out)
    }
}

/// Issues `ioctl(fd, opcode, arg)` and returns the kernel's return value.
///
/// # Safety
/// `T` must be the exact argument type the kernel expects for `opcode`, and every pointer the
/// struct holds (for example `pm_scan_arg.vec`) must be valid for the kernel to access as the
/// ioctl's contract says.
unsafe fn ioctl_with<T>(fd: impl rustix::fd::AsFd, opcode: u32, arg: &mut T) -> Result<i32, Errno> {
    // SAFETY: forwarded from this function's contract.
    unsafe { rustix::ioctl::ioctl(fd, Ioctl { opcode, arg }) }
}

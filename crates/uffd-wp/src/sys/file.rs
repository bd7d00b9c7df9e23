//! Unnamed files ([open(2)](https://man7.org/linux/man-pages/man2/open.2.html) `O_TMPFILE`):
//! a file written in full before it gets a name, so that a writer killed half-way leaves
//! nothing behind (the core file of `uffd-wp dump`).

use std::fs::File;
use std::path::Path;

use rustix::fs::{AtFlags, CWD, Mode, OFlags};

use super::Errno;

/// Creates an unnamed regular file in directory `dir`, open for reading and writing, mode
/// 0666 less the umask. `EOPNOTSUPP` (or `EISDIR` on old kernels) where the filesystem has
/// no `O_TMPFILE`.
pub fn create_unnamed(dir: &Path) -> Result<File, Errno> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    )?;
    Ok(File::from(fd))
}

/// Gives the unnamed file `f` ([`create_unnamed`]) the name `path` (in the directory it was
/// created in): `linkat(2)` of its `/proc/self/fd` link with `AT_SYMLINK_FOLLOW`, which needs
/// no capability, unlike `AT_EMPTY_PATH`. `EEXIST` if `path` exists.
pub fn link_unnamed(f: &File, path: &Path) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
    rustix::fs::linkat(CWD, proc.as_str(), CWD, path, AtFlags::SYMLINK_FOLLOW)
}

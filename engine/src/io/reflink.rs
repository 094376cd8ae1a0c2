//! Reflink (FICLONE): make a file share another's extents, copy-on-write, where the
//! filesystem can (btrfs, XFS with reflink, bcachefs); others answer EOPNOTSUPP, EXDEV or
//! EINVAL and the caller copies instead.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Makes `target` (open for writing) a copy-on-write clone of all of `source`. A `target`
/// with blocks of its own (preallocated) of the same length is accepted: its blocks are
/// replaced by the source's shared extents and freed.
pub fn reflink(source: &File, target: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument, by value, and reads no
    // memory of ours; both descriptors are open for the duration of the call, borrowed from
    // the `File`s.
    let result = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    if result == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Errors from [`reflink`] (or an in-kernel copy) that mean "not on this filesystem, kernel or
/// seccomp filter": the caller copies instead. Anything else is a real failure.
pub fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::EOPNOTSUPP
                | libc::ENOTTY
                | libc::EXDEV
                | libc::EINVAL
                | libc::ENOSYS
                | libc::EPERM
                | libc::EBADF
        )
    )
}

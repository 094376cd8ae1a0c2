//! The output side of a transfer (and of an export): which paths an output may be placed at,
//! and placing the store's content there with the configured mode and owner.
//!
//! The daemon runs as root, so the path it writes is pinned down when it is checked: the
//! checked, canonical parent directory is opened then ([`OutputTarget::open`]) and every
//! later step is relative to that descriptor (`openat`, `linkat`, `renameat`), with an
//! `O_EXCL | O_NOFOLLOW` temporary file. A component swapped for a symlink after the check
//! cannot redirect the write.

use super::TransferError;
use crate::config::{ConfigError, OutputConfig};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::{Gid, Group, Uid, UnlinkatFlags, User};
use std::ffi::{OsStr, OsString};
use std::fs::{File, Permissions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Checks an output path: absolute, no `..`, its directory existing and inside one of
/// the configured output directories (none configured: no output is placed anywhere).
pub fn check_output_path(
    output_dirs: &[PathBuf],
    data_dir: &Path,
    path: &Path,
) -> Result<PathBuf, TransferError> {
    if !path.is_absolute() {
        return Err(TransferError::InvalidArgument(format!(
            "output path {} is relative; give an absolute path",
            path.display()
        )));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(TransferError::InvalidArgument(format!(
            "output path {} contains '..'",
            path.display()
        )));
    }
    let name = path.file_name().ok_or_else(|| {
        TransferError::InvalidArgument(format!("output path {} names no file", path.display()))
    })?;
    let parent = path
        .parent()
        .expect("absolute path with a file name has a parent");
    let parent = parent.canonicalize().map_err(|e| {
        TransferError::InvalidArgument(format!(
            "output directory {} is not usable: {e}",
            parent.display()
        ))
    })?;
    if output_dirs.is_empty() {
        return Err(TransferError::PermissionDenied(format!(
            "output path {}: this daemon has no output directories; set output_dirs \
             (--output-dir) to let transfers and exports place files",
            path.display()
        )));
    }
    if !output_dirs
        .iter()
        .any(|allowed| parent.starts_with(allowed))
    {
        let allowed: Vec<String> = output_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        return Err(TransferError::PermissionDenied(format!(
            "output path {} is outside the allowed output directories ({})",
            path.display(),
            allowed.join(", ")
        )));
    }
    if parent.starts_with(
        data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_owned()),
    ) {
        return Err(TransferError::PermissionDenied(format!(
            "output path {} is inside the daemon's data dir",
            path.display()
        )));
    }
    Ok(parent.join(name))
}

/// Mode and ownership of placed outputs, from `[output]`, names resolved at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputPolicy {
    /// Permission bits (never others-writable, no setuid/setgid/sticky).
    pub mode: u32,
    /// None: unchanged (the daemon's uid).
    pub owner: Option<u32>,
    /// None: unchanged (the daemon's gid).
    pub group: Option<u32>,
}

impl Default for OutputPolicy {
    fn default() -> Self {
        OutputPolicy {
            mode: 0o644,
            owner: None,
            group: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputConfigError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("output.owner = {0:?}: no such user on this host (give a user name or a numeric uid)")]
    UnknownUser(String),
    #[error(
        "output.group = {0:?}: no such group on this host (give a group name or a numeric gid)"
    )]
    UnknownGroup(String),
    #[error("output.{key} = {value:?}: looking it up failed: {source}")]
    Lookup {
        key: &'static str,
        value: String,
        source: Errno,
    },
    #[error("output.{key} = {value:?} asks for chown, which needs CAP_CHOWN, and this daemon does not have it; under systemd add it with `systemctl edit ferry`: [Service] CapabilityBoundingSet=CAP_IPC_LOCK CAP_CHOWN")]
    NoChownCapability { key: &'static str, value: String },
}

impl OutputPolicy {
    /// Resolves `[output]`: the mode checked, user and group names looked up (a number is
    /// taken as an id as it is).
    pub fn resolve(config: &OutputConfig) -> Result<OutputPolicy, OutputConfigError> {
        let mode = config.mode_bits()?;
        let owner = match config.owner.as_deref().map(str::trim) {
            None => None,
            Some(text) => Some(match text.parse::<u32>() {
                Ok(id) => id,
                Err(_) => User::from_name(text)
                    .map_err(|source| OutputConfigError::Lookup {
                        key: "owner",
                        value: text.into(),
                        source,
                    })?
                    .ok_or_else(|| OutputConfigError::UnknownUser(text.into()))?
                    .uid
                    .as_raw(),
            }),
        };
        let group = match config.group.as_deref().map(str::trim) {
            None => None,
            Some(text) => Some(match text.parse::<u32>() {
                Ok(id) => id,
                Err(_) => Group::from_name(text)
                    .map_err(|source| OutputConfigError::Lookup {
                        key: "group",
                        value: text.into(),
                        source,
                    })?
                    .ok_or_else(|| OutputConfigError::UnknownGroup(text.into()))?
                    .gid
                    .as_raw(),
            }),
        };
        Ok(OutputPolicy { mode, owner, group })
    }

    /// Refuses, at start-up rather than at the first placement, an owner or group this
    /// process could not give: changing either to another id needs CAP_CHOWN, which the
    /// installed unit does not grant by default. Where the capability set cannot be read
    /// nothing is refused (placement then reports the EPERM).
    pub fn check_capability(&self, config: &OutputConfig) -> Result<(), OutputConfigError> {
        let foreign_owner = self.owner.filter(|&u| u != Uid::effective().as_raw());
        let foreign_group = self.group.filter(|&g| g != Gid::effective().as_raw());
        let (key, value) = match (foreign_owner, foreign_group) {
            (Some(_), _) => ("owner", config.owner.clone()),
            (None, Some(_)) => ("group", config.group.clone()),
            (None, None) => return Ok(()),
        };
        if has_cap_chown() == Some(false) {
            return Err(OutputConfigError::NoChownCapability {
                key,
                value: value.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Whether a file with `stat`'s owner already satisfies the policy's owner and group.
    fn owned_as_wanted(&self, uid: u32, gid: u32) -> bool {
        self.owner.is_none_or(|u| u == uid) && self.group.is_none_or(|g| g == gid)
    }
}

/// Whether CAP_CHOWN (capability 0) is in this process's effective set; None when
/// /proc/self/status cannot tell.
fn has_cap_chown() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let caps = u64::from_str_radix(hex.trim(), 16).ok()?;
    Some(caps & 1 != 0)
}

/// A checked output path, its directory held open since the check.
#[derive(Debug, Clone)]
pub struct OutputTarget {
    path: PathBuf,
    dir: Arc<OwnedFd>,
    name: OsString,
}

impl OutputTarget {
    /// Opens the directory of a path [`check_output_path`] returned (canonical: no
    /// component is a symlink). A symlink found now means a component was swapped since the
    /// check, and is refused.
    pub fn open(checked: PathBuf) -> Result<OutputTarget, TransferError> {
        let parent = checked.parent().expect("a checked path has a parent");
        let name = checked
            .file_name()
            .expect("a checked path names a file")
            .to_owned();
        let dir = open_dir_no_symlinks(parent).map_err(|err| {
            TransferError::InvalidArgument(format!(
                "output directory {} cannot be opened (changed since it was checked?): {err}",
                parent.display()
            ))
        })?;
        Ok(OutputTarget {
            path: checked,
            dir: Arc::new(dir),
            name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Opens a canonical directory path, following no symlink on the way: `openat2` with
/// RESOLVE_NO_SYMLINKS where the kernel (5.6+) and the seccomp filter allow it, otherwise
/// `O_NOFOLLOW` on the last component and a check that the descriptor's path is still the
/// one asked for.
fn open_dir_no_symlinks(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let how = nix::fcntl::OpenHow::new()
        .flags(flags)
        .resolve(nix::fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOSYS | Errno::EPERM | Errno::E2BIG) => {}
        Err(err) => return Err(err.into()),
    }
    let fd = nix::fcntl::open(path, flags | OFlag::O_NOFOLLOW, Mode::empty())?;
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        fd.as_raw_fd()
    }));
    if let Ok(actual) = std::fs::read_link(fd_path) {
        if actual != path {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("it resolved to {}", actual.display()),
            ));
        }
    }
    Ok(fd)
}

/// How an output was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The output already was the store's content file (a hard link) with the wanted mode.
    AlreadyPlaced,
    /// A hard link to the store's content file: same inode, no bytes copied.
    HardLink,
    /// A copy-on-write clone (FICLONE): an independent inode sharing extents.
    Reflink,
    /// An in-kernel copy (`copy_file_range`).
    CopyFileRange,
    /// A copy through user space (read and write).
    Copy,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::AlreadyPlaced => "already placed",
            Placement::HardLink => "hard link",
            Placement::Reflink => "reflink",
            Placement::CopyFileRange => "copy_file_range",
            Placement::Copy => "copy",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    #[error(
        "no space left placing the output at {path} ({needed} bytes needed on its filesystem)"
    )]
    NoSpace { path: PathBuf, needed: u64 },
    #[error("placing the output at {path}: {doing}: {source}")]
    Io {
        path: PathBuf,
        doing: String,
        #[source]
        source: io::Error,
    },
    #[error("placing the output at {0}: the store's content is {1} bytes, shorter than the task")]
    ShortContent(PathBuf, u64),
    #[error("placing the output at {0} panicked")]
    Panicked(PathBuf),
}

/// Which ways of placing may be tried, in order (tests force the copy paths).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Methods {
    pub link: bool,
    pub reflink: bool,
    pub copy_file_range: bool,
}

impl Methods {
    pub(crate) const ALL: Methods = Methods {
        link: true,
        reflink: true,
        copy_file_range: true,
    };
}

/// Temporary names are unique within the daemon, so two placements onto one path do not
/// collide; the pid keeps a crashed daemon's leftovers recognisable.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Places `length` bytes of the store's `content` file at `target`, atomically (under a
/// temporary name beside it, then a rename) and durably, with the policy's mode and owner.
/// Blocking: call it on the blocking pool.
///
/// A hard link is chosen when content and target share a filesystem and the policy can
/// apply to the store's own file harmlessly: no owner or group change (a chown would hand
/// the store's file, which peers are served from, to that user, who could then write it),
/// and a mode without group or other write (or the file's mode already). The mode is then
/// set on the shared inode, the store's copy included. Otherwise the output is an independent
/// inode: a reflink, else `copy_file_range`, else a plain copy.
pub fn place(
    content: &Path,
    length: u64,
    target: &OutputTarget,
    policy: &OutputPolicy,
) -> Result<Placement, OutputError> {
    place_with(content, length, target, policy, Methods::ALL)
}

pub(crate) fn place_with(
    content: &Path,
    length: u64,
    target: &OutputTarget,
    policy: &OutputPolicy,
    methods: Methods,
) -> Result<Placement, OutputError> {
    let fail = |doing: &str, source: io::Error| {
        if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
            OutputError::NoSpace {
                path: target.path.clone(),
                needed: length,
            }
        } else {
            OutputError::Io {
                path: target.path.clone(),
                doing: doing.to_owned(),
                source,
            }
        }
    };
    let dir = target.dir.as_fd();
    let name = target.name.as_os_str();
    let source = File::open(content).map_err(|e| fail("opening the store's content", e))?;
    let stat = source
        .metadata()
        .map_err(|e| fail("stat of the store's content", e))?;
    if stat.len() < length {
        return Err(OutputError::ShortContent(target.path.clone(), stat.len()));
    }
    let mode_is_harmless = stat.mode() & 0o7777 == policy.mode || policy.mode & 0o022 == 0;
    let linkable = methods.link
        && mode_is_harmless
        && policy.owned_as_wanted(stat.uid(), stat.gid())
        && stat.len() == length;
    let set_mode = |file: &File| {
        file.set_permissions(Permissions::from_mode(policy.mode))
            .map_err(|e| fail(&format!("chmod {:o}", policy.mode), e))
    };

    // A repeat onto an output that is already this inode: renaming a second link over it
    // would be a no-op that leaves the temporary name behind, so only the mode is renewed.
    if let Ok(existing) = fstatat(dir, name) {
        if same_inode(&existing, &stat) && linkable {
            set_mode(&source)?;
            return Ok(Placement::AlreadyPlaced);
        }
    }

    let dir_dev = nix::sys::stat::fstat(dir)
        .map_err(|e| fail("stat of the output directory", e.into()))?
        .st_dev;
    let temp = temp_name(name);
    if linkable && dir_dev == stat.dev() {
        match nix::unistd::linkat(
            nix::fcntl::AT_FDCWD,
            content,
            dir,
            temp.as_os_str(),
            AtFlags::empty(),
        ) {
            Ok(()) => {
                let placed = set_mode(&source).and_then(|()| finish(dir, &temp, name, &fail));
                return match placed {
                    Ok(()) => Ok(Placement::HardLink),
                    Err(err) => {
                        let _ = nix::unistd::unlinkat(
                            dir,
                            temp.as_os_str(),
                            UnlinkatFlags::NoRemoveDir,
                        );
                        Err(err)
                    }
                };
            }
            // Another filesystem after all, hard links refused (fs.protected_hardlinks, a
            // filesystem without them) or too many links: copy instead.
            Err(Errno::EXDEV | Errno::EPERM | Errno::EMLINK | Errno::EOPNOTSUPP) => {}
            Err(err) => return Err(fail("hard-linking the store's content", err.into())),
        }
    }

    let file = create_temp(dir, &temp).map_err(|e| fail("creating the temporary file", e))?;
    let placed = (|| {
        let how = copy_into(&source, &file, length, methods)
            .map_err(|e| fail("copying the store's content", e))?;
        // The mode first: once the file is someone else's, changing it would need CAP_FOWNER.
        set_mode(&file)?;
        if policy.owner.is_some() || policy.group.is_some() {
            std::os::unix::fs::fchown(&file, policy.owner, policy.group).map_err(|e| {
                fail(
                    &format!(
                        "chown to {}:{} (output.owner / output.group; needs CAP_CHOWN)",
                        policy.owner.map_or("-".into(), |u| u.to_string()),
                        policy.group.map_or("-".into(), |g| g.to_string())
                    ),
                    e,
                )
            })?;
        }
        file.sync_all()
            .map_err(|e| fail("syncing the copied output", e))?;
        finish(dir, &temp, name, &fail)?;
        Ok(how)
    })();
    if placed.is_err() {
        let _ = nix::unistd::unlinkat(dir, temp.as_os_str(), UnlinkatFlags::NoRemoveDir);
    }
    placed
}

fn fstatat(dir: std::os::fd::BorrowedFd<'_>, name: &OsStr) -> nix::Result<FileStat> {
    nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn same_inode(a: &FileStat, b: &std::fs::Metadata) -> bool {
    a.st_dev == b.dev() && a.st_ino == b.ino()
}

fn temp_name(name: &OsStr) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(
        ".ferry-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    temp
}

/// A new file under the directory: `O_EXCL | O_NOFOLLOW`, so neither an existing file nor
/// a planted symlink is written through. A leftover of the same name (a crashed daemon
/// that had this pid) is removed once.
fn create_temp(dir: std::os::fd::BorrowedFd<'_>, temp: &OsStr) -> io::Result<File> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mode = Mode::from_bits_truncate(0o600);
    match nix::fcntl::openat(dir, temp, flags, mode) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::EEXIST) => {
            nix::unistd::unlinkat(dir, temp, UnlinkatFlags::NoRemoveDir)?;
            Ok(File::from(nix::fcntl::openat(dir, temp, flags, mode)?))
        }
        Err(err) => Err(err.into()),
    }
}

/// Renames the temporary name over the output and makes the rename durable.
fn finish(
    dir: std::os::fd::BorrowedFd<'_>,
    temp: &OsStr,
    name: &OsStr,
    fail: &impl Fn(&str, io::Error) -> OutputError,
) -> Result<(), OutputError> {
    nix::fcntl::renameat(dir, temp, dir, name)
        .map_err(|e| fail("renaming into place", e.into()))?;
    // rename(2) does nothing when both names are links to one inode (a concurrent
    // placement of the same task got there first): the temporary name must still go.
    match nix::unistd::unlinkat(dir, temp, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(err) => return Err(fail("removing the temporary name", err.into())),
    }
    nix::unistd::fsync(dir).map_err(|e| fail("syncing the output directory", e.into()))
}

/// Copies `length` bytes: a reflink, else `copy_file_range` in a loop, else read and write.
/// Each faster way is given up on only when it is unsupported here, before any byte moved.
fn copy_into(source: &File, target: &File, length: u64, methods: Methods) -> io::Result<Placement> {
    if methods.reflink && source.metadata()?.len() == length {
        match crate::io::reflink(source, target) {
            Ok(()) => return Ok(Placement::Reflink),
            Err(err) if crate::io::reflink_unsupported(&err) => {}
            Err(err) => return Err(err),
        }
    }
    let mut copied = 0u64;
    if methods.copy_file_range {
        let mut off_in = 0i64;
        let mut off_out = 0i64;
        while copied < length {
            let chunk = (length - copied).min(1 << 30) as usize;
            match nix::fcntl::copy_file_range(
                source.as_fd(),
                Some(&mut off_in),
                target.as_fd(),
                Some(&mut off_out),
                chunk,
            ) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => copied += n as u64,
                Err(Errno::EINTR) => {}
                Err(err) if copied == 0 && crate::io::reflink_unsupported(&err.into()) => break,
                Err(err) => return Err(err.into()),
            }
        }
        if copied == length {
            return Ok(Placement::CopyFileRange);
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    while copied < length {
        let want = (length - copied).min(buf.len() as u64) as usize;
        let n = source.read_at(&mut buf[..want], copied)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        target.write_all_at(&buf[..n], copied)?;
        copied += n as u64;
    }
    Ok(Placement::Copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const LENGTH: u64 = 3 * 1024 * 1024 + 17;

    /// A stand-in for a store's content file: `LENGTH` patterned bytes, mode 0600.
    fn content_in(dir: &Path) -> (PathBuf, Vec<u8>) {
        std::fs::create_dir_all(dir).unwrap();
        let bytes: Vec<u8> = (0..LENGTH).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir.join("content");
        std::fs::write(&path, &bytes).unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        (path, bytes)
    }

    fn target(dir: &Path, name: &str) -> OutputTarget {
        std::fs::create_dir_all(dir).unwrap();
        let checked = check_output_path(
            &[dir.canonicalize().unwrap()],
            Path::new("/nonexistent-data-dir"),
            &dir.join(name),
        )
        .unwrap();
        OutputTarget::open(checked).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn placement_lands_in_the_opened_directory_even_after_its_path_becomes_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let (content, bytes) = content_in(&root.path().join("store"));
        let out = root.path().join("out");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let target = target(&out, "model.bin");
        // After the check and the open, the checked directory is swapped for a symlink to
        // a directory the daemon was never allowed to write.
        let moved = root.path().join("out.moved");
        std::fs::rename(&out, &moved).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &out).unwrap();
        for methods in [
            Methods::ALL,
            Methods {
                link: false,
                reflink: false,
                copy_file_range: false,
            },
        ] {
            place_with(&content, LENGTH, &target, &OutputPolicy::default(), methods).unwrap();
            assert_eq!(std::fs::read(moved.join("model.bin")).unwrap(), bytes);
            assert!(names(&elsewhere).is_empty(), "{:?}", names(&elsewhere));
            assert_eq!(names(&moved), ["model.bin"]);
        }
        // Opening the swapped path now is refused: a symlink where the check saw none.
        let swapped = OutputTarget::open(out.join("model.bin")).unwrap_err();
        assert!(
            matches!(swapped, TransferError::InvalidArgument(_)),
            "{swapped}"
        );
    }

    #[test]
    fn a_repeat_onto_the_same_inode_leaves_no_temporary_file() {
        let root = tempfile::tempdir().unwrap();
        let (content, bytes) = content_in(&root.path().join("store"));
        let out = root.path().join("out");
        let target = target(&out, "model.bin");
        let policy = OutputPolicy::default();
        let first = place(&content, LENGTH, &target, &policy).unwrap();
        assert_eq!(first, Placement::HardLink);
        let placed = std::fs::metadata(out.join("model.bin")).unwrap();
        assert_eq!(placed.ino(), std::fs::metadata(&content).unwrap().ino());
        assert_eq!(placed.mode() & 0o7777, 0o644, "the policy's mode");
        let again = place(&content, LENGTH, &target, &policy).unwrap();
        assert_eq!(again, Placement::AlreadyPlaced);
        assert_eq!(names(&out), ["model.bin"]);
        // Even had the check been missed: two links of one inode renamed over each other.
        let temp = temp_name(OsStr::new("model.bin"));
        nix::unistd::linkat(
            nix::fcntl::AT_FDCWD,
            &content,
            target.dir.as_fd(),
            temp.as_os_str(),
            AtFlags::empty(),
        )
        .unwrap();
        let fail = |doing: &str, source: io::Error| OutputError::Io {
            path: target.path.clone(),
            doing: doing.into(),
            source,
        };
        finish(target.dir.as_fd(), &temp, OsStr::new("model.bin"), &fail).unwrap();
        assert_eq!(names(&out), ["model.bin"]);
        assert_eq!(std::fs::read(out.join("model.bin")).unwrap(), bytes);
    }

    #[test]
    fn copies_are_independent_inodes_with_the_policy_mode() {
        let root = tempfile::tempdir().unwrap();
        let (content, bytes) = content_in(&root.path().join("store"));
        let out = root.path().join("out");
        let policy = OutputPolicy {
            mode: 0o640,
            ..OutputPolicy::default()
        };
        let cases = [
            (true, true, "reflink or copy_file_range"),
            (false, true, "copy_file_range"),
            (false, false, "copy"),
        ];
        for (n, (reflink, copy_file_range, expected)) in cases.into_iter().enumerate() {
            let name = format!("model-{n}.bin");
            let target = target(&out, &name);
            let methods = Methods {
                link: false,
                reflink,
                copy_file_range,
            };
            let how = place_with(&content, LENGTH, &target, &policy, methods).unwrap();
            assert!(expected.contains(how.as_str()), "{how:?} for {expected}");
            let placed = out.join(&name);
            assert_eq!(std::fs::read(&placed).unwrap(), bytes, "{how:?}");
            let meta = std::fs::metadata(&placed).unwrap();
            assert_ne!(meta.ino(), std::fs::metadata(&content).unwrap().ino());
            assert_eq!(meta.mode() & 0o7777, 0o640, "{how:?}");
        }
        assert_eq!(
            std::fs::metadata(&content).unwrap().mode() & 0o7777,
            0o600,
            "a copy leaves the store's file alone"
        );
        assert_eq!(names(&out), ["model-0.bin", "model-1.bin", "model-2.bin"]);
    }

    /// /dev/shm is a tmpfs: a real EXDEV against the test's temporary directory.
    #[test]
    fn across_filesystems_the_content_is_copied() {
        let shm = Path::new("/dev/shm");
        let root = tempfile::tempdir().unwrap();
        if !shm.is_dir()
            || std::fs::metadata(shm).unwrap().dev()
                == std::fs::metadata(root.path()).unwrap().dev()
        {
            eprintln!("no second filesystem at /dev/shm: skipped");
            return;
        }
        let store = tempfile::tempdir_in(shm).unwrap();
        let (content, bytes) = content_in(store.path());
        let out = root.path().join("out");
        let how = place(
            &content,
            LENGTH,
            &target(&out, "m.bin"),
            &OutputPolicy::default(),
        )
        .unwrap();
        assert!(
            matches!(
                how,
                Placement::CopyFileRange | Placement::Copy | Placement::Reflink
            ),
            "{how:?}"
        );
        assert_eq!(std::fs::read(out.join("m.bin")).unwrap(), bytes);
        assert_eq!(
            std::fs::metadata(out.join("m.bin")).unwrap().mode() & 0o7777,
            0o644
        );
        assert_eq!(names(&out), ["m.bin"]);
    }

    /// Root only: the owner is given to a copy, never to the store's file through a link.
    #[test]
    fn an_owner_change_is_made_on_a_copy_not_on_the_store_file() {
        if !Uid::effective().is_root() {
            eprintln!("not root: skipped");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let (content, bytes) = content_in(&root.path().join("store"));
        let out = root.path().join("out");
        let policy = OutputPolicy {
            mode: 0o640,
            owner: Some(4242),
            group: Some(4343),
        };
        let target = target(&out, "m.bin");
        let how = place(&content, LENGTH, &target, &policy).unwrap();
        assert_ne!(how, Placement::HardLink);
        let meta = std::fs::metadata(out.join("m.bin")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (4242, 4343, 0o640)
        );
        let store = std::fs::metadata(&content).unwrap();
        assert_eq!((store.uid(), store.mode() & 0o7777), (0, 0o600));
        assert_eq!(std::fs::read(out.join("m.bin")).unwrap(), bytes);
        // A repeat replaces the copy by a new one, and leaves nothing else behind.
        place(&content, LENGTH, &target, &policy).unwrap();
        assert_eq!(names(&out), ["m.bin"]);
    }

    #[test]
    fn owner_and_group_resolve_names_and_numbers_and_refuse_unknown_names() {
        let resolve = |owner: Option<&str>, group: Option<&str>| {
            OutputPolicy::resolve(&OutputConfig {
                mode: "0640".into(),
                owner: owner.map(Into::into),
                group: group.map(Into::into),
            })
        };
        assert_eq!(
            resolve(Some("root"), Some("4343")).unwrap(),
            OutputPolicy {
                mode: 0o640,
                owner: Some(0),
                group: Some(4343)
            }
        );
        assert_eq!(resolve(None, None).unwrap().owner, None);
        let err = resolve(Some("no-such-user-ferry"), None).unwrap_err();
        assert!(matches!(err, OutputConfigError::UnknownUser(_)), "{err}");
        assert!(err.to_string().contains("output.owner"), "{err}");
        let err = resolve(None, Some("no-such-group-ferry")).unwrap_err();
        assert!(matches!(err, OutputConfigError::UnknownGroup(_)), "{err}");
    }
}

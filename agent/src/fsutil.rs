//! Atomic file replacement, shared by the state directory and the File
//! reconciler: temp file in the same directory, fsync, rename, fsync the
//! directory. A crash leaves either the old or the new content, never a mix.
//!
//! [`AnchoredDir`]: a directory below a file root reached without following
//! any symlink, so the File reconciler never leaves its roots, even while
//! someone swaps a directory for a symlink under it
//! (docs/adr/0005-file-ownership.md, "Symlinks and races").

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// An open directory below a file root, reached one component at a time,
/// each opened `O_NOFOLLOW | O_DIRECTORY` relative to the one before (the
/// `openat` walk, through `/proc/self/fd`). Entries are then named relative
/// to the open handle ([`AnchoredDir::entry`]): a symlink put in place of any
/// directory on the way after the walk cannot redirect a write, a chmod, a
/// read or an unlink, and a symlink already there fails the walk (`ELOOP`).
#[derive(Debug)]
pub struct AnchoredDir {
    dir: File,
}

impl AnchoredDir {
    /// Opens `root` (canonical, trusted) and walks `below` (relative, no
    /// `..`), creating missing directories (mode 0755) when `create`.
    ///
    /// # Errors
    /// `ELOOP` for a symlink on the way, `ENOTDIR` for a non-directory,
    /// `NotFound` for a missing directory without `create`.
    pub fn open(root: &Path, below: &Path, create: bool) -> io::Result<Self> {
        let mut dir = Self {
            dir: open_dir(root)?,
        };
        for comp in below.components() {
            let Component::Normal(name) = comp else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a path below a root may only have plain components",
                ));
            };
            let next = dir.entry(name);
            let opened = match open_dir(&next) {
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                    match fs::create_dir(&next) {
                        Ok(()) => fs::set_permissions(&next, fs::Permissions::from_mode(0o755))?,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                    open_dir(&next)?
                }
                // O_DIRECTORY wins over O_NOFOLLOW: a symlink is ENOTDIR;
                // say what it is.
                Err(e)
                    if is_not_a_directory(&e)
                        && fs::symlink_metadata(&next)
                            .is_ok_and(|m| m.file_type().is_symlink()) =>
                {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                other => other?,
            };
            dir = Self { dir: opened };
        }
        Ok(dir)
    }

    /// `name` in this directory, as a path that resolves through the open
    /// handle (`/proc/self/fd/<fd>/<name>`), never through the walked path.
    pub fn entry(&self, name: &OsStr) -> PathBuf {
        Path::new("/proc/self/fd")
            .join(self.dir.as_raw_fd().to_string())
            .join(name)
    }

    /// fsyncs the directory (after a rename or unlink in it).
    pub fn sync(&self) -> io::Result<()> {
        self.dir.sync_all()
    }
}

fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens an existing entry for reading without following a symlink (and
/// without blocking on a FIFO put there).
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Whether an error is the kernel refusing a symlink (`ELOOP` under
/// `O_NOFOLLOW`).
pub fn is_symlink_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// Whether an error is a non-directory on the way (`ENOTDIR`).
pub fn is_not_a_directory(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Replaces `path` with `content`, with permission bits `mode` and, when
/// given, owner `uid`/`gid` — all set on the temp file before the rename.
pub fn write_atomic(
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<(Option<u32>, Option<u32>)>,
) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "path has no parent directory")
    })?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.flotilla-{}.tmp",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, uid, gid)?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsyncs a directory so a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn replaces_content_and_mode_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600, None).unwrap();
        write_atomic(&p, b"two", 0o640, None).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

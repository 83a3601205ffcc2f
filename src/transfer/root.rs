//! The receive directory as a root that nothing escapes: every directory and file is opened
//! or created relative to a directory descriptor, one component at a time, with `openat2`
//! and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so a symbolic link planted inside (or
//! swapped in while a transfer runs) is never followed, and no directory is created before
//! the components above it are known to be real directories inside the root.
//!
//! Blocking calls: run them on a blocking thread.

use super::names::SafeName;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// Why the receiver cannot store something. The text is the sentence both sides show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Only this name is affected (too long, an existing non-directory in the way, a link):
    /// refuse the one file and go on with the rest.
    #[error("{0}")]
    ThisFile(String),
    /// Nothing more can be stored (disk full, read-only, permission denied): stop the
    /// transfer.
    #[error("{0}")]
    Everything(String),
}

/// What an `errno` means for the file `name`, as a sentence without library jargon.
pub fn describe(errno: Errno, name: &str) -> StoreError {
    use StoreError::{Everything, ThisFile};
    match errno {
        Errno::ENOSPC => Everything("the receiver's disk is full".into()),
        Errno::EDQUOT => Everything("the receiver's disk quota is used up".into()),
        Errno::EROFS => Everything("the receiving directory is on a read-only file system".into()),
        Errno::EACCES | Errno::EPERM => Everything(
            "the receiver has no permission to write into its receiving directory".into(),
        ),
        Errno::EIO => Everything("the receiver's disk reported an input/output error".into()),
        Errno::EFBIG => {
            ThisFile(format!("{name} is larger than the receiver may store (its file size limit)"))
        }
        Errno::ENAMETOOLONG => {
            ThisFile(format!("{name}: the name is too long for the receiver's file system"))
        }
        Errno::EINVAL | Errno::EILSEQ => {
            ThisFile(format!("{name}: the receiver's file system cannot hold this name"))
        }
        Errno::ELOOP => ThisFile(format!(
            "{name}: the path leads through a symbolic link at the receiver (not followed)"
        )),
        Errno::ENOTDIR => ThisFile(format!(
            "{name}: a part of the path exists at the receiver and is not a directory"
        )),
        Errno::EXDEV => ThisFile(format!("{name}: the path leaves the receiving directory")),
        Errno::EISDIR => ThisFile(format!("{name} exists at the receiver and is a directory")),
        other => ThisFile(format!("{name}: the receiver could not store it ({})", other.desc())),
    }
}

/// The same for an `io::Error` from reading or writing an open file.
pub fn describe_io(e: &std::io::Error, name: &str) -> StoreError {
    match e.raw_os_error() {
        Some(code) => describe(Errno::from_raw(code), name),
        None => StoreError::ThisFile(format!("{name}: the receiver could not store it ({e})")),
    }
}

fn how(flags: OFlag) -> OpenHow {
    let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    // openat2 refuses a mode without O_CREAT.
    if flags.contains(OFlag::O_CREAT) { how.mode(Mode::from_bits_truncate(0o644)) } else { how }
}

fn open_dir_at(dir: &OwnedFd, component: &str) -> nix::Result<OwnedFd> {
    nix::fcntl::openat2(dir, component, how(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
}

/// The receive directory.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    /// Longest name component its file system takes.
    name_max: usize,
}

/// A directory inside the root, and the last component of a name in it.
#[derive(Debug)]
pub struct Parent {
    fd: OwnedFd,
    pub base: String,
}

impl Root {
    /// Open (creating it if needed) the receive directory. Its own path is the local
    /// user's choice, so it may go through links; nothing under it will.
    pub fn open(dir: &Path) -> std::io::Result<Root> {
        std::fs::create_dir_all(dir)?;
        let fd: OwnedFd = File::open(dir)?.into();
        let name_max = nix::sys::statfs::fstatfs(&fd)
            .map(|s| usize::try_from(s.maximum_name_length()).unwrap_or(255))
            .unwrap_or(255);
        Ok(Root { fd, name_max })
    }

    /// Longest name component the receive directory's file system takes.
    pub fn name_max(&self) -> usize {
        self.name_max
    }

    /// Refuse a name some component of which this file system cannot hold, before anything
    /// is created.
    pub fn check(&self, name: &SafeName) -> Result<(), StoreError> {
        for part in name.components() {
            if part.len() > self.name_max {
                return Err(StoreError::ThisFile(format!(
                    "{}: the name is too long for the receiver's file system ({} bytes in one \
                     part; at most {})",
                    name.as_str(),
                    part.len(),
                    self.name_max
                )));
            }
        }
        Ok(())
    }

    /// Walk `components` from the root, creating missing directories; never through a link.
    fn walk<'a>(
        &self,
        components: impl Iterator<Item = &'a str>,
        shown: &str,
    ) -> Result<OwnedFd, StoreError> {
        let mut cur = self.fd.try_clone().map_err(|e| describe_io(&e, shown))?;
        for part in components {
            cur = match open_dir_at(&cur, part) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match nix::sys::stat::mkdirat(&cur, part, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(describe(e, shown)),
                    }
                    open_dir_at(&cur, part).map_err(|e| describe(e, shown))?
                }
                Err(e) => return Err(describe(e, shown)),
            };
        }
        Ok(cur)
    }

    /// The directory that will hold `name` (created if missing) and its last component.
    pub fn parent(&self, name: &SafeName) -> Result<Parent, StoreError> {
        self.check(name)?;
        let parts: Vec<&str> = name.components().collect();
        let (base, dirs) = parts.split_last().expect("a SafeName has at least one component");
        let fd = self.walk(dirs.iter().copied(), name.as_str())?;
        Ok(Parent { fd, base: (*base).to_string() })
    }

    /// Create the directory `name` (and those above it).
    pub fn make_dir(&self, name: &SafeName) -> Result<(), StoreError> {
        self.check(name)?;
        self.walk(name.components(), name.as_str()).map(drop)
    }
}

impl Parent {
    /// What is at `name` in this directory (the link itself, for a link).
    pub fn stat(&self, name: &str) -> nix::Result<FileStat> {
        nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
    }

    /// Is `name` a regular file here (not a link to one)?
    pub fn is_file(st: &FileStat) -> bool {
        SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
    }

    /// Is `name` a directory here (not a link to one)?
    pub fn is_dir(st: &FileStat) -> bool {
        SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
    }

    /// Open the regular file `name` for reading (never through a link).
    pub fn open_read(&self, name: &str) -> nix::Result<File> {
        nix::fcntl::openat2(&self.fd, name, how(OFlag::O_RDONLY)).map(File::from)
    }

    /// Open `name` for writing, creating it if missing, without truncating it.
    pub fn open_write(&self, name: &str) -> nix::Result<File> {
        nix::fcntl::openat2(&self.fd, name, how(OFlag::O_RDWR | OFlag::O_CREAT)).map(File::from)
    }

    /// Rename `from` to `to` in this directory; with `replace` false, fail with `EEXIST`
    /// rather than replace what is there.
    pub fn rename(&self, from: &str, to: &str, replace: bool) -> nix::Result<()> {
        if replace {
            return nix::fcntl::renameat(&self.fd, from, &self.fd, to);
        }
        match nix::fcntl::renameat2(&self.fd, from, &self.fd, to, RenameFlags::RENAME_NOREPLACE) {
            // A file system without RENAME_NOREPLACE: check, then rename (a small race with
            // local processes only; the sender is serialised behind us).
            Err(Errno::EINVAL) => match self.stat(to) {
                Ok(_) => Err(Errno::EEXIST),
                Err(Errno::ENOENT) => nix::fcntl::renameat(&self.fd, from, &self.fd, to),
                Err(e) => Err(e),
            },
            other => other,
        }
    }

    /// Remove the file `name` here (not a directory).
    pub fn remove(&self, name: &str) -> nix::Result<()> {
        nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
    }

    /// Make the directory's entries durable (after a rename).
    pub fn sync(&self) {
        let _ = nix::unistd::fsync(self.fd.as_fd());
    }
}

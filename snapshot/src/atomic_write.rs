//! Writing a file so that it appears under its final name complete or not at all: a temporary file
//! beside it, fsync, rename, fsync of the directory.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::SnapshotError;

/// A temporary file in the target's directory; removed on drop unless [`AtomicFile::commit`]
/// renamed it into place.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    temp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<Self, SnapshotError> {
        let name = target
            .file_name()
            .ok_or_else(|| SnapshotError::Io {
                path: target.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the path names no file",
                ),
            })?
            .to_string_lossy()
            .into_owned();
        let temp = target.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        // Always a new file (O_CREAT|O_EXCL): the VMM's seccomp filter lets the thread that
        // writes snapshots create files but never open existing ones. A leftover of a crashed
        // writer with the same pid is removed first.
        let create = || {
            OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .open(&temp)
        };
        let file = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&temp).map_err(SnapshotError::io(&temp))?;
                create()
            }
            other => other,
        }
        .map_err(SnapshotError::io(&temp))?;
        Ok(Self {
            file,
            temp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The final name it is committed to.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// fsync, rename over the target, fsync the directory (so the rename itself is durable).
    pub fn commit(mut self) -> Result<(), SnapshotError> {
        self.file
            .sync_all()
            .map_err(SnapshotError::io(&self.temp))?;
        std::fs::rename(&self.temp, &self.target).map_err(SnapshotError::io(&self.target))?;
        self.committed = true;
        sync_parent_dir(&self.target)
    }
}

/// fsync of the directory holding `path`, so that a rename or removal there is durable.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<(), SnapshotError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SnapshotError::io(dir))
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn uncommitted_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state");
        {
            let f = AtomicFile::create(&target).unwrap();
            f.file().write_all(b"half").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let f = AtomicFile::create(&target).unwrap();
        f.file().write_all(b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_stale_temporary_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state");
        let stale = dir
            .path()
            .join(format!(".state.tmp-{}", std::process::id()));
        std::fs::write(&stale, b"stale").unwrap();
        let f = AtomicFile::create(&target).unwrap();
        f.file().write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(!stale.exists());
    }
}

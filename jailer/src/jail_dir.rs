//! The jail's directory on the host, `<base>/<exec file name>/<id>/root`, and its removal.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{JailerError, Result};

/// The created `<base>/<exec>/<id>` tree. Dropping it removes the tree and the parents this
/// jailer created, if no other sandbox uses them by then.
#[derive(Debug)]
pub struct JailDir {
    id_dir: PathBuf,
    /// Ancestors of `id_dir` this jailer created, innermost first.
    created_parents: Vec<PathBuf>,
}

impl JailDir {
    /// Creates `id_dir` (which must not exist) and `id_dir/root`.
    pub fn create(id: &str, id_dir: &Path) -> Result<Self> {
        let mut created_parents = Vec::new();
        let mut missing: Vec<&Path> = id_dir
            .ancestors()
            .skip(1)
            .take_while(|p| !p.exists())
            .collect();
        missing.reverse();
        for parent in missing {
            match fs::create_dir(parent) {
                Ok(()) => created_parents.insert(0, parent.to_path_buf()),
                // Another sandbox made it meanwhile: it is theirs to remove.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    let partial = Self {
                        id_dir: PathBuf::new(),
                        created_parents,
                    };
                    drop(partial);
                    return Err(JailerError::io("cannot create jail directory", parent, e));
                }
            }
        }
        let mut jail = Self {
            id_dir: PathBuf::new(),
            created_parents,
        };
        match fs::create_dir(id_dir) {
            Ok(()) => jail.id_dir = id_dir.to_path_buf(),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(JailerError::JailExists {
                    id: id.to_string(),
                    path: id_dir.to_path_buf(),
                })
            }
            Err(e) => return Err(JailerError::io("cannot create jail directory", id_dir, e)),
        }
        let root = jail.root();
        fs::create_dir(&root).map_err(|e| JailerError::io("cannot create", &root, e))?;
        Ok(jail)
    }

    pub fn root(&self) -> PathBuf {
        self.id_dir.join("root")
    }
}

impl Drop for JailDir {
    fn drop(&mut self) {
        if !self.id_dir.as_os_str().is_empty() {
            // The jail's files live on a tmpfs in the child's mount namespace, gone with it; on
            // the host only the empty directories are left. remove_dir_all never follows
            // symlinks out of the tree.
            if let Err(e) = fs::remove_dir_all(&self.id_dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove jail {}: {e}", self.id_dir.display());
                }
            }
        }
        for parent in &self.created_parents {
            // Fails harmlessly (not empty) while another sandbox uses it.
            if fs::remove_dir(parent).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_removes_the_tree_and_its_new_parents() {
        let base = tempfile::tempdir().unwrap();
        let id_dir = base.path().join("jails/agentvm/sb");
        let jail = JailDir::create("sb", &id_dir).unwrap();
        assert!(jail.root().is_dir());
        let other = JailDir::create("sb2", &base.path().join("jails/agentvm/sb2")).unwrap();
        let err = JailDir::create("sb", &id_dir).unwrap_err().to_string();
        assert!(err.contains("a jail for id sb already exists"), "{err}");
        drop(other);
        assert!(!base.path().join("jails/agentvm/sb2").exists());
        assert!(jail.root().is_dir());
        drop(jail);
        assert!(!base.path().join("jails").exists());
        assert!(base.path().is_dir());
    }
}

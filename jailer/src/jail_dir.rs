//! The jail's directory on the host, `<base>/<exec file name>/<id>`, and its removal. It holds
//! `root` (where the child mounts the jail's tmpfs, in its own mount namespace) and `run`, the
//! VMM's socket directory: a host directory, bind-mounted at /run in the jail, so that the host
//! reaches the VMM's API and vsock sockets at `<id dir>/run/...`.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
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
    /// Creates `id_dir` (which must not exist), `id_dir/root`, and `id_dir/run` owned by
    /// `uid:gid` with mode 0700.
    pub fn create(id: &str, id_dir: &Path, uid: u32, gid: u32) -> Result<Self> {
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
        let run = jail.run_dir();
        fs::create_dir(&run).map_err(|e| JailerError::io("cannot create", &run, e))?;
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700))
            .map_err(|e| JailerError::io("cannot chmod", &run, e))?;
        std::os::unix::fs::chown(&run, Some(uid), Some(gid))
            .map_err(|e| JailerError::io("cannot chown", &run, e))?;
        Ok(jail)
    }

    pub fn root(&self) -> PathBuf {
        self.id_dir.join("root")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.id_dir.join("run")
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
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn creates_and_removes_the_tree_and_its_new_parents() {
        let base = tempfile::tempdir().unwrap();
        let id_dir = base.path().join("jails/agentvm/sb");
        let jail = JailDir::create("sb", &id_dir, 1000, 1001).unwrap();
        assert!(jail.root().is_dir());
        let run = fs::metadata(jail.run_dir()).unwrap();
        assert_eq!((run.uid(), run.gid()), (1000, 1001));
        assert_eq!(run.permissions().mode() & 0o777, 0o700);
        fs::write(jail.run_dir().join("api.sock"), b"").unwrap();
        let other =
            JailDir::create("sb2", &base.path().join("jails/agentvm/sb2"), 1000, 1000).unwrap();
        let err = JailDir::create("sb", &id_dir, 1000, 1000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a jail for id sb already exists"), "{err}");
        drop(other);
        assert!(!base.path().join("jails/agentvm/sb2").exists());
        assert!(jail.root().is_dir());
        drop(jail);
        assert!(!base.path().join("jails").exists());
        assert!(base.path().is_dir());
    }
}

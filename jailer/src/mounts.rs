//! Mounts inside the child's mount namespace: the jail's tmpfs root, the read-only bind mounts of
//! the VMM binary and every `--mount`, /proc, and the switch of the root into the jail.

use std::fs;
use std::path::{Path, PathBuf};

use crate::config::usage;
use crate::error::{JailerError, Result};
use crate::sys;

/// A host path bind-mounted into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub src: PathBuf,
    /// Absolute path inside the jail.
    pub dst: PathBuf,
    pub writable: bool,
}

impl MountSpec {
    /// Parses `SRC[:DST][:rw]`; DST defaults to `/<file name of SRC>`.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut parts: Vec<&str> = spec.split(':').collect();
        let writable = parts.len() > 1 && parts.last() == Some(&"rw");
        if writable {
            parts.pop();
        }
        let (src, dst) = match parts.as_slice() {
            [src] if !src.is_empty() => (PathBuf::from(src), None),
            [src, dst] if !src.is_empty() && !dst.is_empty() => {
                (PathBuf::from(src), Some(PathBuf::from(dst)))
            }
            _ => {
                return Err(usage(format!(
                    "--mount {spec:?} is not SRC[:DST][:rw] (paths containing ':' are not \
                     supported)"
                )))
            }
        };
        let dst = match dst {
            Some(dst) => dst,
            None => Path::new("/").join(src.file_name().ok_or_else(|| {
                usage(format!(
                    "--mount {spec:?}: SRC has no file name to use as DST"
                ))
            })?),
        };
        Ok(Self { src, dst, writable })
    }

    /// Where the destination lies on the host while the jail is being built.
    pub fn target_in(&self, root: &Path) -> PathBuf {
        root.join(self.dst.strip_prefix("/").unwrap_or(&self.dst))
    }
}

/// Size of the jail's root tmpfs: it holds only directories, device nodes and mount points (the
/// VMM writes to /run and /tmp, which are mounts of their own).
const JAIL_TMPFS_OPTIONS: &str = "size=16m,mode=0755";

/// Stops mount events from propagating back to the host: from here on, mounts made by the child
/// stay in its own mount namespace and vanish with it.
pub fn make_mounts_private() -> Result<()> {
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_SLAVE | libc::MS_REC,
        None,
    )
}

/// Mounts a fresh tmpfs on the jail root. The jail's files (device nodes, mount points) live on it rather than in the host directory, so they need no cleanup, and device nodes work
/// even where the base directory's filesystem is mounted nodev. Executables come only from the
/// read-only bind mounts, so the tmpfs itself is noexec.
pub fn mount_jail_tmpfs(root: &Path) -> Result<()> {
    sys::mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(JAIL_TMPFS_OPTIONS),
    )
}

/// Bind-mounts `spec.src` at its place under `root`, then makes it read-only unless writable.
pub fn bind_into_jail(root: &Path, spec: &MountSpec) -> Result<()> {
    let target = spec.target_in(root);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| JailerError::io("cannot create mount directory", parent, e))?;
    }
    let made = if spec.src.is_dir() {
        fs::create_dir(&target)
    } else {
        fs::File::create(&target).map(drop)
    };
    made.map_err(|e| JailerError::io("cannot create mount point", &target, e))?;
    let bind = |flags| sys::mount(Some(&spec.src), &target, None, flags, None);
    bind(libc::MS_BIND | libc::MS_REC).map_err(|e| {
        JailerError::ChildSetup(format!(
            "bind-mounting {} at {}: {e}",
            spec.src.display(),
            spec.dst.display()
        ))
    })?;
    let mut remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if !spec.writable {
        remount |= libc::MS_RDONLY;
    }
    bind(remount).map_err(|e| {
        JailerError::ChildSetup(format!(
            "making the mount of {} at {} {}: {e}",
            spec.src.display(),
            spec.dst.display(),
            if spec.writable {
                "nosuid,nodev"
            } else {
                "read-only"
            }
        ))
    })
}

/// Size of the sandbox's /tmp (`agentvm run` keeps its vsock socket in a temporary directory);
/// its pages are charged to the sandbox's memory cgroup.
const TMP_TMPFS_SIZE: &str = "size=64m";

/// A private /tmp owned by the sandbox's uid:gid.
pub fn mount_private_tmp(root: &Path, uid: u32, gid: u32) -> Result<()> {
    let target = root.join("tmp");
    fs::create_dir(&target).map_err(|e| JailerError::io("cannot create", &target, e))?;
    let options = format!("{TMP_TMPFS_SIZE},mode=0700,uid={uid},gid={gid}");
    sys::mount(
        Some(Path::new("tmpfs")),
        &target,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&options),
    )
}

/// A /proc for the new PID namespace: the VMM reads its own /proc/self (memory statistics).
pub fn mount_proc(root: &Path) -> Result<()> {
    let target = root.join("proc");
    fs::create_dir(&target).map_err(|e| JailerError::io("cannot create", &target, e))?;
    sys::mount(
        Some(Path::new("proc")),
        &target,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
}

/// Makes `root` the process's `/` and forgets the old root.
///
/// pivot_root(".", ".") stacks the old root under the new one, from where it is detached. When
/// the current root is the initramfs rootfs (the nested test host boots a busybox initramfs),
/// pivot_root fails with EINVAL because rootfs can never be unmounted; then the jail is moved
/// over / and chrooted into, as switch_root does. The old rootfs then stays underneath, out of
/// reach of a process that has dropped root.
pub fn enter_jail_root(root: &Path) -> Result<()> {
    std::env::set_current_dir(root)
        .map_err(|e| JailerError::io("cannot enter the jail root", root, e))?;
    let dot = Path::new(".");
    match sys::pivot_root(dot, dot) {
        Ok(()) => sys::umount_detach(dot)?,
        Err(JailerError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!("pivot_root refused (root is rootfs): moving the jail over / instead");
            sys::mount(Some(dot), Path::new("/"), None, libc::MS_MOVE, None)?;
            sys::chroot(dot)?;
        }
        Err(other) => return Err(other),
    }
    std::env::set_current_dir("/").map_err(|e| JailerError::io("cannot enter", "/", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_specs() {
        let m = MountSpec::parse("/srv/kernel").unwrap();
        assert_eq!(m.dst, Path::new("/kernel"));
        assert!(!m.writable);
        let m = MountSpec::parse("/srv/kernel:rw").unwrap();
        assert_eq!((m.dst.as_path(), m.writable), (Path::new("/kernel"), true));
        let m = MountSpec::parse("/tmp/x:/data/x:rw").unwrap();
        assert_eq!(m.src, Path::new("/tmp/x"));
        assert_eq!((m.dst.as_path(), m.writable), (Path::new("/data/x"), true));
        let m = MountSpec::parse("/tmp/x:/y").unwrap();
        assert!(!m.writable);
        assert_eq!(m.target_in(Path::new("/jail")), Path::new("/jail/y"));
        for bad in ["", ":", "/a:/b:/c", "/a::rw", "/"] {
            assert!(MountSpec::parse(bad).is_err(), "{bad:?}");
        }
    }
}

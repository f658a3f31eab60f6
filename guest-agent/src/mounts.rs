//! The filesystems PID 1 mounts before anything else runs.

use std::ffi::CString;
use std::fmt;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: libc::c_ulong,
    pub data: &'static str,
    /// Mode of the mount point if it has to be created.
    pub dir_mode: u32,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// Mounted first, so that /dev/console exists even when the initramfs has no device node.
pub const DEVTMPFS: MountSpec = MountSpec {
    source: "devtmpfs",
    target: "/dev",
    fstype: "devtmpfs",
    flags: libc::MS_NOSUID,
    data: "mode=0755",
    dir_mode: 0o755,
};

/// Everything else, in order (/dev/pts and /dev/shm need /dev).
pub const SYSTEM_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: "",
        dir_mode: 0o555,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: "",
        dir_mode: 0o555,
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        // gid 5 is the initramfs's "tty" group.
        data: "mode=0620,ptmxmode=0666,gid=5",
        dir_mode: 0o755,
    },
    MountSpec {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
        dir_mode: 0o1777,
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
        dir_mode: 0o1777,
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
        dir_mode: 0o755,
    },
];

/// The /dev links shells and tools expect (bash process substitution needs /dev/fd).
pub const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    Mounted,
    /// EBUSY: something is mounted there already (e.g. the kernel's devtmpfs automount).
    AlreadyMounted,
}

#[derive(Debug)]
pub struct MountError {
    pub target: PathBuf,
    pub what: String,
    pub source: io::Error,
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.what,
            self.target.display(),
            self.source
        )
    }
}

impl std::error::Error for MountError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Creates the mount point if needed and mounts `spec` on it, with its target relative to
/// `root` (`/` in the guest; tests use a scratch directory).
pub fn mount_under(root: &Path, spec: &MountSpec) -> Result<MountOutcome, MountError> {
    let target = root.join(spec.target.trim_start_matches('/'));
    let error = |what: &str, source| MountError {
        target: target.clone(),
        what: what.to_string(),
        source,
    };
    if !target.is_dir() {
        DirBuilder::new()
            .recursive(true)
            .mode(spec.dir_mode)
            .create(&target)
            .map_err(|e| error("cannot create mount point", e))?;
    }
    let c_target = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| error("bad path", io::Error::from_raw_os_error(libc::EINVAL)))?;
    let c_source = cstring(spec.source).map_err(|e| error("bad source", e))?;
    let c_fstype = cstring(spec.fstype).map_err(|e| error("bad fstype", e))?;
    let c_data = cstring(spec.data).map_err(|e| error("bad options", e))?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ptr(),
            spec.flags,
            c_data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(MountOutcome::Mounted);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(MountOutcome::AlreadyMounted);
    }
    Err(error(&format!("mount {} on", spec.fstype), err))
}

pub fn mount(spec: &MountSpec) -> Result<MountOutcome, MountError> {
    mount_under(Path::new("/"), spec)
}

/// Creates [`DEV_SYMLINKS`] under `root`; existing entries are left alone.
pub fn create_dev_symlinks_under(root: &Path) -> Vec<MountError> {
    let mut errors = Vec::new();
    for (target, link) in DEV_SYMLINKS {
        let link = root.join(link.trim_start_matches('/'));
        match std::os::unix::fs::symlink(target, &link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => errors.push(MountError {
                target: link,
                what: "cannot create symlink".to_string(),
                source,
            }),
        }
    }
    errors
}

pub fn create_dev_symlinks() -> Vec<MountError> {
    create_dev_symlinks_under(Path::new("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agentvm-mounts-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn mount_order_puts_dev_before_its_children() {
        assert_eq!(DEVTMPFS.target, "/dev");
        let targets: Vec<&str> = SYSTEM_MOUNTS.iter().map(|m| m.target).collect();
        assert_eq!(
            targets,
            ["/proc", "/sys", "/dev/pts", "/dev/shm", "/tmp", "/run"]
        );
        assert!(SYSTEM_MOUNTS.iter().all(|m| m.flags & libc::MS_NOSUID != 0));
    }

    #[test]
    fn failed_mount_names_the_target_and_creates_the_mount_point() {
        let root = scratch("fail");
        let bogus = MountSpec {
            source: "none",
            target: "/nested/point",
            fstype: "agentvm-no-such-filesystem",
            flags: 0,
            data: "",
            dir_mode: 0o700,
        };
        // ENODEV as root, EPERM otherwise: either way an error, never a mount.
        let err = mount_under(&root, &bogus).unwrap_err();
        assert!(err.to_string().contains("nested/point"), "{err}");
        assert!(root.join("nested/point").is_dir());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn dev_symlinks_are_created_once() {
        let root = scratch("links");
        fs::create_dir(root.join("dev")).unwrap();
        assert!(create_dev_symlinks_under(&root).is_empty());
        assert_eq!(
            fs::read_link(root.join("dev/fd")).unwrap(),
            Path::new("/proc/self/fd")
        );
        assert!(create_dev_symlinks_under(&root).is_empty());
        fs::remove_dir_all(&root).unwrap();
        let errors = create_dev_symlinks_under(&root);
        assert_eq!(errors.len(), DEV_SYMLINKS.len());
    }
}

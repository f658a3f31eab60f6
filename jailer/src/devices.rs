//! The device nodes a jail may hold: /dev/kvm always, /dev/userfaultfd and /dev/net/tun on
//! request, and the harmless /dev/null, /dev/zero and /dev/urandom.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::usage;
use crate::error::{JailerError, Result};
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Kvm,
    Userfaultfd,
    Tun,
}

impl Device {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "kvm" => Ok(Self::Kvm),
            "userfaultfd" => Ok(Self::Userfaultfd),
            "tun" => Ok(Self::Tun),
            other => Err(usage(format!(
                "--device {other:?} is not one of kvm, userfaultfd, tun"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Userfaultfd => "userfaultfd",
            Self::Tun => "tun",
        }
    }

    /// The node on the host, and the same path inside the jail.
    pub fn host_path(self) -> &'static Path {
        Path::new(match self {
            Self::Kvm => "/dev/kvm",
            Self::Userfaultfd => "/dev/userfaultfd",
            Self::Tun => "/dev/net/tun",
        })
    }
}

/// Nodes every jail gets, readable and writable by anyone as on the host.
const COMMON_NODES: [&str; 3] = ["/dev/null", "/dev/zero", "/dev/urandom"];

fn in_jail(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Creates a character device node in the jail with the host node's major/minor.
fn copy_node(root: &Path, host: &Path, mode: u32) -> Result<PathBuf> {
    let rdev = fs::metadata(host)
        .map_err(|e| JailerError::io("cannot stat device", host, e))?
        .rdev();
    let node = in_jail(root, host);
    if let Some(parent) = node.parent() {
        fs::create_dir_all(parent).map_err(|e| JailerError::io("cannot create", parent, e))?;
    }
    sys::mknod(&node, libc::S_IFCHR | mode, rdev)?;
    // mknod applies the umask; the mode must be exact.
    fs::set_permissions(&node, fs::Permissions::from_mode(mode))
        .map_err(|e| JailerError::io("cannot chmod", &node, e))?;
    Ok(node)
}

/// Creates /dev in the jail with the common nodes and `devices`, the latter owned by uid:gid
/// with mode 0600 so only the VMM can open them.
pub fn populate_dev(root: &Path, devices: &[Device], uid: u32, gid: u32) -> Result<()> {
    for node in COMMON_NODES {
        copy_node(root, Path::new(node), 0o666)?;
    }
    for device in devices {
        let node = copy_node(root, device.host_path(), 0o600)?;
        std::os::unix::fs::chown(&node, Some(uid), Some(gid))
            .map_err(|e| JailerError::io("cannot chown", &node, e))?;
    }
    Ok(())
}

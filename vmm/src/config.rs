//! What a user asks for, validated before anything touches KVM.

use std::path::PathBuf;

use crate::seccomp::{SeccompLevel, ThreadKind, ThreadSeccomp};

pub const MAX_VCPUS: u8 = 16;

/// Kernel command line for a Linux guest on agentvm's machine model: serial console on COM1, reset
/// through the keyboard controller (the only reset line the VMM has), an immediate reboot on panic
/// (so a panic ends the VMM instead of hanging), no PCI or ACPI to probe.
pub const LINUX_BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd nomodeset";
pub const MIN_MEM_MIB: u64 = 16;

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line except the virtio-mmio device declarations, which the VMM
    /// appends itself.
    pub cmdline: String,
    /// Boot a Linux kernel even where this host's KVM cannot run it (only for measuring the
    /// VMM's own start-up up to the first guest entry).
    pub skip_linux_host_check: bool,
    /// Read the VMM's memory use just before the first vCPU runs, for timing reports.
    pub record_rss_before_guest: bool,
    /// A virtio-vsock device (the guest agent's channel), if any.
    pub vsock: Option<VsockConfig>,
    /// A NIC whose other end is the in-VMM egress filter, if any (none: no network at all).
    pub net: Option<NetConfig>,
    /// KVM dirty-page logging on guest RAM, so the VM can take diff snapshots.
    pub track_dirty_pages: bool,
    /// Whether the VMM's threads run under their seccomp filters (Off only for debugging).
    pub seccomp: SeccompLevel,
    /// Test-only: the thread kind that makes a forbidden syscall once its filter is on.
    pub seccomp_test_violation: Option<ThreadKind>,
}

/// A virtio-vsock device whose host side is a Unix socket (Firecracker's hybrid vsock): the host
/// connects to `uds_path` and sends `CONNECT <port>\n`; guest connections to port P go to
/// `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// The guest's NIC: a virtio-net device wired to the VMM's egress filter (userspace TCP/IP,
/// default deny), never to a host interface.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// What the guest may reach (replaceable at run time through the API).
    pub policy: egress::policy::Policy,
    /// Append one JSON line per DNS answer, connection and HTTP request here.
    pub audit_log: Option<PathBuf>,
    /// The sandbox's name in audit lines.
    pub sandbox: String,
    /// PEM files of extra roots for the servers behind intercepted HTTPS (see
    /// `egress::EgressConfig::extra_upstream_roots`).
    pub upstream_roots: Vec<PathBuf>,
}

/// The CID guests get unless told otherwise (the first one not reserved).
pub const DEFAULT_GUEST_CID: u64 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    #[error("--mem-mib must be at least {MIN_MEM_MIB} MiB, got {0}")]
    MemTooSmall(u64),
    #[error("--mem-mib {requested} is more than this host's {host_mib} MiB of RAM")]
    MemTooLarge { requested: u64, host_mib: u64 },
    #[error("kernel {0} does not exist")]
    KernelMissing(PathBuf),
    #[error("initrd {0} does not exist")]
    InitrdMissing(PathBuf),
    /// A directory, device or socket where a kernel or initrd file was expected.
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("vsock guest CID {0} is reserved (must be 3..=4294967294)")]
    VsockCid(u64),
    #[error("vsock socket path {0} already exists (remove it, or pick another path)")]
    VsockPathExists(PathBuf),
    #[error("vsock socket path {path}: directory {dir} does not exist")]
    VsockDirMissing { path: PathBuf, dir: PathBuf },
    #[error("vsock socket path {path} is {len} bytes long; Unix socket paths (plus a `_<port>` suffix for guest connections) must stay under {max} bytes")]
    VsockPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
}

impl VmConfig {
    /// What a thread of `kind` does about seccomp as it starts.
    pub fn thread_seccomp(&self, kind: ThreadKind) -> ThreadSeccomp {
        ThreadSeccomp {
            level: self.seccomp,
            test_violation: self.seccomp_test_violation == Some(kind),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_machine()?;
        check_file("kernel", &self.kernel, ConfigError::KernelMissing)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd, ConfigError::InitrdMissing)?;
        }
        Ok(())
    }

    /// Everything but the boot files: what a VM restored from a snapshot (which has no kernel to
    /// load) must pass.
    pub fn validate_machine(&self) -> Result<(), ConfigError> {
        validate_vcpus(self.vcpus as u64)?;
        validate_mem_mib(self.mem_mib, host_mem_mib())?;
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        Ok(())
    }
}

/// sun_path holds 108 bytes with the NUL; guest-initiated connections append `_<port>` (up to 11).
const MAX_VSOCK_UDS_LEN: usize = 107 - 11;

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid <= 2 || self.guest_cid >= u64::from(u32::MAX) {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len > MAX_VSOCK_UDS_LEN {
            return Err(ConfigError::VsockPathTooLong {
                path: self.uds_path.clone(),
                len,
                max: MAX_VSOCK_UDS_LEN,
            });
        }
        if self.uds_path.symlink_metadata().is_ok() {
            return Err(ConfigError::VsockPathExists(self.uds_path.clone()));
        }
        let dir = match self.uds_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(ConfigError::VsockDirMissing {
                path: self.uds_path.clone(),
                dir,
            });
        }
        Ok(())
    }
}

pub fn validate_vcpus(vcpus: u64) -> Result<(), ConfigError> {
    if vcpus == 0 || vcpus > MAX_VCPUS as u64 {
        return Err(ConfigError::Vcpus(vcpus));
    }
    Ok(())
}

pub fn validate_mem_mib(mem_mib: u64, host_mib: Option<u64>) -> Result<(), ConfigError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(ConfigError::MemTooSmall(mem_mib));
    }
    if let Some(host_mib) = host_mib {
        if mem_mib > host_mib {
            return Err(ConfigError::MemTooLarge {
                requested: mem_mib,
                host_mib,
            });
        }
    }
    Ok(())
}

/// Physical RAM of the host, from /proc/meminfo. Guest memory is mapped lazily (NORESERVE), but a
/// guest larger than the whole host can only end in the OOM killer.
pub fn host_mem_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// `path` is a regular file (following symlinks), or the error naming what it is instead.
fn check_file(
    what: &'static str,
    path: &std::path::Path,
    missing: fn(PathBuf) -> ConfigError,
) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
        }),
        Err(_) => Err(missing(path.to_path_buf())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_bounds() {
        assert_eq!(validate_vcpus(0), Err(ConfigError::Vcpus(0)));
        assert!(validate_vcpus(1).is_ok());
        assert!(validate_vcpus(16).is_ok());
        assert_eq!(validate_vcpus(17), Err(ConfigError::Vcpus(17)));
    }

    #[test]
    fn memory_bounds() {
        assert_eq!(
            validate_mem_mib(8, Some(1024)),
            Err(ConfigError::MemTooSmall(8))
        );
        assert!(validate_mem_mib(256, Some(1024)).is_ok());
        assert_eq!(
            validate_mem_mib(2048, Some(1024)),
            Err(ConfigError::MemTooLarge {
                requested: 2048,
                host_mib: 1024
            })
        );
        assert!(host_mem_mib().unwrap() > 0);
    }

    #[test]
    fn vsock_checks() {
        let dir = tempfile::tempdir().unwrap();
        let ok = VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            uds_path: dir.path().join("v.sock"),
        };
        assert_eq!(ok.validate(), Ok(()));
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            let bad = VsockConfig {
                guest_cid: cid,
                ..ok.clone()
            };
            assert_eq!(bad.validate(), Err(ConfigError::VsockCid(cid)));
        }
        std::fs::write(&ok.uds_path, b"").unwrap();
        assert_eq!(
            ok.validate(),
            Err(ConfigError::VsockPathExists(ok.uds_path.clone()))
        );
        let missing = VsockConfig {
            uds_path: dir.path().join("nope/v.sock"),
            ..ok.clone()
        };
        assert!(matches!(
            missing.validate(),
            Err(ConfigError::VsockDirMissing { .. })
        ));
        let long = VsockConfig {
            uds_path: dir.path().join("x".repeat(120)),
            ..ok.clone()
        };
        let err = long.validate().unwrap_err();
        assert!(err.to_string().contains("must stay under"), "{err}");
    }
}

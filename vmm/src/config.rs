//! What a user asks for, validated before anything touches KVM.

use std::path::PathBuf;

pub const MAX_VCPUS: u8 = 16;
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
}

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
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_vcpus(self.vcpus as u64)?;
        validate_mem_mib(self.mem_mib, host_mem_mib())?;
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
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
fn host_mem_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
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
}

//! What this host's KVM can do, checked up front so users get one clear line instead of a crawl
//! into an emulation failure.

use std::fs::OpenOptions;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("/dev/kvm does not exist: KVM is not available on this host (load kvm_intel/kvm_amd, or enable nested virtualisation)")]
    NoKvm,
    #[error("no permission to open /dev/kvm: run as root or add your user to the 'kvm' group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(std::io::Error),
    #[error("this host's KVM cannot run a Linux guest: it is nested on a PVM hypervisor (no vmx/svm flag in /proc/cpuinfo: /dev/kvm is kvm_pvm's), which emulates guest ring 0 and fails on Linux's int3 patching. Use `agentvm run --nested` to run inside the nested test host (QEMU TCG with SVM), or a host with VMX/SVM")]
    CannotRunLinux,
}

/// Opens /dev/kvm read-write once to turn "missing" and "no permission" into clear errors.
pub fn check_kvm_access() -> Result<(), HostError> {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return Err(HostError::NoKvm);
    }
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(HostError::KvmPermission),
        Err(e) => Err(HostError::KvmOpen(e)),
    }
}

/// The signature of the development machines: KVM provided by a PVM host (`kvm_pvm` module) on a
/// CPU without hardware virtualisation flags. Guest user code runs natively there, guest kernel
/// code is emulated, and Linux cannot boot.
pub fn check_can_run_linux() -> Result<(), HostError> {
    // Without /proc (a bare chroot) nothing can be told: let the boot try.
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return Ok(());
    };
    let sys_modules = Path::new("/sys/module");
    let pvm = KvmProvider {
        modules_visible: sys_modules.is_dir(),
        pvm_loaded: sys_modules.join("kvm_pvm").exists(),
    };
    if pvm.is_pvm(&cpuinfo) {
        return Err(HostError::CannotRunLinux);
    }
    Ok(())
}

/// What the host shows of the module providing /dev/kvm.
struct KvmProvider {
    modules_visible: bool,
    pvm_loaded: bool,
}

impl KvmProvider {
    fn is_pvm(&self, cpuinfo: &str) -> bool {
        if cpu_has_hw_virt(cpuinfo) {
            return false;
        }
        // In a jail /sys is not mounted; a usable /dev/kvm on a CPU without vmx/svm can then only
        // be PVM's, so the boot fails fast here too instead of crawling.
        self.pvm_loaded || !self.modules_visible
    }
}

/// Whether Linux guests can run here; the CLI uses it to pick the nested test host automatically.
pub fn can_run_linux() -> bool {
    check_can_run_linux().is_ok()
}

fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hw_virt_flag_detection() {
        assert!(cpu_has_hw_virt("processor : 0\nflags : fpu vme svm sse\n"));
        assert!(cpu_has_hw_virt("flags\t\t: fpu vmx\n"));
        assert!(!cpu_has_hw_virt("flags : fpu vme sse hypervisor\n"));
        assert!(!cpu_has_hw_virt("model name : svm-like cpu\n"));
    }

    #[test]
    fn pvm_is_recognised_with_and_without_sys() {
        let plain = "flags : fpu sse hypervisor\n";
        let svm = "flags : fpu svm\n";
        let host = |modules_visible, pvm_loaded| KvmProvider {
            modules_visible,
            pvm_loaded,
        };
        assert!(host(true, true).is_pvm(plain));
        assert!(!host(true, false).is_pvm(plain));
        assert!(!host(true, true).is_pvm(svm));
        // Jailed: no /sys to look at.
        assert!(host(false, false).is_pvm(plain));
        assert!(!host(false, false).is_pvm(svm));
    }
}

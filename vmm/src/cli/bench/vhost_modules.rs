//! The host-kernel side of the peer's vsock device: QEMU's `vhost-vsock-device` needs
//! /dev/vhost-vsock, and the benchmark's client needs AF_VSOCK. The distribution kernel has both
//! as modules; the nested test host gets them from the same kernel package as its kvm modules, and
//! the peer helper loads them in L1 before starting QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::child::run_tool;

/// In load order: each needs the symbols of the ones before it.
pub const MODULES: [(&str, &str); 5] = [
    ("vsock", "net/vmw_vsock/vsock.ko"),
    (
        "vmw_vsock_virtio_transport_common",
        "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    ),
    ("vhost_iotlb", "drivers/vhost/vhost_iotlb.ko"),
    ("vhost", "drivers/vhost/vhost.ko"),
    ("vhost_vsock", "drivers/vhost/vhost_vsock.ko"),
];
/// Where the nested test host keeps them.
pub const L1_DIR: &str = "/lib/modules/vhost";
const INSMOD_LIMIT: Duration = Duration::from_secs(60);

/// The modules in an extracted kernel package (`lib/modules/<ver>/kernel/...`), as
/// (host path, L1 path) pairs for the nested host's extra files.
pub fn files_for_l1(pkg_dir: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let modules_dir = pkg_dir.join("lib/modules");
    let versions = std::fs::read_dir(&modules_dir)
        .map_err(|e| format!("cannot list {}: {e}", modules_dir.display()))?;
    for version in versions.flatten() {
        let kernel = version.path().join("kernel");
        let paths: Vec<PathBuf> = MODULES.iter().map(|(_, rel)| kernel.join(rel)).collect();
        if paths.iter().all(|p| p.is_file()) {
            return Ok(MODULES
                .iter()
                .zip(paths)
                .map(|((name, _), path)| (path, format!("{L1_DIR}/{name}.ko")))
                .collect());
        }
    }
    Err(format!(
        "no <version>/kernel/ in {} has all of {}",
        modules_dir.display(),
        MODULES
            .iter()
            .map(|(_, rel)| *rel)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Loads the modules from `dir` (`<name>.ko`) unless the running kernel already has them.
pub fn load(dir: &Path) -> Result<(), String> {
    for (name, _) in MODULES {
        if is_loaded(name) {
            continue;
        }
        let path = dir.join(format!("{name}.ko"));
        let mut cmd = Command::new("insmod");
        cmd.arg(&path);
        let out = run_tool(cmd, "insmod", INSMOD_LIMIT)?;
        if !out.status.success() && !is_loaded(name) {
            return Err(format!(
                "insmod {} failed ({}): {}",
                path.display(),
                out.status,
                out.stderr.trim()
            ));
        }
    }
    Ok(())
}

fn is_loaded(name: &str) -> bool {
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    module_listed(&modules, name) || Path::new("/sys/module").join(name).is_dir()
}

fn module_listed(proc_modules: &str, name: &str) -> bool {
    proc_modules
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_found_in_a_kernel_package() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("lib/modules/6.1.0-test/kernel");
        for (_, rel) in MODULES {
            let path = kernel.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"").unwrap();
        }
        let files = files_for_l1(dir.path()).unwrap();
        assert_eq!(files.len(), MODULES.len());
        assert_eq!(files[4].1, "/lib/modules/vhost/vhost_vsock.ko");
        assert!(files[4].0.ends_with("drivers/vhost/vhost_vsock.ko"));

        std::fs::remove_file(kernel.join("drivers/vhost/vhost.ko")).unwrap();
        let err = files_for_l1(dir.path()).unwrap_err();
        assert!(err.contains("drivers/vhost/vhost.ko"), "{err}");
        let err = files_for_l1(&dir.path().join("none")).unwrap_err();
        assert!(err.contains("cannot list"), "{err}");
    }

    #[test]
    fn proc_modules_is_read_by_name() {
        let text = "vhost_vsock 24576 0 - Live 0x0\nvhost 57344 1 vhost_vsock, Live 0x0\n";
        assert!(module_listed(text, "vhost"));
        assert!(module_listed(text, "vhost_vsock"));
        assert!(!module_listed(text, "vhost_iotlb"));
    }
}

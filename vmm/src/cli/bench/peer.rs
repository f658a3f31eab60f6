//! The peer: QEMU `-M microvm` with KVM, booting the same vmlinux + initramfs and agent directly
//! into the kernel (no disk, no PCI), with a vhost-vsock device: the host reaches the agent over
//! AF_VSOCK with the same client agentvm is driven with.

use std::path::Path;

use crate::cli::boot::LINUX_BASE_CMDLINE;

pub const PEER_NAME: &str = "qemu-microvm";

/// One way of starting QEMU microvm. They are tried in order until one boots the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub name: &'static str,
    pub machine: &'static str,
}

/// qboot is the firmware in every variant: QEMU microvm has no firmware-less boot. With its
/// option ROMs off, qboot itself loads the kernel through its PVH entry point; with them on,
/// pvh.bin does. Legacy PIC/PIT/RTC and the ISA serial port match agentvm's machine model. ACPI
/// stays on (microvm's default): the Debian kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and
/// finds virtio-mmio devices only in the DSDT, as it does with agentvm's own ACPI tables.
pub const VARIANTS: [Variant; 3] = [
    Variant {
        name: "qboot PVH boot, no option ROMs",
        machine: "microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on,acpi=on",
    },
    Variant {
        name: "qboot + pvh.bin option ROM",
        machine: "microvm,pit=on,pic=on,rtc=on,isa-serial=on,acpi=on",
    },
    Variant {
        name: "microvm defaults",
        machine: "microvm",
    },
];

/// The guest kernel command line for QEMU: agentvm's own, except the reset method. microvm has
/// no keyboard controller, so the guest resets by triple fault (`reboot=t`), which `-no-reboot`
/// turns into QEMU exiting.
pub fn cmdline() -> String {
    let base = LINUX_BASE_CMDLINE.replace("reboot=k", "reboot=t");
    format!("{base} quiet")
}

/// The guest's vsock CID: any above 2 (the host); one peer guest runs at a time.
pub const GUEST_CID: u32 = 3;

/// QEMU's arguments for one boot. The console is QEMU's stdout.
pub fn qemu_args(
    variant: &Variant,
    firmware_dir: Option<&Path>,
    kernel: &Path,
    initrd: &Path,
    mem_mib: u64,
    cmdline: &str,
    guest_cid: u32,
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    if let Some(dir) = firmware_dir {
        args.extend(["-L".into(), dir.display().to_string()]);
    }
    for a in [
        "-M",
        variant.machine,
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        // Thread names ("CPU 0/KVM"), so that vCPU time can be told from the VMM's own.
        "-name",
        "peer,debug-threads=on",
        // agentvm's machine has a virtio-rng at virtio-mmio slot 0; give the peer the same.
        "-device",
        "virtio-rng-device",
    ] {
        args.push(a.to_string());
    }
    args.extend([
        "-device".into(),
        format!("vhost-vsock-device,guest-cid={guest_cid}"),
        "-m".into(),
        mem_mib.to_string(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        cmdline.to_string(),
    ]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_resets_by_triple_fault() {
        let c = cmdline();
        assert!(c.contains("reboot=t") && !c.contains("reboot=k"), "{c}");
        assert!(c.contains("console=ttyS0") && c.ends_with(" quiet"), "{c}");
    }

    #[test]
    fn args_boot_the_kernel_directly_with_kvm() {
        let a = qemu_args(
            &VARIANTS[0],
            Some(Path::new("/opt/qemu/share")),
            Path::new("/l2/vmlinux"),
            Path::new("/l2/initramfs.cpio"),
            256,
            "console=ttyS0",
            7,
        );
        let after = |flag: &str| a.iter().position(|x| x == flag).map(|i| a[i + 1].as_str());
        assert_eq!(after("-L"), Some("/opt/qemu/share"));
        assert_eq!(after("-M"), Some(VARIANTS[0].machine));
        assert_eq!(after("-kernel"), Some("/l2/vmlinux"));
        assert_eq!(after("-initrd"), Some("/l2/initramfs.cpio"));
        assert_eq!(after("-m"), Some("256"));
        assert_eq!(after("-append"), Some("console=ttyS0"));
        assert!(a.iter().any(|x| x == "-enable-kvm") && a.iter().any(|x| x == "-no-reboot"));
        assert_eq!(after("-name"), Some("peer,debug-threads=on"));
        assert!(a
            .windows(2)
            .any(|w| w[0] == "-device" && w[1] == "vhost-vsock-device,guest-cid=7"));
        assert!(VARIANTS.iter().all(|v| v.machine.starts_with("microvm")));
        assert!(VARIANTS.iter().all(|v| !v.machine.contains("acpi=off")));
    }
}

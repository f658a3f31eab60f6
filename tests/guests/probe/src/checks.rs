//! The boot-path checks of the default mode, one `PROBE <name> <ok|fail> <details>` line each.

use core::fmt;

use crate::hw::{cpuid, inb, inl, mmio_read32, mmio_write32};
use crate::mptable;
use crate::serial::{check_line, Escaped};
use crate::zeropage::ZeroPage;

pub fn bootparams(zero_page: u64, zp: Option<ZeroPage>) {
    match zp {
        Some(zp) => check_line("bootparams", zp.header_ok(), zp),
        None => check_line(
            "bootparams",
            false,
            format_args!("zero_page={zero_page:#x} is not a usable address (RSI at entry)"),
        ),
    }
}

pub fn e820(zp: Option<ZeroPage>) {
    match zp {
        Some(zp) => {
            let map = zp.e820();
            check_line("e820", map.problem().is_none(), &map);
        }
        None => check_line("e820", false, "no zero page"),
    }
}

pub fn cmdline(zp: Option<ZeroPage>) {
    match zp.map(|zp| zp.cmdline()) {
        Some(Ok(line)) => check_line("cmdline", true, Escaped(line)),
        Some(Err(e)) => check_line("cmdline", false, e),
        None => check_line("cmdline", false, "no zero page"),
    }
}

pub fn mptable() {
    match mptable::parse() {
        Ok(info) => check_line("mptable", info.is_usable(), info),
        Err(e) => check_line("mptable", false, e),
    }
}

const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;
const HYPERVISOR_LEAF: u32 = 0x4000_0000;
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

pub fn cpuid_check() {
    let hypervisor = cpuid(1)[2] & CPUID_HYPERVISOR_BIT != 0;
    let [max_leaf, b, c, d] = cpuid(HYPERVISOR_LEAF);
    let mut signature = [0u8; 12];
    signature[..4].copy_from_slice(&b.to_le_bytes());
    signature[4..8].copy_from_slice(&c.to_le_bytes());
    signature[8..].copy_from_slice(&d.to_le_bytes());
    let is_kvm = &signature == KVM_SIGNATURE;
    let features = if is_kvm && max_leaf >= KVM_FEATURES_LEAF {
        cpuid(KVM_FEATURES_LEAF)[0]
    } else {
        0
    };
    check_line(
        "cpuid",
        hypervisor && is_kvm,
        format_args!(
            "hypervisor={} signature={} max_leaf={max_leaf:#x} kvm_features={features:#x}",
            if hypervisor { "yes" } else { "no" },
            Escaped(&signature),
        ),
    );
}

/// The QEMU fw_cfg port: no device of ours lives there.
const UNUSED_PORT: u16 = 0x510;

pub fn pio() {
    let byte = inb(UNUSED_PORT);
    let dword = inl(UNUSED_PORT);
    check_line(
        "pio",
        byte == 0xff && dword == 0xffff_ffff,
        format_args!("port={UNUSED_PORT:#x} inb={byte:#04x} inl={dword:#010x}"),
    );
}

const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
const VIRTIO_MAGIC: u32 = 0x7472_6976; // "virt"
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

struct VirtioRegs {
    magic: u32,
    version: u32,
    device_id: u32,
    vendor_id: u32,
    features: u64,
}

impl VirtioRegs {
    fn problem(&self) -> Option<&'static str> {
        if self.magic != VIRTIO_MAGIC {
            Some("bad magic")
        } else if self.version != 2 {
            Some("not a virtio 1.x (version 2) transport")
        } else if self.device_id == 0 {
            Some("no device in slot 0")
        } else if self.features & VIRTIO_F_VERSION_1 == 0 {
            Some("device does not offer VIRTIO_F_VERSION_1")
        } else {
            None
        }
    }
}

impl fmt::Display for VirtioRegs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "base={VIRTIO_MMIO_BASE:#x} magic={:#010x} version={} device_id={} vendor_id={:#010x} \
             features={:#018x}",
            self.magic, self.version, self.device_id, self.vendor_id, self.features
        )?;
        if let Some(problem) = self.problem() {
            write!(f, " problem=\"{problem}\"")?;
        }
        Ok(())
    }
}

pub fn virtio() {
    let reg = |offset| mmio_read32(VIRTIO_MMIO_BASE + offset);
    let mut regs = VirtioRegs {
        magic: reg(REG_MAGIC),
        version: reg(REG_VERSION),
        device_id: reg(REG_DEVICE_ID),
        vendor_id: reg(REG_VENDOR_ID),
        features: 0,
    };
    // The selector write must take effect before the feature read: two MMIO exits in order.
    for half in 0..2u32 {
        mmio_write32(VIRTIO_MMIO_BASE + REG_DEVICE_FEATURES_SEL, half);
        regs.features |= u64::from(reg(REG_DEVICE_FEATURES)) << (32 * half);
    }
    check_line("virtio", regs.problem().is_none(), regs);
}

//! ACPI tables: how a guest kernel that ignores `virtio_mmio.device=` on its command line (built
//! without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, like Debian's) still finds the virtio-mmio devices,
//! and how it learns the vCPUs and the IOAPIC without the MP table.
//!
//! The tables describe a hardware-reduced ACPI platform (no PM1/GPE blocks, no SCI, no FACS):
//!
//! * RSDP (revision 2) at `ACPI_START` (0xe0000), where Linux scans for "RSD PTR " when it was
//!   not booted by EFI; the VMM also passes its address in the zero page
//!   ([`crate::boot_params::set_acpi_rsdp`]), so the scan is only the fallback.
//! * XSDT listing the FADT and the MADT.
//! * FADT: HW_REDUCED_ACPI; power and sleep buttons are not fixed-feature buttons; the ACPI
//!   reset register is the i8042 command port (0x64, value 0xfe), the same write `reboot=k`
//!   makes, so a reboot through ACPI ends the VMM exactly like the keyboard-controller reset.
//!   IA-PC boot flags: no VGA, no MSI, no CMOS RTC, and *no* 8042 (see [`IAPC_BOOT_ARCH`]).
//! * MADT: one enabled Processor Local APIC per vCPU (APIC id = ACPI UID = vCPU index) and the
//!   IOAPIC with GSI base 0 (id = `cpu_count`, as in the MP table). No interrupt source
//!   overrides: on a hardware-reduced platform Linux sets up no 8259 PIC, no PIT/HPET timer and
//!   no ISA IRQ mappings (it runs on the LAPIC timer and kvm-clock); every interrupt it uses is
//!   named by GSI in the DSDT, and KVM's default routing sends GSI n to IOAPIC pin n.
//! * DSDT with `\_SB.COM1` (PNP0501, I/O 0x3f8-0x3ff, IRQ 4) and one `\_SB.Vnnn` per virtio-mmio
//!   window (`_HID` "LNRO0005", the id Linux's virtio_mmio driver matches, `_UID` = slot, `_CRS`
//!   = the window as Memory32Fixed + its GSI as an edge-triggered, active-high interrupt).
//!
//! Everything sits in `[ACPI_START, ACPI_END)`, inside the legacy BIOS hole that the e820 map
//! leaves out of RAM: Linux maps it like firmware tables and never allocates it.

use crate::GuestMemoryMmap;
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::cpuid::MAX_CPU_COUNT;
use crate::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, IRQ_MAX, LAPIC_ADDR};
use crate::mptable::ioapic_id;
use crate::{Error, Result};

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"AGNTVM";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity" (ACPI 6.0+), so a guest can tell what it runs on.
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"AGENTVM ";

/// `_HID` of a virtio-mmio device, matched by Linux's virtio_mmio ACPI table.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// `_HID` of a 16550-compatible serial port.
pub const SERIAL_HID: &str = "PNP0501";
/// COM1 I/O base, where the VMM's serial device sits on the PIO bus.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of COM1 I/O ports.
pub const COM1_PORT_LEN: u8 = 8;
/// COM1 interrupt.
pub const COM1_IRQ: u32 = 4;

/// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11).
pub mod iapc {
    /// LPC/ISA legacy devices that firmware does not describe in ACPI are present.
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    /// An 8042 keyboard controller is present.
    pub const I8042: u16 = 1 << 1;
    /// Probing for VGA is not safe.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// MSI must not be enabled.
    pub const MSI_NOT_SUPPORTED: u16 = 1 << 3;
    /// OSPM must not enable PCIe ASPM.
    pub const PCIE_ASPM_CONTROLS: u16 = 1 << 4;
    /// There is no CMOS RTC at ports 0x70/0x71.
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// The IA-PC boot flags we give: no VGA, no MSI (there is no PCI; revisit with virtio-pci), no
/// CMOS RTC.
///
/// The 8042 flag is deliberately clear. Our i8042 is only a reset line: it cannot pass the
/// controller self-test, and without this flag Linux's i8042 driver (finding no PNP0303/PNP0F13
/// device either) does not probe it at all, instead of spending its probe timeouts on it. The
/// reset does not depend on that driver: `reboot=k` writes 0xfe to port 0x64 directly (arch
/// reboot code), and the FADT reset register makes the ACPI reboot path do the same write.
/// CMOS_RTC_NOT_PRESENT likewise keeps Linux from registering an rtc_cmos device for ports
/// nothing emulates.
pub const IAPC_BOOT_ARCH: u16 =
    iapc::VGA_NOT_PRESENT | iapc::MSI_NOT_SUPPORTED | iapc::CMOS_RTC_NOT_PRESENT;

/// i8042 command port: the ACPI reset register.
pub const RESET_PORT: u16 = 0x64;
/// i8042 "pulse reset line" command: the ACPI reset value.
pub const RESET_VALUE: u8 = 0xfe;

/// Tables are placed on this boundary: the RSDP must be 16-byte aligned for Linux's scan, and it
/// keeps the 64-bit fields of the others naturally aligned.
const TABLE_ALIGN: u64 = 16;
/// Size of an ACPI revision 2 RSDP.
pub const RSDP_SIZE: usize = 36;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Size of the common system description table header.
const SDT_HEADER_SIZE: u32 = 36;
/// DSDT device names are `V` and three hex digits.
const MAX_MMIO_DEVICES: usize = 0x1000;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiMmioDevice {
    /// Guest physical base of the device's MMIO window.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// The IOAPIC GSI the device's irqfd is registered on.
    pub gsi: u32,
}

/// Guest physical address of each table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiLayout {
    /// Root System Description Pointer (always `ACPI_START`).
    pub rsdp: u64,
    /// Extended System Description Table.
    pub xsdt: u64,
    /// Fixed ACPI Description Table ("FACP").
    pub fadt: u64,
    /// Multiple APIC Description Table ("APIC").
    pub madt: u64,
    /// Differentiated System Description Table.
    pub dsdt: u64,
    /// Exclusive end of the last table.
    pub end: u64,
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Eight-character OEM table id: "AVM" + the signature + a space.
fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"AVM     ";
    id[3..7].copy_from_slice(signature);
    id
}

fn check_device(index: usize, dev: &AcpiMmioDevice) -> Result<(u32, u32)> {
    let fits = dev.size > 0
        && dev
            .base
            .checked_add(dev.size)
            .is_some_and(|end| end <= 1 << 32);
    if !fits {
        return Err(Error::AcpiMmioRange {
            index,
            base: dev.base,
            size: dev.size,
        });
    }
    if dev.gsi > IRQ_MAX {
        return Err(Error::AcpiGsi {
            index,
            gsi: dev.gsi,
            max: IRQ_MAX,
        });
    }
    // Both fit: the window ends at or below 4 GiB and is not empty.
    Ok((dev.base as u32, dev.size as u32))
}

/// `Device(\_SB.Vnnn)` for virtio-mmio slot `index`.
fn virtio_mmio_aml(index: usize, base: u32, size: u32, gsi: u32, sink: &mut Vec<u8>) {
    let name = format!("V{index:03X}");
    let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid = aml::Name::new("_UID".into(), &(index as u64));
    let window = aml::Memory32Fixed::new(true, base, size);
    // KVM's irqfd injects a pulse on the GSI (no resampler), which only an edge-triggered
    // IOAPIC pin takes as one interrupt per signal; active high as for every ISA-style pin.
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&window, &irq]),
    );
    aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// `Device(\_SB.COM1)`: keeps the console on ttyS0 when Linux enumerates serial ports via ACPI.
fn com1_aml(sink: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new(SERIAL_HID));
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
    aml::Device::new("COM1".into(), vec![&hid, &crs]).to_aml_bytes(sink);
}

fn dsdt_bytes(devices: &[AcpiMmioDevice]) -> Result<Vec<u8>> {
    if devices.len() > MAX_MMIO_DEVICES {
        return Err(Error::AcpiTooManyDevices {
            count: devices.len(),
            max: MAX_MMIO_DEVICES,
        });
    }
    let mut body = Vec::new();
    com1_aml(&mut body);
    for (index, dev) in devices.iter().enumerate() {
        let (base, size) = check_device(index, dev)?;
        virtio_mmio_aml(index, base, size, dev.gsi, &mut body);
    }
    let scope = aml::Scope::raw("\\_SB_".into(), body);
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_SIZE,
        DSDT_REVISION,
        OEM_ID,
        oem_table_id(b"DSDT"),
        OEM_REVISION,
    );
    dsdt.append_slice(&scope);
    Ok(dsdt.as_slice().to_vec())
}

fn madt_bytes(cpu_count: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        oem_table_id(b"APIC"),
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for cpu in 0..cpu_count {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(ioapic_id(cpu_count), IOAPIC_ADDR as u32, 0));
    to_bytes(&madt)
}

fn fadt_bytes(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(RESET_PORT),
    );
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    to_bytes(&fadt.finalize())
}

fn xsdt_bytes(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    for entry in entries {
        xsdt.add_entry(*entry);
    }
    to_bytes(&xsdt)
}

/// Builds every table for `cpu_count` vCPUs and `devices` (slot i = `devices[i]`), laid out from
/// `ACPI_START`. Returns the bytes of `[ACPI_START, layout.end)` and where each table is.
pub fn acpi_tables_bytes(
    cpu_count: u8,
    devices: &[AcpiMmioDevice],
) -> Result<(Vec<u8>, AcpiLayout)> {
    if cpu_count == 0 || cpu_count > MAX_CPU_COUNT {
        return Err(Error::InvalidCpuCount(u32::from(cpu_count)));
    }
    let dsdt = dsdt_bytes(devices)?;
    let madt = madt_bytes(cpu_count);
    let fadt_len = FADT::len();
    let xsdt_len = SDT_HEADER_SIZE as usize + 2 * 8;

    let rsdp = ACPI_START;
    let xsdt_at = align_up(rsdp + RSDP_SIZE as u64);
    let fadt_at = align_up(xsdt_at + xsdt_len as u64);
    let madt_at = align_up(fadt_at + fadt_len as u64);
    let dsdt_at = align_up(madt_at + madt.len() as u64);
    let end = dsdt_at + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(Error::AcpiTablesTooLarge {
            size: end - ACPI_START,
            available: ACPI_END - ACPI_START,
        });
    }
    let layout = AcpiLayout {
        rsdp,
        xsdt: xsdt_at,
        fadt: fadt_at,
        madt: madt_at,
        dsdt: dsdt_at,
        end,
    };

    let fadt = fadt_bytes(dsdt_at);
    let xsdt = xsdt_bytes(&[fadt_at, madt_at]);
    let rsdp_bytes = to_bytes(&Rsdp::new(OEM_ID, xsdt_at));
    debug_assert_eq!(fadt.len(), fadt_len);
    debug_assert_eq!(xsdt.len(), xsdt_len);
    debug_assert_eq!(rsdp_bytes.len(), RSDP_SIZE);

    let mut image = vec![0u8; (end - ACPI_START) as usize];
    for (at, bytes) in [
        (rsdp, &rsdp_bytes),
        (xsdt_at, &xsdt),
        (fadt_at, &fadt),
        (madt_at, &madt),
        (dsdt_at, &dsdt),
    ] {
        let off = (at - ACPI_START) as usize;
        image[off..off + bytes.len()].copy_from_slice(bytes);
    }
    Ok((image, layout))
}

/// Writes the ACPI tables for `cpu_count` vCPUs and the virtio-mmio `devices` (DSDT slot i =
/// `devices[i]`) at `ACPI_START` and returns the RSDP's address, for
/// [`crate::boot_params::set_acpi_rsdp`].
pub fn setup_acpi(
    mem: &GuestMemoryMmap,
    cpu_count: u8,
    devices: &[AcpiMmioDevice],
) -> Result<GuestAddress> {
    let (image, layout) = acpi_tables_bytes(cpu_count, devices)?;
    mem.write_slice(&image, GuestAddress(ACPI_START))
        .map_err(|source| Error::GuestMemoryWrite {
            what: "ACPI tables",
            addr: ACPI_START,
            source,
        })?;
    Ok(GuestAddress(layout.rsdp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{arch_memory_regions, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
    use crate::test_bytes::{le16, le32, le64, sum};

    /// A guest physical address space made of the image at `ACPI_START`.
    struct Image<'a>(&'a [u8]);

    impl Image<'_> {
        fn at(&self, addr: u64, len: usize) -> &[u8] {
            let off = (addr - ACPI_START) as usize;
            &self.0[off..off + len]
        }

        /// The table at `addr`, checked as ACPICA checks it: signature, length, checksum.
        fn table(&self, addr: u64, signature: &[u8; 4]) -> &[u8] {
            let header = self.at(addr, 36);
            assert_eq!(&header[0..4], signature, "signature at {addr:#x}");
            let len = le32(header, 4) as usize;
            assert!(len >= 36);
            let table = self.at(addr, len);
            assert_eq!(
                sum(table),
                0,
                "{} checksum",
                String::from_utf8_lossy(signature)
            );
            assert_eq!(&table[10..16], &OEM_ID);
            table
        }
    }

    struct Tables<'a> {
        xsdt: &'a [u8],
        fadt: &'a [u8],
        madt: &'a [u8],
        dsdt: &'a [u8],
    }

    /// Walks from the RSDP the way Linux does (RSDP -> XSDT -> FADT -> DSDT, XSDT -> MADT).
    fn walk<'a>(img: &'a Image<'a>, rsdp_addr: u64) -> Tables<'a> {
        let rsdp = img.at(rsdp_addr, RSDP_SIZE);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum (first 20 bytes)");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(le32(rsdp, 20) as usize, RSDP_SIZE);
        assert_eq!(le32(rsdp, 16), 0, "no RSDT");

        let xsdt = img.table(le64(rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16, "two entries");
        let mut fadt = None;
        let mut madt = None;
        for i in 0..2 {
            let addr = le64(xsdt, 36 + 8 * i);
            assert_eq!(addr % 8, 0);
            match img.at(addr, 4) {
                b"FACP" => fadt = Some(img.table(addr, b"FACP")),
                b"APIC" => madt = Some(img.table(addr, b"APIC")),
                other => panic!("unexpected table {other:?}"),
            }
        }
        let fadt = fadt.expect("FADT in XSDT");
        assert_eq!(le32(fadt, 40), 0, "32-bit DSDT pointer unused");
        let dsdt = img.table(le64(fadt, 140), b"DSDT");
        Tables {
            xsdt,
            fadt,
            madt: madt.expect("MADT in XSDT"),
            dsdt,
        }
    }

    fn devices(n: u64) -> Vec<AcpiMmioDevice> {
        (0..n)
            .map(|i| AcpiMmioDevice {
                base: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    /// MADT entries as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], usize::from(madt[at + 1]));
            assert!(
                len >= 2 && at + len <= madt.len(),
                "entry overruns the MADT"
            );
            out.push((kind, &madt[at..at + len]));
            at += len;
        }
        assert_eq!(at, madt.len());
        out
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let (bytes, layout) = acpi_tables_bytes(2, &devices(1)).unwrap();
        assert_eq!(layout.rsdp, 0xe0000);
        assert_eq!(bytes.len() as u64, layout.end - ACPI_START);
        let img = Image(&bytes);
        let t = walk(&img, layout.rsdp);
        assert_eq!(le64(t.xsdt, 36), layout.fadt);
        assert_eq!(le64(t.xsdt, 44), layout.madt);
        assert_eq!(le64(t.fadt, 140), layout.dsdt);
        for addr in [layout.xsdt, layout.fadt, layout.madt, layout.dsdt] {
            assert_eq!(addr % TABLE_ALIGN, 0);
        }
        assert!(layout.end <= ACPI_END);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_i8042_reset() {
        let (bytes, layout) = acpi_tables_bytes(1, &[]).unwrap();
        let img = Image(&bytes);
        let fadt = walk(&img, layout.rsdp).fadt;
        assert_eq!(fadt.len(), 276, "ACPI 6.5 FADT");
        assert_eq!(fadt[8], 6, "major revision");
        assert_eq!(fadt[131], 5, "minor revision");
        let flags = le32(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_ne!(flags & (1 << 4), 0, "no fixed power button");
        assert_ne!(flags & (1 << 5), 0, "no fixed sleep button");

        let boot_arch = le16(fadt, 109);
        assert_eq!(boot_arch & iapc::I8042, 0, "Linux must not probe the i8042");
        assert_eq!(boot_arch & iapc::LEGACY_DEVICES, 0);
        assert_ne!(boot_arch & iapc::VGA_NOT_PRESENT, 0);
        assert_ne!(boot_arch & iapc::CMOS_RTC_NOT_PRESENT, 0);
        assert_ne!(boot_arch & iapc::MSI_NOT_SUPPORTED, 0);

        // Reset register: system I/O, 8 bits at offset 0, byte access, port 0x64; value 0xfe.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(le64(fadt, 120), 0x64);
        assert_eq!(fadt[128], 0xfe);

        // No legacy fixed hardware: SCI, SMI command, PM1 and GPE blocks, FACS all absent.
        assert_eq!(le16(fadt, 46), 0, "SCI_INT");
        assert_eq!(le32(fadt, 48), 0, "SMI_CMD");
        assert!(fadt[56..96].iter().all(|b| *b == 0), "PM/GPE blocks");
        assert_eq!(le32(fadt, 36), 0, "FIRMWARE_CTRL");
        assert_eq!(le64(fadt, 132), 0, "X_FIRMWARE_CTRL");
        assert!(fadt[148..244].iter().all(|b| *b == 0), "X_ PM/GPE blocks");
        assert_eq!(&fadt[268..276], b"AGENTVM ");
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        for cpus in [1u8, 2, 4, 64, MAX_CPU_COUNT] {
            let (bytes, layout) = acpi_tables_bytes(cpus, &devices(2)).unwrap();
            let img = Image(&bytes);
            let madt = walk(&img, layout.rsdp).madt;
            assert_eq!(madt[8], 1, "MADT revision");
            assert_eq!(le32(madt, 36), 0xfee0_0000, "local APIC address");
            let entries = madt_entries(madt);
            let lapics: Vec<_> = entries.iter().filter(|(k, _)| *k == 0).collect();
            assert_eq!(lapics.len(), usize::from(cpus));
            for (i, (_, e)) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!(usize::from(e[2]), i, "ACPI processor UID");
                assert_eq!(usize::from(e[3]), i, "APIC id = vCPU index");
                assert_eq!(le32(e, 4), 1, "enabled");
            }
            let ioapics: Vec<_> = entries.iter().filter(|(k, _)| *k == 1).collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0].1;
            assert_eq!(io.len(), 12);
            assert_eq!(
                io[2], cpus,
                "IOAPIC id after the last APIC id, as in the MP table"
            );
            assert_eq!(le32(io, 4), 0xfec0_0000);
            assert_eq!(le32(io, 8), 0, "GSI base");
            assert_eq!(entries.len(), usize::from(cpus) + 1, "no other entries");
        }
    }

    // ---- A small AML reader, enough for what the DSDT holds. ----

    #[derive(Debug, Clone, PartialEq)]
    enum Value {
        Int(u64),
        Str(String),
        Buffer(Vec<u8>),
    }

    #[derive(Debug, Default)]
    struct Device {
        path: String,
        names: Vec<(String, Value)>,
    }

    impl Device {
        fn get(&self, name: &str) -> &Value {
            &self
                .names
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{} has no {name}", self.path))
                .1
        }
    }

    /// PkgLength at `at`: (value, bytes it took).
    fn pkg_length(b: &[u8], at: usize) -> (usize, usize) {
        let lead = b[at];
        let follow = usize::from(lead >> 6);
        if follow == 0 {
            return (usize::from(lead & 0x3f), 1);
        }
        let mut len = usize::from(lead & 0x0f);
        for i in 0..follow {
            len |= usize::from(b[at + 1 + i]) << (4 + 8 * i);
        }
        (len, follow + 1)
    }

    /// NameString at `at`: (dotted path, bytes it took).
    fn name_string(b: &[u8], mut at: usize) -> (String, usize) {
        let start = at;
        let mut prefix = String::new();
        while b[at] == b'\\' || b[at] == b'^' {
            prefix.push(b[at] as char);
            at += 1;
        }
        let segs = match b[at] {
            0x2e => {
                at += 1;
                2
            }
            0x2f => {
                at += 2;
                usize::from(b[at - 1])
            }
            0x00 => {
                at += 1;
                0
            }
            _ => 1,
        };
        let mut parts = Vec::new();
        for _ in 0..segs {
            parts.push(String::from_utf8(b[at..at + 4].to_vec()).unwrap());
            at += 4;
        }
        (prefix + &parts.join("."), at - start)
    }

    /// A DataRefObject at `at`: (value, bytes it took).
    fn data_object(b: &[u8], at: usize) -> (Value, usize) {
        match b[at] {
            0x00 => (Value::Int(0), 1),
            0x01 => (Value::Int(1), 1),
            0xff => (Value::Int(u64::MAX), 1),
            0x0a => (Value::Int(u64::from(b[at + 1])), 2),
            0x0b => (Value::Int(u64::from(le16(b, at + 1))), 3),
            0x0c => (Value::Int(u64::from(le32(b, at + 1))), 5),
            0x0e => (Value::Int(le64(b, at + 1)), 9),
            0x0d => {
                let end = at + 1 + b[at + 1..].iter().position(|c| *c == 0).unwrap();
                let s = String::from_utf8(b[at + 1..end].to_vec()).unwrap();
                (Value::Str(s), end + 1 - at)
            }
            0x11 => {
                let (len, n) = pkg_length(b, at + 1);
                let (size, m) = data_object(b, at + 1 + n);
                let Value::Int(size) = size else {
                    panic!("buffer size is not an integer")
                };
                let data = &b[at + 1 + n + m..at + 1 + len];
                assert_eq!(data.len() as u64, size, "buffer size matches its PkgLength");
                (Value::Buffer(data.to_vec()), 1 + len)
            }
            op => panic!("unsupported data object opcode {op:#x} at {at}"),
        }
    }

    /// Parses a TermList of Scope / Device / Name objects, collecting devices.
    fn term_list(b: &[u8], scope: &str, out: &mut Vec<Device>, names: &mut Vec<(String, Value)>) {
        let mut at = 0;
        while at < b.len() {
            match b[at] {
                0x10 => {
                    let (len, n) = pkg_length(b, at + 1);
                    let (path, m) = name_string(b, at + 1 + n);
                    let body = &b[at + 1 + n + m..at + 1 + len];
                    term_list(body, &path, out, &mut Vec::new());
                    at += 1 + len;
                }
                0x5b if b[at + 1] == 0x82 => {
                    let (len, n) = pkg_length(b, at + 2);
                    let (name, m) = name_string(b, at + 2 + n);
                    let body = &b[at + 2 + n + m..at + 2 + len];
                    let mut dev = Device {
                        path: format!("{scope}.{name}"),
                        ..Default::default()
                    };
                    term_list(body, &dev.path.clone(), out, &mut dev.names);
                    out.push(dev);
                    at += 2 + len;
                }
                0x08 => {
                    let (name, m) = name_string(b, at + 1);
                    let (value, k) = data_object(b, at + 1 + m);
                    names.push((name, value));
                    at += 1 + m + k;
                }
                op => panic!("unsupported opcode {op:#x} in {scope}"),
            }
        }
        assert_eq!(at, b.len(), "objects fill their scope exactly");
    }

    fn dsdt_devices(dsdt: &[u8]) -> Vec<Device> {
        assert_eq!(dsdt[8], 2, "DSDT revision 2 (64-bit integers)");
        let mut out = Vec::new();
        term_list(&dsdt[36..], "", &mut out, &mut Vec::new());
        out
    }

    #[derive(Debug, PartialEq)]
    enum Resource {
        Mem32Fixed {
            writable: bool,
            base: u32,
            len: u32,
        },
        ExtIrq {
            flags: u8,
            irqs: Vec<u32>,
        },
        Io {
            min: u16,
            max: u16,
            align: u8,
            len: u8,
        },
    }

    fn resources(buf: &[u8]) -> Vec<Resource> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let tag = buf[at];
            if tag & 0x80 == 0 {
                let (kind, len) = ((tag >> 3) & 0x0f, usize::from(tag & 0x07));
                match kind {
                    0x0f => {
                        assert_eq!(at + 2, buf.len(), "end tag is last");
                        return out;
                    }
                    0x08 => out.push(Resource::Io {
                        min: le16(buf, at + 2),
                        max: le16(buf, at + 4),
                        align: buf[at + 6],
                        len: buf[at + 7],
                    }),
                    other => panic!("unexpected small resource {other:#x}"),
                }
                at += 1 + len;
            } else {
                let len = usize::from(le16(buf, at + 1));
                let d = &buf[at + 3..at + 3 + len];
                match tag {
                    0x86 => out.push(Resource::Mem32Fixed {
                        writable: d[0] == 1,
                        base: le32(d, 1),
                        len: le32(d, 5),
                    }),
                    0x89 => {
                        let count = usize::from(d[1]);
                        out.push(Resource::ExtIrq {
                            flags: d[0],
                            irqs: (0..count).map(|i| le32(d, 2 + 4 * i)).collect(),
                        })
                    }
                    other => panic!("unexpected large resource {other:#x}"),
                }
                at += 3 + len;
            }
        }
    }

    /// Extended IRQ flags: consumer, edge-triggered, active high, exclusive.
    const EDGE_HIGH_EXCLUSIVE_CONSUMER: u8 = 0b0011;

    #[test]
    fn dsdt_has_com1_and_one_device_per_virtio_slot() {
        let devs = devices(3);
        let (bytes, layout) = acpi_tables_bytes(2, &devs).unwrap();
        let img = Image(&bytes);
        let parsed = dsdt_devices(walk(&img, layout.rsdp).dsdt);
        let paths: Vec<_> = parsed.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["\\_SB_.COM1", "\\_SB_.V000", "\\_SB_.V001", "\\_SB_.V002"]
        );

        let com1 = &parsed[0];
        // EISAID("PNP0501") as AML encodes it.
        assert_eq!(com1.get("_HID"), &Value::Int(0x0105_D041));
        let Value::Buffer(crs) = com1.get("_CRS") else {
            panic!("COM1 _CRS is not a buffer")
        };
        assert_eq!(
            resources(crs),
            vec![
                Resource::Io {
                    min: 0x3f8,
                    max: 0x3f8,
                    align: 1,
                    len: 8
                },
                Resource::ExtIrq {
                    flags: EDGE_HIGH_EXCLUSIVE_CONSUMER,
                    irqs: vec![4]
                },
            ]
        );

        for (i, (dev, want)) in parsed[1..].iter().zip(&devs).enumerate() {
            assert_eq!(dev.get("_HID"), &Value::Str("LNRO0005".into()));
            assert_eq!(dev.get("_UID"), &Value::Int(i as u64));
            let Value::Buffer(crs) = dev.get("_CRS") else {
                panic!("{} _CRS is not a buffer", dev.path)
            };
            assert_eq!(
                resources(crs),
                vec![
                    Resource::Mem32Fixed {
                        writable: true,
                        base: want.base as u32,
                        len: want.size as u32
                    },
                    Resource::ExtIrq {
                        flags: EDGE_HIGH_EXCLUSIVE_CONSUMER,
                        irqs: vec![want.gsi]
                    },
                ]
            );
        }
    }

    #[test]
    fn dsdt_crs_bytes_for_the_first_virtio_device() {
        let (bytes, layout) = acpi_tables_bytes(1, &devices(1)).unwrap();
        let img = Image(&bytes);
        let dsdt = walk(&img, layout.rsdp).dsdt;
        // Memory32Fixed(ReadWrite, 0xd0000000, 0x1000) then Interrupt(ResourceConsumer, Edge,
        // ActiveHigh, Exclusive) {5} then EndTag, as iasl would encode them.
        let crs: &[u8] = &[
            0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00, //
            0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00, //
            0x79, 0x00,
        ];
        assert!(dsdt.windows(crs.len()).any(|w| w == crs), "{dsdt:02x?}");
        assert!(dsdt.windows(10).any(|w| w == b"\x0dLNRO0005\0"));
    }

    #[test]
    fn many_devices_use_long_package_lengths() {
        // 19 devices (every GSI from 5 to 23) push the _SB_ scope past 63 and 4095 bytes of
        // PkgLength encoding thresholds; the reader checks every length.
        let devs: Vec<_> = (0..19u64)
            .map(|i| AcpiMmioDevice {
                base: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                gsi: 5 + i as u32,
            })
            .collect();
        let (bytes, layout) = acpi_tables_bytes(8, &devs).unwrap();
        let img = Image(&bytes);
        let parsed = dsdt_devices(walk(&img, layout.rsdp).dsdt);
        assert_eq!(parsed.len(), 20);
        assert_eq!(parsed[19].path, "\\_SB_.V012");
        assert_eq!(parsed[19].get("_UID"), &Value::Int(18));
    }

    #[test]
    fn invalid_inputs_are_errors() {
        assert!(matches!(
            acpi_tables_bytes(0, &[]),
            Err(Error::InvalidCpuCount(0))
        ));
        assert!(matches!(
            acpi_tables_bytes(255, &[]),
            Err(Error::InvalidCpuCount(255))
        ));
        let mut devs = devices(2);
        devs[1].gsi = 24;
        assert!(matches!(
            acpi_tables_bytes(1, &devs),
            Err(Error::AcpiGsi {
                index: 1,
                gsi: 24,
                max: 23
            })
        ));
        for (base, size) in [(0xffff_f000, 0x2000), (1 << 32, 0x1000), (0xd000_0000, 0)] {
            let dev = AcpiMmioDevice { base, size, gsi: 5 };
            assert!(matches!(
                acpi_tables_bytes(1, &[dev]),
                Err(Error::AcpiMmioRange { index: 0, .. })
            ));
        }
        let edge = AcpiMmioDevice {
            base: 0xffff_f000,
            size: 0x1000,
            gsi: 5,
        };
        assert!(
            acpi_tables_bytes(1, &[edge]).is_ok(),
            "a window may end at 4 GiB"
        );
        let too_many = vec![edge; MAX_MMIO_DEVICES + 1];
        assert!(matches!(
            acpi_tables_bytes(1, &too_many),
            Err(Error::AcpiTooManyDevices {
                count: 4097,
                max: 4096
            })
        ));
    }

    #[test]
    fn large_dsdt_that_does_not_fit_is_an_error() {
        let dev = AcpiMmioDevice {
            base: VIRTIO_MMIO_BASE,
            size: VIRTIO_MMIO_SIZE,
            gsi: 5,
        };
        // About 40 bytes of AML per device: 4096 devices overflow the 128 KiB window.
        match acpi_tables_bytes(1, &vec![dev; MAX_MMIO_DEVICES]) {
            Err(Error::AcpiTablesTooLarge { size, available }) => {
                assert_eq!(available, 0x20000);
                assert!(size > available);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn written_where_linux_scans_for_the_rsdp() {
        let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(64 << 20)).unwrap();
        let rsdp = setup_acpi(&mem, 2, &devices(1)).unwrap();
        // Linux's BIOS scan: 16-byte steps over [0xe0000, 0x100000).
        let mut area = vec![0u8; (ACPI_END - ACPI_START) as usize];
        mem.read_slice(&mut area, GuestAddress(ACPI_START)).unwrap();
        let found = (0..area.len())
            .step_by(16)
            .find(|off| &area[*off..*off + 8] == b"RSD PTR " && sum(&area[*off..*off + 20]) == 0)
            .map(|off| ACPI_START + off as u64);
        assert_eq!(found, Some(rsdp.0));
        let img = Image(&area);
        let t = walk(&img, rsdp.0);
        assert_eq!(madt_entries(t.madt).len(), 3);
    }

    #[test]
    fn too_little_memory_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_acpi(&mem, 1, &[]),
            Err(Error::GuestMemoryWrite {
                what: "ACPI tables",
                addr: 0xe0000,
                ..
            })
        ));
    }
}

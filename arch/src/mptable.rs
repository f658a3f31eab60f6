//! Intel MultiProcessor Specification 1.4 table, the way a guest without ACPI learns how many
//! CPUs it has, where the IOAPIC is, and how ISA/virtio interrupts are wired to it.
//!
//! Written at `MPTABLE_START` (the start of the EBDA, which Linux scans): the 16-byte floating
//! pointer, then the configuration table with, in the order the specification requires,
//! processor entries (APIC id = vCPU index, BSP flag on vCPU 0), one ISA bus, one IOAPIC, an I/O
//! interrupt entry per IOAPIC pin 0..=IRQ_MAX (bus IRQ n -> pin n, matching KVM's default GSI
//! routing), and the local interrupt entries (ExtINT on LINT0, NMI on LINT1 of every LAPIC).
//!
//! The IOAPIC's MP id is `cpu_count`, the first id after the vCPUs' APIC ids: it must not collide
//! with one of them, and `cpu_count + 1` would reach the broadcast id 0xff at 254 vCPUs.
//!
//! Everything must fit in the EBDA's last KiB, which caps the table at 37 vCPUs.

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::cpuid::MAX_CPU_COUNT;
use crate::layout::{EBDA_END, IOAPIC_ADDR, IRQ_MAX, LAPIC_ADDR, MPTABLE_START};
use crate::{Error, Result};

/// Floating pointer signature.
pub const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
/// Configuration table signature.
pub const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
/// MP specification revision 1.4.
pub const MP_SPEC_REV: u8 = 4;
/// OEM id in the configuration table header (space padded).
pub const MPC_OEM: &[u8; 8] = b"AGENTVM ";
/// Product id in the configuration table header (space padded).
pub const MPC_PRODUCT_ID: &[u8; 12] = b"MICROVM     ";

/// Entry type: processor.
pub const MP_PROCESSOR: u8 = 0;
/// Entry type: bus.
pub const MP_BUS: u8 = 1;
/// Entry type: IOAPIC.
pub const MP_IOAPIC: u8 = 2;
/// Entry type: I/O interrupt assignment.
pub const MP_INTSRC: u8 = 3;
/// Entry type: local interrupt assignment.
pub const MP_LINTSRC: u8 = 4;

/// Interrupt type: vectored interrupt from the IOAPIC.
pub const MP_INT: u8 = 0;
/// Interrupt type: NMI.
pub const MP_NMI: u8 = 1;
/// Interrupt type: ExtINT (8259 PIC).
pub const MP_EXTINT: u8 = 3;

/// Processor flag: enabled.
pub const CPU_ENABLED: u8 = 1 << 0;
/// Processor flag: bootstrap processor.
pub const CPU_BOOTPROCESSOR: u8 = 1 << 1;
/// IOAPIC flag: usable.
pub const MPC_APIC_USABLE: u8 = 1 << 0;

/// LAPIC version reported per processor (integrated APIC, as KVM's LAPIC reports).
pub const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version (KVM's IOAPIC version register).
pub const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature (family 6, model 0, stepping 0); Linux only prints it.
pub const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1 EDX feature flags for the processor entries: FPU and APIC.
pub const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Destination LAPIC id meaning "all LAPICs".
pub const ALL_LAPICS: u8 = 0xff;

/// Size of the floating pointer structure.
pub const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
pub const MPC_HEADER_SIZE: usize = 44;
/// Size of a processor entry.
pub const PROCESSOR_ENTRY_SIZE: usize = 20;
/// Size of every other entry.
pub const ENTRY_SIZE: usize = 8;

/// Number of IOAPIC pins given an I/O interrupt entry.
const IO_INTERRUPTS: usize = IRQ_MAX as usize + 1;
/// Room for the whole table: the last KiB of conventional memory.
const AVAILABLE: usize = (EBDA_END - MPTABLE_START) as usize;

/// MP id of the IOAPIC for a guest with `cpu_count` vCPUs.
pub fn ioapic_id(cpu_count: u8) -> u8 {
    cpu_count
}

/// Bytes the floating pointer and configuration table take for `cpu_count` vCPUs.
pub fn mptable_size(cpu_count: u8) -> usize {
    MPF_SIZE
        + MPC_HEADER_SIZE
        + PROCESSOR_ENTRY_SIZE * usize::from(cpu_count)
        + ENTRY_SIZE // bus
        + ENTRY_SIZE // IOAPIC
        + ENTRY_SIZE * IO_INTERRUPTS
        + ENTRY_SIZE * 2 // LINT0, LINT1
}

/// Largest vCPU count whose table fits in the EBDA.
pub fn max_cpus() -> u8 {
    let fixed = mptable_size(0);
    ((AVAILABLE - fixed) / PROCESSOR_ENTRY_SIZE).min(usize::from(MAX_CPU_COUNT)) as u8
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the MP table for `cpu_count` vCPUs as the bytes to place at `MPTABLE_START`.
pub fn mptable_bytes(cpu_count: u8) -> Result<Vec<u8>> {
    if cpu_count == 0 || cpu_count > MAX_CPU_COUNT {
        return Err(Error::InvalidCpuCount(u32::from(cpu_count)));
    }
    let size = mptable_size(cpu_count);
    if size > AVAILABLE {
        return Err(Error::MpTableTooLarge {
            cpu_count,
            size,
            available: AVAILABLE,
        });
    }
    let config_addr = MPTABLE_START + MPF_SIZE as u64;
    let ioapic = ioapic_id(cpu_count);

    let mut entries = Vec::with_capacity(size - MPF_SIZE - MPC_HEADER_SIZE);
    for cpu in 0..cpu_count {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    // Bus 0, ISA: its default polarity/trigger (active high, edge) matches how KVM injects
    // both the legacy devices' and irqfd-driven virtio interrupts.
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    for irq in 0..IO_INTERRUPTS as u8 {
        // Flags 0: polarity and trigger conform to the bus.
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic, irq]);
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, ALL_LAPICS, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, ALL_LAPICS, 1]);
    let entry_count = u16::from(cpu_count) + 2 + IO_INTERRUPTS as u16 + 2;

    let table_len = (MPC_HEADER_SIZE + entries.len()) as u16;
    let mut config = Vec::with_capacity(usize::from(table_len));
    config.extend_from_slice(MPC_SIGNATURE);
    config.extend_from_slice(&table_len.to_le_bytes());
    config.push(MP_SPEC_REV);
    config.push(0); // checksum, filled below
    config.extend_from_slice(MPC_OEM);
    config.extend_from_slice(MPC_PRODUCT_ID);
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    config.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    config.push(0); // extended table checksum
    config.push(0); // reserved
    debug_assert_eq!(config.len(), MPC_HEADER_SIZE);
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&(config_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MP_SPEC_REV);
    mpf.push(0); // checksum, filled below
                 // Feature byte 1 = 0: a configuration table is present (no default configuration).
                 // Feature byte 2 = 0: IMCR absent, virtual wire mode.
    mpf.extend_from_slice(&[0u8; 5]);
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&config);
    debug_assert_eq!(out.len(), size);
    Ok(out)
}

/// Writes the MP table for `cpu_count` vCPUs at `MPTABLE_START`.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpu_count: u8) -> Result<()> {
    let bytes = mptable_bytes(cpu_count)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|source| Error::GuestMemoryWrite {
            what: "MP table",
            addr: MPTABLE_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes::{le16, le32, sum};

    #[derive(Debug, Default)]
    struct Parsed {
        cpus: Vec<(u8, u8)>,
        buses: Vec<(u8, [u8; 6])>,
        ioapics: Vec<(u8, u8, u32)>,
        intsrc: Vec<(u8, u16, u8, u8, u8, u8)>,
        lintsrc: Vec<(u8, u8, u8)>,
        lapic_addr: u32,
    }

    /// Parses the table as Linux's mpparse does, from memory read at `base` (the guest address
    /// of `mem[0]`), checking every signature, length and checksum on the way.
    fn parse(mem: &[u8], base: u64) -> Parsed {
        let mpf = &mem[..16];
        assert_eq!(&mpf[0..4], MPF_SIGNATURE);
        assert_eq!(mpf[8], 1, "length in paragraphs");
        assert_eq!(mpf[9], 4, "spec revision");
        assert_eq!(sum(mpf), 0, "floating pointer checksum");
        assert_eq!(mpf[11], 0, "feature byte 1: table present");

        let physptr = u64::from(le32(mpf, 4));
        let off = (physptr - base) as usize;
        let len = usize::from(le16(mem, off + 4));
        let cfg = &mem[off..off + len];
        assert_eq!(&cfg[0..4], MPC_SIGNATURE);
        assert_eq!(cfg[6], 4);
        assert_eq!(sum(cfg), 0, "configuration table checksum");
        assert_eq!(&cfg[8..16], MPC_OEM);
        assert_eq!(&cfg[16..28], MPC_PRODUCT_ID);
        assert_eq!(le16(cfg, 40), 0, "no extended table");
        let count = le16(cfg, 34);

        let mut p = Parsed {
            lapic_addr: le32(cfg, 36),
            ..Default::default()
        };
        let mut at = MPC_HEADER_SIZE;
        let mut last_type = 0;
        for _ in 0..count {
            let t = cfg[at];
            assert!(t >= last_type, "entries must be sorted by type");
            last_type = t;
            let e = &cfg[at..];
            match t {
                MP_PROCESSOR => {
                    p.cpus.push((e[1], e[3]));
                    assert_eq!(e[2], LAPIC_VERSION);
                    at += PROCESSOR_ENTRY_SIZE;
                    continue;
                }
                MP_BUS => p.buses.push((e[1], e[2..8].try_into().unwrap())),
                MP_IOAPIC => p.ioapics.push((e[1], e[3], le32(e, 4))),
                MP_INTSRC => p.intsrc.push((e[1], le16(e, 2), e[4], e[5], e[6], e[7])),
                MP_LINTSRC => p.lintsrc.push((e[1], e[6], e[7])),
                other => panic!("unknown entry type {other}"),
            }
            at += ENTRY_SIZE;
        }
        assert_eq!(at, len, "entries fill the table exactly");
        p
    }

    #[test]
    fn table_parses_back() {
        let bytes = mptable_bytes(4).unwrap();
        assert_eq!(bytes.len(), mptable_size(4));
        let p = parse(&bytes, MPTABLE_START);
        assert_eq!(p.lapic_addr, 0xfee0_0000);
        assert_eq!(
            p.cpus,
            vec![
                (0, CPU_ENABLED | CPU_BOOTPROCESSOR),
                (1, CPU_ENABLED),
                (2, CPU_ENABLED),
                (3, CPU_ENABLED)
            ]
        );
        assert_eq!(p.buses, vec![(0, *b"ISA   ")]);
        assert_eq!(p.ioapics, vec![(4, MPC_APIC_USABLE, 0xfec0_0000)]);
        assert_eq!(p.intsrc.len(), 24);
        for (i, (kind, flags, bus, irq, apic, pin)) in p.intsrc.iter().copied().enumerate() {
            assert_eq!((kind, flags, bus), (MP_INT, 0, 0));
            assert_eq!(usize::from(irq), i);
            assert_eq!(usize::from(pin), i, "bus IRQ n is IOAPIC pin n");
            assert_eq!(apic, 4, "routed to the IOAPIC's id");
        }
        assert_eq!(
            p.lintsrc,
            vec![(MP_EXTINT, ALL_LAPICS, 0), (MP_NMI, ALL_LAPICS, 1)]
        );
    }

    #[test]
    fn ioapic_id_is_after_last_cpu() {
        for n in [1u8, 2, 17, max_cpus()] {
            let p = parse(&mptable_bytes(n).unwrap(), MPTABLE_START);
            let id = p.ioapics[0].0;
            assert_eq!(id, n);
            assert!(p.cpus.iter().all(|(apic, _)| *apic != id));
            assert_eq!(p.cpus.len(), usize::from(n));
        }
    }

    #[test]
    fn single_cpu_table() {
        let p = parse(&mptable_bytes(1).unwrap(), MPTABLE_START);
        assert_eq!(p.cpus, vec![(0, CPU_ENABLED | CPU_BOOTPROCESSOR)]);
    }

    #[test]
    fn capacity_of_the_ebda() {
        assert_eq!(max_cpus(), 37);
        assert_eq!(mptable_size(37), 1024);
        assert!(mptable_bytes(37).is_ok());
        match mptable_bytes(38) {
            Err(Error::MpTableTooLarge {
                cpu_count: 38,
                size,
                available: 1024,
            }) => assert_eq!(size, 1044),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn invalid_cpu_counts() {
        assert!(matches!(mptable_bytes(0), Err(Error::InvalidCpuCount(0))));
        assert!(matches!(
            mptable_bytes(255),
            Err(Error::InvalidCpuCount(255))
        ));
    }

    #[test]
    fn written_to_guest_memory_where_linux_scans() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 2).unwrap();
        // Linux scans [639 KiB, 640 KiB) on 16-byte boundaries for the floating pointer.
        let mut ebda = vec![0u8; AVAILABLE];
        mem.read_slice(&mut ebda, GuestAddress(639 * 1024)).unwrap();
        let p = parse(&ebda, 639 * 1024);
        assert_eq!(p.cpus.len(), 2);
    }

    #[test]
    fn too_little_memory_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(Error::GuestMemoryWrite {
                addr: MPTABLE_START,
                ..
            })
        ));
    }
}

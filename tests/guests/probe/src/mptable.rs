//! Finds and validates the Intel MultiProcessor Specification 1.4 tables the VMM wrote.

use core::fmt;

use crate::hw::phys_slice;
use crate::serial::Escaped;

const FPS_SIGNATURE: &[u8; 4] = b"_MP_";
const FPS_SIZE: usize = 16;
const CONFIG_SIGNATURE: &[u8; 4] = b"PCMP";
const CONFIG_HEADER_SIZE: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const OTHER_ENTRY_SIZE: usize = 8;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const IOAPIC_ENABLED: u8 = 1 << 0;

/// BIOS data area words the spec's search order starts from.
const BDA_EBDA_SEGMENT: u64 = 0x40e;
const BDA_BASE_MEMORY_KIB: u64 = 0x413;
const DEFAULT_BASE_MEMORY_KIB: u64 = 640;
const BIOS_ROM: (u64, usize) = (0xf0000, 0x10000);

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The regions the MP spec (section 4) says to search, in its order: the first KiB of the EBDA,
/// the last KiB of base memory, the BIOS ROM. A VMM without a BIOS data area leaves the BDA words
/// zero, which the search treats as "no EBDA" and "640 KiB of base memory".
fn search_regions() -> [Option<(u64, usize)>; 3] {
    let bda = phys_slice(0x400, 0x100);
    let ebda = bda
        .map(|b| u64::from(le16(b, (BDA_EBDA_SEGMENT - 0x400) as usize)) << 4)
        .filter(|&addr| addr != 0)
        .map(|addr| (addr, 1024));
    let base_kib = bda
        .map(|b| u64::from(le16(b, (BDA_BASE_MEMORY_KIB - 0x400) as usize)))
        .filter(|&kib| (1..=DEFAULT_BASE_MEMORY_KIB).contains(&kib))
        .unwrap_or(DEFAULT_BASE_MEMORY_KIB);
    [ebda, Some(((base_kib - 1) * 1024, 1024)), Some(BIOS_ROM)]
}

pub struct MpInfo {
    pub fps_addr: u64,
    pub config_addr: u64,
    pub spec_rev: u8,
    pub oem_id: &'static [u8],
    pub product_id: &'static [u8],
    pub lapic_addr: u32,
    pub entries: u16,
    pub cpus: u32,
    pub bootstrap_cpus: u32,
    pub bsp_apic_id: u8,
    pub ioapics: u32,
}

pub enum MpError {
    NotFound,
    FpsChecksum(u64),
    NoConfigTable(u64),
    ConfigUnmapped(u64),
    ConfigSignature(u64),
    ConfigLength(u16),
    ConfigChecksum(u64),
    ExtChecksum(u64),
    BadEntry { kind: u8, offset: usize },
    EntriesOverrun,
}

impl fmt::Display for MpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => write!(f, "no MP floating pointer in EBDA, base memory or BIOS ROM"),
            Self::FpsChecksum(a) => write!(f, "floating pointer at {a:#x} has a bad checksum"),
            Self::NoConfigTable(a) => write!(
                f,
                "floating pointer at {a:#x} has no configuration table (default config)"
            ),
            Self::ConfigUnmapped(a) => write!(f, "configuration table at {a:#x} is not readable"),
            Self::ConfigSignature(a) => write!(f, "no PCMP signature at {a:#x}"),
            Self::ConfigLength(l) => write!(f, "configuration table length {l} is too small"),
            Self::ConfigChecksum(a) => {
                write!(f, "configuration table at {a:#x} has a bad checksum")
            }
            Self::ExtChecksum(a) => write!(f, "extended table after {a:#x} has a bad checksum"),
            Self::BadEntry { kind, offset } => {
                write!(f, "unknown entry type {kind} at table offset {offset:#x}")
            }
            Self::EntriesOverrun => write!(f, "entries run past the table length"),
        }
    }
}

/// Returns the address of the first floating pointer with a valid checksum. A signature with a
/// bad checksum is remembered so that the error says so if nothing better turns up.
fn find_fps() -> Result<u64, MpError> {
    let mut bad_checksum = None;
    for (base, len) in search_regions().into_iter().flatten() {
        let Some(region) = phys_slice(base, len) else {
            continue;
        };
        for (i, candidate) in region.chunks_exact(FPS_SIZE).enumerate() {
            if &candidate[..4] != FPS_SIGNATURE {
                continue;
            }
            let addr = base + (i * FPS_SIZE) as u64;
            // Byte 8 is the structure length in 16-byte units; 1 in every revision.
            if candidate[8] == 1 && checksum(candidate) == 0 {
                return Ok(addr);
            }
            bad_checksum.get_or_insert(addr);
        }
    }
    Err(bad_checksum.map_or(MpError::NotFound, MpError::FpsChecksum))
}

pub fn parse() -> Result<MpInfo, MpError> {
    let fps_addr = find_fps()?;
    let fps = phys_slice(fps_addr, FPS_SIZE).ok_or(MpError::NotFound)?;
    let config_addr = u64::from(le32(fps, 4));
    if config_addr == 0 || fps[11] != 0 {
        return Err(MpError::NoConfigTable(fps_addr));
    }
    let header =
        phys_slice(config_addr, CONFIG_HEADER_SIZE).ok_or(MpError::ConfigUnmapped(config_addr))?;
    if &header[..4] != CONFIG_SIGNATURE {
        return Err(MpError::ConfigSignature(config_addr));
    }
    let base_len = le16(header, 4);
    if usize::from(base_len) < CONFIG_HEADER_SIZE {
        return Err(MpError::ConfigLength(base_len));
    }
    let ext_len = le16(header, 40);
    let table = phys_slice(config_addr, usize::from(base_len) + usize::from(ext_len))
        .ok_or(MpError::ConfigUnmapped(config_addr))?;
    let (base, ext) = table.split_at(usize::from(base_len));
    if checksum(base) != 0 {
        return Err(MpError::ConfigChecksum(config_addr));
    }
    // The extended checksum byte makes the extended entries sum to zero (it is 0 when there are none).
    if checksum(ext).wrapping_add(header[42]) != 0 {
        return Err(MpError::ExtChecksum(config_addr));
    }

    let mut info = MpInfo {
        fps_addr,
        config_addr,
        spec_rev: header[6],
        oem_id: &header[8..16],
        product_id: &header[16..28],
        lapic_addr: le32(header, 36),
        entries: le16(header, 34),
        cpus: 0,
        bootstrap_cpus: 0,
        bsp_apic_id: 0,
        ioapics: 0,
    };
    let mut offset = CONFIG_HEADER_SIZE;
    for _ in 0..info.entries {
        let kind = *base.get(offset).ok_or(MpError::EntriesOverrun)?;
        let size = match kind {
            ENTRY_PROCESSOR => PROCESSOR_ENTRY_SIZE,
            ENTRY_BUS | ENTRY_IOAPIC | ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => {
                OTHER_ENTRY_SIZE
            }
            _ => return Err(MpError::BadEntry { kind, offset }),
        };
        let entry = base
            .get(offset..offset + size)
            .ok_or(MpError::EntriesOverrun)?;
        match kind {
            ENTRY_PROCESSOR if entry[3] & CPU_ENABLED != 0 => {
                info.cpus += 1;
                if entry[3] & CPU_BOOTSTRAP != 0 {
                    info.bootstrap_cpus += 1;
                    info.bsp_apic_id = entry[1];
                }
            }
            ENTRY_IOAPIC if entry[3] & IOAPIC_ENABLED != 0 => info.ioapics += 1,
            _ => {}
        }
        offset += size;
    }
    Ok(info)
}

impl MpInfo {
    /// A table Linux can bring up SMP from: at least one enabled CPU, exactly one bootstrap CPU.
    pub fn is_usable(&self) -> bool {
        self.cpus >= 1 && self.bootstrap_cpus == 1
    }
}

impl fmt::Display for MpInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpus={} ioapic={} bsp_apic_id={} bootstrap_cpus={} fps={:#x} config={:#x} spec_rev={} \
             entries={} lapic={:#x} oem=\"{}\" product=\"{}\"",
            self.cpus,
            if self.ioapics > 0 { "yes" } else { "no" },
            self.bsp_apic_id,
            self.bootstrap_cpus,
            self.fps_addr,
            self.config_addr,
            self.spec_rev,
            self.entries,
            self.lapic_addr,
            Escaped(self.oem_id),
            Escaped(self.product_id),
        )
    }
}

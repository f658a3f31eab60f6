//! Just enough ELF64 parsing to check that a test guest is something the VMM's loader accepts.

use std::path::Path;

/// `e_type` of a fixed-address executable.
pub const ET_EXEC: u16 = 2;
/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// `p_type` of a loadable segment.
pub const PT_LOAD: u32 = 1;
/// `p_flags` bit: executable.
pub const PF_X: u32 = 1;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not an ELF64 little-endian file")]
    NotElf64,
    #[error(
        "program header table ({count} x {entsize} bytes at {offset:#x}) lies outside the file"
    )]
    BadProgramHeaders {
        offset: u64,
        count: u16,
        entsize: u16,
    },
}

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub kind: u32,
    pub flags: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

impl Segment {
    /// Whether guest-physical address `addr` lies in this segment's memory image.
    pub fn contains_paddr(&self, addr: u64) -> bool {
        addr >= self.paddr && addr - self.paddr < self.memsz
    }
}

/// The ELF header fields and program headers of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfSummary {
    pub file_len: u64,
    pub elf_type: u16,
    pub machine: u16,
    pub entry: u64,
    pub segments: Vec<Segment>,
}

impl ElfSummary {
    pub fn load_segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|s| s.kind == PT_LOAD)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

/// Parses the ELF header and program headers of `bytes`.
pub fn parse_elf(bytes: &[u8]) -> Result<ElfSummary, ElfError> {
    if bytes.len() < EHDR_SIZE || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(ElfError::NotElf64);
    }
    let phoff = u64_at(bytes, 32);
    let phentsize = u16_at(bytes, 54);
    let phnum = u16_at(bytes, 56);
    let table_fits = usize::from(phentsize) == PHDR_SIZE
        && usize::try_from(phoff)
            .ok()
            .and_then(|off| off.checked_add(usize::from(phnum) * PHDR_SIZE))
            .is_some_and(|end| end <= bytes.len());
    if !table_fits {
        return Err(ElfError::BadProgramHeaders {
            offset: phoff,
            count: phnum,
            entsize: phentsize,
        });
    }
    let segments = (0..usize::from(phnum))
        .map(|i| {
            let p = &bytes[phoff as usize + i * PHDR_SIZE..][..PHDR_SIZE];
            Segment {
                kind: u32_at(p, 0),
                flags: u32_at(p, 4),
                offset: u64_at(p, 8),
                vaddr: u64_at(p, 16),
                paddr: u64_at(p, 24),
                filesz: u64_at(p, 32),
                memsz: u64_at(p, 40),
            }
        })
        .collect();
    Ok(ElfSummary {
        file_len: bytes.len() as u64,
        elf_type: u16_at(bytes, 16),
        machine: u16_at(bytes, 18),
        entry: u64_at(bytes, 24),
        segments,
    })
}

/// Reads and parses the ELF file at `path`.
pub fn read_elf(path: &Path) -> Result<ElfSummary, ElfError> {
    let bytes = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_elf(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_elf(phnum: u16) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE + usize::from(phnum) * PHDR_SIZE];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&phnum.to_le_bytes());
        b
    }

    #[test]
    fn parses_header_and_segments() {
        let mut b = minimal_elf(1);
        let p = EHDR_SIZE;
        b[p..p + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[p + 4..p + 8].copy_from_slice(&5u32.to_le_bytes());
        b[p + 24..p + 32].copy_from_slice(&0x20_0000u64.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&0x100u64.to_le_bytes());
        b[p + 40..p + 48].copy_from_slice(&0x200u64.to_le_bytes());
        let elf = parse_elf(&b).unwrap();
        assert_eq!(elf.elf_type, ET_EXEC);
        assert_eq!(elf.machine, EM_X86_64);
        assert_eq!(elf.entry, 0x20_0000);
        assert_eq!(elf.segments.len(), 1);
        let seg = elf.segments[0];
        assert_eq!((seg.kind, seg.flags, seg.paddr), (PT_LOAD, 5, 0x20_0000));
        assert!(seg.contains_paddr(0x20_01ff));
        assert!(!seg.contains_paddr(0x20_0200));
    }

    #[test]
    fn rejects_non_elf_and_truncated_tables() {
        assert!(matches!(parse_elf(b"not an elf"), Err(ElfError::NotElf64)));
        let mut b = minimal_elf(2);
        b.truncate(EHDR_SIZE + PHDR_SIZE);
        assert!(matches!(
            parse_elf(&b),
            Err(ElfError::BadProgramHeaders { count: 2, .. })
        ));
    }
}

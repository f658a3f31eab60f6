//! The Linux zero page (`struct boot_params`) as the VMM filled it, read field by field at the
//! offsets of Documentation/arch/x86/zero-page.rst and boot.rst.

use core::fmt;

use crate::hw::{phys_slice, IDENTITY_MAP_END};
use crate::serial::Escaped;

const ZERO_PAGE_SIZE: usize = 4096;
const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const BOOT_FLAG: usize = 0x1fe;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
const E820_MAX_ENTRIES: usize = 128;
const E820_ENTRY_SIZE: usize = 20;

const BOOT_FLAG_VALUE: u16 = 0xaa55;
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// The probe gives up looking for the command line's NUL after this many bytes.
const CMDLINE_SCAN_LIMIT: usize = 64 * 1024;

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    u64::from(le32(bytes, at)) | (u64::from(le32(bytes, at + 4)) << 32)
}

/// The zero page the VMM passed in RSI.
#[derive(Clone, Copy)]
pub struct ZeroPage {
    pub addr: u64,
    bytes: &'static [u8],
}

impl ZeroPage {
    /// `None` when `addr` cannot be a zero page (null or outside the identity map).
    pub fn at(addr: u64) -> Option<Self> {
        phys_slice(addr, ZERO_PAGE_SIZE).map(|bytes| Self { addr, bytes })
    }

    pub fn boot_flag(&self) -> u16 {
        le16(self.bytes, BOOT_FLAG)
    }

    pub fn header(&self) -> &'static [u8] {
        &self.bytes[HEADER..HEADER + 4]
    }

    pub fn header_ok(&self) -> bool {
        self.boot_flag() == BOOT_FLAG_VALUE && self.header() == HEADER_MAGIC
    }

    pub fn version(&self) -> u16 {
        le16(self.bytes, VERSION)
    }

    pub fn type_of_loader(&self) -> u8 {
        self.bytes[TYPE_OF_LOADER]
    }

    pub fn cmd_line_ptr(&self) -> u64 {
        u64::from(le32(self.bytes, CMD_LINE_PTR))
            | (u64::from(le32(self.bytes, EXT_CMD_LINE_PTR)) << 32)
    }

    /// The command line without its NUL terminator.
    pub fn cmdline(&self) -> Result<&'static [u8], CmdlineError> {
        let ptr = self.cmd_line_ptr();
        if ptr == 0 {
            return Err(CmdlineError::NullPointer);
        }
        let window = CMDLINE_SCAN_LIMIT.min(IDENTITY_MAP_END.saturating_sub(ptr) as usize);
        let bytes = phys_slice(ptr, window).ok_or(CmdlineError::Unmapped(ptr))?;
        let len = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(CmdlineError::Unterminated(ptr))?;
        Ok(&bytes[..len])
    }

    pub fn e820(&self) -> E820Map {
        let count = usize::from(self.bytes[E820_ENTRIES]);
        let mut entries = [E820Entry::default(); E820_MAX_ENTRIES];
        let usable = count.min(E820_MAX_ENTRIES);
        for (i, entry) in entries.iter_mut().enumerate().take(usable) {
            let at = E820_TABLE + i * E820_ENTRY_SIZE;
            *entry = E820Entry {
                addr: le64(self.bytes, at),
                size: le64(self.bytes, at + 8),
                kind: le32(self.bytes, at + 16),
            };
        }
        E820Map {
            declared: count,
            entries,
        }
    }
}

impl fmt::Display for ZeroPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "zero_page={:#x} boot_flag={:#06x} header={} version={:#06x} type_of_loader={:#04x}",
            self.addr,
            self.boot_flag(),
            Escaped(self.header()),
            self.version(),
            self.type_of_loader()
        )
    }
}

pub enum CmdlineError {
    NullPointer,
    Unmapped(u64),
    Unterminated(u64),
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NullPointer => write!(f, "cmd_line_ptr is 0"),
            Self::Unmapped(ptr) => write!(f, "cmd_line_ptr={ptr:#x} is outside the identity map"),
            Self::Unterminated(ptr) => write!(
                f,
                "cmd_line_ptr={ptr:#x}: no NUL within {CMDLINE_SCAN_LIMIT} bytes"
            ),
        }
    }
}

#[derive(Clone, Copy, Default)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct E820Map {
    /// The entry count the VMM wrote, which may exceed what the zero page can hold.
    declared: usize,
    entries: [E820Entry; E820_MAX_ENTRIES],
}

impl E820Map {
    pub fn entries(&self) -> &[E820Entry] {
        &self.entries[..self.declared.min(E820_MAX_ENTRIES)]
    }

    pub fn ram_bytes(&self) -> u64 {
        self.entries()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .fold(0u64, |sum, e| sum.saturating_add(e.size))
    }

    /// Why the map is unusable, if it is: Linux sanitises a sloppy map, but a VMM has no reason to
    /// write one, so the probe insists on sorted, non-empty, non-overlapping entries with some RAM.
    pub fn problem(&self) -> Option<&'static str> {
        if self.declared == 0 {
            return Some("no entries");
        }
        if self.declared > E820_MAX_ENTRIES {
            return Some("more entries than the zero page holds");
        }
        let entries = self.entries();
        if entries.iter().any(|e| e.size == 0) {
            return Some("empty entry");
        }
        if entries.iter().any(|e| e.addr.checked_add(e.size).is_none()) {
            return Some("entry wraps around");
        }
        if entries
            .windows(2)
            .any(|w| w[0].addr + w[0].size > w[1].addr)
        {
            return Some("entries unsorted or overlapping");
        }
        if self.ram_bytes() == 0 {
            return Some("no RAM");
        }
        None
    }
}

impl fmt::Display for E820Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ram_kib={} entries={}",
            self.ram_bytes() / 1024,
            self.declared
        )?;
        for e in self.entries() {
            write!(
                f,
                " {:#x}-{:#x}:{}",
                e.addr,
                e.addr.wrapping_add(e.size),
                e.kind
            )?;
        }
        if let Some(problem) = self.problem() {
            write!(f, " problem=\"{problem}\"")?;
        }
        Ok(())
    }
}

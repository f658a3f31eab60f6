//! The boot GDT and its translation into the segment registers KVM loads.
//!
//! Linux's 64-bit entry reloads its own GDT and selectors before using them, so this table only
//! has to describe flat segments valid in long mode: a 64-bit code segment, a data segment, and a
//! TSS (VMX refuses to enter long mode without a usable, busy 64-bit TSS in TR).

use kvm_bindings::kvm_segment;

/// Access byte: present.
pub const ACCESS_PRESENT: u8 = 1 << 7;
/// Access byte: code/data descriptor (as opposed to a system descriptor).
pub const ACCESS_CODE_DATA: u8 = 1 << 4;
/// Type nibble for code: execute/read, accessed.
pub const TYPE_CODE_EXEC_READ_ACCESSED: u8 = 0xb;
/// Type nibble for data: read/write, accessed.
pub const TYPE_DATA_READ_WRITE_ACCESSED: u8 = 0x3;
/// Type nibble for a system descriptor: busy 64-bit TSS.
pub const TYPE_TSS64_BUSY: u8 = 0xb;

/// Flags nibble: granularity (limit counted in 4 KiB units).
pub const FLAG_GRANULARITY: u8 = 1 << 3;
/// Flags nibble: default operand size 32-bit (must be clear for 64-bit code).
pub const FLAG_DB: u8 = 1 << 2;
/// Flags nibble: 64-bit code segment.
pub const FLAG_LONG: u8 = 1 << 1;
/// Flags nibble: available for software.
pub const FLAG_AVL: u8 = 1 << 0;

/// Index of the 64-bit code segment.
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment.
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS.
pub const TSS_INDEX: u8 = 3;
/// Number of entries in the boot GDT.
pub const BOOT_GDT_ENTRIES: usize = 4;

/// Selector of the boot code segment.
pub const BOOT_CODE_SELECTOR: u16 = (CODE_INDEX as u16) << 3;
/// Selector of the boot data segment (DS, ES, FS, GS, SS).
pub const BOOT_DATA_SELECTOR: u16 = (DATA_INDEX as u16) << 3;
/// Selector of the boot TSS.
pub const BOOT_TSS_SELECTOR: u16 = (TSS_INDEX as u16) << 3;

/// Size of a 64-bit TSS minus one; a TSS limit smaller than this is rejected by VMX.
const TSS64_LIMIT: u32 = 0x67;

/// Encodes one 8-byte segment descriptor.
///
/// `access` is the access byte (P, DPL, S, type), `flags` the upper nibble of byte 6 (G, D/B, L,
/// AVL), `limit` the raw 20-bit limit (in 4 KiB units when `FLAG_GRANULARITY` is set).
pub const fn gdt_entry(access: u8, flags: u8, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    (limit & 0xffff)
        | ((base & 0x00ff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags as u64) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The boot GDT: null, flat 64-bit code, flat data, busy 64-bit TSS at base 0.
pub const fn boot_gdt() -> [u64; BOOT_GDT_ENTRIES] {
    [
        0,
        gdt_entry(
            ACCESS_PRESENT | ACCESS_CODE_DATA | TYPE_CODE_EXEC_READ_ACCESSED,
            FLAG_GRANULARITY | FLAG_LONG,
            0,
            0xfffff,
        ),
        gdt_entry(
            ACCESS_PRESENT | ACCESS_CODE_DATA | TYPE_DATA_READ_WRITE_ACCESSED,
            FLAG_GRANULARITY | FLAG_DB,
            0,
            0xfffff,
        ),
        gdt_entry(ACCESS_PRESENT | TYPE_TSS64_BUSY, 0, 0, TSS64_LIMIT),
    ]
}

/// Base address stored in a descriptor.
pub const fn entry_base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24)
}

/// Limit of a descriptor in bytes, as the CPU's hidden segment state holds it (scaled to 4 KiB
/// units with the low 12 bits set when the granularity flag is set, which is what KVM expects).
pub const fn entry_limit(entry: u64) -> u32 {
    let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    if entry_flags(entry) & FLAG_GRANULARITY != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// Access byte of a descriptor.
pub const fn entry_access(entry: u64) -> u8 {
    (entry >> 40) as u8
}

/// Flags nibble of a descriptor.
pub const fn entry_flags(entry: u64) -> u8 {
    ((entry >> 52) & 0xf) as u8
}

/// The hidden segment state KVM loads for `entry` when it sits at `index` in the GDT.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let access = entry_access(entry);
    let flags = entry_flags(entry);
    let present = access >> 7;
    kvm_segment {
        base: entry_base(entry),
        limit: entry_limit(entry),
        selector: u16::from(index) << 3,
        type_: access & 0xf,
        present,
        dpl: (access >> 5) & 0x3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g: (flags >> 3) & 1,
        avl: flags & 1,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_gdt_matches_known_encodings() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        // Flat 64-bit code: access 0x9b, flags G|L, limit 0xfffff.
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        // Flat data: access 0x93, flags G|D/B.
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        // Busy 64-bit TSS, byte granular, limit 0x67.
        assert_eq!(gdt[3], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x93, 0, 0x1234_5678, 0xa_bcde);
        assert_eq!(entry_base(e), 0x1234_5678);
        assert_eq!(entry_limit(e), 0xa_bcde);
        assert_eq!(entry_access(e), 0x93);
        assert_eq!(entry_flags(e), 0);
        // Base bits 31:24 live in the top byte, bits 23:0 in bytes 2..5.
        assert_eq!(e >> 56, 0x12);
        assert_eq!((e >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!((e >> 48) & 0xf, 0xa);
    }

    #[test]
    fn granular_limit_is_scaled() {
        let e = gdt_entry(0x93, FLAG_GRANULARITY, 0, 0xfffff);
        assert_eq!(entry_limit(e), 0xffff_ffff);
        let e = gdt_entry(0x93, FLAG_GRANULARITY, 0, 0);
        assert_eq!(entry_limit(e), 0xfff);
    }

    #[test]
    fn code_segment_to_kvm() {
        let seg = kvm_segment_from_gdt(boot_gdt()[1], CODE_INDEX);
        assert_eq!(seg.selector, 0x08);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0, "a 64-bit code segment must have D clear");
        assert_eq!(seg.g, 1);
        assert_eq!(seg.avl, 0);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn data_segment_to_kvm() {
        let seg = kvm_segment_from_gdt(boot_gdt()[2], DATA_INDEX);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.type_, 0x3);
        assert_eq!((seg.s, seg.l, seg.db, seg.g), (1, 0, 1, 1));
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn tss_to_kvm() {
        let seg = kvm_segment_from_gdt(boot_gdt()[3], TSS_INDEX);
        assert_eq!(seg.selector, 0x18);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.s, 0, "a TSS is a system descriptor");
        assert_eq!(seg.g, 0);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.present, 1);
    }

    #[test]
    fn null_entry_is_unusable() {
        let seg = kvm_segment_from_gdt(0, 0);
        assert_eq!(seg.present, 0);
        assert_eq!(seg.unusable, 1);
        assert_eq!(seg.selector, 0);
    }

    #[test]
    fn dpl_and_avl_decoded() {
        // Ring-3 data segment with AVL set.
        let seg = kvm_segment_from_gdt(gdt_entry(0xf3, FLAG_AVL, 0, 0), 5);
        assert_eq!(seg.dpl, 3);
        assert_eq!(seg.avl, 1);
        assert_eq!(seg.selector, 5 << 3);
    }
}

//! Guest physical memory layout for the x86_64 Linux 64-bit boot protocol.
//!
//! Everything the VMM writes before the first instruction lives in the first megabyte, below
//! `HIMEM_START`, where Linux never loads itself:
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)           0x0000_9000  PML4
//! 0x0000_0520  IDT (1 null entry)        0x0000_a000  PDPT
//! 0x0000_7000  zero page (boot_params)   0x0000_b000  4 page directories (up to 0xf000)
//! 0x0000_8ff0  initial stack pointer     0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA)           0x000e_0000  ACPI tables (RSDP first)
//! 0x0010_0000  HIMEM_START: kernel / RAM
//! 0xd000_0000  MMIO gap (virtio-mmio, IOAPIC, LAPIC) up to 4 GiB, RAM continues above 4 GiB
//! ```

use vm_memory::GuestAddress;

/// Boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: a single null gate; the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux zero page (`struct boot_params`), passed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP/RBP. The stack grows down into the free page below the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table (one page, 4 used entries).
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories that identity-map the first 4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Number of page-directory pages after `PDE_START` (one per GiB mapped).
pub const PDE_PAGES: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including the terminating NUL. Linux copies COMMAND_LINE_SIZE (2048)
/// bytes from `cmd_line_ptr` whatever the string length, so this much memory must be readable.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, the last KiB of conventional memory. Linux scans
/// `[639 KiB, 640 KiB)` for the MP floating pointer.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional memory (legacy VGA/BIOS area follows, not RAM for the guest).
pub const EBDA_END: u64 = 0xa0000;
/// ACPI tables, RSDP first: without EFI, Linux scans `[0xe0000, 0x100000)` for the RSDP. Guest
/// memory backs this range, but the e820 map leaves it out of RAM, like the firmware area it is.
pub const ACPI_START: u64 = 0xe_0000;
/// Exclusive end of the ACPI table area.
pub const ACPI_END: u64 = HIMEM_START;
/// First byte of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole. RAM that does not fit below it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Size of the 32-bit MMIO hole.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// IOAPIC MMIO base (the in-kernel IOAPIC answers here).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// First virtio-mmio device window; device `n` sits at `VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices.
pub const IRQ_BASE: u32 = 5;
/// Last GSI handed to virtio-mmio devices (the in-kernel IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;
/// Size of a guest page.
pub const PAGE_SIZE: u64 = 0x1000;

// The stack lives in the free page between the zero page and the PML4, and the interrupt
// controllers sit inside the MMIO gap, never over RAM.
const _: () = assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + PAGE_SIZE);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(IOAPIC_ADDR >= MMIO_GAP_START && LAPIC_ADDR < MMIO_GAP_END);

/// The guest RAM regions for `mem_size` bytes of memory: one region when it fits below the MMIO
/// gap, otherwise the part below the gap plus the rest starting at 4 GiB.
///
/// `mem_size` of 0 yields no region. Sizes are `usize`, which on x86_64 holds any `u64`.
pub fn arch_memory_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size == 0 {
        return Vec::new();
    }
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (mem_size - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// Exclusive end of the RAM below the MMIO gap for `mem_size` bytes of memory laid out by
/// [`arch_memory_regions`].
pub fn lowmem_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// Last usable RAM address below the MMIO gap, or `None` for an empty guest. The initrd is placed
/// so that it ends here.
pub fn last_lowmem_addr(mem_size: u64) -> Option<GuestAddress> {
    lowmem_end(mem_size).checked_sub(1).map(GuestAddress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let regions = arch_memory_regions(128 << 20);
        assert_eq!(regions, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn guest_exactly_up_to_gap_is_one_region() {
        let regions = arch_memory_regions(MMIO_GAP_START);
        assert_eq!(regions, vec![(GuestAddress(0), MMIO_GAP_START as usize)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let size = 8u64 << 30;
        let regions = arch_memory_regions(size);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), 0xd000_0000),
                (GuestAddress(1 << 32), (size - 0xd000_0000) as usize),
            ]
        );
        let total: u64 = regions.iter().map(|r| r.1 as u64).sum();
        assert_eq!(total, size);
        // Nothing may land in the hole.
        for (start, len) in &regions {
            let end = start.0 + *len as u64;
            assert!(end <= MMIO_GAP_START || start.0 >= MMIO_GAP_END);
        }
    }

    #[test]
    fn one_byte_past_gap_spills_to_4g() {
        let regions = arch_memory_regions(MMIO_GAP_START + 1);
        assert_eq!(regions[1], (GuestAddress(MMIO_GAP_END), 1));
    }

    #[test]
    fn empty_guest_has_no_regions() {
        assert!(arch_memory_regions(0).is_empty());
        assert_eq!(last_lowmem_addr(0), None);
    }

    #[test]
    fn last_lowmem_address() {
        assert_eq!(
            last_lowmem_addr(256 << 20),
            Some(GuestAddress((256 << 20) - 1))
        );
        assert_eq!(
            last_lowmem_addr(16 << 30),
            Some(GuestAddress(MMIO_GAP_START - 1))
        );
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        // (start, end) of everything written below 1 MiB.
        let mut areas = [
            (BOOT_GDT_START, BOOT_GDT_START + 4 * 8),
            (BOOT_IDT_START, BOOT_IDT_START + 8),
            (ZERO_PAGE_START, ZERO_PAGE_START + PAGE_SIZE),
            (PML4_START, PML4_START + PAGE_SIZE),
            (PDPTE_START, PDPTE_START + PAGE_SIZE),
            (PDE_START, PDE_START + PDE_PAGES * PAGE_SIZE),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, EBDA_END),
            (ACPI_START, ACPI_END),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "{:x?} overlaps {:x?}",
                pair[0],
                pair[1]
            );
        }
        assert!(areas.last().unwrap().1 <= HIMEM_START);
    }
}

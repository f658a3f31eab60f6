//! The Linux zero page (`struct boot_params`) for the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): setup header, command line and initrd location, and the
//! e820 memory map, plus placement of the initrd in guest RAM.

use crate::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{
    CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, MPTABLE_START, PAGE_SIZE,
    ZERO_PAGE_START,
};
use crate::{Error, Result};

/// `boot_flag`: the 0xAA55 boot sector signature.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header`: "HdrS", marks a setup header of protocol 2.00 or later.
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: 0xff, a boot loader without an assigned id.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `kernel_alignment` when no bzImage header supplies the kernel's own (16 MiB, the x86_64
/// default of CONFIG_PHYSICAL_ALIGN's upper range and where vmlinux is linked).
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// The e820 map for guest RAM given as (start, length) regions: RAM below the EBDA
/// (`[0, MPTABLE_START)`), RAM from `HIMEM_START` to the end of the low region, and every region
/// above the MMIO gap. The EBDA/MP table and the legacy VGA/BIOS hole are left out so Linux
/// treats them as reserved.
pub fn e820_map(ram: &[(GuestAddress, u64)]) -> Result<Vec<boot_e820_entry>> {
    let mut regions: Vec<(u64, u64)> = ram
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|(start, len)| (start.0, start.0.saturating_add(*len)))
        .collect();
    regions.sort_unstable();

    let mut map = Vec::new();
    let mut add = |addr: u64, end: u64| {
        map.push(boot_e820_entry {
            addr,
            size: end - addr,
            r#type: E820_RAM,
        })
    };
    for (start, end) in regions {
        if start < MMIO_GAP_END && end > MMIO_GAP_START {
            return Err(Error::RamInMmioGap { start, end });
        }
        if start < MPTABLE_START {
            add(start, end.min(MPTABLE_START));
        }
        if end > HIMEM_START {
            add(start.max(HIMEM_START), end);
        }
    }
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(Error::TooManyE820Entries(map.len()));
    }
    Ok(map)
}

fn lo32(v: u64) -> u32 {
    v as u32
}

fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}

/// Builds the zero page for a kernel booted through its 64-bit entry point.
///
/// * `ram`: the guest RAM regions, for the e820 map.
/// * `cmdline_addr`, `cmdline_size`: the NUL-terminated command line and its size including the
///   NUL (as linux-loader's `load_cmdline` writes it); size 0 means no command line.
/// * `initrd`: address and size of the initrd, if any.
/// * `setup_header`: the header a bzImage carries (from linux-loader's `KernelLoaderResult`);
///   the zero page starts from it so the kernel's own fields (`kernel_alignment`,
///   `relocatable_kernel`, `init_size`, ...) are kept. For an ELF vmlinux pass `None`.
pub fn build_boot_params(
    ram: &[(GuestAddress, u64)],
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
    setup_header: Option<setup_header>,
) -> Result<boot_params> {
    if cmdline_size > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLarge {
            size: cmdline_size,
            max: CMDLINE_MAX_SIZE,
        });
    }
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }

    if cmdline_size > 0 {
        params.hdr.cmd_line_ptr = lo32(cmdline_addr.0);
        params.ext_cmd_line_ptr = hi32(cmdline_addr.0);
        params.hdr.cmdline_size = cmdline_size as u32;
    }

    if let Some((addr, size)) = initrd {
        if size == 0 {
            return Err(Error::EmptyInitrd);
        }
        params.hdr.ramdisk_image = lo32(addr.0);
        params.ext_ramdisk_image = hi32(addr.0);
        params.hdr.ramdisk_size = lo32(size as u64);
        params.ext_ramdisk_size = hi32(size as u64);
    }

    let map = e820_map(ram)?;
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    Ok(params)
}

fn check_in_memory(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: GuestAddress,
    size: usize,
) -> Result<()> {
    if mem.check_range(addr, size) {
        Ok(())
    } else {
        Err(Error::OutsideGuestMemory {
            what,
            addr: addr.0,
            size,
        })
    }
}

/// Builds the zero page (see [`build_boot_params`]) with the e820 map taken from `mem`'s regions
/// and writes it at `ZERO_PAGE_START` with linux-loader's `LinuxBootConfigurator`. The command
/// line and initrd ranges must lie in guest memory.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
    setup_header: Option<setup_header>,
) -> Result<()> {
    if cmdline_size > 0 {
        check_in_memory(mem, "command line", cmdline_addr, cmdline_size)?;
    }
    if let Some((addr, size)) = initrd {
        check_in_memory(mem, "initrd", addr, size)?;
    }
    let ram: Vec<(GuestAddress, u64)> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
    let params = build_boot_params(&ram, cmdline_addr, cmdline_size, initrd, setup_header)?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(Error::BootParamsWrite)
}

/// Offset of `acpi_rsdp_addr` in the zero page (boot protocol 2.14+).
pub const ACPI_RSDP_ADDR_OFFSET: usize = std::mem::offset_of!(boot_params, acpi_rsdp_addr);

/// Stores the ACPI RSDP address in the zero page written by [`write_boot_params`] (call it
/// after that). Linux's 64-bit entry copies the whole zero page and takes the RSDP from there
/// before it falls back to scanning the BIOS area, so this is the primary way it finds the
/// tables.
pub fn set_acpi_rsdp(mem: &GuestMemoryMmap, rsdp: GuestAddress) -> Result<()> {
    let addr = ZERO_PAGE_START + ACPI_RSDP_ADDR_OFFSET as u64;
    mem.write_obj(rsdp.0, GuestAddress(addr))
        .map_err(|source| Error::GuestMemoryWrite {
            what: "zero page RSDP address",
            addr,
            source,
        })
}

/// Where to load an initrd of `initrd_size` bytes: the highest page-aligned address at which it
/// ends before the MMIO gap (or the end of the RAM region at 0) and starts at or above
/// `HIMEM_START`.
///
/// This does not know where the kernel is; use [`initrd_load_addr_above`] with the kernel's end
/// to make sure a small guest does not get the initrd on top of the kernel.
pub fn initrd_load_addr(mem: &GuestMemoryMmap, initrd_size: usize) -> Result<GuestAddress> {
    initrd_load_addr_above(mem, initrd_size, GuestAddress(HIMEM_START))
}

/// Like [`initrd_load_addr`], with the initrd also starting at or above `floor` (for example the
/// end of the loaded kernel).
pub fn initrd_load_addr_above(
    mem: &GuestMemoryMmap,
    initrd_size: usize,
    floor: GuestAddress,
) -> Result<GuestAddress> {
    let low = mem.find_region(GuestAddress(0)).ok_or(Error::NoLowMemory)?;
    let low_end = low.start_addr().0.saturating_add(low.len());
    initrd_placement(low_end, initrd_size, floor)
}

/// The placement rule of [`initrd_load_addr_above`] given the end of the RAM region at 0.
pub fn initrd_placement(
    low_end: u64,
    initrd_size: usize,
    floor: GuestAddress,
) -> Result<GuestAddress> {
    if initrd_size == 0 {
        return Err(Error::EmptyInitrd);
    }
    let end = low_end.min(MMIO_GAP_START);
    let floor = floor.0.max(HIMEM_START);
    end.checked_sub(initrd_size as u64)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|start| *start >= floor)
        .map(GuestAddress)
        .ok_or(Error::InitrdTooLarge {
            size: initrd_size,
            floor,
            end,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{arch_memory_regions, CMDLINE_START};
    use vm_memory::{ByteValued, Bytes};

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).unwrap()
    }

    fn ram(size: u64) -> Vec<(GuestAddress, u64)> {
        arch_memory_regions(size)
            .into_iter()
            .map(|(a, l)| (a, l as u64))
            .collect()
    }

    fn entries(params: &boot_params) -> Vec<(u64, u64, u32)> {
        params.e820_table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect()
    }

    #[test]
    fn e820_small_guest() {
        let p = build_boot_params(&ram(256 << 20), GuestAddress(0), 0, None, None).unwrap();
        assert_eq!(
            entries(&p),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x10_0000, (256 << 20) - 0x10_0000, E820_RAM)
            ]
        );
    }

    #[test]
    fn e820_large_guest_leaves_out_mmio_gap() {
        let size = 6u64 << 30;
        let p = build_boot_params(&ram(size), GuestAddress(0), 0, None, None).unwrap();
        assert_eq!(
            entries(&p),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x10_0000, 0xd000_0000 - 0x10_0000, E820_RAM),
                (1 << 32, size - 0xd000_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_rejects_ram_in_gap() {
        let bad = [(GuestAddress(0), 0xe000_0000u64)];
        assert!(matches!(e820_map(&bad), Err(Error::RamInMmioGap { .. })));
    }

    #[test]
    fn e820_tiny_guest_below_ebda() {
        let p = build_boot_params(
            &[(GuestAddress(0), 0x8_0000)],
            GuestAddress(0),
            0,
            None,
            None,
        )
        .unwrap();
        assert_eq!(entries(&p), vec![(0, 0x8_0000, E820_RAM)]);
    }

    #[test]
    fn e820_too_many_regions() {
        let regions: Vec<_> = (0..129u64)
            .map(|i| (GuestAddress((8 << 30) + i * 0x20_0000), 0x10_0000))
            .collect();
        assert!(matches!(
            e820_map(&regions),
            Err(Error::TooManyE820Entries(129))
        ));
    }

    #[test]
    fn header_fields_for_vmlinux() {
        let p = build_boot_params(
            &ram(128 << 20),
            GuestAddress(CMDLINE_START),
            23,
            Some((GuestAddress(0x700_0000), 0x12345)),
            None,
        )
        .unwrap();
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.kernel_alignment }, 0x0100_0000);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.ext_cmd_line_ptr }, 0);
        assert_eq!({ p.hdr.cmdline_size }, 23);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.ext_ramdisk_image }, 0);

        // Byte offsets fixed by the boot protocol.
        let bytes = p.as_slice();
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(bytes[0x210], 0xff);
        assert_eq!(u16::from_le_bytes([bytes[0x1fe], bytes[0x1ff]]), 0xaa55);
        assert_eq!(
            u32::from_le_bytes(bytes[0x228..0x22c].try_into().unwrap()),
            0x20000
        );
        assert_eq!(
            u32::from_le_bytes(bytes[0x218..0x21c].try_into().unwrap()),
            0x700_0000
        );
        assert_eq!(
            u32::from_le_bytes(bytes[0x21c..0x220].try_into().unwrap()),
            0x12345
        );
        assert_eq!(bytes[0x1e8], 2, "e820_entries");
        // First e820 entry at 0x2d0: addr 0, size 0x9fc00, type 1.
        assert_eq!(
            u64::from_le_bytes(bytes[0x2d8..0x2e0].try_into().unwrap()),
            0x9fc00
        );
        assert_eq!(
            u32::from_le_bytes(bytes[0x2e0..0x2e4].try_into().unwrap()),
            1
        );
    }

    #[test]
    fn bzimage_header_is_the_starting_point() {
        let hdr = setup_header {
            setup_sects: 27,
            version: 0x020f,
            loadflags: 1,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            init_size: 0x2a0_0000,
            code32_start: 0x10_0000,
            boot_flag: 0xaa55,
            header: KERNEL_HDR_MAGIC,
            type_of_loader: 0,
            ..Default::default()
        };
        let p = build_boot_params(
            &ram(64 << 20),
            GuestAddress(CMDLINE_START),
            5,
            None,
            Some(hdr),
        )
        .unwrap();
        assert_eq!({ p.hdr.setup_sects }, 27);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.init_size }, 0x2a0_0000);
        assert_eq!(
            { p.hdr.kernel_alignment },
            0x20_0000,
            "kernel's own alignment kept"
        );
        assert_eq!({ p.hdr.relocatable_kernel }, 1);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn high_addresses_use_ext_fields() {
        let p = build_boot_params(
            &ram(8 << 30),
            GuestAddress(0x1_2345_6000),
            10,
            Some((GuestAddress(0x1_8000_0000), 0x1000)),
            None,
        )
        .unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x2345_6000);
        assert_eq!({ p.ext_cmd_line_ptr }, 1);
        assert_eq!({ p.hdr.ramdisk_image }, 0x8000_0000);
        assert_eq!({ p.ext_ramdisk_image }, 1);
    }

    #[test]
    fn cmdline_limits() {
        assert!(matches!(
            build_boot_params(
                &ram(64 << 20),
                GuestAddress(CMDLINE_START),
                2049,
                None,
                None
            ),
            Err(Error::CmdlineTooLarge {
                size: 2049,
                max: 2048
            })
        ));
        let p =
            build_boot_params(&ram(64 << 20), GuestAddress(CMDLINE_START), 0, None, None).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0, "no command line");
    }

    #[test]
    fn written_at_zero_page() {
        let m = mem(64 << 20);
        write_boot_params(
            &m,
            GuestAddress(CMDLINE_START),
            12,
            Some((GuestAddress(0x300_0000), 0x2000)),
            None,
        )
        .unwrap();
        let back: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ back.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ back.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!(
            entries(&back),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x10_0000, (64 << 20) - 0x10_0000, E820_RAM)
            ]
        );
    }

    #[test]
    fn write_checks_ranges() {
        let m = mem(64 << 20);
        assert!(matches!(
            write_boot_params(
                &m,
                GuestAddress(CMDLINE_START),
                12,
                Some((GuestAddress(0x3ff_f000), 0x2000)),
                None
            ),
            Err(Error::OutsideGuestMemory { what: "initrd", .. })
        ));
        assert!(matches!(
            write_boot_params(&m, GuestAddress(64 << 20), 12, None, None),
            Err(Error::OutsideGuestMemory {
                what: "command line",
                ..
            })
        ));
        assert!(matches!(
            write_boot_params(
                &m,
                GuestAddress(CMDLINE_START),
                12,
                Some((GuestAddress(0x300_0000), 0)),
                None
            ),
            Err(Error::EmptyInitrd)
        ));
    }

    #[test]
    fn acpi_rsdp_address_lands_at_offset_0x70() {
        assert_eq!(ACPI_RSDP_ADDR_OFFSET, 0x70);
        let m = mem(64 << 20);
        write_boot_params(&m, GuestAddress(CMDLINE_START), 12, None, None).unwrap();
        set_acpi_rsdp(&m, GuestAddress(0xe_0000)).unwrap();
        let back: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ back.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!({ back.hdr.cmd_line_ptr }, CMDLINE_START as u32, "rest kept");
        let raw: u64 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x70)).unwrap();
        assert_eq!(raw, 0xe_0000);
    }

    #[test]
    fn acpi_rsdp_needs_the_zero_page_in_memory() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            set_acpi_rsdp(&m, GuestAddress(0xe_0000)),
            Err(Error::GuestMemoryWrite { addr: 0x7070, .. })
        ));
    }

    #[test]
    fn initrd_goes_to_top_of_low_memory() {
        let m = mem(128 << 20);
        let addr = initrd_load_addr(&m, 0x1234).unwrap();
        assert_eq!(addr, GuestAddress((128 << 20) - 0x2000));
        assert_eq!(addr.0 % PAGE_SIZE, 0);
        assert!(addr.0 + 0x1234 <= 128 << 20);
    }

    #[test]
    fn initrd_stays_below_mmio_gap() {
        let top = GuestAddress(0xd000_0000 - 0x10_0000);
        let floor = GuestAddress(HIMEM_START);
        assert_eq!(
            initrd_placement(0xd000_0000, 0x10_0000, floor).unwrap(),
            top
        );
        // A low region reaching into the gap is clamped to it.
        assert_eq!(
            initrd_placement(0xe000_0000, 0x10_0000, floor).unwrap(),
            top
        );
    }

    #[test]
    fn initrd_too_large() {
        let m = mem(16 << 20);
        // Exactly fills [1 MiB, 16 MiB).
        assert_eq!(
            initrd_load_addr(&m, (15 << 20) as usize).unwrap(),
            GuestAddress(HIMEM_START)
        );
        assert!(matches!(
            initrd_load_addr(&m, (15 << 20) + 1),
            Err(Error::InitrdTooLarge { floor: HIMEM_START, end, .. }) if end == 16 << 20
        ));
        assert!(matches!(
            initrd_load_addr(&m, 32 << 20),
            Err(Error::InitrdTooLarge { .. })
        ));
        assert!(matches!(initrd_load_addr(&m, 0), Err(Error::EmptyInitrd)));
    }

    #[test]
    fn initrd_above_kernel_end() {
        let m = mem(32 << 20);
        assert_eq!(
            initrd_load_addr_above(&m, 8 << 20, GuestAddress(24 << 20)).unwrap(),
            GuestAddress(24 << 20)
        );
        assert!(matches!(
            initrd_load_addr_above(&m, 8 << 20, GuestAddress((24 << 20) + 1)),
            Err(Error::InitrdTooLarge { floor, .. }) if floor == (24 << 20) + 1
        ));
    }
}

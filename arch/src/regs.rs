//! General, segment/control and FPU registers for entering a 64-bit kernel, plus the boot GDT,
//! IDT and identity-mapped page tables they point at.

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::gdt::{self, kvm_segment_from_gdt, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PAGE_SIZE, PDE_PAGES, PDE_START,
    PDPTE_START, PML4_START,
};
use crate::{kvm_err, Error, Result};

/// CR0: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0: monitor coprocessor; with TS clear, makes WAIT/FWAIT behave as SSE code expects.
pub const CR0_MP: u64 = 1 << 1;
/// CR0: x87 emulation. Must be clear or every x87/SSE instruction raises #UD/#NM.
pub const CR0_EM: u64 = 1 << 2;
/// CR0: task switched (lazy FPU); clear so the first FPU use does not fault.
pub const CR0_TS: u64 = 1 << 3;
/// CR0: extension type (hardwired to 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0: native x87 error reporting (#MF) instead of the legacy IRQ13 path.
pub const CR0_NE: u64 = 1 << 5;
/// CR0: not write-through.
pub const CR0_NW: u64 = 1 << 29;
/// CR0: cache disable.
pub const CR0_CD: u64 = 1 << 30;
/// CR0: paging.
pub const CR0_PG: u64 = 1 << 31;

/// CR4: physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4: the OS saves SSE state with FXSAVE; without it SSE instructions raise #UD.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4: the OS handles SIMD floating-point exceptions (#XM).
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;

/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Page-table entry: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry: user accessible. Set at every level so the project's ring-3 test guest can
/// use these tables; Linux replaces them before it runs user code.
pub const PTE_USER: u64 = 1 << 2;
/// Page-directory entry: maps a 2 MiB page.
pub const PDE_PAGE_SIZE: u64 = 1 << 7;

/// Flags of every non-leaf entry (PML4E, PDPTE).
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
/// Flags of every 2 MiB leaf entry.
const LEAF_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PDE_PAGE_SIZE;
/// Entries per page-table page.
const ENTRIES_PER_TABLE: usize = 512;
/// Bytes mapped by one PDE.
const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// CR0 at entry: protected mode with paging, FPU/SSE usable.
pub const BOOT_CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
/// CR4 at entry.
pub const BOOT_CR4: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
/// EFER at entry.
pub const BOOT_EFER: u64 = EFER_LME | EFER_LMA;

/// RFLAGS at entry: only the always-one bit 1, so interrupts are disabled as the boot protocol
/// requires.
pub const BOOT_RFLAGS: u64 = 0x2;
/// x87 control word after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
pub const BOOT_FCW: u16 = 0x37f;
/// MXCSR at reset: all SIMD exceptions masked, round to nearest.
pub const BOOT_MXCSR: u32 = 0x1f80;

/// The general registers for entering a 64-bit kernel at `entry` with the zero page at
/// `boot_params`.
pub fn boot_regs(entry: GuestAddress, boot_params: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: BOOT_RFLAGS,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: boot_params.0,
        ..Default::default()
    }
}

/// The FPU state at entry.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: BOOT_FCW,
        mxcsr: BOOT_MXCSR,
        ..Default::default()
    }
}

/// Sets RIP, RSP, RBP, RSI and RFLAGS for the boot entry; all other registers are zero.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress, boot_params: GuestAddress) -> Result<()> {
    vcpu.set_regs(&boot_regs(entry, boot_params))
        .map_err(kvm_err("KVM_SET_REGS"))
}

/// Sets the x87 control word and MXCSR to their post-reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    vcpu.set_fpu(&boot_fpu()).map_err(kvm_err("KVM_SET_FPU"))
}

/// Writes the boot GDT, IDT and page tables into guest memory and switches the vCPU to 64-bit
/// long mode on them.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    configure_sregs(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

/// The KVM-independent part of [`setup_sregs`]: writes the tables into `mem` and updates the
/// segment, descriptor-table and control registers in `sregs`. Fields it does not own (APIC base,
/// CR8, pending interrupts) are left as they are.
pub fn configure_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<()> {
    write_gdt_and_idt(mem)?;
    write_page_tables(mem)?;

    let gdt = gdt::boot_gdt();
    let code = kvm_segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = kvm_segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // Start from a known CR0 rather than the reset value, whose CD/NW bits would leave the
    // caches disabled until the guest rewrites CR0.
    sregs.cr0 = BOOT_CR0;
    sregs.cr3 = PML4_START;
    sregs.cr4 = BOOT_CR4;
    sregs.efer = BOOT_EFER;
    Ok(())
}

fn write_gdt_and_idt(mem: &GuestMemoryMmap) -> Result<()> {
    let gdt_bytes: Vec<u8> = gdt::boot_gdt()
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    write_bytes(mem, "boot GDT", BOOT_GDT_START, &gdt_bytes)?;
    write_bytes(mem, "boot IDT", BOOT_IDT_START, &0u64.to_le_bytes())
}

/// The PML4, PDPT and page-directory pages identity-mapping the first 4 GiB with 2 MiB pages,
/// returned as (guest address, page contents) in the order they are written.
pub fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let mut pml4 = vec![0u64; ENTRIES_PER_TABLE];
    pml4[0] = PDPTE_START | TABLE_FLAGS;

    let mut pdpt = vec![0u64; ENTRIES_PER_TABLE];
    for (i, e) in pdpt.iter_mut().take(PDE_PAGES as usize).enumerate() {
        *e = (PDE_START + i as u64 * PAGE_SIZE) | TABLE_FLAGS;
    }

    let pds: Vec<u64> = (0..PDE_PAGES * ENTRIES_PER_TABLE as u64)
        .map(|i| (i * LARGE_PAGE_SIZE) | LEAF_FLAGS)
        .collect();

    let bytes = |v: &[u64]| v.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
    vec![
        (PML4_START, bytes(&pml4)),
        (PDPTE_START, bytes(&pdpt)),
        (PDE_START, bytes(&pds)),
    ]
}

/// Writes [`page_tables`] into guest memory.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    for (addr, bytes) in page_tables() {
        write_bytes(mem, "boot page tables", addr, &bytes)?;
    }
    Ok(())
}

fn write_bytes(mem: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestMemoryWrite { what, addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Walks the tables in guest memory like the MMU does for a 2 MiB mapping and returns the
    /// physical address and the AND of the permission bits along the walk.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<(u64, u64)> {
        let addr_mask = 0x000f_ffff_ffff_f000u64;
        let pml4e = read_u64(mem, cr3 + ((va >> 39) & 0x1ff) * 8);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = read_u64(mem, (pml4e & addr_mask) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        assert_eq!(pdpte & PDE_PAGE_SIZE, 0, "no 1 GiB pages expected");
        let pde = read_u64(mem, (pdpte & addr_mask) + ((va >> 21) & 0x1ff) * 8);
        if pde & PTE_PRESENT == 0 {
            return None;
        }
        assert_ne!(pde & PDE_PAGE_SIZE, 0, "2 MiB leaf expected");
        let pa = (pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff);
        Some((pa, pml4e & pdpte & pde & 0x7))
    }

    #[test]
    fn regs_follow_boot_protocol() {
        let regs = boot_regs(GuestAddress(0x100_0000), GuestAddress(0x7000));
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rbp, BOOT_STACK_POINTER);
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rflags & (1 << 9), 0, "interrupts must be disabled");
        assert_eq!(
            (regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rdi),
            (0, 0, 0, 0, 0)
        );
    }

    #[test]
    fn fpu_reset_values() {
        let fpu = boot_fpu();
        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
    }

    #[test]
    fn control_registers_enable_long_mode_and_sse() {
        assert_eq!(BOOT_CR0, 0x8000_0033);
        assert_eq!(BOOT_CR0 & (CR0_EM | CR0_TS | CR0_CD | CR0_NW), 0);
        assert_eq!(BOOT_CR4, 0x620);
        assert_eq!(BOOT_EFER, 0x500);
    }

    #[test]
    fn identity_maps_first_4g_with_user_access() {
        let m = mem(1 << 20);
        write_page_tables(&m).unwrap();
        for va in [
            0u64,
            0x7000,
            0x1f_ffff,
            0x20_0000,
            0x100_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xd000_0000,
            0xfec0_0000,
            0xfee0_0abc,
            0xffff_ffff,
        ] {
            let (pa, perms) = translate(&m, PML4_START, va).unwrap();
            assert_eq!(pa, va, "va {va:#x}");
            assert_eq!(perms, PTE_PRESENT | PTE_WRITABLE | PTE_USER, "va {va:#x}");
        }
        assert_eq!(translate(&m, PML4_START, 1 << 32), None);
        assert_eq!(translate(&m, PML4_START, 1 << 39), None);
    }

    #[test]
    fn page_table_entries_exact() {
        let m = mem(1 << 20);
        write_page_tables(&m).unwrap();
        assert_eq!(read_u64(&m, PML4_START), 0xa007);
        assert_eq!(read_u64(&m, PML4_START + 8), 0);
        assert_eq!(read_u64(&m, PDPTE_START), 0xb007);
        assert_eq!(read_u64(&m, PDPTE_START + 3 * 8), 0xe007);
        assert_eq!(read_u64(&m, PDPTE_START + 4 * 8), 0);
        assert_eq!(read_u64(&m, PDE_START), 0x87);
        assert_eq!(read_u64(&m, PDE_START + 8), 0x20_0087);
        // Last PDE of the fourth directory maps [4 GiB - 2 MiB, 4 GiB).
        assert_eq!(read_u64(&m, 0xf000 - 8), 0xffe0_0087);
    }

    #[test]
    fn sregs_are_long_mode_on_boot_tables() {
        let m = mem(1 << 20);
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            cr0: 0x6000_0010,
            ..Default::default()
        };
        configure_sregs(&m, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, BOOT_CR0);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr4, BOOT_CR4);
        assert_eq!(sregs.efer, BOOT_EFER);
        assert_eq!(sregs.apic_base, 0xfee0_0900, "apic base must be preserved");
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (BOOT_IDT_START, 7));
        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!(sregs.cs.l, 1);
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x10);
            assert_eq!(seg.type_, 0x3);
        }
        assert_eq!(sregs.tr.selector, 0x18);

        // The GDT in memory is the one the segment registers were derived from.
        for (i, e) in gdt::boot_gdt().iter().enumerate() {
            assert_eq!(read_u64(&m, BOOT_GDT_START + 8 * i as u64), *e);
        }
        assert_eq!(read_u64(&m, BOOT_IDT_START), 0);
    }

    #[test]
    fn tables_outside_memory_is_an_error() {
        // 4 KiB of RAM cannot hold the page tables at 0x9000.
        let m = mem(0x1000);
        let err = write_page_tables(&m).unwrap_err();
        assert!(
            matches!(
                err,
                Error::GuestMemoryWrite {
                    addr: PML4_START,
                    ..
                }
            ),
            "{err}"
        );
    }
}

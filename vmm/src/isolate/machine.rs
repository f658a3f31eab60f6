//! What the host lays out before an isolate's first instruction: descriptor tables, TSS, page
//! tables, boot info and the interrupt frame that takes the one-instruction ring-0 entry to ring 3,
//! and the vCPU's initial registers. The guest never changes any of it (it runs at CPL 3).

use arch::gdt::{
    gdt_entry, kvm_segment_from_gdt, ACCESS_CODE_DATA, ACCESS_PRESENT, FLAG_DB, FLAG_GRANULARITY,
    FLAG_LONG, TYPE_CODE_EXEC_READ_ACCESSED, TYPE_DATA_READ_WRITE_ACCESSED, TYPE_TSS64_BUSY,
};
use arch::regs::{BOOT_CR0, BOOT_CR4, BOOT_EFER};
use isolate_abi::{layout, BootInfo, ImageHeader};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::ram::{GuestRam, RamError};

const ACCESS_DPL3: u8 = 3 << 5;
const KERNEL_CODE: u8 = 1;
const KERNEL_DATA: u8 = 2;
const USER_DATA: u8 = 3;
const USER_CODE: u8 = 4;
const TSS_INDEX: u8 = 5;
/// Selectors with RPL 3, as the interrupt frame hands them to `iretq`.
const USER_CS: u64 = ((USER_CODE as u64) << 3) | 3;
const USER_SS: u64 = ((USER_DATA as u64) << 3) | 3;
/// RFLAGS in ring 3: the reserved bit 1 and IOPL 3; IF clear (there are no interrupts).
const USER_RFLAGS: u64 = (3 << 12) | (1 << 1);

/// The 64-bit TSS (104 bytes), then the I/O permission bitmap (one bit per port, all clear: every
/// port allowed) and its terminating 0xff byte.
const TSS_SIZE: usize = 104;
const IOPB_BYTES: usize = 65536 / 8;
const TSS_LIMIT: u32 = (TSS_SIZE + IOPB_BYTES + 1 - 1) as u32;
/// IDT gate type: present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u64 = 0x8e;
const EXCEPTION_VECTORS: u64 = 32;

fn gdt() -> [u64; 7] {
    let code = ACCESS_PRESENT | ACCESS_CODE_DATA | TYPE_CODE_EXEC_READ_ACCESSED;
    let data = ACCESS_PRESENT | ACCESS_CODE_DATA | TYPE_DATA_READ_WRITE_ACCESSED;
    let tss = gdt_entry(
        ACCESS_PRESENT | TYPE_TSS64_BUSY,
        0,
        layout::TSS as u32,
        TSS_LIMIT,
    );
    [
        0,
        gdt_entry(code, FLAG_GRANULARITY | FLAG_LONG, 0, 0xfffff),
        gdt_entry(data, FLAG_GRANULARITY | FLAG_DB, 0, 0xfffff),
        gdt_entry(data | ACCESS_DPL3, FLAG_GRANULARITY | FLAG_DB, 0, 0xfffff),
        gdt_entry(code | ACCESS_DPL3, FLAG_GRANULARITY | FLAG_LONG, 0, 0xfffff),
        tss,
        // The upper half of the 16-byte TSS descriptor: base bits 63..32, all zero here.
        layout::TSS >> 32,
    ]
}

fn idt(header: &ImageHeader) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(EXCEPTION_VECTORS as usize * 16);
    for vector in 0..EXCEPTION_VECTORS {
        let handler = header.fault_stubs + vector * u64::from(header.fault_stub_stride);
        let low = (handler & 0xffff)
            | (u64::from(KERNEL_CODE) << 3 << 16)
            | (INTERRUPT_GATE << 40)
            | (((handler >> 16) & 0xffff) << 48);
        bytes.extend_from_slice(&low.to_le_bytes());
        bytes.extend_from_slice(&(handler >> 32).to_le_bytes());
    }
    bytes
}

fn tss() -> Vec<u8> {
    let mut t = vec![0u8; TSS_SIZE + IOPB_BYTES + 1];
    // RSP0 (offset 4): where a fault in ring 3 switches to.
    t[4..12].copy_from_slice(&layout::KERNEL_STACK_TOP.to_le_bytes());
    // I/O map base (offset 102): the bitmap right after the TSS proper.
    t[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    t[TSS_SIZE + IOPB_BYTES] = 0xff;
    t
}

/// The interrupt frame `iretq` pops at the ring-0 entry: into ring 3 at `user_entry`.
fn entry_frame(header: &ImageHeader) -> [u8; 40] {
    let mut f = [0u8; 40];
    for (i, v) in [
        header.user_entry,
        USER_CS,
        USER_RFLAGS,
        layout::USER_STACK_TOP,
        USER_SS,
    ]
    .into_iter()
    .enumerate()
    {
        f[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    f
}

pub const ENTRY_FRAME: u64 = layout::KERNEL_STACK_TOP - 40;

/// Writes the tables, boot info, image and entry frame into fresh RAM.
pub fn write_boot_memory(
    ram: &mut GuestRam,
    image: &[u8],
    header: &ImageHeader,
    boot: &BootInfo,
) -> Result<(), RamError> {
    let gdt_bytes: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(layout::GDT, &gdt_bytes)?;
    ram.write(layout::IDT, &idt(header))?;
    ram.write(layout::TSS, &tss())?;
    for (addr, bytes) in arch::regs::page_tables() {
        ram.write(addr, &bytes)?;
    }
    ram.write(layout::BOOT_INFO, &boot.encode())?;
    ram.write(ENTRY_FRAME, &entry_frame(header))?;
    ram.write(layout::IMAGE, image)
}

/// Long mode at CPL 0 on the tables above, paging on, SSE enabled.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let g = gdt();
    let segment = |index: u8| kvm_segment_from_gdt(g[usize::from(index)], index);
    let data: kvm_segment = segment(KERNEL_DATA);
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (g.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = (EXCEPTION_VECTORS * 16 - 1) as u16;
    sregs.cs = segment(KERNEL_CODE);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_INDEX);
    sregs.cr0 = BOOT_CR0;
    sregs.cr3 = layout::PAGE_TABLES;
    sregs.cr4 = BOOT_CR4;
    sregs.efer = BOOT_EFER;
    sregs
}

/// At the ring-0 entry with RSP on the entry frame and the boot info address in RDI (which
/// `iretq` leaves alone, so ring 3 receives it as its first argument).
pub fn boot_regs(header: &ImageHeader) -> kvm_regs {
    kvm_regs {
        rip: header.kernel_entry,
        rsp: ENTRY_FRAME,
        rdi: layout::BOOT_INFO,
        rflags: 2,
        ..Default::default()
    }
}

/// Where a CPU exception left the guest, read from the ring-0 stack the fault stub runs on.
pub struct FaultFrame {
    pub rip: u64,
    pub error_code: Option<u64>,
}

pub fn read_fault_frame(ram: &GuestRam, vector: u8) -> Result<FaultFrame, RamError> {
    // The CPU pushed SS, RSP, RFLAGS, CS, RIP (and for some vectors an error code) below RSP0.
    let top = layout::KERNEL_STACK_TOP;
    let rip = ram.read_u64(top - 40)?;
    let error_code = if isolate_abi::vector_has_error_code(vector) {
        Some(ram.read_u64(top - 48)?)
    } else {
        None
    };
    Ok(FaultFrame { rip, error_code })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_the_privilege_levels_ring_3_needs() {
        let g = gdt();
        let dpl = |i: u8| kvm_segment_from_gdt(g[usize::from(i)], i).dpl;
        assert_eq!(dpl(KERNEL_CODE), 0);
        assert_eq!(dpl(USER_CODE), 3);
        assert_eq!(dpl(USER_DATA), 3);
        let code = kvm_segment_from_gdt(g[usize::from(USER_CODE)], USER_CODE);
        assert_eq!(code.l, 1, "user code must be 64-bit");
        let tr = kvm_segment_from_gdt(g[usize::from(TSS_INDEX)], TSS_INDEX);
        assert_eq!((tr.base, tr.limit, tr.type_), (layout::TSS, TSS_LIMIT, 0xb));
    }

    #[test]
    fn idt_gates_point_at_the_fault_stubs() {
        let h = ImageHeader {
            magic: ImageHeader::MAGIC,
            abi_version: isolate_abi::ABI_VERSION,
            fault_stub_stride: 16,
            kernel_entry: 0x20_0030,
            user_entry: 0x20_0031,
            fault_stubs: 0x20_0040,
        };
        let bytes = idt(&h);
        let gate = |v: usize| {
            let lo = u64::from_le_bytes(bytes[v * 16..v * 16 + 8].try_into().unwrap());
            let hi = u64::from_le_bytes(bytes[v * 16 + 8..v * 16 + 16].try_into().unwrap());
            (lo & 0xffff) | (((lo >> 48) & 0xffff) << 16) | (hi << 32)
        };
        assert_eq!(gate(0), 0x20_0040);
        assert_eq!(gate(14), 0x20_0040 + 14 * 16);
        let tss = tss();
        assert_eq!(tss.len(), TSS_LIMIT as usize + 1);
        assert_eq!(*tss.last().unwrap(), 0xff);
    }
}

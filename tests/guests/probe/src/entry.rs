//! The ring-0 entry stub and the switch to ring 3.
//!
//! Ring-0 code is emulated instruction by instruction on the development machine's KVM, so the stub
//! is six instructions long and everything it needs is laid out statically in `.data`:
//!
//! 1. `lgdt`: our own GDT, which keeps the VMM's selectors 0x08 (code64) and 0x10 (data) and adds
//!    user data (0x18, DPL 3), user code64 (0x20, DPL 3) and a 64-bit TSS (0x28). Code and data
//!    descriptors have the accessed bit preset so the CPU never needs to write them.
//! 2. `lidt` with limit 0: no IDT at all, so any exception escalates to a triple fault, which the
//!    VMM must report (the `triple-fault` mode relies on this).
//! 3. `mov ax` + `ltr`: the TSS exists only for its I/O permission bitmap, which allows every port
//!    to ring 3. RFLAGS.IOPL=3 alone would do on hardware, but the PVM-based KVM of the development
//!    machine forces the guest's IOPL to 0 on the way to ring 3 (observed: `in` then raises #GP),
//!    while its instruction emulator honours the TSS bitmap, as real CPUs do.
//! 4. `lea rsp`: point the stack at a prebuilt `iretq` frame.
//! 5. `iretq` to `probe_ring3_entry` with CS=0x23, SS=0x1b, RSP=`__stack_top` (in the image) and
//!    RFLAGS = IOPL 3 with IF=0.
//!
//! RSI (the zero page, per the Linux 64-bit boot protocol) survives `iretq` untouched and is moved
//! to RDI in ring 3 to become `probe_main`'s argument. The red zone of the x86-64 ABI is safe to use:
//! nothing ever interrupts ring 3 on the probe's own stack (IF=0, and an exception could only
//! switch to ring 0, which has no IDT and ends in a triple fault anyway). The TSS's RSP0 is 0 for
//! the same reason: no event is ever delivered to ring 0.

core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "    lgdt [rip + probe_gdtr]",
    "    lidt [rip + probe_null_idtr]",
    "    mov ax, {tss_sel}",
    "    ltr ax",
    "    lea rsp, [rip + probe_iret_frame]",
    "    iretq",
    ".size _start, . - _start",
    "",
    ".section .text.probe_ring3_entry, \"ax\"",
    ".global probe_ring3_entry",
    ".type probe_ring3_entry, @function",
    "probe_ring3_entry:",
    "    mov rdi, rsi",
    "    call probe_main",
    "    ud2",
    ".size probe_ring3_entry, . - probe_ring3_entry",
    "",
    ".section .data.probe_boot, \"aw\"",
    ".balign 16",
    "probe_gdt:",
    "    .quad 0",
    "    .quad 0x00af9b000000ffff",
    "    .quad 0x00cf93000000ffff",
    "    .quad 0x00cff3000000ffff",
    "    .quad 0x00affb000000ffff",
    "    .quad probe_tss_desc_lo",
    "    .quad probe_tss_desc_hi",
    "probe_gdt_end:",
    ".balign 16",
    "probe_gdtr:",
    "    .short probe_gdt_end - probe_gdt - 1",
    "    .quad probe_gdt",
    ".balign 16",
    "probe_null_idtr:",
    "    .short 0",
    "    .quad 0",
    ".balign 16",
    "probe_iret_frame:",
    "    .quad probe_ring3_entry",
    "    .quad {user_cs}",
    "    .quad {user_rflags}",
    "    .quad __stack_top",
    "    .quad {user_ss}",
    "",
    ".section .data.probe_tss, \"aw\"",
    ".balign 16",
    ".global probe_tss",
    "probe_tss:",
    "    .fill 102, 1, 0",
    "    .short probe_iomap - probe_tss",
    "probe_iomap:",
    "    .fill 8192, 1, 0",
    "    .byte 0xff",
    ".global probe_tss_end",
    "probe_tss_end:",
    user_cs = const USER_CS,
    tss_sel = const TSS_SELECTOR,
    user_ss = const USER_SS,
    user_rflags = const USER_RFLAGS,
);

/// User code64 selector: GDT index 4, RPL 3.
pub const USER_CS: u64 = (4 << 3) | 3;
/// User data selector: GDT index 3, RPL 3.
pub const USER_SS: u64 = (3 << 3) | 3;
/// 64-bit TSS: GDT indexes 5 and 6.
pub const TSS_SELECTOR: u64 = 5 << 3;
/// Bit 1 is reserved and must be set; IOPL=3 lets ring 3 execute `in`/`out`; IF stays clear.
pub const USER_RFLAGS: u64 = (3 << 12) | (1 << 1);

//! The image header, the only ring-0 code of a normal run (one `iretq`), the ring-3 entry and the
//! fault stubs.
//!
//! Ring 0 is emulated instruction by instruction on the development machine's KVM, so the host
//! prepares everything (GDT, IDT, TSS, page tables, and an interrupt frame for `isolate_user_entry`
//! on the ring-0 stack) and starts the vCPU at `isolate_kernel_entry`, which only returns to ring 3.
//!
//! A CPU exception (a bug of the guest runtime; WebAssembly traps are caught by the interpreter)
//! enters the stub for its vector through the host-built IDT. The stub pushes the vector and writes
//! it to `FAULT_PORT`; the host reads the exception frame from the ring-0 stack and ends the job
//! with the fault's name and address. The host never resumes a faulted isolate.

use isolate_abi::{ImageHeader, ABI_VERSION, FAULT_PORT};

core::arch::global_asm!(
    ".section .image_header, \"a\"",
    ".balign 8",
    "    .quad {magic}",
    "    .long {abi_version}",
    "    .long 16",
    "    .quad isolate_kernel_entry",
    "    .quad isolate_user_entry",
    "    .quad isolate_fault_stubs",
    "",
    ".section .text.entry, \"ax\"",
    ".global isolate_kernel_entry",
    "isolate_kernel_entry:",
    "    iretq",
    "",
    ".global isolate_user_entry",
    "isolate_user_entry:",
    "    call isolate_main",
    "    ud2",
    "",
    ".balign 16",
    ".global isolate_fault_stubs",
    "isolate_fault_stubs:",
    ".irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".balign 16",
    "    push \\vector",
    "    jmp isolate_fault_common",
    ".endr",
    "",
    "isolate_fault_common:",
    "    mov eax, dword ptr [rsp]",
    "    mov dx, {fault_port}",
    "    out dx, eax",
    "2:  hlt",
    "    jmp 2b",
    magic = const ImageHeader::MAGIC,
    abi_version = const ABI_VERSION,
    fault_port = const FAULT_PORT,
);

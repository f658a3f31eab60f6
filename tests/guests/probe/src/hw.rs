//! The probe's only contact with the machine: port I/O, CPUID, MMIO and guest-physical memory.
//!
//! The VMM identity-maps the first 4 GiB with user-accessible pages, so in ring 3 a physical address
//! below 4 GiB is also a valid virtual address.

use core::arch::asm;

/// End of the identity map the VMM's boot page tables provide.
pub const IDENTITY_MAP_END: u64 = 1 << 32;

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the entry stub sets RFLAGS.IOPL=3, so `in` is allowed in ring 3; it touches no memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Reads a doubleword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: as for `inb`; the ports the probe writes (COM1, the i8042 command port) have no effect
    // on memory the probe uses.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Writes `bytes` to an I/O port with one `rep outsb` (a single string-I/O exit for the VMM).
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: as for `inb`; `rep outsb` only reads `bytes` (RSI/RCX describe exactly that slice) and
    // DF is clear as the ABI requires, so it reads upwards.
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _,
             inout("rcx") bytes.len() => _, options(nostack, preserves_flags, readonly));
    }
}

/// Executes CPUID for `leaf` (sub-leaf 0) and returns EAX, EBX, ECX, EDX.
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let result = core::arch::x86_64::__cpuid_count(leaf, 0);
    [result.eax, result.ebx, result.ecx, result.edx]
}

/// A read-only view of `len` bytes of guest RAM at physical address `addr`, or `None` when the
/// range is empty, starts at the null address or leaves the identity map.
///
/// Only for RAM the VMM filled before the first instruction and nobody writes afterwards (zero
/// page, command line, MP table, the probe image): holding a shared reference to it is sound.
pub fn phys_slice(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr == 0 || len == 0 || end > IDENTITY_MAP_END {
        return None;
    }
    // SAFETY: [addr, end) is non-null and inside the identity map, hence mapped and readable; per the
    // contract above nothing writes it while the probe runs, and it overlaps no Rust object that is
    // ever mutated (the probe has no writable statics besides its boot frame).
    Some(unsafe {
        core::slice::from_raw_parts(core::ptr::with_exposed_provenance(addr as usize), len)
    })
}

/// Reads a 32-bit device register at `addr` (an MMIO exit to the VMM).
pub fn mmio_read32(addr: u64) -> u32 {
    debug_assert!(addr.is_multiple_of(4) && addr + 4 <= IDENTITY_MAP_END);
    // SAFETY: `addr` is an aligned address inside the identity map (all callers pass constants in the
    // virtio-mmio window); a volatile read of device memory has no effect on Rust objects.
    unsafe { core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u32>(addr as usize)) }
}

/// Writes a 32-bit device register at `addr` (an MMIO exit to the VMM).
pub fn mmio_write32(addr: u64, value: u32) {
    debug_assert!(addr.is_multiple_of(4) && addr + 4 <= IDENTITY_MAP_END);
    // SAFETY: as for `mmio_read32`.
    unsafe {
        core::ptr::write_volatile(
            core::ptr::with_exposed_provenance_mut::<u32>(addr as usize),
            value,
        )
    }
}

/// Writes a byte at the start of the RAM page at `addr`, which makes the VMM back the page.
pub fn touch_page(addr: u64) {
    debug_assert!(addr < IDENTITY_MAP_END);
    // SAFETY: callers pass page addresses of guest RAM inside the identity map, above everything
    // the probe itself uses (its image, stack, page tables and the boot structures); nothing in
    // Rust refers to that memory.
    unsafe {
        core::ptr::write_volatile(
            core::ptr::with_exposed_provenance_mut::<u8>(addr as usize),
            1,
        )
    }
}

/// Reads `width` bytes (1, 2, 4 or 8; anything else reads 4) of device memory at `addr`, which
/// need not be aligned: one `mov`, so the VMM sees exactly one MMIO exit of that size.
///
/// `read_volatile` cannot be used here: it requires an aligned pointer, and misaligned and
/// odd-width accesses are exactly what the hostile mode makes.
pub fn mmio_read_sized(addr: u64, width: u8) -> u64 {
    let value: u64;
    // SAFETY: callers pass addresses in the virtio-mmio window (below 4 GiB, identity-mapped and
    // backed by no RAM), so the load only causes an MMIO exit; it touches no Rust object.
    unsafe {
        match width {
            1 => asm!("movzx {v:e}, byte ptr [{a}]", a = in(reg) addr, v = out(reg) value,
                      options(nostack, preserves_flags, readonly)),
            2 => asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) addr, v = out(reg) value,
                      options(nostack, preserves_flags, readonly)),
            8 => asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) value,
                      options(nostack, preserves_flags, readonly)),
            _ => asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) value,
                      options(nostack, preserves_flags, readonly)),
        }
    }
    value
}

/// Writes the low `width` bytes (1, 2, 4 or 8; anything else writes 4) of `value` to device
/// memory at `addr`, aligned or not, in one `mov` (one MMIO exit of that size).
pub fn mmio_write_sized(addr: u64, width: u8, value: u64) {
    // SAFETY: as for `mmio_read_sized`: the store goes to device memory, no Rust object.
    unsafe {
        match width {
            1 => asm!("mov byte ptr [{a}], {v:l}", a = in(reg) addr, v = in(reg) value,
                      options(nostack, preserves_flags)),
            2 => asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) value,
                      options(nostack, preserves_flags)),
            8 => asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value,
                      options(nostack, preserves_flags)),
            _ => asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value,
                      options(nostack, preserves_flags)),
        }
    }
}

/// Copies `bytes` into guest RAM at physical address `addr` (volatile: the VMM's device threads
/// read this memory behind the compiler's back).
pub fn ram_write(addr: u64, bytes: &[u8]) {
    debug_assert!(addr + bytes.len() as u64 <= IDENTITY_MAP_END);
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: callers pass RAM above the probe's own image, stack and boot structures (the
        // hostile mode's ring area), which no Rust object occupies.
        unsafe {
            core::ptr::write_volatile(
                core::ptr::with_exposed_provenance_mut::<u8>(addr as usize + i),
                b,
            )
        }
    }
}

/// Reads `out.len()` bytes of guest RAM at `addr` (volatile, as for `ram_write`).
pub fn ram_read(addr: u64, out: &mut [u8]) {
    debug_assert!(addr + out.len() as u64 <= IDENTITY_MAP_END);
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: as for `ram_write`.
        *b = unsafe {
            core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u8>(addr as usize + i))
        };
    }
}

/// Fills `len` bytes of guest RAM at `addr` with `byte`.
pub fn ram_fill(addr: u64, len: usize, byte: u8) {
    for i in 0..len as u64 {
        ram_write(addr + i, &[byte]);
    }
}

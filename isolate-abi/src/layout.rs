//! Guest-physical (= guest-virtual) addresses of an isolate. The host writes everything below
//! [`IMAGE`] except the ring-0 stack's unused part; the guest image is an ELF linked at
//! [`IMAGE`]; the host sizes the input region and heap and tells the guest in the [`BootInfo`].
//!
//! [`BootInfo`]: crate::BootInfo

/// Global descriptor table (null, kernel code, kernel data, user data, user code, 64-bit TSS).
pub const GDT: u64 = 0x1000;
/// Interrupt descriptor table: 32 gates, one per exception vector, to the image's fault stubs.
pub const IDT: u64 = 0x2000;
/// The 64-bit TSS, followed by its I/O permission bitmap (all ports allowed to ring 3: the
/// development machine's KVM drops RFLAGS.IOPL on the way to ring 3 but honours the bitmap).
pub const TSS: u64 = 0x3000;
/// The [`BootInfo`](crate::BootInfo).
pub const BOOT_INFO: u64 = 0x6000;
/// Top of the ring-0 stack (TSS.RSP0): the entry's interrupt frame, then any fault's.
pub const KERNEL_STACK_TOP: u64 = 0x8000;
/// Page tables (identity map of the first 4 GiB with 2 MiB pages, user-accessible).
pub const PAGE_TABLES: u64 = 0x9000;
/// The mailbox of hypercall payloads and answers.
pub const MAILBOX: u64 = 0x10_0000;
pub const MAILBOX_SIZE: u64 = 0x10_0000;
/// The guest image (its ELF segments are linked here and above).
pub const IMAGE: u64 = 0x20_0000;
/// Room for the image.
pub const IMAGE_MAX: u64 = 0xe0_0000;
/// The ring-3 stack: [`USER_STACK_TOP`] - [`USER_STACK_SIZE`] up to [`USER_STACK_TOP`].
pub const USER_STACK_TOP: u64 = 0x120_0000;
pub const USER_STACK_SIZE: u64 = 0x20_0000;
/// The input region (the job) starts here; its size, and the heap after it, are the host's choice.
pub const INPUT: u64 = 0x120_0000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_do_not_overlap() {
        let regions = [
            (GDT, 0x1000),
            (IDT, 0x1000),
            (TSS, 0x3000),
            (BOOT_INFO, 0x1000),
            (KERNEL_STACK_TOP - 0x1000, 0x1000),
            (PAGE_TABLES, 0x6000),
            (MAILBOX, MAILBOX_SIZE),
            (IMAGE, IMAGE_MAX),
            (USER_STACK_TOP - USER_STACK_SIZE, USER_STACK_SIZE),
        ];
        for (i, &(a, alen)) in regions.iter().enumerate() {
            for &(b, blen) in &regions[i + 1..] {
                assert!(
                    a + alen <= b || b + blen <= a,
                    "{a:#x}+{alen:#x} vs {b:#x}+{blen:#x}"
                );
            }
        }
        const { assert!(USER_STACK_TOP <= INPUT) };
    }
}

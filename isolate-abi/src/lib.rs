//! The contract between the VMM's isolate runner (`vmm/src/isolate`) and the isolate guest
//! (`guest-agent/isolate`): where things sit in guest memory, how the guest calls the host, and
//! how jobs, values and errors are encoded. `no_std` and allocation-free so the freestanding guest
//! can use it as is.
//!
//! The guest runs at CPL 3 with the first 4 GiB identity-mapped (virtual = physical). A hypercall
//! is `out HYPERCALL_PORT, eax` with the call number in `eax` and its payload in the mailbox; the
//! host answers in the mailbox before resuming the guest. [`Call::Result`] and [`Call::Error`]
//! end a job: the host does not resume the guest after them.

#![no_std]

pub mod encoding;
pub mod fetch;
pub mod layout;

pub use encoding::{DecodeError, Job, JobArgs, Reader, Value, ValueTag, Writer};
pub use fetch::{FetchAnswer, FetchRequestView, FetchStatus};

/// Version of this contract, checked by the host against the image header and by the guest
/// against [`BootInfo::abi_version`].
pub const ABI_VERSION: u32 = 1;

/// The port of every hypercall.
pub const HYPERCALL_PORT: u16 = 0x0e0;
/// The port the guest's ring-0 fault handler writes the exception vector to.
pub const FAULT_PORT: u16 = 0x0e1;

/// Hypercall numbers (`eax` of `out HYPERCALL_PORT, eax`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Initialisation is complete and the guest is about to read its job: the host may snapshot
    /// the isolate here (the pool's template). No payload.
    Ready = 1,
    /// Payload: [`Writer::bytes`] of a UTF-8 message. No answer.
    Log = 2,
    /// Payload: the key (bytes). Answer: `u32` 1 and the value (bytes), or `u32` 0.
    KvGet = 3,
    /// Payload: key (bytes), value (bytes). Answer: `u32` 1, or `u32` 0 when the store is full.
    KvPut = 4,
    /// Terminal. Payload: `u32` count, then each [`Value`].
    Result = 5,
    /// Terminal. Payload: `u32` [`ErrorKind`], then the message (bytes).
    Error = 6,
    /// An HTTP request made by the host under the egress policy. Payload: method (bytes), URL
    /// (bytes), `u32` header count, each name and value (bytes), body (bytes). Answer: `u32` 0,
    /// `u32` HTTP status, `u32` header count, each name and value (bytes), body (bytes); or a
    /// `u32` [`FetchStatus`] failure and its message (bytes). The answer fits the mailbox: a
    /// response that would not is answered [`FetchStatus::TooLarge`]. See [`fetch`].
    Fetch = 7,
}

impl Call {
    pub fn from_u32(n: u32) -> Option<Call> {
        Some(match n {
            1 => Call::Ready,
            2 => Call::Log,
            3 => Call::KvGet,
            4 => Call::KvPut,
            5 => Call::Result,
            6 => Call::Error,
            7 => Call::Fetch,
            _ => return None,
        })
    }
}

/// Why a job failed inside the guest.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The job in the input region could not be decoded (a host bug, or a corrupted isolate).
    BadJob = 1,
    /// The module is not valid WebAssembly (or uses a feature the runtime does not have).
    InvalidModule = 2,
    /// Instantiation failed: an import the isolate does not provide, a start function that
    /// trapped, a memory larger than the limit.
    Instantiate = 3,
    /// The function to invoke is not exported, or not a function.
    MissingExport = 4,
    /// The arguments do not match the function's parameters.
    BadArguments = 5,
    /// The function trapped (the message holds the trap reason).
    Trap = 6,
    /// The guest's own heap is exhausted.
    OutOfMemory = 7,
    /// The guest runtime panicked (a bug of the isolate guest).
    Panic = 8,
}

impl ErrorKind {
    pub fn from_u32(n: u32) -> Option<ErrorKind> {
        Some(match n {
            1 => ErrorKind::BadJob,
            2 => ErrorKind::InvalidModule,
            3 => ErrorKind::Instantiate,
            4 => ErrorKind::MissingExport,
            5 => ErrorKind::BadArguments,
            6 => ErrorKind::Trap,
            7 => ErrorKind::OutOfMemory,
            8 => ErrorKind::Panic,
            _ => return None,
        })
    }
}

/// Written by the host at [`layout::BOOT_INFO`] before the guest starts; the guest receives its
/// address in `rdi`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    pub abi_version: u32,
    /// Largest linear memory a module may have, in 64 KiB WebAssembly pages.
    pub max_wasm_pages: u32,
    pub mailbox: u64,
    pub mailbox_size: u64,
    /// Where the host writes the job ([`Job`]) before resuming the guest after [`Call::Ready`].
    pub input: u64,
    pub input_size: u64,
    /// The guest's heap: everything from here to the end of RAM.
    pub heap: u64,
    pub heap_size: u64,
}

impl BootInfo {
    pub const MAGIC: u64 = u64::from_le_bytes(*b"AVISOBI1");
    pub const SIZE: usize = core::mem::size_of::<BootInfo>();

    /// The bytes the guest reads as this `repr(C)` struct (little-endian, no padding).
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let mut w = Writer::new(&mut out);
        // The buffer is exactly SIZE bytes: none of these can run out of room.
        let _ = w.u64(self.magic);
        let _ = w.u32(self.abi_version);
        let _ = w.u32(self.max_wasm_pages);
        for v in [
            self.mailbox,
            self.mailbox_size,
            self.input,
            self.input_size,
            self.heap,
            self.heap_size,
        ] {
            let _ = w.u64(v);
        }
        out
    }
}

/// At the first byte of the guest image (see the guest's linker script): where the host enters
/// it and where its fault handlers are.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub magic: u64,
    pub abi_version: u32,
    /// Size of one fault stub; stub `v` (for exception vector `v`, 0..32) is at
    /// `fault_stubs + v * fault_stub_stride`.
    pub fault_stub_stride: u32,
    /// A ring-0 `iretq` (the only ring-0 instruction of a normal run): the host points RSP at an
    /// interrupt frame for `user_entry` and starts the vCPU here.
    pub kernel_entry: u64,
    /// The ring-3 entry; takes the [`BootInfo`] address in `rdi`.
    pub user_entry: u64,
    pub fault_stubs: u64,
}

impl ImageHeader {
    pub const MAGIC: u64 = u64::from_le_bytes(*b"AVISOIMG");
    pub const SIZE: usize = core::mem::size_of::<ImageHeader>();

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let mut w = Writer::new(&mut out);
        // The buffer is exactly SIZE bytes: none of these can run out of room.
        let _ = w.u64(self.magic);
        let _ = w.u32(self.abi_version);
        let _ = w.u32(self.fault_stub_stride);
        let _ = w.u64(self.kernel_entry);
        let _ = w.u64(self.user_entry);
        let _ = w.u64(self.fault_stubs);
        out
    }

    /// Decodes the header from the image's first bytes.
    pub fn parse(bytes: &[u8]) -> Option<ImageHeader> {
        let mut r = Reader::new(bytes);
        Some(ImageHeader {
            magic: r.u64().ok()?,
            abi_version: r.u32().ok()?,
            fault_stub_stride: r.u32().ok()?,
            kernel_entry: r.u64().ok()?,
            user_entry: r.u64().ok()?,
            fault_stubs: r.u64().ok()?,
        })
    }
}

/// Exception vectors that push an error code (so the host knows the ring-0 frame's shape).
pub const fn vector_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The exception's name, for error messages.
pub const fn vector_name(vector: u8) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "NMI",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack fault (#SS)",
        13 => "general protection (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating point (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating point (#XM)",
        _ => "reserved exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_and_error_numbers_round_trip() {
        for n in 0..10 {
            if let Some(c) = Call::from_u32(n) {
                assert_eq!(c as u32, n);
            }
            if let Some(k) = ErrorKind::from_u32(n) {
                assert_eq!(k as u32, n);
            }
        }
        assert_eq!(Call::from_u32(0), None);
        assert_eq!(ErrorKind::from_u32(99), None);
    }

    #[test]
    fn boot_info_encoding_matches_its_repr_c_layout() {
        use core::mem::offset_of;
        assert_eq!(BootInfo::SIZE, 64);
        let expect = [
            (offset_of!(BootInfo, magic), 0),
            (offset_of!(BootInfo, abi_version), 8),
            (offset_of!(BootInfo, max_wasm_pages), 12),
            (offset_of!(BootInfo, mailbox), 16),
            (offset_of!(BootInfo, mailbox_size), 24),
            (offset_of!(BootInfo, input), 32),
            (offset_of!(BootInfo, input_size), 40),
            (offset_of!(BootInfo, heap), 48),
            (offset_of!(BootInfo, heap_size), 56),
        ];
        for (got, want) in expect {
            assert_eq!(got, want);
        }
        let info = BootInfo {
            magic: BootInfo::MAGIC,
            abi_version: 7,
            max_wasm_pages: 9,
            mailbox: 1,
            mailbox_size: 2,
            input: 3,
            input_size: 4,
            heap: 5,
            heap_size: 6,
        };
        let b = info.encode();
        assert_eq!(&b[8..12], &7u32.to_le_bytes());
        assert_eq!(&b[12..16], &9u32.to_le_bytes());
        assert_eq!(&b[56..64], &6u64.to_le_bytes());
    }

    #[test]
    fn image_header_round_trips() {
        let h = ImageHeader {
            magic: ImageHeader::MAGIC,
            abi_version: ABI_VERSION,
            fault_stub_stride: 16,
            kernel_entry: 0x20_0040,
            user_entry: 0x20_1000,
            fault_stubs: 0x20_0100,
        };
        let bytes = h.encode();
        assert_eq!(ImageHeader::parse(&bytes), Some(h));
        assert_eq!(ImageHeader::parse(&bytes[..10]), None);
    }
}

//! The isolate guest: runs one WebAssembly job at CPL 3, with no operating system.
//!
//! The VMM enters it through a one-instruction ring-0 stub (entry.rs) straight into ring 3 with
//! the [`BootInfo`] address in `rdi`. It sets up its heap, creates the interpreter (wasmi), tells
//! the host it is ready (the host may snapshot it there: that is the pool's template), then reads
//! its job from the input region, runs it and reports the results or the error. Everything goes
//! through hypercalls (hypercall.rs); there are no devices and no interrupts.

#![no_std]
#![no_main]

extern crate alloc;

mod entry;
mod heap;
mod http_text;
mod hypercall;
mod runtime;

use freestanding as _;
use isolate_abi::{BootInfo, ErrorKind, ABI_VERSION};

/// Called by `isolate_user_entry` (entry.rs) at CPL 3 on the ring-3 stack the host set up.
#[no_mangle]
extern "C" fn isolate_main(boot: *const BootInfo) -> ! {
    // SAFETY: the host writes a BootInfo at this address before starting the vCPU and never
    // changes it while the guest runs; it is only read.
    let boot = unsafe { boot.read() };
    if boot.magic != BootInfo::MAGIC || boot.abi_version != ABI_VERSION {
        hypercall::fail(
            ErrorKind::BadJob,
            format_args!(
                "boot info has magic {:#x} version {}, this guest speaks version {ABI_VERSION}",
                boot.magic, boot.abi_version
            ),
        );
    }
    hypercall::init(&boot);
    heap::init(boot.heap, boot.heap_size);
    let engine = runtime::engine();
    hypercall::ready();
    runtime::run(&engine, &boot)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let kind = if heap::exhausted() {
        ErrorKind::OutOfMemory
    } else {
        ErrorKind::Panic
    };
    hypercall::fail(kind, format_args!("{}", info))
}

// The precompiled `core`/`alloc` of the host target are built for unwinding and reference these
// symbols; with panic=abort nothing ever unwinds, so they are never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    hypercall::fail(ErrorKind::Panic, format_args!("unwinding is not supported"))
}

/// Formats into a fixed buffer, cutting what does not fit (panics must not allocate).
pub(crate) struct FixedWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> FixedWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        FixedWriter { buf, len: 0 }
    }

    pub fn written(&self) -> usize {
        self.len
    }
}

impl core::fmt::Write for FixedWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

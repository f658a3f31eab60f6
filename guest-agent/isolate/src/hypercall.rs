//! Calls to the host: `out HYPERCALL_PORT, eax` with the call number in `eax` and the payload in
//! the mailbox (encodings in isolate_abi). The host handles the exit and answers in the mailbox
//! before it resumes the vCPU, so a call is synchronous.

use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use isolate_abi::encoding::Full;
use isolate_abi::{
    layout, BootInfo, Call, DecodeError, ErrorKind, FetchAnswer, Reader, Value, Writer,
};

use crate::FixedWriter;

static MAILBOX: AtomicU64 = AtomicU64::new(layout::MAILBOX);
static MAILBOX_SIZE: AtomicU64 = AtomicU64::new(layout::MAILBOX_SIZE);

pub fn init(boot: &BootInfo) {
    MAILBOX.store(boot.mailbox, Ordering::Relaxed);
    MAILBOX_SIZE.store(boot.mailbox_size, Ordering::Relaxed);
}

/// The mailbox, which only this (single-threaded) guest and the host, while the guest is stopped
/// in a hypercall, ever touch. Callers keep the slice only until their next call.
fn mailbox() -> &'static mut [u8] {
    let addr = MAILBOX.load(Ordering::Relaxed);
    let size = MAILBOX_SIZE.load(Ordering::Relaxed);
    // SAFETY: the host maps [addr, addr+size) as guest RAM reserved for the mailbox; the guest is
    // single-threaded and no two slices of it are alive at once (each call takes it anew).
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, size as usize) }
}

fn out(call: Call) {
    // SAFETY: a port write the host traps on (the TSS I/O bitmap lets ring 3 do it); it touches no
    // memory the compiler knows of, and the host changes only the mailbox, read after this.
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            in("dx") isolate_abi::HYPERCALL_PORT,
            in("eax") call as u32,
            options(nostack, preserves_flags)
        );
    }
}

pub fn ready() {
    out(Call::Ready);
}

pub fn log(message: &[u8]) {
    let mb = mailbox();
    let cut = message.len().min(mb.len() - 4);
    // Cannot fail: cut leaves room for the length.
    let _ = Writer::new(mb).bytes(&message[..cut]);
    out(Call::Log);
}

/// The value stored under `key`, copied by `copy` while it is in the mailbox.
pub fn kv_get<R>(key: &[u8], copy: impl FnOnce(Option<&[u8]>) -> R) -> Result<R, &'static str> {
    let mb = mailbox();
    Writer::new(mb)
        .bytes(key)
        .map_err(|_| "key larger than the mailbox")?;
    out(Call::KvGet);
    let mut r = Reader::new(mailbox());
    let found = r.u32().map_err(|_| "bad answer from the host")?;
    if found == 0 {
        return Ok(copy(None));
    }
    let value = r.bytes().map_err(|_| "bad answer from the host")?;
    Ok(copy(Some(value)))
}

/// Stores `value` under `key`; false when the host's store is full.
pub fn kv_put(key: &[u8], value: &[u8]) -> Result<bool, &'static str> {
    let mb = mailbox();
    let mut w = Writer::new(mb);
    w.bytes(key)
        .and_then(|_| w.bytes(value))
        .map_err(|_| "key and value larger than the mailbox")?;
    out(Call::KvPut);
    let ok = Reader::new(mailbox())
        .u32()
        .map_err(|_| "bad answer from the host")?;
    Ok(ok == 1)
}

/// An HTTP request through the host's egress policy: `write` encodes it into the mailbox
/// (`isolate_abi::fetch`), `read` sees the host's answer while it is there. Err when the request
/// does not fit the mailbox (nothing is sent then).
pub fn fetch<R>(
    write: impl FnOnce(&mut Writer<'_>) -> Result<(), Full>,
    read: impl FnOnce(Result<FetchAnswer<'_>, DecodeError>) -> R,
) -> Result<R, Full> {
    write(&mut Writer::new(mailbox()))?;
    out(Call::Fetch);
    Ok(read(FetchAnswer::decode(mailbox())))
}

/// Reports the results; the host ends the job here.
pub fn result(values: &[Value]) -> ! {
    let mut w = Writer::new(mailbox());
    let fits = w.u32(values.len() as u32).is_ok() && values.iter().all(|v| w.value(*v).is_ok());
    if !fits {
        fail(
            ErrorKind::Panic,
            format_args!("{} results do not fit the mailbox", values.len()),
        );
    }
    out(Call::Result);
    stopped()
}

/// Reports an error; the host ends the job here. Formats without allocating (this is also the
/// panic path, and the heap may be exhausted).
pub fn fail(kind: ErrorKind, message: core::fmt::Arguments<'_>) -> ! {
    let mb = mailbox();
    let (head, text) = mb.split_at_mut(8);
    let mut fw = FixedWriter::new(text);
    let _ = fw.write_fmt(message);
    let len = fw.written() as u32;
    head[..4].copy_from_slice(&(kind as u32).to_le_bytes());
    head[4..8].copy_from_slice(&len.to_le_bytes());
    out(Call::Error);
    stopped()
}

/// After a terminal call the host does not resume this vCPU; should it ever, ask again.
fn stopped() -> ! {
    loop {
        out(Call::Error);
    }
}

//! The probe: a tiny freestanding guest that checks the VMM's boot path from the inside.
//!
//! The VMM enters `_start` (entry.rs) in long mode at CPL 0 with RSI pointing at the zero page; a
//! four-instruction stub drops to ring 3, where everything else runs (ring 3 runs natively on the
//! development machine's KVM, ring 0 is emulated). Results go to COM1 as lines:
//!
//! - check lines `PROBE <name> <ok|fail> <details>`: `start`, `bootparams`, `e820`, `cmdline`,
//!   `mptable`, `cpuid`, `pio`, `virtio` (see checks.rs for each one's details);
//! - marker lines `PROBE done`, `PROBE spinning`, `PROBE triple-fault rip=<hex>`,
//!   `PROBE flood begin bytes=<n> fifo_depth=<n>`, `PROBE flood end bytes=<n> fnv1a64=<hex>`.
//!
//! `probe.mode=` on the command line selects what runs: `default` (the checks), `triple-fault`,
//! `spin`, `flood`, `hog` (touches every RAM page above 16 MiB: `PROBE hog begin ram_kib=<n>`,
//! `PROBE hog end touched_kib=<n>`), `hostile` (attacks every virtio-mmio device as a malicious
//! driver would, see hostile.rs, then `PROBE hostile end` and counts as `count` does) and
//! `count` (prints `PROBE count <n>` for n = 1, 2, ... forever, so a paused VM shows as a
//! console that stops growing). The probe ends with an i8042 reset (`out 0x64, 0xfe`) except in
//! the `triple-fault`, `spin`, `hostile` and `count` modes.

#![no_std]
#![no_main]

mod checks;
mod entry;
mod hog;
mod hostile;
mod hw;
mod mptable;
mod serial;
mod zeropage;

use core::fmt::{self, Write};

use freestanding as _;

use serial::{check_line, marker_line, Com1, Escaped};
use zeropage::ZeroPage;

#[derive(Clone, Copy)]
enum Mode {
    Default,
    TripleFault,
    Spin,
    Flood,
    Hog,
    Hostile,
    Count,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::TripleFault => "triple-fault",
            Mode::Spin => "spin",
            Mode::Flood => "flood",
            Mode::Hog => "hog",
            Mode::Hostile => "hostile",
            Mode::Count => "count",
        }
    }

    /// The last `probe.mode=` on the command line wins, as for kernel parameters.
    fn from_cmdline(cmdline: &[u8]) -> Result<Mode, &[u8]> {
        let value = cmdline
            .split(|&b| b == b' ')
            .filter_map(|arg| arg.strip_prefix(b"probe.mode="))
            .next_back();
        match value {
            None | Some(b"default") => Ok(Mode::Default),
            Some(b"triple-fault") => Ok(Mode::TripleFault),
            Some(b"spin") => Ok(Mode::Spin),
            Some(b"flood") => Ok(Mode::Flood),
            Some(b"hog") => Ok(Mode::Hog),
            Some(b"hostile") => Ok(Mode::Hostile),
            Some(b"count") => Ok(Mode::Count),
            Some(other) => Err(other),
        }
    }
}

/// Ring-3 entry point, called by `probe_ring3_entry` with the zero page address from RSI.
#[no_mangle]
pub extern "C" fn probe_main(zero_page: u64) -> ! {
    let zp = ZeroPage::at(zero_page);
    // A missing or unreadable command line selects the default mode; the `cmdline` check reports it.
    let cmdline = zp.and_then(|zp| zp.cmdline().ok()).unwrap_or(b"");
    let mode = match Mode::from_cmdline(cmdline) {
        Ok(mode) => mode,
        Err(unknown) => {
            check_line(
                "start",
                false,
                format_args!("unknown probe.mode={}", Escaped(unknown)),
            );
            marker_line("done");
            reset();
        }
    };
    check_line(
        "start",
        true,
        format_args!("mode={} zero_page={zero_page:#x}", mode.name()),
    );
    match mode {
        Mode::Default => {
            checks::bootparams(zero_page, zp);
            checks::e820(zp);
            checks::cmdline(zp);
            checks::mptable();
            checks::cpuid_check();
            checks::pio();
            checks::virtio();
            marker_line("done");
            reset();
        }
        Mode::TripleFault => triple_fault(),
        Mode::Spin => {
            marker_line("spinning");
            loop {
                core::hint::spin_loop();
            }
        }
        Mode::Flood => {
            flood();
            marker_line("done");
            reset();
        }
        Mode::Hog => {
            hog::hog(zp);
            marker_line("done");
            reset();
        }
        Mode::Hostile => {
            hostile::hostile(zp, cmdline);
            marker_line("hostile end");
            count()
        }
        Mode::Count => count(),
    }
}

/// Iterations of the spin loop between two `count` lines: keeps the console's growth (one VM exit
/// per byte) to a trickle.
const COUNT_SPIN: u64 = 1 << 20;

fn count() -> ! {
    let mut n: u64 = 0;
    loop {
        n += 1;
        marker_line(format_args!("count {n}"));
        for _ in 0..COUNT_SPIN {
            core::hint::spin_loop();
        }
    }
}

extern "C" {
    /// A lone `ud2` (below), so its address is the RIP the VMM must report for the triple fault.
    fn probe_ud2() -> !;
}

core::arch::global_asm!(
    ".section .text.probe_ud2, \"ax\"",
    ".global probe_ud2",
    ".type probe_ud2, @function",
    "probe_ud2:",
    "    ud2",
    ".size probe_ud2, . - probe_ud2",
);

/// `ud2` with no IDT: #UD cannot be delivered, nor can the #GP and #DF that follow, so the CPU
/// shuts down (triple fault) with RIP at the `ud2`.
fn triple_fault() -> ! {
    marker_line(format_args!(
        "triple-fault rip={:#x}",
        probe_ud2 as *const () as usize
    ));
    // SAFETY: probe_ud2 never returns; the fault ends the VM, nothing in Rust observes it.
    unsafe { probe_ud2() }
}

/// Size of the `flood` output between its begin and end markers.
/// 64 KiB: each byte is a VM exit, ~60 µs apiece on the PVM development hosts.
pub const FLOOD_BYTES: usize = 64 << 10;
const FLOOD_LINE: usize = 64;
const FLOOD_ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Writes `FLOOD_BYTES` bytes as 64-byte lines: line `i` is `i` as 8 hex digits, a space, 54
/// characters of `FLOOD_ALPHABET` starting at index `i % 62` (wrapping), and `\n`. The host can
/// regenerate the stream, and the end marker carries the FNV-1a 64 hash of exactly what was sent.
///
/// Each exit costs tens of microseconds on nested KVM, so the flood loads the UART's FIFO with
/// `rep outsb` (see `Com1::write_bytes_fifo`) rather than polling before every byte; this also
/// makes the VMM handle string I/O exits that carry many bytes.
fn flood() {
    let fifo_depth = Com1.enable_fifo();
    marker_line(format_args!(
        "flood begin bytes={FLOOD_BYTES} fifo_depth={fifo_depth}"
    ));
    let mut hash = Fnv1a64::new();
    let mut line = [0u8; FLOOD_LINE];
    for i in 0..FLOOD_BYTES / FLOOD_LINE {
        let mut prefix = LineBuf::new(&mut line[..9]);
        // 8 hex digits and a space fill the prefix exactly.
        let _ = write!(prefix, "{i:08x} ");
        for (j, b) in line[9..FLOOD_LINE - 1].iter_mut().enumerate() {
            *b = FLOOD_ALPHABET[(i + j) % FLOOD_ALPHABET.len()];
        }
        line[FLOOD_LINE - 1] = b'\n';
        hash.update(&line);
        Com1.write_bytes_fifo(&line, fifo_depth);
    }
    marker_line(format_args!(
        "flood end bytes={FLOOD_BYTES} fnv1a64={:#018x}",
        hash.0
    ));
}

struct Fnv1a64(u64);

impl Fnv1a64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A `fmt::Write` into a fixed buffer that fails instead of overflowing.
struct LineBuf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> LineBuf<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }
}

impl Write for LineBuf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Pulses the CPU reset line through the i8042, which the VMM treats as a clean end of the guest.
/// The VMM may act on it asynchronously, so the probe waits quietly (no output that could race
/// with the teardown).
fn reset() -> ! {
    hw::outb(I8042_COMMAND, I8042_RESET);
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    check_line("panic", false, info);
    marker_line("done");
    reset()
}

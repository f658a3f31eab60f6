//! Output on COM1, the 16550 UART the VMM emulates at 0x3f8. Every byte waits for the transmit
//! holding register to be empty (LSR bit 5), as a driver for real hardware must.

use core::fmt;

use crate::hw::{inb, outb, outsb};

const COM1_DATA: u16 = 0x3f8;
const COM1_IIR_FCR: u16 = COM1_DATA + 2;
const COM1_LSR: u16 = COM1_DATA + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
const FCR_ENABLE_AND_CLEAR_FIFOS: u8 = 0x07;
const IIR_FIFOS_ENABLED: u8 = 0xc0;
const UART_16550A_FIFO_DEPTH: usize = 16;

/// Writer for COM1. Line endings are a bare `\n`: the host reads the raw byte stream.
pub struct Com1;

impl Com1 {
    pub fn write_byte(&mut self, byte: u8) {
        while inb(COM1_LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        outb(COM1_DATA, byte);
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }

    /// Enables the FIFOs and returns how many bytes may follow one "transmitter empty" poll: 16 on
    /// a 16550A (IIR bits 7:6 read back as set), 1 on anything older. This is what Linux's 8250
    /// driver calls `tx_loadsz`.
    pub fn enable_fifo(&mut self) -> usize {
        outb(COM1_IIR_FCR, FCR_ENABLE_AND_CLEAR_FIFOS);
        if inb(COM1_IIR_FCR) & IIR_FIFOS_ENABLED == IIR_FIFOS_ENABLED {
            UART_16550A_FIFO_DEPTH
        } else {
            1
        }
    }

    /// Like `write_bytes`, but fills the FIFO with one string-I/O instruction (`rep outsb`) per
    /// "transmitter empty" poll: two VM exits per `fifo_depth` bytes instead of two per byte.
    pub fn write_bytes_fifo(&mut self, bytes: &[u8], fifo_depth: usize) {
        for chunk in bytes.chunks(fifo_depth.max(1)) {
            while inb(COM1_LSR) & LSR_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
            outsb(COM1_DATA, chunk);
        }
    }
}

impl fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints one check line: `PROBE <name> <ok|fail> <details>`.
pub fn check_line(name: &str, ok: bool, details: impl fmt::Display) {
    let status = if ok { "ok" } else { "fail" };
    // Com1's write_str never fails.
    let _ = fmt::Write::write_fmt(&mut Com1, format_args!("PROBE {name} {status} {details}\n"));
}

/// Prints a marker line: `PROBE <text>`.
pub fn marker_line(text: impl fmt::Display) {
    let _ = fmt::Write::write_fmt(&mut Com1, format_args!("PROBE {text}\n"));
}

/// Displays bytes as ASCII, escaping anything unprintable (and the backslash) as `\xNN` so that a
/// line stays one line whatever the guest memory held.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) && b != b'\\' {
                fmt::Write::write_char(f, char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

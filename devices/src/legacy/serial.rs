//! COM1: a 16550A UART (vm-superio) whose transmit side is the guest console.

use std::io::{self, Write};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::NoEvents;

use super::trigger::EventFdTrigger;

pub const SERIAL_COM1_BASE: u16 = 0x3f8;
pub const SERIAL_COM1_IRQ: u32 = 4;
pub const SERIAL_PORT_LEN: u16 = 8;

/// The guest writes the console one byte per port write (one VM exit each); the writer passed in
/// decides buffering. A write error on the host side (closed stdout, full disk) must not stop the
/// guest, so it is logged once and further output is dropped.
pub struct Serial {
    pub(super) inner: vm_superio::Serial<EventFdTrigger, NoEvents, SinkWriter>,
}

impl Serial {
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: vm_superio::Serial::new(interrupt, SinkWriter::new(out)),
        }
    }

    /// Pushes pending console output to its destination (called when the VM stops).
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.writer_mut().out.flush()
    }

    /// Feeds host input into the receive FIFO (and raises the interrupt if the guest enabled it).
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        self.inner
            .enqueue_raw_bytes(input)
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }
}

pub(super) struct SinkWriter {
    out: Box<dyn Write + Send>,
    failed: bool,
}

impl SinkWriter {
    pub(super) fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out, failed: false }
    }
}

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Ok(buf.len());
        }
        if let Err(e) = self.out.write_all(buf) {
            tracing::warn!("guest console output dropped from here on: {e}");
            self.failed = true;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.failed {
            return Ok(());
        }
        self.out.flush()
    }
}

impl MutDevicePio for Serial {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.inner.read(offset as u8);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.inner.write(offset as u8, value) {
                tracing::warn!("serial write at offset {offset}: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn trigger() -> EventFdTrigger {
        EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn transmitted_bytes_reach_the_writer_in_order() {
        let sink = Shared::default();
        let mut serial = Serial::new(trigger(), Box::new(sink.clone()));
        for b in b"hello\n" {
            serial.pio_write(PioAddress(SERIAL_COM1_BASE), 0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let mut serial = Serial::new(trigger(), Box::new(io::sink()));
        let mut lsr = [0u8];
        serial.pio_read(PioAddress(SERIAL_COM1_BASE), 5, &mut lsr);
        assert_eq!(lsr[0] & 0x20, 0x20, "THR empty bit must be set");
    }

    #[test]
    fn broken_output_does_not_stop_the_guest() {
        let mut serial = Serial::new(trigger(), Box::new(Broken));
        for _ in 0..3 {
            serial.pio_write(PioAddress(SERIAL_COM1_BASE), 0, b"x");
        }
        serial.flush().unwrap();
    }

    #[test]
    fn input_is_readable_from_the_receive_register() {
        let mut serial = Serial::new(trigger(), Box::new(io::sink()));
        serial.enqueue_input(b"a").unwrap();
        let mut rbr = [0u8];
        serial.pio_read(PioAddress(SERIAL_COM1_BASE), 0, &mut rbr);
        assert_eq!(rbr[0], b'a');
    }
}

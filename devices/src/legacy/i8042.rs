//! The i8042 keyboard controller, reduced to what a headless microVM needs: Linux with `reboot=k`
//! (and our test guests) reset the machine by writing 0xFE to its command port.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::I8042Device;

use super::trigger::CallbackTrigger;

pub const I8042_PORT_BASE: u16 = 0x60;
/// Data port 0x60 through command/status port 0x64.
pub const I8042_PORT_LEN: u16 = 5;

/// Status register bit 2 ("system flag"): set after a successful self-test. Linux's i8042 probe
/// reads the status port; a controller that answers 0xff everywhere looks absent, one that answers
/// 0 looks idle with no data, which is what we want.
pub struct I8042 {
    inner: I8042Device<CallbackTrigger>,
}

impl I8042 {
    /// `on_reset` runs on the vCPU thread that wrote the reset command.
    pub fn new(on_reset: CallbackTrigger) -> Self {
        Self {
            inner: I8042Device::new(on_reset),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.inner.read(offset as u8);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.inner.write(offset as u8, value) {
                tracing::warn!("i8042 reset trigger failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command_fires_callback_once_and_other_writes_do_not() {
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let mut dev = I8042::new(CallbackTrigger::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        let base = PioAddress(I8042_PORT_BASE);
        dev.pio_write(base, 0, &[0xfe]); // data port: not a reset
        dev.pio_write(base, 4, &[0xaa]); // self-test command: not a reset
        dev.pio_write(base, 4, &[]); // malformed access: ignored
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.pio_write(base, 4, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        let mut status = [0xffu8];
        dev.pio_read(base, 4, &mut status);
        assert_eq!(status[0], 0);
    }
}

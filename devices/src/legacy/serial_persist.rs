//! COM1's state in a snapshot: the UART registers and unread input (vm-superio's `SerialState`,
//! which has no serde support of its own, mirrored field for field).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};

use super::serial::{Serial, SinkWriter};
use super::trigger::EventFdTrigger;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Serial {
    pub fn save_state(&self) -> SerialSnapshot {
        self.inner.state().into()
    }

    /// COM1 as it was when `state` was saved, writing to `out`.
    pub fn from_snapshot(
        state: &SerialSnapshot,
        interrupt: EventFdTrigger,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let inner = vm_superio::Serial::from_state(
            &state.into(),
            interrupt,
            NoEvents,
            SinkWriter::new(out),
        )
        .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_device::bus::PioAddress;
    use vm_device::MutDevicePio;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn trigger() -> EventFdTrigger {
        EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn registers_and_pending_input_survive() {
        let mut serial = Serial::new(trigger(), Box::new(std::io::sink()));
        serial.pio_write(PioAddress(0x3f8), 7, &[0x5a]); // scratch
        serial.pio_write(PioAddress(0x3f8), 1, &[0x01]); // IER: receive interrupt
        serial.enqueue_input(b"hi").unwrap();
        let state = serial.save_state();

        let mut restored =
            Serial::from_snapshot(&state, trigger(), Box::new(std::io::sink())).unwrap();
        assert_eq!(restored.save_state(), state);
        let mut byte = [0u8];
        restored.pio_read(PioAddress(0x3f8), 7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        restored.pio_read(PioAddress(0x3f8), 0, &mut byte);
        assert_eq!(byte[0], b'h');
    }

    #[test]
    fn overfull_input_buffer_is_refused() {
        let serial = Serial::new(trigger(), Box::new(std::io::sink()));
        let mut state = serial.save_state();
        state.in_buffer = vec![0; 1 << 20];
        let err = Serial::from_snapshot(&state, trigger(), Box::new(std::io::sink()))
            .err()
            .unwrap();
        assert!(err.contains("serial state"), "{err}");
    }
}

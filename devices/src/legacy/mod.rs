//! Legacy PC devices the guest kernel expects on port I/O: the COM1 UART (console) and the i8042
//! keyboard controller (only for its CPU-reset line, which is how a microVM guest ends itself).

mod i8042;
mod serial;
mod serial_persist;
mod trigger;

pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{Serial, SERIAL_COM1_BASE, SERIAL_COM1_IRQ, SERIAL_PORT_LEN};
pub use serial_persist::SerialSnapshot;
pub use trigger::{CallbackTrigger, EventFdTrigger};

//! virtio-entropy (device ID 4): hands the guest random bytes from the host's getrandom(2).
//!
//! - device.rs: the device model (features, queue, activation, reset).
//! - event_handler.rs: its event-loop side (which EventFd means what).
//! - handler.rs: request processing, independent of the event loop.

mod device;
mod event_handler;
mod handler;

pub use device::{Rng, QUEUE_SIZE};
pub use handler::{EntropySource, GetRandom, ProcessOutcome, RequestHandler, MAX_REQUEST_BYTES};

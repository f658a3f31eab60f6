//! The agentvm host <-> guest agent protocol: versioned, length-prefixed binary frames over any
//! byte stream (a vsock connection in production, a Unix socket in tests).
//!
//! - [`frame`]: `u32 LE length | u8 kind | payload` framing, [`FrameReader`]/[`FrameWriter`] for
//!   blocking streams and [`FrameDecoder`] for event loops, with a [`MAX_PAYLOAD`] limit checked
//!   before any allocation.
//! - [`message`]: every message (postcard-encoded payloads), one frame kind each.
//! - [`hello`]: the version handshake.
//! - [`flow`]: per-stream window accounting for [`Data`].
//!
//! See README.md in this crate for the wire format and the rules of each service.

pub mod error;
pub mod flow;
pub mod frame;
pub mod hello;
pub mod message;
pub mod net;

pub use error::Error;
pub use flow::{RecvWindow, SendWindow};
pub use frame::{Frame, FrameDecoder, FrameReader, FrameWriter, HEADER_LEN, MAX_PAYLOAD};
pub use hello::{handshake, Features, Hello, Negotiated, Role, Version, MAGIC, PROTOCOL_VERSION};
pub use message::*;

/// The vsock port the guest agent listens on; the host reaches it through the VMM's vsock Unix
/// socket with `CONNECT 1024\n`.
pub const AGENT_VSOCK_PORT: u32 = 1024;

//! The agentvm guest agent: PID 1 inside the guest (see `main.rs`), its protocol server (the
//! host drives it over virtio-vsock), and the console's diagnostic markers the host shares with it.
//!
//! Everything the agent does is here as a library so it can be tested as an ordinary host
//! process; only the PID-1 sequencing lives in the binary.

pub mod cmdline;
pub mod console;
pub mod console_protocol;
pub mod egress_ca;
pub mod loopback;
pub mod modules;
pub mod mounts;
pub mod network;
pub mod power;
pub mod server;
pub mod services;
pub mod vsock;

//! Host-side client for the agentvm guest agent: a blocking API over one multiplexed protocol
//! connection (see `protocol/README.md`), used by the CLI, the API daemon, integration tests and
//! benchmarks.
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use agentvm_client::{AgentClient, ProcessSpec, ProcessSpecExt};
//!
//! let agent = AgentClient::connect_vsock_uds(Path::new("/run/vm.vsock"), 52, Duration::from_secs(5))?;
//! let output = agent.exec_output(ProcessSpec::shell("uname -a"))?;
//! print!("{}", String::from_utf8_lossy(&output.stdout));
//! # Ok::<(), agentvm_client::ClientError>(())
//! ```
//!
//! Threads: one reader thread per connection dispatches incoming messages by request id; calls
//! may be made from any number of threads. Every stream has its own credit window, so a consumer
//! that stops reading one stream holds back that stream only.

mod af_vsock;
mod call_reader;
mod client;
mod connect_retry;
mod connection;
mod error;
mod exec;
mod files;
mod inbound;
mod port;
mod process;
mod pty;
mod spec;
mod vsock;
mod watch;

pub use agentvm_protocol::{
    DirEntry, ErrorCode, ExitStatus, FileMetadata, FileType, Negotiated, ProcInfo, ProcessSpec,
    Stream, WatchEvent,
};
pub use client::{AgentClient, DEFAULT_CALL_TIMEOUT, HANDSHAKE_GRACE};
pub use error::{ClientError, Result};
pub use exec::{ExecController, ExecEvent, ExecHandle, ExecStdin, Output, DEFAULT_OUTPUT_LIMIT};
pub use files::WriteOptions;
pub use port::{ForwardHandle, ForwardListener, PortReader, PortStream, PortWriter};
pub use process::{BackgroundProcess, LogStopper, LogStream, ProcExit};
pub use pty::{PtyInput, PtySession};
pub use spec::ProcessSpecExt;
pub use watch::Watch;

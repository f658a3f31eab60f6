//! The agent's protocol server (see `protocol/README.md`): one [`serve_connection`] per host
//! connection, sharing one [`Services`] (the child reaper, the background process table).
//!
//! - `connection.rs`: handshake, reading loop, teardown.
//! - `dispatch.rs`: which handler serves which request; the one place to add a service.
//! - `context.rs`: [`RequestContext`], the API handlers use (windowed output, buffered input,
//!   close/kill/resize, the final message).
//! - `registry.rs`, `writer.rs`: a connection's live requests and its shared frame writer.
//! - `exec.rs`, `process_spec.rs`, `supervise.rs`, `input.rs`, `output.rs`: running processes
//!   for `Exec`; `pty.rs` for `PtyOpen`.
//! - `processes.rs`, `ring_log.rs`: background processes and their bounded logs.
//! - `reaper.rs`: the only `waitpid` caller.
//! - `unix_listener.rs`: host-process mode (`--listen-unix PATH`).
//! - `files.rs`, `watch.rs`, `port_forward.rs`, `after_restore.rs`: handlers of those services,
//!   whose logic lives in `crate::services`.

pub mod after_restore;
pub mod connection;
pub mod context;
mod dispatch;
mod exec;
pub(crate) mod fd;
pub mod files;
mod input;
mod output;
pub mod port_forward;
pub mod process_spec;
pub mod processes;
mod pty;
pub mod reaper;
mod registry;
mod ring_log;
mod supervise;
pub mod unix_listener;
pub mod watch;
mod writer;

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use agentvm_protocol::Features;

pub use connection::{advertise_protocol_version, agent_hello, serve_connection};
pub use context::{CloseSignal, Control, InputStream, RequestContext};
pub use processes::ProcessTable;
pub use reaper::Reaper;
pub use writer::ConnectionGone;

/// Why a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot set up the connection: {0}")]
    Setup(#[source] io::Error),
    #[error("handshake failed: {0}")]
    Handshake(#[source] agentvm_protocol::Error),
    #[error("connection dropped: {0}")]
    Protocol(#[source] agentvm_protocol::Error),
}

/// What outlives connections: the reaper and the background processes.
pub struct Services {
    pub reaper: Arc<Reaper>,
    pub processes: Arc<ProcessTable>,
}

impl Services {
    /// Starts the reaper thread. One `Services` per agent process.
    pub fn new() -> io::Result<Arc<Services>> {
        Ok(Arc::new(Services {
            reaper: Reaper::start()?,
            processes: Arc::new(ProcessTable::new()),
        }))
    }

    /// The services this agent implements, as advertised in its Hello.
    pub fn features(&self) -> Features {
        Features::EXEC
            | Features::PROCESSES
            | Features::PTY
            | Features::FILES
            | Features::WATCH
            | Features::PORT_FORWARD
            | Features::AFTER_RESTORE
    }
}

/// Accepts connections for ever, serving each on its own thread. Returns only when accepting
/// fails for a reason other than a transient one (an interrupted call, an aborted connection, or
/// running out of descriptors, which frees up as connections end).
pub fn serve_listener_forever(
    mut accept: impl FnMut() -> io::Result<UnixStream>,
    services: &Arc<Services>,
) -> io::Error {
    loop {
        let stream = match accept() {
            Ok(stream) => stream,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => continue,
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    eprintln!("agentvm-guest-agent: accept: {e}; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
                _ => return e,
            },
        };
        let services = Arc::clone(services);
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .spawn(move || {
                if let Err(e) = serve_connection(stream, &services) {
                    eprintln!("agentvm-guest-agent: {e}");
                }
            });
        if let Err(e) = spawned {
            eprintln!("agentvm-guest-agent: no thread for a new connection: {e}");
        }
    }
}

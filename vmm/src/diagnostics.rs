//! The state dump `agentvm` writes to its log on SIGUSR1: vCPU exit counts and, per virtio
//! device, its registers, ring positions and host connections. It is for a guest that stopped
//! making progress: a lost interrupt, a missed queue notification or a connection stuck on
//! credit each leave a different pattern of numbers (see
//! `devices::virtio::diagnostics::describe_queue`). Never blocks on a lock a stalled thread
//! may hold.

use std::sync::{Mutex, Weak};
use std::time::Duration;

use devices::virtio::diagnostics::try_lock_for;
use devices::virtio::MmioTransport;

use crate::vstate::exit_counts::ExitCounts;

/// How long each lock is tried before the dump says it is held.
const LOCK_WAIT: Duration = Duration::from_millis(500);

/// What a dump reads; cheap to clone, usable from any thread while the VM runs. It holds the
/// devices weakly: a handle kept past the VM's end must not keep a device, and so its host
/// sockets, alive (a vsock client would wait for ever for its connection to close).
#[derive(Clone)]
pub struct Diagnostics {
    pub(crate) transports: Vec<(&'static str, Weak<Mutex<MmioTransport>>)>,
    pub(crate) exits: ExitCounts,
}

impl Diagnostics {
    /// The dump, several lines.
    pub fn dump(&self) -> String {
        let exits: Vec<String> = self
            .exits
            .snapshot()
            .iter()
            .map(|(reason, n)| format!("{} {n}", reason.as_str()))
            .collect();
        let mut out = format!("state dump (SIGUSR1)\nvCPU exits: {}", exits.join(", "));
        for (name, transport) in &self.transports {
            out.push_str(&format!("\n{name}: "));
            let Some(transport) = transport.upgrade() else {
                out.push_str("gone (the VM has ended)");
                continue;
            };
            let described = try_lock_for(&transport, LOCK_WAIT).map(|t| t.diagnostics(LOCK_WAIT));
            match described {
                Some(text) => out.push_str(&text),
                None => out.push_str(&format!("transport lock held for more than {LOCK_WAIT:?}")),
            }
        }
        out
    }
}

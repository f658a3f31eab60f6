//! SIGINT/SIGTERM/SIGHUP end the VM through the same event channel as a guest exit, so teardown
//! (vCPU threads joined, console flushed) is identical whichever way a run ends. SIGUSR1 writes
//! a state dump to the log (see `vmm::diagnostics`) and changes nothing.
//!
//! The forwarding thread runs under the `vmm` seccomp filter, installed as it starts.

use std::thread::JoinHandle;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::{Handle, Signals};

use vmm::seccomp::{SeccompLevel, ThreadKind, ThreadSeccomp};

/// How long the new thread may take to put itself under its seccomp filter.
const FILTER_START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SignalForwarder {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl SignalForwarder {
    /// Calls `on_signal` on the signal thread for each SIGINT/SIGTERM/SIGHUP/SIGUSR1 until it
    /// returns false.
    pub fn start(
        mut on_signal: impl FnMut(i32) -> bool + Send + 'static,
        seccomp: SeccompLevel,
    ) -> Result<Self, String> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1])
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        let handle = signals.handle();
        let (filtered_tx, filtered) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let entered = ThreadSeccomp {
                    level: seccomp,
                    test_violation: false,
                }
                .enter(ThreadKind::Vmm)
                .map_err(|e| e.to_string());
                let ok = entered.is_ok();
                let _ = filtered_tx.send(entered);
                if !ok {
                    return;
                }
                for sig in signals.forever() {
                    if !on_signal(sig) {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
        let forwarder = Self {
            handle,
            thread: Some(thread),
        };
        match filtered.recv_timeout(FILTER_START_TIMEOUT) {
            Ok(Ok(())) => Ok(forwarder),
            Ok(Err(e)) => Err(format!("signal thread: {e}")),
            Err(_) => Err(format!(
                "the signal thread did not install its seccomp filter within {FILTER_START_TIMEOUT:?}"
            )),
        }
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The usual forwarding: SIGUSR1 logs `diagnostics`' dump (when there is a VM to describe),
/// every other signal becomes a [`VmmEvent::Signal`] that ends the VM.
pub fn to_vm(
    events: std::sync::mpsc::Sender<vmm::exit::VmmEvent>,
    diagnostics: Option<vmm::diagnostics::Diagnostics>,
) -> impl FnMut(i32) -> bool + Send + 'static {
    move |sig| {
        if is_dump_request(sig) {
            log_state_dump(diagnostics.as_ref());
            return true;
        }
        events.send(vmm::exit::VmmEvent::Signal(sig)).is_ok()
    }
}

/// Whether `sig` asks for a state dump rather than an end.
pub fn is_dump_request(sig: i32) -> bool {
    sig == SIGUSR1
}

/// Logs the state dump of the VM `diagnostics` describes (at WARN, so the default level shows it).
pub fn log_state_dump(diagnostics: Option<&vmm::diagnostics::Diagnostics>) {
    match diagnostics {
        Some(d) => tracing::warn!("{}", d.dump()),
        None => tracing::warn!("SIGUSR1: no VM to describe yet"),
    }
}

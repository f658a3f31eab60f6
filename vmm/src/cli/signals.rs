//! SIGINT/SIGTERM/SIGHUP end the VM through the same event channel as a guest exit, so teardown
//! (vCPU threads joined, console flushed) is identical whichever way a run ends.
//!
//! The forwarding thread runs under the `vmm` seccomp filter, installed as it starts.

use std::thread::JoinHandle;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use vmm::seccomp::{SeccompLevel, ThreadKind, ThreadSeccomp};

/// How long the new thread may take to put itself under its seccomp filter.
const FILTER_START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SignalForwarder {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl SignalForwarder {
    /// Calls `on_signal` on the signal thread for each SIGINT/SIGTERM/SIGHUP until it returns false.
    pub fn start(
        mut on_signal: impl FnMut(i32) -> bool + Send + 'static,
        seccomp: SeccompLevel,
    ) -> Result<Self, String> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
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

/// The usual forwarding: each signal becomes a [`VmmEvent::Signal`] that ends the VM.
pub fn to_vm(
    events: std::sync::mpsc::Sender<vmm::exit::VmmEvent>,
) -> impl FnMut(i32) -> bool + Send + 'static {
    move |sig| events.send(vmm::exit::VmmEvent::Signal(sig)).is_ok()
}

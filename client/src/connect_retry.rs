//! Retrying a connection to a guest agent that may not be up yet, with a growing pause: the
//! loop that hybrid vsock and AF_VSOCK connects share.

use std::time::{Duration, Instant};

/// Pause between attempts while the guest agent is not listening yet. Short, since boot-to-agent
/// latency is what callers measure; bounded so a long wait does not spin.
const RETRY_FIRST: Duration = Duration::from_millis(5);
const RETRY_MAX: Duration = Duration::from_millis(100);

/// An attempt that failed.
pub(crate) enum Attempt {
    /// Worth retrying: the guest or its agent is not there yet.
    Retry(String),
    /// Retrying cannot help.
    Fatal(String),
}

/// Why retrying ended without a connection.
pub(crate) enum GaveUp {
    Fatal(String),
    TimedOut { waited: Duration, last: String },
}

/// Calls `attempt` (with the deadline) until it connects, fails for good, or `timeout` passed.
pub(crate) fn retry_until<T>(
    timeout: Duration,
    mut attempt: impl FnMut(Instant) -> Result<T, Attempt>,
) -> Result<T, GaveUp> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut pause = RETRY_FIRST;
    loop {
        let last = match attempt(deadline) {
            Ok(connected) => return Ok(connected),
            Err(Attempt::Fatal(reason)) => return Err(GaveUp::Fatal(reason)),
            Err(Attempt::Retry(reason)) => reason,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(GaveUp::TimedOut {
                waited: now - started,
                last,
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(RETRY_MAX);
    }
}

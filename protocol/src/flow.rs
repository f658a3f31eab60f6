//! Per-stream flow control for [`Data`](crate::Data).
//!
//! Every stream (a request id plus a [`Stream`](crate::Stream), in one direction) starts with
//! [`INITIAL_WINDOW`] bytes of credit. The sender spends credit on the `data` bytes it sends and
//! stops at zero; the receiver returns credit with [`Window`](crate::Window) messages as the
//! consumer takes the data. So a stalled consumer of one stream stalls that stream's producer only,
//! never the connection or the other streams sharing it, and no receiver buffers more than
//! `INITIAL_WINDOW` per stream.

use crate::error::Error;
use crate::message::{INITIAL_WINDOW, MAX_CHUNK};

/// Credit beyond this is a protocol error (it also keeps the arithmetic far from overflow).
pub const MAX_WINDOW: u64 = (1 << 31) - 1;

/// The sending side's credit for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWindow {
    available: u64,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl SendWindow {
    pub fn new() -> Self {
        Self {
            available: INITIAL_WINDOW.into(),
        }
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> u64 {
        self.available
    }

    /// How many of `pending` bytes the next `Data` may carry: bounded by the credit and by
    /// [`MAX_CHUNK`]. Zero means wait for a `Window`.
    pub fn next_chunk(&self, pending: usize) -> usize {
        let credit = usize::try_from(self.available).unwrap_or(usize::MAX);
        pending.min(credit).min(MAX_CHUNK)
    }

    /// Records `n` bytes sent. Refuses (changing nothing) if that exceeds the credit.
    pub fn consume(&mut self, n: usize) -> Result<(), Error> {
        match self.available.checked_sub(n as u64) {
            Some(left) => {
                self.available = left;
                Ok(())
            }
            None => Err(Error::InvalidMessage {
                name: "Data",
                reason: format!("{n} bytes exceed the stream's window of {}", self.available),
            }),
        }
    }

    /// Applies a `Window` grant from the receiver.
    pub fn grant(&mut self, bytes: u32) -> Result<(), Error> {
        let total = self.available + u64::from(bytes);
        if total > MAX_WINDOW {
            return Err(Error::InvalidMessage {
                name: "Window",
                reason: format!("grant of {bytes} bytes raises the window above {MAX_WINDOW}"),
            });
        }
        self.available = total;
        Ok(())
    }
}

/// The receiving side's view of one stream: what the peer may still send, and what the consumer
/// has freed but not yet given back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvWindow {
    /// Credit the peer still has.
    outstanding: u64,
    /// Received, not yet consumed.
    buffered: u64,
    /// Consumed, not yet granted back.
    freed: u64,
}

impl Default for RecvWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvWindow {
    pub fn new() -> Self {
        Self {
            outstanding: INITIAL_WINDOW.into(),
            buffered: 0,
            freed: 0,
        }
    }

    /// Bytes received and not yet consumed: never more than [`INITIAL_WINDOW`].
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// Records a received `Data` of `n` bytes. An error means the peer ignored its window (a
    /// protocol violation, answered with an `ErrorMsg` of code `Protocol`).
    pub fn received(&mut self, n: usize) -> Result<(), Error> {
        match self.outstanding.checked_sub(n as u64) {
            Some(left) => {
                self.outstanding = left;
                self.buffered += n as u64;
                Ok(())
            }
            None => Err(Error::InvalidMessage {
                name: "Data",
                reason: format!(
                    "peer sent {n} bytes with only {} bytes of window left",
                    self.outstanding
                ),
            }),
        }
    }

    /// Records that the consumer took `n` bytes (at most what is buffered; more is clamped).
    /// Returns the grant to send as a `Window` message, once enough was freed to be worth one
    /// (half the initial window), and counts it as given.
    pub fn consumed(&mut self, n: usize) -> Option<u32> {
        let n = (n as u64).min(self.buffered);
        self.buffered -= n;
        self.freed += n;
        if self.freed < u64::from(INITIAL_WINDOW / 2) {
            return None;
        }
        let grant = u32::try_from(self.freed).unwrap_or(u32::MAX);
        self.freed -= u64::from(grant);
        self.outstanding += u64::from(grant);
        Some(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_stops_at_zero_credit_and_resumes_on_grant() {
        let mut tx = SendWindow::new();
        let mut rx = RecvWindow::new();
        let mut sent = 0u64;
        loop {
            let n = tx.next_chunk(usize::MAX);
            if n == 0 {
                break;
            }
            assert!(n <= MAX_CHUNK);
            tx.consume(n).unwrap();
            rx.received(n).unwrap();
            sent += n as u64;
        }
        assert_eq!(sent, u64::from(INITIAL_WINDOW));
        assert_eq!(rx.buffered(), u64::from(INITIAL_WINDOW));
        assert!(tx.consume(1).is_err());
        assert!(rx.received(1).is_err());

        // A small consumption is not worth a Window message yet.
        assert_eq!(rx.consumed(1000), None);
        let grant = rx.consumed(INITIAL_WINDOW as usize).unwrap();
        assert_eq!(u64::from(grant), u64::from(INITIAL_WINDOW));
        assert_eq!(rx.buffered(), 0);
        tx.grant(grant).unwrap();
        assert_eq!(tx.available(), u64::from(INITIAL_WINDOW));
        rx.received(INITIAL_WINDOW as usize).unwrap();
    }

    #[test]
    fn refused_consumption_changes_nothing() {
        let mut tx = SendWindow::new();
        tx.consume(INITIAL_WINDOW as usize - 10).unwrap();
        assert!(tx.consume(11).is_err());
        assert_eq!(tx.available(), 10);
        assert_eq!(tx.next_chunk(100), 10);
    }

    #[test]
    fn grant_beyond_max_window_is_an_error() {
        let mut tx = SendWindow::new();
        assert!(tx.grant(u32::MAX).is_err());
        assert_eq!(tx.available(), u64::from(INITIAL_WINDOW));
        tx.grant((MAX_WINDOW - u64::from(INITIAL_WINDOW)) as u32)
            .unwrap();
        assert_eq!(tx.available(), MAX_WINDOW);
        assert!(tx.grant(1).is_err());
    }
}

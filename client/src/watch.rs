//! Filesystem watches.

use std::time::Duration;

use agentvm_protocol::{Message, WatchEvent, WatchStart};

use crate::client::AgentClient;
use crate::connection::Call;
use crate::error::{ClientError, Result};

impl AgentClient {
    /// Watches `path` (with `recursive`, the whole tree, including directories created later),
    /// reporting changes whose path relative to `path` matches some `include` glob (or any, when
    /// empty) and no `exclude` glob. Returns once the watches are in place, so every change made
    /// after this returns is reported.
    pub fn watch(
        &self,
        path: &str,
        recursive: bool,
        include: &[&str],
        exclude: &[&str],
    ) -> Result<Watch> {
        let to_strings = |globs: &[&str]| globs.iter().map(|g| g.to_string()).collect();
        let mut call = self.start(|id| {
            Message::WatchStart(WatchStart {
                id,
                path: path.to_string(),
                recursive,
                include: to_strings(include),
                exclude: to_strings(exclude),
            })
        })?;
        let what = format!("the watch on {path} to be set up");
        match self.next(&mut call, &what)? {
            Message::Ready(_) => Ok(Watch {
                call,
                path: path.to_string(),
                call_timeout: self.call_timeout,
            }),
            other => Err(call.unexpected(&other, &what)),
        }
    }
}

/// A running watch. Dropping it stops the watch in the guest.
pub struct Watch {
    call: Call,
    path: String,
    call_timeout: Duration,
}

impl Watch {
    /// The next batch of events, or an empty batch if none came within `timeout`.
    pub fn next_events(&mut self, timeout: Duration) -> Result<Vec<WatchEvent>> {
        if self.call.is_done() {
            return Err(ClientError::Protocol(format!(
                "the watch on {} already ended",
                self.path
            )));
        }
        let what = format!("events of the watch on {}", self.path);
        match self.call.next(Some(timeout), &what) {
            Ok(Message::WatchEvents(batch)) => Ok(batch.events),
            Ok(Message::Done(_)) => Err(ClientError::Protocol(format!(
                "the guest agent ended the watch on {} unasked",
                self.path
            ))),
            Ok(other) => Err(self.call.unexpected(&other, &what)),
            Err(ClientError::TimedOut { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Stops the watch and waits (within the call timeout) for the agent to confirm. Events
    /// still in flight are dropped.
    pub fn stop(mut self) -> Result<()> {
        if self.call.is_done() {
            return Ok(());
        }
        self.call.link().close()?;
        let what = format!("the watch on {} to stop", self.path);
        loop {
            match self.call.next(Some(self.call_timeout), &what)? {
                Message::WatchEvents(_) => {}
                Message::Done(_) => return Ok(()),
                other => return Err(self.call.unexpected(&other, &what)),
            }
        }
    }
}

//! Waiting for a spawned process while acting on the host's `Kill`/`Close` and the spec's
//! timeout: shared by exec and PTY requests.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use agentvm_protocol::{ErrorCode, ExitStatus, Exited, Message};

use super::context::{Control, RequestContext};
use super::fd::signal_group;

/// How long a hung-up PTY session has to exit before it is killed.
pub(crate) const HANGUP_GRACE: Duration = Duration::from_secs(2);

pub(crate) enum Event {
    Exited(ExitStatus),
    Control(Control),
}

/// What `Close` does to the process group.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnClose {
    Kill,
    /// SIGHUP, then SIGKILL after [`HANGUP_GRACE`].
    HangUp,
}

pub(crate) struct Outcome {
    pub(crate) status: ExitStatus,
    pub(crate) timed_out: bool,
}

/// Spawns `command` through the reaper, which sends its exit to [`supervise`] on `events`.
pub(crate) fn spawn_supervised(
    ctx: &RequestContext,
    command: &mut Command,
    events: &Sender<Event>,
) -> io::Result<Child> {
    let exit_tx = events.clone();
    ctx.services().reaper.spawn_with(command, move |status| {
        let _ = exit_tx.send(Event::Exited(status));
    })
}

/// Answers the request that ran process `pid` with its `Exited`, or, if its exit was lost (see
/// [`supervise`]), with an error; `kind` names the request in that error ("request", "PTY").
pub(crate) fn finish(ctx: RequestContext, pid: u32, outcome: Option<Outcome>, kind: &str) {
    let id = ctx.id();
    match outcome {
        Some(outcome) => ctx.finish(Message::Exited(Exited {
            id,
            status: outcome.status,
            timed_out: outcome.timed_out,
        })),
        None => ctx.fail(
            ErrorCode::Internal,
            format!("lost track of process {pid} of {kind} {id}"),
        ),
    }
}

/// Runs until the process `pgid` exits; `None` if the event channel broke, which cannot happen
/// while the reaper holds its sender. `Resize` is the PTY's business (it applies it at once).
pub(crate) fn supervise(
    ctx: &RequestContext,
    pgid: u32,
    events: &Receiver<Event>,
    timeout: Option<Duration>,
    on_close: OnClose,
) -> Option<Outcome> {
    let mut timeout_at = timeout.map(|t| Instant::now() + t);
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        let next = [timeout_at, kill_at].into_iter().flatten().min();
        let event = match next {
            Some(at) => events.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Ok(Event::Exited(status)) => return Some(Outcome { status, timed_out }),
            Ok(Event::Control(Control::Kill { signal })) => {
                if let Err(e) = signal_group(pgid, signal) {
                    if e.raw_os_error() != Some(libc::ESRCH) {
                        report(
                            ctx,
                            format!("cannot send signal {signal} to process group {pgid}: {e}"),
                        );
                    }
                }
            }
            Ok(Event::Control(Control::Resize { .. })) => {}
            Ok(Event::Control(Control::Close)) => match on_close {
                OnClose::Kill => {
                    let _ = signal_group(pgid, libc::SIGKILL);
                }
                OnClose::HangUp => {
                    let _ = signal_group(pgid, libc::SIGHUP);
                    let _ = signal_group(pgid, libc::SIGCONT);
                    kill_at.get_or_insert(Instant::now() + HANGUP_GRACE);
                }
            },
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if timeout_at.is_some_and(|at| at <= now) {
                    timed_out = true;
                    timeout_at = None;
                    let _ = signal_group(pgid, libc::SIGKILL);
                }
                if kill_at.is_some_and(|at| at <= now) {
                    kill_at = None;
                    let _ = signal_group(pgid, libc::SIGKILL);
                }
            }
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// A complaint about a message that is not a request (so it has no answer of its own).
fn report(ctx: &RequestContext, message: String) {
    let _ = ctx.send(&agentvm_protocol::Message::ErrorMsg(
        agentvm_protocol::ErrorMsg {
            id: 0,
            code: ErrorCode::InvalidArgument,
            message: format!("Kill for request {}: {message}", ctx.id()),
        },
    ));
}

//! Terminal sessions: `POST /sandbox/pty` starts a process on a guest pseudo-terminal and
//! upgrades the connection to its raw bytes (see [`super::upgrade`]); the 101 names the session
//! in `X-Agentvm-Pty-Id`. A raw stream has no room for a trailer, so the exit status is asked
//! for separately (`GET /sandbox/pty/{id}`, set before the server closes the stream), and so is
//! a new window size (`POST /sandbox/pty/{id}/resize`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use agentvm_client::{ExitStatus, PtyInput};
use hyper::header::HeaderMap;
use hyper::upgrade::OnUpgrade;
use tokio::sync::oneshot;

use super::agent::agent_fault;
use super::fault::Fault;
use super::handlers::{lock, ApiContext, Reply};
use super::models::{parse_body, SandboxPty, SandboxPtyResize, SandboxPtyStatus};
use super::sandbox::{first_answer, process_spec};
use super::upgrade::{self, OutputEnd, OUTPUT_POLL, PTY_PROTOCOL};

/// Ended sessions whose status stays available; the oldest are forgotten first. Running ones
/// are bounded by the job limit.
const MAX_ENDED_SESSIONS: usize = 256;

/// The VM's terminal sessions by id. Cheap to clone.
#[derive(Clone, Default)]
pub struct PtySessions(Arc<Mutex<Sessions>>);

#[derive(Default)]
struct Sessions {
    last_id: u64,
    entries: BTreeMap<u64, Session>,
}

struct Session {
    /// While the process runs: its input side, for resizes.
    input: Option<PtyInput>,
    status: SandboxPtyStatus,
}

impl PtySessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // Every update is one statement on the map; a panic elsewhere leaves it consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, input: PtyInput) -> u64 {
        let mut sessions = self.lock();
        sessions.last_id += 1;
        let id = sessions.last_id;
        let status = SandboxPtyStatus {
            id,
            running: true,
            exit_code: None,
            signal: None,
            timed_out: false,
            error: None,
        };
        sessions.entries.insert(
            id,
            Session {
                input: Some(input),
                status,
            },
        );
        let ended: Vec<u64> = sessions
            .entries
            .iter()
            .filter(|(_, session)| !session.status.running)
            .map(|(&id, _)| id)
            .collect();
        for old in ended
            .iter()
            .take(ended.len().saturating_sub(MAX_ENDED_SESSIONS))
        {
            sessions.entries.remove(old);
        }
        id
    }

    fn ended(&self, id: u64, exit: Option<(ExitStatus, bool)>, error: Option<String>) {
        if let Some(session) = self.lock().entries.get_mut(&id) {
            session.input = None;
            let status = &mut session.status;
            status.running = false;
            match exit {
                Some((ExitStatus::Code(code), timed_out)) => {
                    status.exit_code = Some(code);
                    status.timed_out = timed_out;
                }
                Some((ExitStatus::Signal(signal), timed_out)) => {
                    status.signal = Some(signal);
                    status.timed_out = timed_out;
                }
                None => status.error = error,
            }
        }
    }

    fn status(&self, what: &str, id: u64) -> Result<SandboxPtyStatus, Fault> {
        self.lock()
            .entries
            .get(&id)
            .map(|session| session.status.clone())
            .ok_or_else(|| unknown(what, id))
    }

    fn input(&self, what: &str, id: u64) -> Result<PtyInput, Fault> {
        let sessions = self.lock();
        let session = sessions.entries.get(&id).ok_or_else(|| unknown(what, id))?;
        session
            .input
            .clone()
            .ok_or_else(|| Fault::conflict(format!("{what}: terminal session {id} has ended")))
    }
}

fn unknown(what: &str, id: u64) -> Fault {
    Fault::not_found(format!(
        "{what}: no terminal session {id} (ids come from POST /sandbox/pty's X-Agentvm-Pty-Id)"
    ))
}

/// `POST /sandbox/pty`: 101 once the process runs on its terminal; then the connection is the
/// terminal (client bytes are keyboard input, server bytes its output) until the process exits.
/// Closing the client's write half hangs up the terminal (SIGHUP), as closing a window does.
pub async fn open(
    ctx: &ApiContext,
    headers: &HeaderMap,
    on_upgrade: OnUpgrade,
    body: &[u8],
) -> Result<Reply, Fault> {
    const WHAT: &str = "POST /sandbox/pty";
    upgrade::require_upgrade(WHAT, headers, PTY_PROTOCOL)?;
    let request: SandboxPty = parse_body(WHAT, body)?;
    let cmd = request.cmd.unwrap_or_else(|| vec!["sh".to_string()]);
    let spec = process_spec(
        WHAT,
        &cmd,
        request.env.as_ref(),
        request.cwd.as_deref(),
        request.user.as_deref(),
        request.timeout_ms,
    )?;
    if request.cols == 0 || request.rows == 0 {
        return Err(Fault::bad_request(format!(
            "{WHAT}: cols and rows must be at least 1"
        )));
    }
    let term = request.term.unwrap_or_else(|| "xterm".to_string());
    let uds = lock(&ctx.controller).agent_uds(WHAT)?;
    let (job, connection) = upgrade::channels();
    let (started_tx, started) = oneshot::channel();
    let worker = ctx.agent.clone();
    let sessions = ctx.pty_sessions.clone();
    ctx.agent.submit(move || {
        let opened = worker.client(&uds).and_then(|client| {
            client
                .pty_open(spec, &term, request.rows, request.cols)
                .map_err(|e| agent_fault(WHAT, e))
        });
        let mut session = match opened {
            Ok(session) => session,
            Err(fault) => return drop(started_tx.send(Err(fault))),
        };
        let input = session.input();
        let hang_up = session.input();
        let fed = upgrade::spawn_input_feeder(
            job.input,
            move |bytes| input.write_input(bytes).map_err(std::io::Error::other),
            move || {
                if let Err(e) = hang_up.close() {
                    tracing::debug!("{WHAT}: hang-up not delivered: {e}");
                }
            },
        );
        if let Err(e) = fed {
            let fault = Fault::internal(format!("{WHAT}: cannot start the input thread: {e}"));
            return drop(started_tx.send(Err(fault)));
        }
        let id = sessions.add(session.input());
        if started_tx.send(Ok(id)).is_err() {
            return sessions.ended(id, None, Some("the HTTP client went away".into()));
        }
        session.set_read_timeout(Some(OUTPUT_POLL));
        // Recorded before the output channel closes, so a client that saw the stream end finds
        // the exit status.
        match upgrade::pump_output(&mut session, &job.output) {
            OutputEnd::Eof => sessions.ended(id, session.exit(), None),
            OutputEnd::ClientGone => {
                // Dropping the session hangs up; its exit status is not awaited.
                sessions.ended(id, None, Some("the HTTP client went away".into()))
            }
            OutputEnd::Failed(e) => sessions.ended(id, None, Some(e.to_string())),
        }
    })?;
    let id = first_answer(started, WHAT).await?;
    upgrade::pump(on_upgrade, connection, format!("{WHAT} {id}"));
    Ok(Reply::SwitchingProtocols {
        protocol: PTY_PROTOCOL,
        pty_id: Some(id),
    })
}

/// `GET /sandbox/pty/{id}`.
pub fn status(ctx: &ApiContext, param: Option<&str>) -> Result<Reply, Fault> {
    const WHAT: &str = "GET /sandbox/pty";
    let id = session_id(WHAT, param)?;
    let status = ctx.pty_sessions.status(WHAT, id)?;
    serde_json::to_string(&status)
        .map(Reply::Json)
        .map_err(|e| Fault::internal(format!("cannot encode the answer: {e}")))
}

/// `POST /sandbox/pty/{id}/resize`: the foreground program gets SIGWINCH.
pub async fn resize(ctx: &ApiContext, param: Option<&str>, body: &[u8]) -> Result<Reply, Fault> {
    const WHAT: &str = "POST /sandbox/pty/{id}/resize";
    let id = session_id(WHAT, param)?;
    let size: SandboxPtyResize = parse_body(WHAT, body)?;
    if size.cols == 0 || size.rows == 0 {
        return Err(Fault::bad_request(format!(
            "{WHAT}: cols and rows must be at least 1"
        )));
    }
    let input = ctx.pty_sessions.input(WHAT, id)?;
    let (answer_tx, answer) = oneshot::channel();
    // A blocking socket write: on a job thread, as every agent call.
    ctx.agent.submit(move || {
        let resized = input
            .resize(size.rows, size.cols)
            .map_err(|e| agent_fault(WHAT, e));
        let _ = answer_tx.send(resized);
    })?;
    first_answer(answer, WHAT).await?;
    Ok(Reply::NoContent)
}

fn session_id(what: &str, param: Option<&str>) -> Result<u64, Fault> {
    let text = param.unwrap_or_default();
    text.parse().map_err(|_| {
        Fault::bad_request(format!(
            "{what}: {text:?} is not a terminal session id (a number)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_numbers() {
        assert_eq!(session_id("x", Some("12")).unwrap(), 12);
        assert!(session_id("x", Some("a")).is_err());
        assert!(session_id("x", None).is_err());
        let sessions = PtySessions::default();
        assert_eq!(
            sessions.status("x", 1).unwrap_err().status,
            hyper::StatusCode::NOT_FOUND
        );
    }
}

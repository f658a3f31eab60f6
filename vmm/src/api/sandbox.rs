//! The agent extensions under `/sandbox/...`: exec with a streamed NDJSON answer, and files
//! (read, write, list), each served by a job thread of the [`AgentWorker`] talking to the guest
//! agent. Bodies in both directions are streamed through bounded channels, so neither a large
//! file nor a chatty process makes the VMM buffer without bound.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentvm_client::{ExecEvent, FileType, ProcessSpec, ProcessSpecExt, WriteOptions};
use agentvm_protocol::{ExitStatus, MAX_CHUNK};
use base64::Engine;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::CONTENT_LENGTH;
use hyper::{Request, StatusCode};
use tokio::sync::{mpsc, oneshot};

use super::agent::{agent_fault, AGENT_CONNECT_TIMEOUT};
use super::audit::Peer;
use super::exec_trace::{ExecEnd, ExecTrace};
use super::fault::Fault;
use super::handlers::{lock, ApiBody, ApiContext, Reply};
use super::models::{parse_body, SandboxDirEntry, SandboxExec};
use super::server::BODY_TIMEOUT;

/// The body limit of `PUT /sandbox/files` (other requests keep the API's small limit).
pub const MAX_FILE_UPLOAD_BYTES: u64 = 64 * 1024 * 1024;
/// Chunks in flight between a job thread and the HTTP connection, each at most the protocol's
/// chunk size: this bounds the memory one streaming request holds.
pub(super) const STREAM_DEPTH: usize = 8;
/// How long a request waits for its job's first answer: a restored VM's after-restore step
/// (which the job waits for first), connecting, and one agent call.
const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(
    super::after_restore::GATE_WAIT_LIMIT.as_secs()
        + AGENT_CONNECT_TIMEOUT.as_secs()
        + agentvm_client::DEFAULT_CALL_TIMEOUT.as_secs()
        + 5,
);
/// How often a streaming job with no output checks whether its HTTP client went away.
pub(super) const CLIENT_GONE_POLL: Duration = Duration::from_secs(1);

pub(super) type Chunks = mpsc::Receiver<Result<Bytes, io::Error>>;

/// `POST /sandbox/exec`: 200 once the process started; the body streams one JSON object per
/// line: `{"stdout": b64}`, `{"stderr": b64}`, finally `{"exit_code": N, "timed_out": bool}` or
/// `{"signal": N, "timed_out": bool}`, or `{"error": "..."}` if the agent connection broke.
///
/// Every exec handed to the guest agent ends in the exec metrics and, if there is one, the audit
/// log ([`ExecTrace`]), whether it exited, failed to start, broke or lost its client.
pub async fn exec(ctx: &ApiContext, body: &[u8], peer: Option<Peer>) -> Result<Reply, Fault> {
    const WHAT: &str = "POST /sandbox/exec";
    let began = Instant::now();
    let request: SandboxExec = parse_body(WHAT, body)?;
    let spec = process_spec(
        WHAT,
        &request.cmd,
        request.env.as_ref(),
        request.cwd.as_deref(),
        request.user.as_deref(),
        request.timeout_ms,
    )?;
    let (uds, observer) = {
        let controller = lock(&ctx.controller);
        (controller.agent_uds(WHAT)?, controller.exec_observer())
    };
    let trace = ExecTrace::new(observer, &request, spec.user.as_deref(), peer, began);
    let (lines_tx, lines) = mpsc::channel(STREAM_DEPTH);
    let (started_tx, started) = oneshot::channel();
    let worker = ctx.agent.clone();
    ctx.agent.submit(move || {
        let refused = |trace: ExecTrace, started_tx: oneshot::Sender<_>, fault: Fault| {
            trace.end(ExecEnd::Failed(fault.message.clone()));
            drop(started_tx.send(Err(fault)));
        };
        let client = match worker.client(&uds) {
            Ok(client) => client,
            Err(fault) => return refused(trace, started_tx, fault),
        };
        let mut handle = match client.exec(spec, request.stdin.is_some()) {
            Ok(handle) => handle,
            Err(e) => return refused(trace, started_tx, agent_fault(WHAT, e)),
        };
        if let (Some(text), Some(mut stdin)) = (request.stdin, handle.take_stdin()) {
            // On its own thread: a process that writes before it reads must not stall on output
            // this thread has not consumed yet.
            let feeder = std::thread::Builder::new()
                .name("agent-stdin".into())
                .spawn(move || {
                    crate::seccomp::violation::label_current_thread(
                        crate::seccomp::ThreadKind::AgentJobs,
                    );
                    if let Err(e) = stdin.write_all(text.as_bytes()) {
                        tracing::debug!("exec stdin not fully written: {e}");
                    }
                });
            if let Err(e) = feeder {
                let _ = handle.close();
                let fault = Fault::internal(format!("{WHAT}: cannot start the stdin thread: {e}"));
                return refused(trace, started_tx, fault);
            }
        }
        if started_tx.send(Ok(())).is_err() {
            return;
        }
        // Each way out of this loop ends the trace: with the exit status or error, or (by
        // dropping it) as abandoned when the HTTP client went away first.
        let mut trace = Some(trace);
        loop {
            let line = match handle.next_event_timeout(CLIENT_GONE_POLL) {
                Ok(Some(event)) => {
                    if let Some(trace) = trace.as_mut() {
                        trace.saw(&event);
                    }
                    if let ExecEvent::Exited { status, timed_out } = &event {
                        // The end counts once the process ended, whether or not its client
                        // reads it.
                        if let Some(trace) = trace.take() {
                            trace.end(ExecEnd::Exited {
                                status: *status,
                                timed_out: *timed_out,
                            });
                        }
                    }
                    event_line(&event)
                }
                Ok(None) => {
                    if let Some(trace) = trace.take() {
                        let error = "the guest agent ended the exec without an exit status";
                        trace.end(ExecEnd::Failed(error.into()));
                    }
                    return;
                }
                Err(agentvm_client::ClientError::TimedOut { .. }) => {
                    if lines_tx.is_closed() {
                        // Dropping the handle kills the process group.
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    if let Some(trace) = trace.take() {
                        trace.end(ExecEnd::Failed(e.to_string()));
                    }
                    serde_json::json!({ "error": e.to_string() })
                }
            };
            let ended = line.get("error").is_some();
            let mut text = line.to_string();
            text.push('\n');
            if lines_tx.blocking_send(Ok(Bytes::from(text))).is_err() || ended {
                return;
            }
        }
    })?;
    first_answer(started, WHAT).await?;
    Ok(Reply::Stream {
        content_type: "application/x-ndjson",
        body: stream_body(lines),
    })
}

/// The guest process `what` (a request) asks for, its fields checked.
pub(super) fn process_spec(
    what: &str,
    cmd: &[String],
    env: Option<&BTreeMap<String, String>>,
    cwd: Option<&str>,
    user: Option<&str>,
    timeout_ms: Option<u64>,
) -> Result<ProcessSpec, Fault> {
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err(Fault::bad_request(format!(
            "{what}: cmd must be a non-empty argv, e.g. [\"sh\", \"-c\", \"ls\"]"
        )));
    }
    let mut spec = ProcessSpec::argv(cmd.iter().cloned());
    for (key, value) in env.into_iter().flatten() {
        if key.is_empty() || key.contains('=') {
            return Err(Fault::bad_request(format!(
                "{what}: env name {key:?} must be non-empty and without '='"
            )));
        }
        spec = spec.env(key.clone(), value.clone());
    }
    if let Some(cwd) = cwd {
        check_absolute(&format!("{what}: cwd"), cwd)?;
        spec = spec.cwd(cwd.to_string());
    }
    if let Some(user) = user {
        if user.is_empty() {
            return Err(Fault::bad_request(format!(
                "{what}: user must be a name, a uid or uid:gid"
            )));
        }
        spec = spec.user(user.to_string());
    }
    match timeout_ms {
        Some(0) => {
            return Err(Fault::bad_request(format!(
                "{what}: timeout_ms must be at least 1"
            )))
        }
        Some(ms) => spec = spec.timeout(Duration::from_millis(ms)),
        None => {}
    }
    Ok(spec)
}

fn event_line(event: &ExecEvent) -> serde_json::Value {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    match event {
        ExecEvent::Stdout(bytes) => serde_json::json!({ "stdout": b64(bytes) }),
        ExecEvent::Stderr(bytes) => serde_json::json!({ "stderr": b64(bytes) }),
        ExecEvent::Exited {
            status: ExitStatus::Code(code),
            timed_out,
        } => serde_json::json!({ "exit_code": code, "timed_out": timed_out }),
        ExecEvent::Exited {
            status: ExitStatus::Signal(signal),
            timed_out,
        } => serde_json::json!({ "signal": signal, "timed_out": timed_out }),
    }
}

/// `GET /sandbox/files?path=/abs`: the file's bytes, streamed.
pub async fn get_file(ctx: &ApiContext, query: Option<&str>) -> Result<Reply, Fault> {
    const WHAT: &str = "GET /sandbox/files";
    let path = path_param(WHAT, query)?;
    let uds = lock(&ctx.controller).agent_uds(WHAT)?;
    let (chunks_tx, chunks) = mpsc::channel(STREAM_DEPTH);
    let (started_tx, started) = oneshot::channel();
    let worker = ctx.agent.clone();
    ctx.agent.submit(move || {
        let checked = worker.client(&uds).and_then(|client| {
            let metadata = client.stat(&path, true).map_err(|e| agent_fault(WHAT, e))?;
            match metadata.file_type {
                FileType::File => Ok(client),
                FileType::Dir => Err(Fault::bad_request(format!(
                    "{WHAT}: {path} is a directory (list it with GET /sandbox/files/list)"
                ))),
                _ => Err(Fault::bad_request(format!(
                    "{WHAT}: {path} is not a regular file"
                ))),
            }
        });
        let client = match checked {
            Ok(client) => client,
            Err(fault) => return drop(started_tx.send(Err(fault))),
        };
        if started_tx.send(Ok(())).is_err() {
            return;
        }
        let mut sink = ChunkSender(chunks_tx.clone());
        if let Err(e) = client.read_file(&path, 0, None, &mut sink) {
            // Aborts the response body: the client sees a truncated transfer, never a short file
            // passed off as whole.
            let _ = chunks_tx.blocking_send(Err(io::Error::other(format!("{WHAT}: {e}"))));
        }
    })?;
    first_answer(started, WHAT).await?;
    Ok(Reply::Stream {
        content_type: "application/octet-stream",
        body: stream_body(chunks),
    })
}

/// `GET /sandbox/files/list?path=/dir`: the directory's entries as JSON.
pub async fn list_files(ctx: &ApiContext, query: Option<&str>) -> Result<Reply, Fault> {
    const WHAT: &str = "GET /sandbox/files/list";
    let path = path_param(WHAT, query)?;
    let uds = lock(&ctx.controller).agent_uds(WHAT)?;
    let (answer_tx, answer) = oneshot::channel();
    let worker = ctx.agent.clone();
    ctx.agent.submit(move || {
        let listed = worker.client(&uds).and_then(|client| {
            let entries = client.list_dir(&path).map_err(|e| agent_fault(WHAT, e))?;
            Ok(entries
                .into_iter()
                .map(|entry| SandboxDirEntry {
                    name: entry.name,
                    file_type: match entry.metadata.file_type {
                        FileType::File => "file",
                        FileType::Dir => "dir",
                        FileType::Symlink => "symlink",
                        FileType::Other => "other",
                    },
                    size: entry.metadata.size,
                    mode: entry.metadata.mode,
                    mtime_ns: entry.metadata.mtime_ns,
                    symlink_target: entry.metadata.symlink_target,
                })
                .collect::<Vec<_>>())
        });
        let _ = answer_tx.send(listed);
    })?;
    let entries = first_answer(answer, WHAT).await?;
    serde_json::to_string(&entries)
        .map(Reply::Json)
        .map_err(|e| Fault::internal(format!("cannot encode the answer: {e}")))
}

/// `PUT /sandbox/files?path=/abs`: the body (up to [`MAX_FILE_UPLOAD_BYTES`]) becomes the file,
/// streamed to the agent as it arrives. The agent writes atomically (temporary file renamed), so
/// a refused or broken upload leaves the old file, if any, as it was.
pub async fn put_file(ctx: &ApiContext, request: Request<Incoming>) -> Result<Reply, Fault> {
    const WHAT: &str = "PUT /sandbox/files";
    let path = path_param(WHAT, request.uri().query())?;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > MAX_FILE_UPLOAD_BYTES) {
        return Err(upload_too_large(&format!("{len} bytes")));
    }
    let uds = lock(&ctx.controller).agent_uds(WHAT)?;
    let (chunks_tx, chunks) = mpsc::channel(STREAM_DEPTH);
    let (answer_tx, answer) = oneshot::channel();
    let worker = ctx.agent.clone();
    ctx.agent.submit(move || {
        let written = worker.client(&uds).and_then(|client| {
            let mut source = ChunkReader {
                chunks,
                pending: Bytes::new(),
            };
            let options = WriteOptions {
                atomic: true,
                ..WriteOptions::default()
            };
            client
                .write_file(&path, &mut source, options)
                .map_err(|e| agent_fault(WHAT, e))
        });
        let _ = answer_tx.send(written);
    })?;
    let mut body = request.into_body();
    let mut total = 0u64;
    let mut refused = None;
    loop {
        let frame = match tokio::time::timeout(BODY_TIMEOUT, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                refused = Some(Fault::bad_request(format!(
                    "{WHAT}: cannot read the request body: {e}"
                )));
                break;
            }
            Err(_) => {
                refused = Some(Fault {
                    status: StatusCode::REQUEST_TIMEOUT,
                    message: format!("{WHAT}: the request body stalled for {BODY_TIMEOUT:?}"),
                });
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > MAX_FILE_UPLOAD_BYTES {
            refused = Some(upload_too_large("the request body"));
            break;
        }
        // A failed send means the job ended early (the agent refused the path): its answer
        // below says why.
        if chunks_tx.send(Ok(data)).await.is_err() {
            break;
        }
    }
    if let Some(fault) = refused {
        // The job's read fails, so the agent discards the partial upload.
        let _ = chunks_tx
            .send(Err(io::Error::other(fault.message.clone())))
            .await;
        drop(chunks_tx);
        let _ = first_answer(answer, WHAT).await;
        return Err(fault);
    }
    drop(chunks_tx);
    first_answer(answer, WHAT).await?;
    Ok(Reply::NoContent)
}

fn upload_too_large(size: &str) -> Fault {
    Fault::too_large(format!(
        "PUT /sandbox/files: {size} is over the {MAX_FILE_UPLOAD_BYTES}-byte upload limit"
    ))
}

/// The `path` query parameter, which must be absolute.
pub(super) fn path_param(what: &str, query: Option<&str>) -> Result<String, Fault> {
    let path = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "path")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| {
            Fault::bad_request(format!(
                "{what}: the query needs ?path=<absolute guest path>"
            ))
        })?;
    check_absolute(&format!("{what}: path"), &path)?;
    Ok(path)
}

fn check_absolute(what: &str, path: &str) -> Result<(), Fault> {
    if !PathBuf::from(path).is_absolute() {
        return Err(Fault::bad_request(format!(
            "{what} {path:?} must be absolute (start with '/')"
        )));
    }
    Ok(())
}

pub(super) async fn first_answer<T>(
    answer: oneshot::Receiver<Result<T, Fault>>,
    what: &str,
) -> Result<T, Fault> {
    match tokio::time::timeout(FIRST_ANSWER_TIMEOUT, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(Fault::internal(format!(
            "{what}: the guest agent job ended without an answer"
        ))),
        Err(_) => Err(Fault::unavailable(format!(
            "{what}: no answer from the guest agent within {FIRST_ANSWER_TIMEOUT:?}"
        ))),
    }
}

/// A response body fed by a job thread through a bounded channel; an `Err` chunk aborts it.
///
/// Written here rather than http-body-util's `Channel`: that one needs a forwarding task whose
/// sender only learns that hyper dropped the body (the HTTP client went away) when it next sends,
/// so a silent process would outlive its client. Dropping this body drops the receiver, which
/// the job thread sees at once (`is_closed`, or a failed send).
struct ChunkBody(Chunks);

impl hyper::body::Body for ChunkBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data)))
    }
}

pub(super) fn stream_body(chunks: Chunks) -> ApiBody {
    ChunkBody(chunks).boxed()
}

/// `Write` into a response body's channel, from a job thread.
struct ChunkSender(mpsc::Sender<Result<Bytes, io::Error>>);

impl Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MAX_CHUNK);
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the HTTP client went away"))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `Read` from a request body's channel, on a job thread. The API thread sends or closes within
/// its body timeout, so a read never waits without bound.
struct ChunkReader {
    chunks: Chunks,
    pending: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pending.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_bodies_and_paths_are_checked() {
        let parse = |body: &str| parse_body::<SandboxExec>("x", body.as_bytes());
        let spec_of = |request: &SandboxExec| {
            process_spec(
                "x",
                &request.cmd,
                request.env.as_ref(),
                request.cwd.as_deref(),
                request.user.as_deref(),
                request.timeout_ms,
            )
        };
        let spec = spec_of(
            &parse(
                r#"{"cmd":["sh","-c","x"],"env":{"A":"1"},"cwd":"/tmp","user":"1000:1000","timeout_ms":5}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(spec.env, vec![("A".into(), "1".into())]);
        assert_eq!(spec.user.as_deref(), Some("1000:1000"));
        assert_eq!(
            (spec.cwd.as_deref(), spec.timeout_ms),
            (Some("/tmp"), Some(5))
        );
        for bad in [
            r#"{"cmd":[]}"#,
            r#"{"cmd":["ls"],"cwd":"tmp"}"#,
            r#"{"cmd":["ls"],"timeout_ms":0}"#,
            r#"{"cmd":["ls"],"env":{"A=B":"1"}}"#,
            r#"{"cmd":["ls"],"user":""}"#,
        ] {
            assert!(spec_of(&parse(bad).unwrap()).is_err(), "{bad}");
        }
        assert!(parse(r#"{"cmd":["ls"],"shell":true}"#).is_err());
        assert_eq!(
            path_param("GET", Some("path=%2Ftmp%2Fa%20b")).unwrap(),
            "/tmp/a b"
        );
        assert!(path_param("GET", Some("path=tmp")).is_err());
        assert!(path_param("GET", None).is_err());
    }

    #[test]
    fn exec_events_become_ndjson_lines() {
        assert_eq!(
            event_line(&ExecEvent::Stdout(b"hi".to_vec())),
            serde_json::json!({"stdout": "aGk="})
        );
        assert_eq!(
            event_line(&ExecEvent::Exited {
                status: ExitStatus::Signal(9),
                timed_out: true
            }),
            serde_json::json!({"signal": 9, "timed_out": true})
        );
    }
}

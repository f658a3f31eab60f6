//! The worker's HTTP API over its Unix socket: hyper 1 on a current-thread tokio runtime in one
//! thread (`api`, under the `api` seccomp filter: it accepts, reads and writes sockets, opens no
//! file and starts no thread), as `agentvm serve`'s API thread. Calls go to the job thread.
//!
//! - `GET /`: the module's exported functions, the limits, the calls served.
//! - `POST /call {"function", "args", "cpu_limit_ms"?, "wall_limit_ms"?}`: 200 with the results,
//!   the guest's log lines and the call's duration; or a fault with the error's `kind`.

use std::convert::Infallible;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::sync::Notify;
use vmm::isolate::{IsolateError, Value};
use vmm::seccomp::{SeccompLevel, ThreadKind};

use super::jobs::{Call, Jobs, Refused, QUEUE_DEPTH};
use super::module_info::ExportedFunction;

const MAX_BODY_BYTES: usize = 64 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Beyond the calls' own wall-clock limits, what an answer may take (the reset, the queue).
const ANSWER_SLACK: Duration = Duration::from_secs(10);

/// What the API knows besides the job queue.
pub struct Worker {
    pub jobs: Jobs,
    /// The module's exported functions, or why they could not be read.
    pub exports: Result<Vec<ExportedFunction>, String>,
    pub module_bytes: usize,
    pub max_memory_mib: u32,
    /// A call's defaults, and the most it may ask for.
    pub cpu_limit: Duration,
    pub wall_limit: Duration,
    pub kv_max_bytes: usize,
}

pub struct ApiServer {
    thread: Option<JoinHandle<()>>,
    shutdown: Arc<Notify>,
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` and serves it from a new thread under the `api` filter.
    pub fn start(path: &Path, worker: Worker, seccomp: SeccompLevel) -> Result<Self, String> {
        if path.symlink_metadata().is_ok() {
            return Err(format!(
                "API socket {} already exists (remove it, or pick another path)",
                path.display()
            ));
        }
        let listener = StdUnixListener::bind(path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("cannot listen on the API socket {}: {e}", path.display()))?;
        let shutdown = Arc::new(Notify::new());
        let stop = shutdown.clone();
        let worker = Arc::new(worker);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let started = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(|e| format!("cannot build the tokio runtime: {e}"))
                    .and_then(|runtime| {
                        let listener = {
                            let _entered = runtime.enter();
                            tokio::net::UnixListener::from_std(listener)
                                .map_err(|e| format!("cannot register the API socket: {e}"))?
                        };
                        vmm::seccomp::install(ThreadKind::Api, seccomp)
                            .map_err(|e| format!("API thread: {e}"))?;
                        Ok((runtime, listener))
                    });
                match started {
                    Ok((runtime, listener)) => {
                        let _ = ready_tx.send(Ok(()));
                        runtime.block_on(serve(listener, worker, stop));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
        let server = ApiServer {
            thread: Some(thread),
            shutdown,
            path: path.to_path_buf(),
        };
        match ready.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "the API thread did not start within {START_TIMEOUT:?}"
            )),
        }
    }
}

impl Drop for ApiServer {
    /// Stops serving, joins the thread (its [`Jobs`] go with it) and removes the socket file.
    fn drop(&mut self) {
        self.shutdown.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(listener: tokio::net::UnixListener, worker: Arc<Worker>, shutdown: Arc<Notify>) {
    loop {
        tokio::select! {
            _ = shutdown.notified() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let worker = worker.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            let worker = worker.clone();
                            async move { Ok::<_, Infallible>(respond(&worker, request).await) }
                        });
                        let connection = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        if let Err(e) = connection.await {
                            tracing::debug!("API connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning on the same error.
                    tracing::warn!("cannot accept an API connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// An error answer: `{"fault_message": ..., "kind"?: ...}`.
#[derive(Debug)]
struct Fault {
    status: StatusCode,
    message: String,
    kind: Option<&'static str>,
}

impl Fault {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Fault {
            status,
            message: message.into(),
            kind: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<IsolateError> for Fault {
    fn from(e: IsolateError) -> Self {
        Fault {
            status: status_of(&e),
            message: e.to_string(),
            kind: Some(e.kind()),
        }
    }
}

/// The caller's mistakes are 400, the module's own failures while running 422, the isolate's
/// (or KVM's) failures 500.
pub fn status_of(e: &IsolateError) -> StatusCode {
    match e {
        IsolateError::ModuleTooLarge { .. }
        | IsolateError::InvalidModule(_)
        | IsolateError::Instantiate(_)
        | IsolateError::MissingExport(_)
        | IsolateError::BadArguments(_) => StatusCode::BAD_REQUEST,
        IsolateError::Trap(_)
        | IsolateError::CpuLimitExceeded { .. }
        | IsolateError::WallLimitExceeded { .. }
        | IsolateError::OutOfMemory(_) => StatusCode::UNPROCESSABLE_ENTITY,
        IsolateError::Setup(_) | IsolateError::Crashed(_) | IsolateError::Kvm(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

type Body = Full<Bytes>;

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn respond(worker: &Worker, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    match handle(worker, request).await {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(fault) => {
            tracing::info!(
                "{method} {path} refused ({}): {}",
                fault.status,
                fault.message
            );
            let mut body = serde_json::json!({ "fault_message": fault.message });
            if let Some(kind) = fault.kind {
                body["kind"] = kind.into();
            }
            json_response(fault.status, &body)
        }
    }
}

async fn handle(worker: &Worker, request: Request<Incoming>) -> Result<serde_json::Value, Fault> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => Ok(info(worker)),
        (&Method::POST, "/call") => {
            let body = read_json::<CallBody>(request).await?;
            call(worker, body).await
        }
        (_, "/" | "/call") => Err(Fault::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} {}: allowed is {}",
                request.method(),
                request.uri().path(),
                if request.uri().path() == "/" {
                    "GET"
                } else {
                    "POST"
                }
            ),
        )),
        (_, path) => Err(Fault::new(
            StatusCode::NOT_FOUND,
            format!("no such route: {path} (an isolate worker serves GET / and POST /call)"),
        )),
    }
}

fn info(worker: &Worker) -> serde_json::Value {
    let mut info = serde_json::json!({
        "service": "agentvm-isolate",
        "version": env!("CARGO_PKG_VERSION"),
        "module_bytes": worker.module_bytes,
        "limits": {
            "cpu_limit_ms": worker.cpu_limit.as_millis() as u64,
            "wall_limit_ms": worker.wall_limit.as_millis() as u64,
            "max_memory_mib": worker.max_memory_mib,
            "kv_max_bytes": worker.kv_max_bytes,
        },
        "calls_served": worker.jobs.served(),
    });
    match &worker.exports {
        Ok(exports) => info["exports"] = serde_json::json!(exports),
        Err(e) => info["exports_error"] = serde_json::json!(e),
    }
    info
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    function: String,
    #[serde(default)]
    args: Vec<serde_json::Value>,
    cpu_limit_ms: Option<u64>,
    wall_limit_ms: Option<u64>,
}

/// An argument as the guest parses it: a number's text.
fn arg_text(i: usize, arg: &serde_json::Value) -> Result<String, Fault> {
    match arg {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(Fault::bad_request(format!(
            "args[{i}] is {other}: each argument is a number or a string holding one"
        ))),
    }
}

/// `requested` milliseconds, at most `max` (the worker's limit, also the default).
fn limit(what: &str, requested: Option<u64>, max: Duration) -> Result<Duration, Fault> {
    let Some(ms) = requested else {
        return Ok(max);
    };
    let asked = Duration::from_millis(ms);
    if ms == 0 || asked > max {
        return Err(Fault::bad_request(format!(
            "{what} must be 1..={} (this sandbox's limit), got {ms}",
            max.as_millis()
        )));
    }
    Ok(asked)
}

async fn call(worker: &Worker, body: CallBody) -> Result<serde_json::Value, Fault> {
    if body.function.is_empty() {
        return Err(Fault::bad_request(
            "function must name an exported function",
        ));
    }
    let args = body
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| arg_text(i, a))
        .collect::<Result<Vec<_>, _>>()?;
    let call = Call {
        function: body.function,
        args,
        cpu_limit: limit("cpu_limit_ms", body.cpu_limit_ms, worker.cpu_limit)?,
        wall_limit: limit("wall_limit_ms", body.wall_limit_ms, worker.wall_limit)?,
    };
    let answer = worker.jobs.submit(call).map_err(|refused| match refused {
        Refused::Busy => Fault::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{QUEUE_DEPTH} calls are waiting already: try again later"),
        ),
        Refused::Gone => Fault::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the isolate worker is ending (its job thread failed)",
        ),
    })?;
    // Each call queued ahead ends within its wall-clock limit, at most the worker's.
    let wait = worker.wall_limit * (QUEUE_DEPTH as u32 + 1) + ANSWER_SLACK;
    let outcome = match tokio::time::timeout(wait, answer).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => {
            return Err(Fault::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the job thread ended without answering the call",
            ))
        }
        Err(_) => {
            return Err(Fault::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the call was not answered within {wait:?}"),
            ))
        }
    };
    let values = outcome.result.map_err(Fault::from)?;
    Ok(serde_json::json!({
        "results": values.iter().map(value_json).collect::<Vec<_>>(),
        "logs": outcome.logs,
        "duration_us": outcome.duration.as_micros() as u64,
    }))
}

/// `{"type": "i32", "value": 42}`; a float JSON cannot hold (NaN, infinities) as a string.
fn value_json(value: &Value) -> serde_json::Value {
    let float = |f: f64| {
        if f.is_finite() {
            serde_json::json!(f)
        } else {
            serde_json::json!(value.to_string())
        }
    };
    let (ty, v) = match *value {
        Value::I32(v) => ("i32", serde_json::json!(v)),
        Value::I64(v) => ("i64", serde_json::json!(v)),
        Value::F32(v) => ("f32", float(f64::from(v))),
        Value::F64(v) => ("f64", float(v)),
    };
    serde_json::json!({ "type": ty, "value": v })
}

/// Reads a JSON body of at most [`MAX_BODY_BYTES`] within [`BODY_TIMEOUT`].
async fn read_json<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Result<T, Fault> {
    let too_large = || {
        Fault::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("POST /call: the body is over the {MAX_BODY_BYTES}-byte limit"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(request.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(e)) => {
            return Err(Fault::bad_request(format!(
                "POST /call: reading the body: {e}"
            )))
        }
        Err(_) => {
            return Err(Fault::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("POST /call: the body did not arrive within {BODY_TIMEOUT:?}"),
            ))
        }
    };
    if body.is_empty() {
        return Err(Fault::bad_request("POST /call needs a JSON body"));
    }
    serde_json::from_slice(&body).map_err(|e| Fault::bad_request(format!("POST /call: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_arguments_map_to_json_and_back() {
        assert_eq!(
            value_json(&Value::I32(42)),
            serde_json::json!({"type": "i32", "value": 42})
        );
        assert_eq!(
            value_json(&Value::F64(f64::NAN)),
            serde_json::json!({"type": "f64", "value": "NaN"})
        );
        assert_eq!(arg_text(0, &serde_json::json!(-7)).unwrap(), "-7");
        assert_eq!(arg_text(0, &serde_json::json!("2.5")).unwrap(), "2.5");
        let fault = arg_text(3, &serde_json::json!(true)).unwrap_err();
        assert!(
            fault.message.starts_with("args[3] is true"),
            "{}",
            fault.message
        );
        let max = Duration::from_millis(100);
        assert_eq!(limit("cpu_limit_ms", None, max).unwrap(), max);
        assert!(limit("cpu_limit_ms", Some(101), max).is_err());
        assert!(limit("cpu_limit_ms", Some(0), max).is_err());
        assert_eq!(
            status_of(&IsolateError::Trap("x".into())),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}

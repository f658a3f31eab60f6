//! HTTP/1.1 over the API's Unix socket: hyper on a current-thread tokio runtime in one thread.
//!
//! Each connection is its own task, so a client that sends half a request and stalls delays no
//! one else; hyper drops it when its headers do not arrive within [`HEADER_TIMEOUT`], and a body
//! that does not arrive within [`BODY_TIMEOUT`] gets a 408. Bodies over [`MAX_BODY_BYTES`] are
//! refused with 413 (from Content-Length, before reading; or as soon as the limit is crossed).

use std::convert::Infallible;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;

use super::audit::Peer;
use super::fault::Fault;
use super::handlers::{self, lock, ApiBody, ApiContext, Reply};
use super::request_counts::UNMATCHED_ROUTE;
use super::routes::{self, Endpoint};
use super::{port_forward, pty, sandbox};
use crate::seccomp::{ThreadKind, ThreadSeccomp};

/// Firecracker's default payload limit is 51200 bytes; the same here (but for
/// `PUT /sandbox/files`, streamed up to [`sandbox::MAX_FILE_UPLOAD_BYTES`]).
pub const MAX_BODY_BYTES: usize = 50 * 1024;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The header of `POST /sandbox/pty`'s 101 naming the new terminal session.
pub const PTY_ID_HEADER: &str = "x-agentvm-pty-id";
/// How long the new thread may take to build its runtime and install its filter.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket {0} already exists (remove it, or pick another path)")]
    Exists(PathBuf),
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Thread(String),
}

/// The running API thread. [`ApiServer::stop`] ends it and removes the socket file.
pub struct ApiServer {
    thread: Option<JoinHandle<()>>,
    shutdown: Arc<Notify>,
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` (on the calling thread, so a bad path is reported at once) and serves it from a
    /// new thread that puts itself under the `api` seccomp filter once its runtime exists.
    pub fn start(
        path: &Path,
        ctx: ApiContext,
        seccomp: ThreadSeccomp,
    ) -> Result<Self, ServerError> {
        if path.symlink_metadata().is_ok() {
            return Err(ServerError::Exists(path.to_path_buf()));
        }
        let listener = StdUnixListener::bind(path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| ServerError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        let shutdown = Arc::new(Notify::new());
        let stop = shutdown.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(|e| format!("cannot build the tokio runtime: {e}"));
                let started = runtime.and_then(|runtime| {
                    let listener = {
                        let _entered = runtime.enter();
                        tokio::net::UnixListener::from_std(listener)
                            .map_err(|e| format!("cannot register the API socket: {e}"))?
                    };
                    seccomp.enter(ThreadKind::Api).map_err(|e| e.to_string())?;
                    Ok((runtime, listener))
                });
                match started {
                    Ok((runtime, listener)) => {
                        let _ = ready_tx.send(Ok(()));
                        runtime.block_on(serve(listener, ctx, stop));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| ServerError::Thread(e.to_string()))?;
        let server = Self {
            thread: Some(thread),
            shutdown,
            path: path.to_path_buf(),
        };
        match ready.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(ServerError::Thread(e)),
            Err(_) => Err(ServerError::Thread(format!(
                "the API thread did not start within {START_TIMEOUT:?}"
            ))),
        }
    }

    /// Stops serving (open connections are dropped), joins the thread, removes the socket file.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shutdown.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove the API socket {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

async fn serve(listener: tokio::net::UnixListener, ctx: ApiContext, shutdown: Arc<Notify>) {
    loop {
        tokio::select! {
            _ = shutdown.notified() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let ctx = ctx.clone();
                    let peer = peer_of(&stream);
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            let ctx = ctx.clone();
                            async move { Ok::<_, Infallible>(respond(&ctx, request, peer).await) }
                        });
                        let connection = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades();
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

/// The connecting process, from SO_PEERCRED (the audit log's "who asked").
fn peer_of(stream: &tokio::net::UnixStream) -> Option<Peer> {
    match stream.peer_cred() {
        Ok(cred) => Some(Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        }),
        Err(e) => {
            tracing::debug!("no peer credentials for an API connection: {e}");
            None
        }
    }
}

async fn respond(
    ctx: &ApiContext,
    request: Request<Incoming>,
    peer: Option<Peer>,
) -> Response<ApiBody> {
    let method = request.method().clone();
    let resolved = routes::resolve(request.method(), request.uri().path());
    let route_label = resolved
        .as_ref()
        .map_or(UNMATCHED_ROUTE, |route| route.path);
    let response = answer(ctx, request, resolved, peer).await;
    lock(&ctx.controller).count_request(&method, route_label, response.status().as_u16());
    response
}

async fn answer(
    ctx: &ApiContext,
    mut request: Request<Incoming>,
    resolved: Result<routes::Matched, Fault>,
    peer: Option<Peer>,
) -> Response<ApiBody> {
    let result = async {
        let route = resolved?;
        match route.endpoint {
            Endpoint::PutSandboxFile => return sandbox::put_file(ctx, request).await,
            Endpoint::SandboxPty | Endpoint::ConnectSandboxPort => {
                let headers = request.headers().clone();
                let on_upgrade = hyper::upgrade::on(&mut request);
                let body = read_body(request).await?;
                return if route.endpoint == Endpoint::SandboxPty {
                    pty::open(ctx, &headers, on_upgrade, &body).await
                } else {
                    port_forward::connect(ctx, &headers, route.param.as_deref(), on_upgrade).await
                };
            }
            _ => {}
        }
        let query = request.uri().query().map(str::to_owned);
        let body = read_body(request).await?;
        handlers::handle(ctx, route, query.as_deref(), &body, peer).await
    }
    .await;
    const JSON: &str = "application/json";
    let (status, body) = match result {
        Ok(Reply::Stream { content_type, body }) => {
            let mut response = Response::new(body);
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            return response;
        }
        Ok(Reply::SwitchingProtocols { protocol, pty_id }) => {
            let mut response = Response::new(whole(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, HeaderValue::from_static(protocol));
            if let Some(id) = pty_id {
                headers.insert(PTY_ID_HEADER, HeaderValue::from(id));
            }
            return response;
        }
        Ok(Reply::NoContent) => (StatusCode::NO_CONTENT, None),
        Ok(Reply::Json(json)) => (StatusCode::OK, Some((json, JSON))),
        Ok(Reply::Prometheus(text)) => (
            StatusCode::OK,
            Some((text, "text/plain; version=0.0.4; charset=utf-8")),
        ),
        Err(fault) => {
            tracing::info!("API request refused ({}): {}", fault.status, fault.message);
            (fault.status, Some((fault.body(), JSON)))
        }
    };
    let mut response = match body {
        Some((body, content_type)) => {
            let mut response = Response::new(whole(Bytes::from(body)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            response
        }
        None => Response::new(whole(Bytes::new())),
    };
    *response.status_mut() = status;
    response
}

fn whole(bytes: Bytes) -> ApiBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Fault> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > MAX_BODY_BYTES as u64) {
        return Err(too_large(Some(len)));
    }
    let limited = Limited::new(request.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(None)),
        Ok(Err(e)) => Err(Fault::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
        Err(_) => Err(Fault {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        }),
    }
}

fn too_large(declared: Option<u64>) -> Fault {
    let size = match declared {
        Some(len) => format!("{len} bytes"),
        None => "the request body".into(),
    };
    Fault::too_large(format!(
        "{size} is over the API's {MAX_BODY_BYTES}-byte body limit"
    ))
}

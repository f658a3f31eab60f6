//! HTTP/1.1 over the daemon's Unix socket (hyper on a multi-threaded tokio runtime): one task
//! per connection; JSON bodies are limited in size and time, agent routes stream through.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::fault::Fault;
use crate::model::{Tier, MAX_MODULE_BYTES};
use crate::routes::{self, Endpoint};
use crate::sandboxes::Sandboxes;
use crate::vm_client;

pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// `POST /sandboxes` may carry an isolate's module in base64 (4 characters for 3 bytes).
pub const MAX_CREATE_BODY_BYTES: usize = MAX_MODULE_BYTES / 3 * 4 + 64 * 1024;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, hyper::Error>;

/// Binds the daemon's socket. A socket file left by a daemon that died is replaced; one that a
/// live daemon answers on is not.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {} for the socket: {e}", dir.display()))?;
    }
    if path.symlink_metadata().is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{} is in use: another daemon is serving on it",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, sandboxes: Arc<Sandboxes>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let sandboxes = sandboxes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let sandboxes = sandboxes.clone();
                async move { Ok::<_, Infallible>(respond(&sandboxes, request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

enum Reply {
    Json(StatusCode, serde_json::Value),
    NoContent,
    Forwarded(Response<Incoming>),
}

async fn respond(sandboxes: &Arc<Sandboxes>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    match handle(sandboxes, request).await {
        Ok(Reply::Json(status, value)) => json_response(status, value.to_string()),
        Ok(Reply::NoContent) => {
            let mut response = Response::new(empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        Ok(Reply::Forwarded(response)) => response.map(|body| body.boxed()),
        Err(fault) => {
            tracing::info!(
                "{method} {path} refused ({}): {}",
                fault.status,
                fault.message
            );
            json_response(fault.status, fault.body())
        }
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

async fn handle(sandboxes: &Arc<Sandboxes>, request: Request<Incoming>) -> Result<Reply, Fault> {
    let route = routes::resolve(request.method(), request.uri().path())?;
    let param = route.param().to_string();
    let what = format!("{} {}", request.method(), route.path);
    // The routes of one tier refuse the other's sandboxes with 400.
    let tier = match route.endpoint {
        Endpoint::PauseSandbox
        | Endpoint::ResumeSandbox
        | Endpoint::HibernateSandbox
        | Endpoint::Forward { .. } => Some(Tier::Microvm),
        Endpoint::CallSandbox => Some(Tier::Isolate),
        _ => None,
    };
    if let Some(tier) = tier {
        sandboxes.require_tier(&param, tier, &what)?;
    }
    let ok = |value: serde_json::Value| Ok(Reply::Json(StatusCode::OK, value));
    match route.endpoint {
        Endpoint::DaemonInfo => ok(serde_json::json!({
            "service": "agentvm-daemon",
            "version": env!("CARGO_PKG_VERSION"),
            "sandboxes": sandboxes.list().len(),
        })),
        Endpoint::ListSandboxes => {
            ok(serde_json::json!({ "sandboxes": to_json(&sandboxes.list()) }))
        }
        Endpoint::CreateSandbox => {
            let body = read_json(request, "POST /sandboxes", MAX_CREATE_BODY_BYTES).await?;
            let info = sandboxes.create(body).await?;
            Ok(Reply::Json(StatusCode::CREATED, to_json(&info)))
        }
        Endpoint::GetSandbox => ok(to_json(&sandboxes.get(&param)?)),
        Endpoint::DestroySandbox => {
            sandboxes.destroy(&param).await?;
            Ok(Reply::NoContent)
        }
        Endpoint::StopSandbox => ok(to_json(&sandboxes.stop(&param).await?)),
        Endpoint::PauseSandbox => ok(to_json(&sandboxes.set_paused(&param, true).await?)),
        Endpoint::ResumeSandbox => ok(to_json(&sandboxes.set_paused(&param, false).await?)),
        Endpoint::HibernateSandbox => ok(to_json(&sandboxes.hibernate(&param).await?)),
        Endpoint::ListTemplates => {
            ok(serde_json::json!({ "templates": sandboxes.template_names()? }))
        }
        Endpoint::GetTemplate => ok(to_json(&sandboxes.get_template(&param)?)),
        Endpoint::PutTemplate => {
            let what = format!("PUT /templates/{param}");
            let template = read_json(request, &what, MAX_BODY_BYTES).await?;
            sandboxes.put_template(&param, template)?;
            Ok(Reply::NoContent)
        }
        Endpoint::DeleteTemplate => {
            sandboxes.delete_template(&param)?;
            Ok(Reply::NoContent)
        }
        Endpoint::CallSandbox => {
            let sock = sandboxes.isolate_sock(&param)?;
            let response = vm_client::forward(&sock, request, "/call")
                .await
                .map_err(|e| Fault::unavailable(format!("sandbox {param}: {e}")))?;
            Ok(Reply::Forwarded(response))
        }
        Endpoint::Forward { upstream, agent } => {
            let sock = if agent {
                sandboxes.agent_sock_restoring(&param).await?
            } else {
                sandboxes.api_sock(&param)?
            };
            let upstream = route.upstream_path(upstream);
            let response = vm_client::forward(&sock, request, &upstream)
                .await
                .map_err(|e| Fault::unavailable(format!("sandbox {param}: {e}")))?;
            Ok(Reply::Forwarded(response))
        }
    }
}

/// Reads a JSON body of at most `max_bytes` within [`BODY_TIMEOUT`] and decodes it (unknown
/// fields are refused by the types themselves).
async fn read_json<T: DeserializeOwned>(
    request: Request<Incoming>,
    what: &str,
    max_bytes: usize,
) -> Result<T, Fault> {
    let too_large = || {
        Fault::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what}: the body is over the {max_bytes}-byte limit"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_bytes as u64) {
        return Err(too_large());
    }
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(request.into_body(), max_bytes).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(e)) => return Err(Fault::bad_request(format!("{what}: reading the body: {e}"))),
        Err(_) => {
            return Err(Fault::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("{what}: the body did not arrive within {BODY_TIMEOUT:?}"),
            ))
        }
    };
    if body.is_empty() {
        return Err(Fault::bad_request(format!("{what} needs a JSON body")));
    }
    serde_json::from_slice(&body).map_err(|e| Fault::bad_request(format!("{what}: {e}")))
}

//! HTTP/1.1 to a sandbox's per-VM API socket (hyper's client over a Unix stream): one-shot JSON
//! calls while creating and controlling it, and forwarding of the agent routes (streamed bodies,
//! and upgraded connections for interactive sessions).

use std::path::Path;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// A whole answer of the per-VM API.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The per-VM API's `fault_message`, or the body as text.
    pub fn fault_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

type UpstreamBody = BoxBody<Bytes, hyper::Error>;

async fn connect(sock: &Path) -> Result<http1::SendRequest<UpstreamBody>, String> {
    let stream = UnixStream::connect(sock).await.map_err(|e| {
        format!(
            "cannot connect to the VMM's API socket {}: {e}",
            sock.display()
        )
    })?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {} failed: {e}", sock.display()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!("per-VM API connection ended: {e}");
        }
    });
    Ok(sender)
}

/// One request with an optional JSON body, answered within `timeout`.
pub async fn call(
    sock: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    timeout: Duration,
) -> Result<Answer, String> {
    let what = format!("{method} {path} on {}", sock.display());
    let exchange = async {
        let mut sender = connect(sock).await?;
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, bytes.len())
            .body(Full::new(bytes).map_err(|never| match never {}).boxed())
            .map_err(|e| format!("{what}: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{what}: reading the answer: {e}"))?
            .to_bytes();
        Ok(Answer { status, body })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{what}: no answer within {timeout:?}")))
}

/// Sends `request` on to `sock` as `upstream_path` (query kept) and returns the VMM's answer with
/// its body still streaming. An `Upgrade` request whose answer is 101 gets both upgraded
/// connections spliced together.
pub async fn forward(
    sock: &Path,
    mut request: Request<Incoming>,
    upstream_path: &str,
) -> Result<Response<Incoming>, String> {
    let uri = match request.uri().query() {
        Some(query) => format!("{upstream_path}?{query}"),
        None => upstream_path.to_string(),
    };
    let client_upgrade = request
        .headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    parts.uri = uri.parse().map_err(|e| format!("bad path {uri:?}: {e}"))?;
    // The body streams through as it arrives: a file upload is never held whole here.
    let upstream = Request::from_parts(parts, body.boxed());
    let mut sender = connect(sock).await?;
    let mut response = sender
        .send_request(upstream)
        .await
        .map_err(|e| format!("forwarding to {}: {e}", sock.display()))?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let vm_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, vm_upgrade) {
                    Ok((client, vm)) => {
                        let (mut client, mut vm) = (TokioIo::new(client), TokioIo::new(vm));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut vm).await {
                            tracing::debug!("upgraded session ended: {e}");
                        }
                    }
                    Err(e) => tracing::debug!("upgrade failed: {e}"),
                }
            });
        }
    }
    Ok(response)
}

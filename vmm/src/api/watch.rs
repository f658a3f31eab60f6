//! `GET /sandbox/watch?path=/dir[&recursive=true]`: file events under a guest directory as an
//! NDJSON stream (chunked), one object per event, from the moment the 200 is sent until the
//! client disconnects (the watch is then cancelled in the guest) or the guest agent goes away
//! (a last `{"error": "..."}` line).

use agentvm_client::WatchEvent;
use tokio::sync::{mpsc, oneshot};

use super::agent::agent_fault;
use super::fault::Fault;
use super::handlers::{lock, ApiContext, Reply};
use super::sandbox::{first_answer, path_param, stream_body, CLIENT_GONE_POLL, STREAM_DEPTH};

pub async fn watch(ctx: &ApiContext, query: Option<&str>) -> Result<Reply, Fault> {
    const WHAT: &str = "GET /sandbox/watch";
    let path = path_param(WHAT, query)?;
    let recursive = recursive_param(WHAT, query)?;
    let uds = lock(&ctx.controller).agent_uds(WHAT)?;
    let (lines_tx, lines) = mpsc::channel(STREAM_DEPTH);
    let (started_tx, started) = oneshot::channel();
    let worker = ctx.agent.clone();
    ctx.agent.submit(move || {
        let watching = worker.client(&uds).and_then(|client| {
            client
                .watch(&path, recursive, &[], &[])
                .map_err(|e| agent_fault(WHAT, e))
        });
        let mut watch = match watching {
            Ok(watch) => watch,
            Err(fault) => return drop(started_tx.send(Err(fault))),
        };
        if started_tx.send(Ok(())).is_err() {
            return;
        }
        loop {
            let events = match watch.next_events(CLIENT_GONE_POLL) {
                Ok(events) => events,
                Err(e) => {
                    let line = format!("{}\n", serde_json::json!({ "error": e.to_string() }));
                    let _ = lines_tx.blocking_send(Ok(line.into()));
                    return;
                }
            };
            if events.is_empty() && lines_tx.is_closed() {
                break;
            }
            for event in &events {
                let line = format!("{}\n", event_line(event));
                if lines_tx.blocking_send(Ok(line.into())).is_err() {
                    break;
                }
            }
            if lines_tx.is_closed() {
                break;
            }
        }
        if let Err(e) = watch.stop() {
            tracing::debug!("{WHAT}: the watch on {path} did not stop cleanly: {e}");
        }
    })?;
    first_answer(started, WHAT).await?;
    Ok(Reply::Stream {
        content_type: "application/x-ndjson",
        body: stream_body(lines),
    })
}

/// `recursive=true|false`, false when absent.
fn recursive_param(what: &str, query: Option<&str>) -> Result<bool, Fault> {
    let value = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "recursive")
        .map(|(_, value)| value.into_owned());
    match value.as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Fault::bad_request(format!(
            "{what}: recursive={other:?} must be true or false"
        ))),
    }
}

fn event_line(event: &WatchEvent) -> serde_json::Value {
    match event {
        WatchEvent::Created { path, is_dir } => {
            serde_json::json!({"type": "created", "path": path, "is_dir": is_dir})
        }
        WatchEvent::Modified { path } => serde_json::json!({"type": "modified", "path": path}),
        WatchEvent::Deleted { path, is_dir } => {
            serde_json::json!({"type": "deleted", "path": path, "is_dir": is_dir})
        }
        WatchEvent::Moved { from, to, is_dir } => {
            serde_json::json!({"type": "moved", "from": from, "to": to, "is_dir": is_dir})
        }
        WatchEvent::Overflow => serde_json::json!({"type": "overflow"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_events() {
        assert!(!recursive_param("x", Some("path=/a")).unwrap());
        assert!(recursive_param("x", Some("path=/a&recursive=true")).unwrap());
        assert!(recursive_param("x", Some("recursive=yes")).is_err());
        assert_eq!(
            event_line(&WatchEvent::Moved {
                from: "/a".into(),
                to: "/b".into(),
                is_dir: false
            }),
            serde_json::json!({"type": "moved", "from": "/a", "to": "/b", "is_dir": false})
        );
    }
}

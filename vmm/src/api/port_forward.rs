//! `POST /sandbox/ports/{port}/connect`: a TCP connection to `127.0.0.1:{port}` in the guest,
//! made by the guest agent; after 101 the API connection is a raw byte tunnel to it (see
//! [`super::upgrade`]). Closing the client's write half sends end of file to the guest server,
//! which may still answer; the tunnel closes once the guest side closed.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use agentvm_client::{ClientError, ErrorCode, PortWriter};
use hyper::header::HeaderMap;
use hyper::upgrade::OnUpgrade;
use hyper::StatusCode;
use tokio::sync::oneshot;

use super::agent::agent_fault;
use super::fault::Fault;
use super::handlers::{lock, ApiContext, Reply};
use super::sandbox::first_answer;
use super::upgrade::{self, OutputEnd, OUTPUT_POLL, TCP_PROTOCOL};

pub async fn connect(
    ctx: &ApiContext,
    headers: &HeaderMap,
    param: Option<&str>,
    on_upgrade: OnUpgrade,
) -> Result<Reply, Fault> {
    const ROUTE: &str = "POST /sandbox/ports/{port}/connect";
    upgrade::require_upgrade(ROUTE, headers, TCP_PROTOCOL)?;
    let port = guest_port(ROUTE, param)?;
    let what = format!("POST /sandbox/ports/{port}/connect");
    let uds = lock(&ctx.controller).agent_uds(&what)?;
    let (job, connection) = upgrade::channels();
    let (started_tx, started) = oneshot::channel();
    let worker = ctx.agent.clone();
    let job_what = what.clone();
    ctx.agent.submit(move || {
        let what = job_what;
        let connected = worker.client(&uds).and_then(|client| {
            client
                .connect_port(port)
                .map_err(|e| connect_fault(&what, e))
        });
        let stream = match connected {
            Ok(stream) => stream,
            Err(fault) => return drop(started_tx.send(Err(fault))),
        };
        let (mut reader, writer) = stream.split();
        // Both closures run on the feeder thread, one after the other: the lock never waits.
        let writer = Arc::new(Mutex::new(writer));
        let closer = writer.clone();
        let fed = upgrade::spawn_input_feeder(
            job.input,
            move |bytes| lock_writer(&writer).write_all(bytes),
            move || {
                if let Err(e) = lock_writer(&closer).shutdown_write() {
                    tracing::debug!("guest port {port}: end of file not delivered: {e}");
                }
            },
        );
        if let Err(e) = fed {
            let fault = Fault::internal(format!("{what}: cannot start the input thread: {e}"));
            return drop(started_tx.send(Err(fault)));
        }
        if started_tx.send(Ok(())).is_err() {
            return;
        }
        reader.set_read_timeout(Some(OUTPUT_POLL));
        match upgrade::pump_output(&mut reader, &job.output) {
            OutputEnd::Eof => {}
            // Dropping the reader closes the guest connection.
            OutputEnd::ClientGone => {}
            OutputEnd::Failed(e) => tracing::debug!("{what}: {e}"),
        }
    })?;
    first_answer(started, &what).await?;
    upgrade::pump(on_upgrade, connection, what);
    Ok(Reply::SwitchingProtocols {
        protocol: TCP_PROTOCOL,
        pty_id: None,
    })
}

fn lock_writer(writer: &Mutex<PortWriter>) -> MutexGuard<'_, PortWriter> {
    writer.lock().unwrap_or_else(|e| e.into_inner())
}

/// Nothing listening is the upstream's failure (502 with the agent's reason), not the client's.
fn connect_fault(what: &str, error: ClientError) -> Fault {
    match error.agent_code() {
        Some(ErrorCode::ConnectionRefused) => Fault {
            status: StatusCode::BAD_GATEWAY,
            message: format!("{what}: {error}"),
        },
        _ => agent_fault(what, error),
    }
}

fn guest_port(what: &str, param: Option<&str>) -> Result<u16, Fault> {
    let text = param.unwrap_or_default();
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(Fault::bad_request(format!(
            "{what}: port {text:?} must be a number from 1 to 65535"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_checked() {
        assert_eq!(guest_port("x", Some("8080")).unwrap(), 8080);
        for bad in ["0", "65536", "-1", "http", ""] {
            let fault = guest_port("x", Some(bad)).unwrap_err();
            assert!(fault.message.contains("1 to 65535"), "{bad}: {fault:?}");
        }
    }
}

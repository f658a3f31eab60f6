//! Upgraded connections (`POST /sandbox/pty`, `POST /sandbox/ports/{port}/connect`): after
//! `101 Switching Protocols` the API connection carries raw bytes both ways, as a terminal or a
//! TCP tunnel.
//!
//! The connection is tokio IO on the API thread; the guest agent client is blocking and lives on
//! a job thread (see [`super::agent`]). Between them run two bounded channels: the API thread's
//! [`pump`] task moves client bytes into one and the job's output from the other onto the
//! connection; on the job side, [`pump_output`] reads the agent stream into the output channel and
//! [`spawn_input_feeder`] writes the input channel into the agent stream from a second job thread
//! (a blocking write waits for the guest's window credit, which must not stall the output).
//!
//! Ends: when the job's output ends (process exited, guest closed the connection) the server
//! closes the connection after the last byte. When the client closes its write half (or the whole
//! connection) the input feeder's `end` runs: a hang-up for a terminal, end of file for a tunnel.
//! When the client is gone, the next output write fails, the output channel closes, and the job
//! sees it within [`CLIENT_GONE_POLL`] even while the guest is silent.

use std::io::{self, Read};
use std::time::Duration;

use agentvm_protocol::MAX_CHUNK;
use hyper::body::Bytes;
use hyper::header::{HeaderMap, CONNECTION, UPGRADE};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::fault::Fault;
use super::sandbox::{CLIENT_GONE_POLL, STREAM_DEPTH};

/// The `Upgrade` protocol of `POST /sandbox/pty`.
pub const PTY_PROTOCOL: &str = "agentvm-pty";
/// The `Upgrade` protocol of `POST /sandbox/ports/{port}/connect`.
pub const TCP_PROTOCOL: &str = "agentvm-tcp";
/// How long hyper may take to hand over the connection once the 101 is written.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// 400 unless the request asks for `protocol` with `Connection: Upgrade` and `Upgrade: protocol`.
pub fn require_upgrade(what: &str, headers: &HeaderMap, protocol: &str) -> Result<(), Fault> {
    let connection_upgrade = headers.get_all(CONNECTION).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    let upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(protocol));
    if connection_upgrade && upgrade {
        Ok(())
    } else {
        Err(Fault::bad_request(format!(
            "{what} needs the headers `Connection: Upgrade` and `Upgrade: {protocol}` (after \
             101 Switching Protocols the connection carries raw bytes both ways)"
        )))
    }
}

/// The job thread's ends of an upgraded connection.
pub struct JobEnds {
    /// Bytes the client sent; closed when the client's side ended.
    pub input: mpsc::Receiver<Bytes>,
    /// Bytes for the client; closed when the client is gone.
    pub output: mpsc::Sender<Bytes>,
}

/// The API thread's ends, handed to [`pump`].
pub struct ConnectionEnds {
    input: mpsc::Sender<Bytes>,
    output: mpsc::Receiver<Bytes>,
}

pub fn channels() -> (JobEnds, ConnectionEnds) {
    let (input_tx, input) = mpsc::channel(STREAM_DEPTH);
    let (output, output_rx) = mpsc::channel(STREAM_DEPTH);
    (
        JobEnds { input, output },
        ConnectionEnds {
            input: input_tx,
            output: output_rx,
        },
    )
}

/// On the API thread's runtime: once hyper hands over the connection (after the 101), moves
/// bytes between it and the job until the job's output ends or the client is gone.
pub fn pump(on_upgrade: OnUpgrade, ends: ConnectionEnds, what: String) {
    tokio::spawn(async move {
        let upgraded = match tokio::time::timeout(UPGRADE_TIMEOUT, on_upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => return tracing::debug!("{what}: the upgrade failed: {e}"),
            Err(_) => {
                return tracing::debug!("{what}: no upgraded connection within {UPGRADE_TIMEOUT:?}")
            }
        };
        let (mut from_client, mut to_client) = tokio::io::split(TokioIo::new(upgraded));
        let ConnectionEnds { input, mut output } = ends;
        let client_to_job = async move {
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // Closing the input tells the job; the output may go on (a half-closed tunnel).
            drop(input);
            std::future::pending::<()>().await
        };
        let job_to_client = async move {
            while let Some(chunk) = output.recv().await {
                if to_client.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = to_client.shutdown().await;
        };
        tokio::select! {
            () = job_to_client => {}
            () = client_to_job => {}
        }
    });
}

/// How [`pump_output`] ended.
#[derive(Debug)]
pub enum OutputEnd {
    /// The source reached its end.
    Eof,
    /// The client went away.
    ClientGone,
    Failed(io::Error),
}

/// On a job thread: copies `source` into `output` until either ends. `source` must time out its
/// reads (`io::ErrorKind::TimedOut`) every [`CLIENT_GONE_POLL`] or so, to notice a gone client
/// while the guest is silent.
pub fn pump_output(source: &mut impl Read, output: &mpsc::Sender<Bytes>) -> OutputEnd {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match source.read(&mut buf) {
            Ok(0) => return OutputEnd::Eof,
            Ok(n) => {
                if output
                    .blocking_send(Bytes::copy_from_slice(&buf[..n]))
                    .is_err()
                {
                    return OutputEnd::ClientGone;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                if output.is_closed() {
                    return OutputEnd::ClientGone;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return OutputEnd::Failed(e),
        }
    }
}

/// Read timeout of the agent streams that [`pump_output`] reads.
pub const OUTPUT_POLL: Duration = CLIENT_GONE_POLL;

/// Starts a thread (under the job's `agent_jobs` filter) that passes each input chunk to
/// `write`, and calls `end` once the client's side ended; a failed write (the guest side ended)
/// stops it without `end`.
pub fn spawn_input_feeder(
    mut input: mpsc::Receiver<Bytes>,
    mut write: impl FnMut(&[u8]) -> io::Result<()> + Send + 'static,
    end: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("agent-input".into())
        .spawn(move || {
            crate::seccomp::violation::label_current_thread(crate::seccomp::ThreadKind::AgentJobs);
            while let Some(chunk) = input.blocking_recv() {
                if let Err(e) = write(&chunk) {
                    return tracing::debug!("upgraded connection input not delivered: {e}");
                }
            }
            end();
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn upgrade_headers_are_required() {
        let mut headers = HeaderMap::new();
        assert!(require_upgrade("x", &headers, PTY_PROTOCOL).is_err());
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(require_upgrade("x", &headers, PTY_PROTOCOL).is_err());
        headers.insert(UPGRADE, HeaderValue::from_static("agentvm-tcp"));
        let wrong = require_upgrade("x", &headers, PTY_PROTOCOL).unwrap_err();
        assert!(wrong.message.contains("Upgrade: agentvm-pty"), "{wrong:?}");
        assert!(require_upgrade("x", &headers, TCP_PROTOCOL).is_ok());
    }

    #[test]
    fn output_pump_reports_end_and_gone_client() {
        let (tx, mut rx) = mpsc::channel(STREAM_DEPTH);
        let mut source: &[u8] = b"abc";
        assert!(matches!(pump_output(&mut source, &tx), OutputEnd::Eof));
        assert_eq!(rx.try_recv().unwrap(), Bytes::from_static(b"abc"));
        drop(rx);
        struct Silent;
        impl Read for Silent {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::TimedOut.into())
            }
        }
        assert!(matches!(
            pump_output(&mut Silent, &tx),
            OutputEnd::ClientGone
        ));
    }
}

//! Connecting through a fake VMM's hybrid vsock Unix socket: `CONNECT <port>` / `OK <port>`, the
//! retries while the agent is not up, each failure's error, and the version handshake.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use agentvm_client::{AgentClient, ClientError};
use agentvm_protocol::{Done, Features, Hello, Message, Role, Version};
use common::{agent_hello, FakeAgent, GUARD};

const PORT: u32 = 52;

/// Reads the `CONNECT <port>\n` line byte by byte, as a VMM would.
fn read_connect(stream: &mut UnixStream) -> String {
    stream.set_read_timeout(Some(GUARD)).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vsock.sock")
}

fn connect(path: &Path, timeout: Duration) -> Result<AgentClient, ClientError> {
    AgentClient::connect_vsock_uds(path, PORT, timeout)
}

/// Serves one connection like the VMM plus the agent: OK line and Hello in one write (so a client
/// reading past the line would lose the Hello), then answers one Ping.
fn serve_agent(listener: UnixListener, hello: Hello) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        assert_eq!(read_connect(&mut stream), format!("CONNECT {PORT}"));
        let mut first = b"OK 1073741824\n".to_vec();
        first.extend(Message::Hello(hello.clone()).encode().unwrap());
        stream.write_all(&first).unwrap();
        // The Hello was sent already; the fake agent's handshake sends it again, so run the
        // guest side by hand: read the host's Hello, then serve.
        let mut agent = FakeAgent {
            reader: agentvm_protocol::FrameReader::new(stream.try_clone().unwrap()),
            writer: agentvm_protocol::FrameWriter::new(stream.try_clone().unwrap()),
            socket: stream,
        };
        let Some(Message::Hello(host)) = agent.recv_or_eof() else {
            return;
        };
        if hello.negotiate(&host).is_err() {
            return;
        }
        if let Some(Message::Ping(p)) = agent.recv_or_eof() {
            agent.send(Done { id: p.id });
        }
    })
}

#[test]
fn connects_after_ok_without_reading_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = serve_agent(UnixListener::bind(&path).unwrap(), agent_hello());
    let client = connect(&path, GUARD).unwrap();
    assert_eq!(
        client.negotiated().peer.software_version,
        "fake-agent 9.9.9"
    );
    client.ping().unwrap();
    server.join().unwrap();
}

#[test]
fn retries_until_the_socket_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let client_path = path.clone();
    let client = thread::spawn(move || connect(&client_path, GUARD));
    // Whether the client tried once or many times before this, it must keep trying.
    thread::sleep(Duration::from_millis(30));
    let server = serve_agent(UnixListener::bind(&path).unwrap(), agent_hello());
    let client = client.join().unwrap().unwrap();
    client.ping().unwrap();
    server.join().unwrap();
}

#[test]
fn retries_while_the_vmm_closes_because_the_agent_is_not_listening() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        // Two refusals (the guest port has no listener yet), then the agent is up.
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            assert_eq!(read_connect(&mut stream), format!("CONNECT {PORT}"));
        }
        serve_agent(listener, agent_hello()).join().unwrap();
    });
    let client = connect(&path, GUARD).unwrap();
    client.ping().unwrap();
    server.join().unwrap();
}

#[test]
fn a_socket_that_never_appears_times_out_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let err = connect(&path, Duration::from_millis(50)).unwrap_err();
    assert!(
        matches!(err, ClientError::ConnectTimedOut { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("port 52"), "{text}");
}

#[test]
fn a_refusing_socket_times_out_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    // Bound, then closed: the file stays, connections are refused.
    drop(UnixListener::bind(&path).unwrap());
    let err = connect(&path, Duration::from_millis(50)).unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
}

#[test]
fn a_vmm_that_always_closes_before_ok_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = thread::spawn(move || {
        while !server_stop.load(std::sync::atomic::Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => drop(stream),
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    let err = connect(&path, Duration::from_millis(100)).unwrap_err();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    server.join().unwrap();
    assert!(
        matches!(err, ClientError::ConnectTimedOut { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("without OK"), "{err}");
}

#[test]
fn a_silent_vmm_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        // Holds the connection open without answering until the client gives up.
        let mut stream = stream;
        let _ = stream.read(&mut [0; 64]);
        let _ = stream.read(&mut [0; 64]);
    });
    let err = connect(&path, Duration::from_millis(100)).unwrap_err();
    assert!(
        matches!(err, ClientError::ConnectTimedOut { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no answer"), "{err}");
    server.join().unwrap();
}

#[test]
fn a_garbage_answer_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        read_connect(&mut stream);
        stream.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
    });
    let err = connect(&path, GUARD).unwrap_err();
    server.join().unwrap();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("HTTP/1.1 400"), "{err}");
}

#[test]
fn a_version_mismatch_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mut hello = Hello::new(Role::Guest, "agentvm-guest-agent 7.0.0", Features::ALL);
    hello.protocol_version = Version { major: 7, minor: 3 }.to_u32();
    let server = serve_agent(UnixListener::bind(&path).unwrap(), hello);
    let err = connect(&path, GUARD).unwrap_err();
    server.join().unwrap();
    assert!(matches!(err, ClientError::Handshake(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("protocol version mismatch"), "{text}");
    assert!(text.contains("v7.3"), "{text}");
    assert!(text.contains("agentvm-guest-agent 7.0.0"), "{text}");
    assert!(text.contains("agentvm-client"), "{text}");
}

#[test]
fn a_peer_that_is_not_an_agent_fails_the_handshake() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        guest.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
        let _ = guest.read(&mut [0; 64]);
    });
    let err = AgentClient::from_stream(host).unwrap_err();
    assert!(matches!(err, ClientError::Handshake(_)), "{err:?}");
    assert!(err.to_string().contains("SSH-"), "{err}");
    server.join().unwrap();
}

/// A connection made in the last moments of the connect timeout still gets the handshake grace
/// (the agent sends its Hello after the deadline has passed).
#[test]
fn a_connection_at_the_end_of_the_timeout_still_gets_its_hello() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let timeout = Duration::from_millis(300);
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        assert_eq!(read_connect(&mut stream), format!("CONNECT {PORT}"));
        stream.write_all(b"OK 1073741824\n").unwrap();
        // Past the connect deadline, well within the grace.
        thread::sleep(timeout + Duration::from_millis(200));
        assert!(agentvm_client::HANDSHAKE_GRACE > timeout + Duration::from_millis(800));
        let mut agent = FakeAgent {
            reader: agentvm_protocol::FrameReader::new(stream.try_clone().unwrap()),
            writer: agentvm_protocol::FrameWriter::new(stream.try_clone().unwrap()),
            socket: stream,
        };
        agent.send(agent_hello());
        let Some(Message::Hello(_)) = agent.recv_or_eof() else {
            panic!("no Hello from the client");
        };
        if let Some(Message::Ping(p)) = agent.recv_or_eof() {
            agent.send(Done { id: p.id });
        }
    });
    let client = connect(&path, timeout).unwrap();
    client.ping().unwrap();
    server.join().unwrap();
}

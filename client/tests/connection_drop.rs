//! When the connection dies, every pending call fails promptly with a clear error, and new calls
//! fail at once.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::thread;

use agentvm_client::{ClientError, ProcessSpec, ProcessSpecExt};
use agentvm_protocol::{Message, Ready, SendWindow, Started, Stream, INITIAL_WINDOW, MAX_CHUNK};
use common::{connect, within_guard, GUARD};

fn assert_closed(err: &ClientError) {
    assert!(
        matches!(err, ClientError::ConnectionClosed(_)),
        "expected ConnectionClosed, got {err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("guest agent connection closed: "),
        "{err}"
    );
}

#[test]
fn every_pending_call_fails_when_the_agent_goes_away() {
    let (client, mut agent) = connect();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let mut pending = Vec::new();

    // A one-shot call waiting for its answer (with a call timeout far beyond the test).
    let c = client.clone();
    pending.push(thread::spawn(move || c.ping().unwrap_err()));

    // An exec consumer waiting for output, without any timeout.
    let c = client.clone();
    let ready = ready_tx.clone();
    pending.push(thread::spawn(move || {
        let mut exec = c.exec(ProcessSpec::argv(["sleep", "1000"]), true).unwrap();
        let mut stdin = exec.take_stdin().unwrap();
        // A stdin writer blocked on an exhausted window, on its own thread.
        let writer = thread::spawn(move || {
            stdin
                .write_all(&vec![0; 2 * INITIAL_WINDOW as usize])
                .unwrap_err()
        });
        ready.send(()).unwrap();
        let exec_err = exec.next_event().unwrap_err();
        let write_err = writer.join().unwrap();
        assert_eq!(write_err.kind(), std::io::ErrorKind::ConnectionAborted);
        assert!(
            write_err.to_string().contains("connection closed"),
            "{write_err}"
        );
        exec_err
    }));

    // A port stream reader waiting for data.
    let c = client.clone();
    let ready = ready_tx.clone();
    pending.push(thread::spawn(move || {
        let mut port = c.connect_port(8080).unwrap();
        ready.send(()).unwrap();
        let err = port.read(&mut [0; 16]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);
        ClientError::Io(err)
    }));

    // Answer what needs answering so that each call reaches its blocking wait.
    let mut seen = 0;
    let mut stdin_bytes = 0;
    while seen < 3 || stdin_bytes < INITIAL_WINDOW as usize {
        match agent.recv() {
            Message::Ping(_) => seen += 1,
            Message::Exec(e) => {
                seen += 1;
                agent.send(Started { id: e.id, pid: 9 });
            }
            Message::Connect(c) => {
                seen += 1;
                agent.send(Ready { id: c.id });
            }
            Message::Data(d) => stdin_bytes += d.data.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    ready_rx.recv_timeout(GUARD).unwrap();
    ready_rx.recv_timeout(GUARD).unwrap();

    // The agent dies.
    agent.socket.shutdown(Shutdown::Both).unwrap();
    drop(agent);

    for call in pending {
        let err = within_guard(move || call.join().unwrap());
        match &err {
            ClientError::Io(io) => assert!(io.to_string().contains("connection closed"), "{io}"),
            other => assert_closed(other),
        }
    }
    // New calls fail at once, naming the cause.
    let err = client.ping().unwrap_err();
    assert_closed(&err);
    assert!(
        err.to_string()
            .contains("the guest agent closed the connection"),
        "{err}"
    );
    assert!(client.closed_reason().is_some());
}

#[test]
fn a_corrupt_stream_closes_the_connection_with_the_reason() {
    let (client, mut agent) = connect();
    let c = client.clone();
    let call = thread::spawn(move || c.ping().unwrap_err());
    assert!(matches!(agent.recv(), Message::Ping(_)));
    // A length prefix far beyond the frame limit: the stream cannot be resynchronised.
    agent
        .socket
        .write_all(&[0xff, 0xff, 0xff, 0x7f, 0x04])
        .unwrap();
    let err = within_guard(move || call.join().unwrap());
    assert_closed(&err);
    assert!(err.to_string().contains("frame"), "{err}");
}

#[test]
fn an_undecodable_frame_is_reported_and_the_connection_goes_on() {
    let (client, mut agent) = connect();
    // A well-delimited frame of an unknown kind.
    agent.socket.write_all(&[0, 0, 0, 0, 0xee]).unwrap();
    match agent.recv() {
        Message::ErrorMsg(e) => {
            assert_eq!(e.id, 0);
            assert_eq!(e.code, agentvm_client::ErrorCode::Protocol);
            assert!(e.message.contains("0xee"), "{}", e.message);
        }
        other => panic!("expected ErrorMsg, got {other:?}"),
    }
    let c = client.clone();
    let call = thread::spawn(move || c.ping());
    let Message::Ping(p) = agent.recv() else {
        panic!("expected Ping")
    };
    agent.send(agentvm_protocol::Done { id: p.id });
    call.join().unwrap().unwrap();
}

#[test]
fn shutdown_fails_pending_calls_and_dropping_the_client_closes_the_socket() {
    let (client, mut agent) = connect();
    let c = client.clone();
    let call = thread::spawn(move || c.exec_output(ProcessSpec::shell("sleep 100")));
    let Message::Exec(exec) = agent.recv() else {
        panic!("expected Exec")
    };
    agent.send(Started {
        id: exec.id,
        pid: 1,
    });
    let mut window = SendWindow::new();
    agent.send_stream(exec.id, Stream::Stdout, &[1; MAX_CHUNK], &mut window);
    client.shutdown();
    let err = within_guard(move || call.join().unwrap()).unwrap_err();
    assert_closed(&err);
    assert!(err.to_string().contains("shut"), "{err}");
    drop(client);
    // The agent sees the end of the stream (possibly after whatever was in flight).
    while let Some(message) = agent.recv_or_eof() {
        assert!(
            matches!(message, Message::Window(_) | Message::Close(_)),
            "{message:?}"
        );
    }
}

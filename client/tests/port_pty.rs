//! Port forwarding and PTY sessions against a fake agent.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

use agentvm_client::{ClientError, ErrorCode, ExitStatus, ProcessSpec, ProcessSpecExt};
use agentvm_protocol::{Done, Eof, ErrorMsg, Exited, Message, Ready, SendWindow, Started, Stream};
use common::{connect, FakeAgent, GUARD};

/// The agent's side of one forwarded connection: expects Connect to `port`, echoes upper-cased
/// what the host sends until its Eof, then ends both directions.
fn serve_uppercase(agent: &mut FakeAgent, port: u16) {
    let connect = match agent.recv() {
        Message::Connect(connect) => connect,
        other => panic!("expected Connect, got {other:?}"),
    };
    assert_eq!(connect.port, port);
    agent.send(Ready { id: connect.id });
    let input = agent.recv_stream(connect.id, Stream::Stdin);
    agent.send_stream(
        connect.id,
        Stream::Stdout,
        &input.to_ascii_uppercase(),
        &mut SendWindow::new(),
    );
    agent.send(Eof {
        id: connect.id,
        stream: Stream::Stdout,
    });
    agent.send(Done { id: connect.id });
}

#[test]
fn port_stream_carries_bytes_both_ways_with_half_close() {
    let (client, mut agent) = connect();
    let user = thread::spawn(move || {
        let mut port = client.connect_port(8080)?;
        port.write_all(b"hello guest")?;
        port.shutdown_write()?;
        let mut answer = String::new();
        port.read_to_string(&mut answer)?;
        Ok::<_, ClientError>(answer)
    });
    serve_uppercase(&mut agent, 8080);
    assert_eq!(user.join().unwrap().unwrap(), "HELLO GUEST");
}

#[test]
fn connecting_to_a_closed_guest_port_is_connection_refused() {
    let (client, mut agent) = connect();
    let user = thread::spawn(move || client.connect_port(9).map(|_| ()));
    let Message::Connect(connect) = agent.recv() else {
        panic!("expected Connect")
    };
    agent.send(ErrorMsg {
        id: connect.id,
        code: ErrorCode::ConnectionRefused,
        message: "nothing listens on guest port 9".into(),
    });
    let err = user.join().unwrap().unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::ConnectionRefused));
    assert!(err.to_string().contains("port 9"), "{err}");
}

#[test]
fn tcp_listener_forwards_each_client_through_its_own_request() {
    let (client, mut agent) = connect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let forward = client.forward_listener(listener, 3000).unwrap();
    for text in ["first", "second"] {
        let mut host_client = TcpStream::connect(address).unwrap();
        host_client.set_read_timeout(Some(GUARD)).unwrap();
        host_client.write_all(text.as_bytes()).unwrap();
        host_client.shutdown(Shutdown::Write).unwrap();
        serve_uppercase(&mut agent, 3000);
        let mut answer = String::new();
        host_client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, text.to_ascii_uppercase());
    }
    forward.stop();
}

#[test]
fn unix_listener_forwarding_and_stop_disconnects_clients() {
    let (client, mut agent) = connect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fwd.sock");
    let forward = client
        .forward_listener(UnixListener::bind(&path).unwrap(), 5432)
        .unwrap();
    let mut host_client = UnixStream::connect(&path).unwrap();
    host_client.set_read_timeout(Some(GUARD)).unwrap();
    let Message::Connect(connect) = agent.recv() else {
        panic!("expected Connect")
    };
    agent.send(Ready { id: connect.id });
    host_client.write_all(b"q").unwrap();
    let Message::Data(data) = agent.recv() else {
        panic!("expected Data")
    };
    assert_eq!(data.data, b"q");
    // Stopping the forwarder disconnects its clients: the host client reads end of file.
    forward.stop();
    let mut rest = Vec::new();
    host_client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // ... and closes their guest connections.
    loop {
        match agent.recv() {
            Message::Eof(e) if e.id == connect.id && e.stream == Stream::Stdin => {}
            Message::Close(c) if c.id == connect.id => break,
            other => panic!("expected Close, got {other:?}"),
        }
    }
}

#[test]
fn a_refused_forward_closes_the_host_client() {
    let (client, mut agent) = connect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let _forward = client.forward_listener(listener, 1).unwrap();
    let mut host_client = TcpStream::connect(address).unwrap();
    host_client.set_read_timeout(Some(GUARD)).unwrap();
    let Message::Connect(connect) = agent.recv() else {
        panic!("expected Connect")
    };
    agent.send(ErrorMsg {
        id: connect.id,
        code: ErrorCode::ConnectionRefused,
        message: "refused".into(),
    });
    let mut rest = Vec::new();
    host_client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn pty_session_input_resize_output_and_exit() {
    let (client, mut agent) = connect();
    let user = thread::spawn(move || {
        let mut pty = client.pty_open(ProcessSpec::argv(["bash"]), "xterm-256color", 24, 80)?;
        let pid = pty.pid();
        pty.write_input(b"ls\r")?;
        pty.resize(50, 132)?;
        let mut output = Vec::new();
        pty.read_to_end(&mut output)?;
        Ok::<_, ClientError>((pid, output, pty.exit()))
    });
    let Message::PtyOpen(open) = agent.recv() else {
        panic!("expected PtyOpen")
    };
    assert_eq!(
        (open.term.as_str(), open.rows, open.cols),
        ("xterm-256color", 24, 80)
    );
    agent.send(Started {
        id: open.id,
        pid: 31,
    });
    let Message::Data(input) = agent.recv() else {
        panic!("expected Data")
    };
    assert_eq!(
        (input.stream, input.data.as_slice()),
        (Stream::Stdin, &b"ls\r"[..])
    );
    let Message::Resize(resize) = agent.recv() else {
        panic!("expected Resize")
    };
    assert_eq!((resize.rows, resize.cols), (50, 132));
    agent.send_stream(
        open.id,
        Stream::Stdout,
        b"a  b\r\n$ ",
        &mut SendWindow::new(),
    );
    agent.send(Exited {
        id: open.id,
        status: ExitStatus::Code(0),
        timed_out: false,
    });
    let (pid, output, exit) = user.join().unwrap().unwrap();
    assert_eq!(pid, 31);
    assert_eq!(output, b"a  b\r\n$ ");
    assert_eq!(exit, Some((ExitStatus::Code(0), false)));
}

#[test]
fn dropping_a_pty_session_hangs_up() {
    let (client, mut agent) = connect();
    let user = thread::spawn(move || {
        let pty = client.pty_open(ProcessSpec::shell("top"), "vt100", 10, 10)?;
        pty.close()?;
        drop(pty);
        Ok::<_, ClientError>(())
    });
    let Message::PtyOpen(open) = agent.recv() else {
        panic!("expected PtyOpen")
    };
    agent.send(Started {
        id: open.id,
        pid: 2,
    });
    user.join().unwrap().unwrap();
    // One Close: dropping after close() does not repeat it.
    assert!(matches!(agent.recv(), Message::Close(c) if c.id == open.id));
    // The client was dropped with the thread: the connection ends with nothing more.
    assert!(agent.recv_or_eof().is_none());
}

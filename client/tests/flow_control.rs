//! Per-stream windows: the client grants only as its consumer takes data, never sends beyond the
//! window, and one stalled consumer does not hold back other requests.

mod common;

use std::io::Write;
use std::sync::mpsc;
use std::thread;

use agentvm_client::{ClientError, ErrorCode, ExecEvent, ExitStatus, ProcessSpec, ProcessSpecExt};
use agentvm_protocol::{
    Data, Done, Exited, Message, RecvWindow, SendWindow, Started, Stream, Window, INITIAL_WINDOW,
    MAX_CHUNK,
};
use common::{connect, FakeAgent};

/// The agent's side of starting an exec: answers the Exec with Started and returns its id.
fn accept_exec(agent: &mut FakeAgent) -> u64 {
    let Message::Exec(exec) = agent.recv() else {
        panic!("expected Exec")
    };
    agent.send(Started {
        id: exec.id,
        pid: 100 + exec.id as u32,
    });
    exec.id
}

/// Makes the client finish dispatching everything the agent sent so far: the reader thread
/// handles messages in order, so once a Ping's answer came back, every earlier message was
/// dispatched (and any Window a wrong client would grant on receipt was already sent).
fn sync(client: &agentvm_client::AgentClient, agent: &mut FakeAgent) {
    let pinger = client.clone();
    let ping = thread::spawn(move || pinger.ping());
    let p = match agent.recv() {
        Message::Ping(p) => p,
        other => panic!("expected only the Ping, not a Window or anything else: {other:?}"),
    };
    agent.send(Done { id: p.id });
    ping.join().unwrap().unwrap();
}

#[test]
fn windows_are_granted_only_as_the_consumer_reads() {
    let (client, mut agent) = connect();
    let (go, wait) = mpsc::channel::<()>();
    let exec_client = client.clone();
    let consumer = thread::spawn(move || {
        let mut exec = exec_client.exec(ProcessSpec::argv(["producer"]), false)?;
        wait.recv().unwrap();
        let mut total = 0;
        while let Some(event) = exec.next_event()? {
            if let ExecEvent::Stdout(chunk) = event {
                total += chunk.len();
            }
        }
        Ok::<_, ClientError>(total)
    });
    let id = accept_exec(&mut agent);
    let mut window = SendWindow::new();
    let chunk = vec![b'x'; MAX_CHUNK];
    while window.available() > 0 {
        window.consume(MAX_CHUNK).unwrap();
        agent.send(Data {
            id,
            stream: Stream::Stdout,
            data: chunk.clone(),
        });
    }
    // All of the window arrived, nobody read: no grant may have been sent.
    sync(&client, &mut agent);
    sync(&client, &mut agent);

    go.send(()).unwrap();
    let Message::Window(grant) = agent.recv() else {
        panic!("expected a Window")
    };
    assert_eq!((grant.id, grant.stream), (id, Stream::Stdout));
    // Granted once half the window was consumed, and for what was consumed.
    assert_eq!(grant.bytes, INITIAL_WINDOW / 2);
    window.grant(grant.bytes).unwrap();
    agent.send_stream(id, Stream::Stdout, &[b'y'; 100], &mut window);
    agent.send(Exited {
        id,
        status: ExitStatus::Code(0),
        timed_out: false,
    });
    assert_eq!(
        consumer.join().unwrap().unwrap(),
        INITIAL_WINDOW as usize + 100
    );
}

#[test]
fn data_beyond_the_window_fails_that_request() {
    let (client, mut agent) = connect();
    let exec_client = client.clone();
    let (go, wait) = mpsc::channel::<()>();
    let consumer = thread::spawn(move || {
        let mut exec = exec_client
            .exec(ProcessSpec::argv(["producer"]), false)
            .unwrap();
        // Reading only after the overrun: consumption would legitimately widen the window.
        wait.recv().unwrap();
        let mut taken = 0;
        loop {
            match exec.next_event() {
                Ok(Some(ExecEvent::Stderr(chunk))) => taken += chunk.len(),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => return (taken, e),
            }
        }
    });
    let id = accept_exec(&mut agent);
    for _ in 0..INITIAL_WINDOW as usize / MAX_CHUNK {
        agent.send(Data {
            id,
            stream: Stream::Stderr,
            data: vec![0; MAX_CHUNK],
        });
    }
    agent.send(Data {
        id,
        stream: Stream::Stderr,
        data: vec![0; 1],
    });
    let Message::ErrorMsg(error) = agent.recv() else {
        panic!("expected ErrorMsg")
    };
    assert_eq!((error.id, error.code), (id, ErrorCode::Protocol));
    assert!(error.message.contains("window"), "{}", error.message);
    assert!(matches!(agent.recv(), Message::Close(c) if c.id == id));
    go.send(()).unwrap();
    // The data that arrived within the window is still delivered, then the error.
    let (taken, err) = consumer.join().unwrap();
    assert_eq!(taken, INITIAL_WINDOW as usize);
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("window"), "{err}");
    // Other requests are unaffected.
    sync(&client, &mut agent);
}

#[test]
fn a_stalled_consumer_does_not_block_other_requests() {
    let (client, mut agent) = connect();
    let (stalled_tx, stalled_rx) = mpsc::channel();
    let stalled_client = client.clone();
    // Holds its exec open without ever reading it.
    let stalled = thread::spawn(move || {
        let exec = stalled_client
            .exec(ProcessSpec::argv(["flood"]), false)
            .unwrap();
        stalled_rx.recv().unwrap();
        drop(exec);
    });
    let stalled_id = accept_exec(&mut agent);
    let mut stalled_window = SendWindow::new();
    agent.send_stream(
        stalled_id,
        Stream::Stdout,
        &vec![1; INITIAL_WINDOW as usize],
        &mut stalled_window,
    );
    assert_eq!(stalled_window.available(), 0);

    let busy_client = client.clone();
    let busy = thread::spawn(move || {
        busy_client
            .exec(ProcessSpec::argv(["busy"]), false)?
            .wait_with_output(usize::MAX)
    });
    let busy_id = accept_exec(&mut agent);
    let output: Vec<u8> = (0..4 * INITIAL_WINDOW).map(|i| i as u8).collect();
    // Needs grants from the busy consumer all along: it gets them while the other stalls.
    agent.send_stream(busy_id, Stream::Stdout, &output, &mut SendWindow::new());
    agent.send(Exited {
        id: busy_id,
        status: ExitStatus::Code(0),
        timed_out: false,
    });
    let result = busy.join().unwrap().unwrap();
    assert_eq!(result.stdout, output);

    stalled_tx.send(()).unwrap();
    stalled.join().unwrap();
    // Dropping the unread exec closes it; no grant was ever sent for it (the busy exec's last
    // grants may still be in flight).
    loop {
        match agent.recv() {
            Message::Window(w) if w.id == busy_id => {}
            Message::Close(c) if c.id == stalled_id => break,
            other => panic!("expected Close of the stalled exec, got {other:?}"),
        }
    }
}

#[test]
fn the_client_never_sends_beyond_the_window() {
    let (client, mut agent) = connect();
    let input: Vec<u8> = (0..4 * INITIAL_WINDOW as usize)
        .map(|i| (i % 251) as u8)
        .collect();
    let sent = input.clone();
    let writer = thread::spawn(move || {
        let mut exec = client.exec(ProcessSpec::argv(["sink"]), true)?;
        let mut stdin = exec.take_stdin().unwrap();
        stdin.write_all(&sent)?;
        stdin.close()?;
        Ok::<_, ClientError>(exec)
    });
    let id = accept_exec(&mut agent);
    let mut window = RecvWindow::new();
    let mut received = Vec::new();
    while received.len() < INITIAL_WINDOW as usize {
        let Message::Data(d) = agent.recv() else {
            panic!("expected Data")
        };
        assert_eq!((d.id, d.stream), (id, Stream::Stdin));
        assert!(d.data.len() <= MAX_CHUNK);
        window.received(d.data.len()).expect("beyond the window");
        received.extend_from_slice(&d.data);
    }
    // Out of credit now. A small grant must produce exactly that much: anything sent beyond
    // the window would have been queued before it.
    agent.send(Window {
        id,
        stream: Stream::Stdin,
        bytes: 100,
    });
    let Message::Data(d) = agent.recv() else {
        panic!("expected Data")
    };
    assert_eq!(d.data.len(), 100);
    received.extend_from_slice(&d.data);
    // The rest under a normal window.
    agent.send(Window {
        id,
        stream: Stream::Stdin,
        bytes: INITIAL_WINDOW,
    });
    let mut window = RecvWindow::new();
    loop {
        match agent.recv() {
            Message::Data(d) => {
                window.received(d.data.len()).expect("beyond the window");
                received.extend_from_slice(&d.data);
                if let Some(bytes) = window.consumed(d.data.len()) {
                    agent.send(Window {
                        id,
                        stream: Stream::Stdin,
                        bytes,
                    });
                }
            }
            Message::Eof(e) if e.stream == Stream::Stdin => break,
            other => panic!("expected Data or Eof, got {other:?}"),
        }
    }
    assert_eq!(received, input);
    agent.send(Exited {
        id,
        status: ExitStatus::Code(0),
        timed_out: false,
    });
    let mut exec = writer.join().unwrap().unwrap();
    assert!(matches!(
        exec.next_event().unwrap(),
        Some(ExecEvent::Exited { .. })
    ));
}

#[test]
fn a_blocked_stdin_writer_fails_when_the_process_exits() {
    let (client, mut agent) = connect();
    let writer = thread::spawn(move || {
        let mut exec = client.exec(ProcessSpec::argv(["sink"]), true)?;
        let mut stdin = exec.take_stdin().unwrap();
        let err = stdin
            .write_all(&vec![0; 2 * INITIAL_WINDOW as usize])
            .unwrap_err();
        Ok::<_, ClientError>((err, exec))
    });
    let id = accept_exec(&mut agent);
    let mut got = 0;
    while got < INITIAL_WINDOW as usize {
        let Message::Data(d) = agent.recv() else {
            panic!("expected Data")
        };
        got += d.data.len();
    }
    agent.send(Exited {
        id,
        status: ExitStatus::Code(1),
        timed_out: false,
    });
    let (err, _exec) = writer.join().unwrap().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    assert!(err.to_string().contains("exited"), "{err}");
}

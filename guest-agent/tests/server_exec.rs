//! `Exec` over the protocol: output streams, exit codes and signals, stdin, spawn failures,
//! timeouts, Kill, Close, concurrency, flow control, environment, user, connection teardown.

mod common;

use std::io::{BufRead, BufReader};

use agentvm_protocol::{
    Close, Data, Eof, ErrorCode, Exec, ExitStatus, Features, Kill, Message, Ping, SendWindow,
    Stream, INITIAL_WINDOW,
};
use common::{argv, wait_gone, Agent, Client};

fn first_line(bytes: &[u8]) -> String {
    BufReader::new(bytes)
        .lines()
        .next()
        .expect("a line")
        .unwrap()
}

/// Reads request `id` until its first stdout line (granting nothing: lines are short).
fn read_stdout_line(client: &mut Client, id: u64) -> String {
    let mut out = Vec::new();
    while !out.contains(&b'\n') {
        match client.recv_for(id) {
            Message::Started(_) => {}
            Message::Data(d) if d.stream == Stream::Stdout => out.extend(d.data),
            other => panic!("unexpected {other:?}"),
        }
    }
    first_line(&out)
}

#[test]
fn stdout_and_stderr_are_separate_and_ordered_and_exited_comes_last() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let result = client.sh(
        1,
        "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 3",
    );
    assert_eq!(result.stdout, b"out1\nout2\nout3\n");
    assert_eq!(result.stderr, b"err1\nerr2\nerr3\n");
    assert_eq!(result.status, Some(ExitStatus::Code(3)));
    assert!(!result.timed_out);
    assert!(matches!(result.messages[0], Message::Started(_)));
    assert!(matches!(result.messages.last(), Some(Message::Exited(_))));
}

#[test]
fn exit_by_signal_is_reported() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let result = client.sh(1, "kill -TERM $$");
    assert_eq!(result.status, Some(ExitStatus::Signal(libc::SIGTERM)));
    let result = client.exec(2, argv(&["true"]));
    assert_eq!(result.status, Some(ExitStatus::Code(0)));
}

#[test]
fn stdin_is_piped_with_window_grants() {
    let agent = Agent::start();
    let mut client = agent.connect();
    // More than one window of input: the agent must grant more as `cat` consumes it.
    let input: Vec<u8> = (0..(3 * INITIAL_WINDOW as usize + 1234))
        .map(|i| (i % 251) as u8)
        .collect();
    client.send(Exec {
        id: 7,
        spec: argv(&["cat"]),
        stdin: true,
    });
    let mut window = SendWindow::new();
    let mut sent = 0;
    let mut stdout = Vec::new();
    let mut eof_sent = false;
    loop {
        while sent < input.len() {
            let n = window.next_chunk(input.len() - sent);
            if n == 0 {
                break;
            }
            window.consume(n).unwrap();
            client.send(Data {
                id: 7,
                stream: Stream::Stdin,
                data: input[sent..sent + n].to_vec(),
            });
            sent += n;
        }
        if sent == input.len() && !eof_sent {
            client.send(Eof {
                id: 7,
                stream: Stream::Stdin,
            });
            eof_sent = true;
        }
        match client.recv_for(7) {
            Message::Started(_) => {}
            Message::Window(w) => {
                assert_eq!(w.stream, Stream::Stdin);
                window.grant(w.bytes).unwrap();
            }
            Message::Data(d) => {
                assert_eq!(d.stream, Stream::Stdout);
                client.grant(7, Stream::Stdout, d.data.len() as u32);
                stdout.extend(d.data);
            }
            Message::Exited(e) => {
                assert_eq!(e.status, ExitStatus::Code(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        stdout == input,
        "cat echoed {} of {} bytes",
        stdout.len(),
        input.len()
    );
}

#[test]
fn spawn_failures_name_the_program_and_reason() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let e = client
        .exec(1, argv(&["/nonexistent/agentvm-program"]))
        .error
        .expect("an error");
    assert_eq!(e.code, ErrorCode::SpawnFailed);
    assert!(
        e.message.contains("/nonexistent/agentvm-program"),
        "{}",
        e.message
    );
    assert!(e.message.contains("No such file"), "{}", e.message);

    let e = client
        .exec(2, argv(&["/etc/passwd"]))
        .error
        .expect("an error");
    assert_eq!(e.code, ErrorCode::SpawnFailed);
    assert!(e.message.contains("/etc/passwd"), "{}", e.message);
    assert!(e.message.contains("ermission denied"), "{}", e.message);

    let mut spec = argv(&["true"]);
    spec.user = Some("no-such-user-agentvm".into());
    let e = client.exec(3, spec).error.expect("an error");
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.message.contains("no-such-user-agentvm"), "{}", e.message);

    let mut spec = argv(&["true"]);
    spec.cwd = Some("/nonexistent-agentvm-cwd".into());
    let e = client.exec(4, spec).error.expect("an error");
    assert_eq!(e.code, ErrorCode::SpawnFailed);
    assert!(
        e.message.contains("/nonexistent-agentvm-cwd"),
        "{}",
        e.message
    );

    // The connection is fine afterwards.
    assert_eq!(
        client.exec(5, argv(&["true"])).status,
        Some(ExitStatus::Code(0))
    );
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let mut spec = argv(&["sh", "-c", "sleep 1000 & echo $!; sleep 1000"]);
    spec.timeout_ms = Some(300);
    client.send(Exec {
        id: 1,
        spec,
        stdin: false,
    });
    let background: u32 = read_stdout_line(&mut client, 1).parse().unwrap();
    let result = client.collect(1);
    assert!(result.timed_out);
    assert_eq!(result.status, Some(ExitStatus::Signal(libc::SIGKILL)));
    wait_gone(background);
}

#[test]
fn kill_signals_the_process_group() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send(Exec {
        id: 1,
        spec: argv(&["sh", "-c", "echo ready; exec sleep 1000"]),
        stdin: false,
    });
    assert_eq!(read_stdout_line(&mut client, 1), "ready");
    client.send(Kill {
        id: 1,
        signal: libc::SIGTERM,
    });
    let result = client.collect(1);
    assert_eq!(result.status, Some(ExitStatus::Signal(libc::SIGTERM)));
    assert!(!result.timed_out);
}

#[test]
fn close_kills_the_group_and_ends_with_exited() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send(Exec {
        id: 1,
        spec: argv(&["sh", "-c", "sleep 1000 & echo $!; wait"]),
        stdin: false,
    });
    let background: u32 = read_stdout_line(&mut client, 1).parse().unwrap();
    client.send(Close { id: 1 });
    let result = client.collect(1);
    assert_eq!(result.status, Some(ExitStatus::Signal(libc::SIGKILL)));
    wait_gone(background);
    // Messages for the ended id are ignored.
    client.send(Close { id: 1 });
    client.send(Data {
        id: 1,
        stream: Stream::Stdin,
        data: b"late".to_vec(),
    });
    client.send(Ping { id: 2 });
    assert!(matches!(client.recv(), Message::Done(d) if d.id == 2));
}

#[test]
fn a_hundred_concurrent_execs() {
    let agent = Agent::start();
    let mut client = agent.connect();
    for id in 1..=100u64 {
        client.send(Exec {
            id,
            spec: argv(&["sh", "-c", &format!("echo {id}; echo e{id} >&2")]),
            stdin: false,
        });
    }
    for id in 1..=100u64 {
        let result = client.collect(id);
        assert_eq!(result.status, Some(ExitStatus::Code(0)), "{result:?}");
        assert_eq!(result.stdout, format!("{id}\n").as_bytes());
        assert_eq!(result.stderr, format!("e{id}\n").as_bytes());
    }
}

#[test]
fn output_never_exceeds_the_window_and_arrives_complete() {
    let agent = Agent::start();
    let mut client = agent.connect();
    // Not a multiple of the window, so every stall happens with output still to come.
    const TOTAL: usize = (64 << 20) + 12345;
    client.send(Exec {
        id: 1,
        spec: argv(&["head", "-c", &TOTAL.to_string(), "/dev/zero"]),
        stdin: false,
    });
    let mut credit = INITIAL_WINDOW as usize;
    let mut received = 0;
    let mut pings = 0u64;
    loop {
        match client.recv() {
            Message::Started(_) => {}
            Message::Data(d) => {
                assert_eq!(d.stream, Stream::Stdout);
                assert!(d.data.len() <= credit, "agent sent beyond the window");
                assert!(d.data.iter().all(|b| *b == 0));
                credit -= d.data.len();
                received += d.data.len();
                if credit == 0 {
                    // The stream is stalled on the window; the connection is not: a Ping
                    // still gets through before we grant more.
                    pings += 1;
                    client.send(Ping { id: 1000 + pings });
                    match client.recv() {
                        Message::Done(done) if done.id == 1000 + pings => {}
                        other => panic!("expected only the Ping's Done, got {other:?}"),
                    }
                    credit += INITIAL_WINDOW as usize;
                    client.grant(1, Stream::Stdout, INITIAL_WINDOW);
                }
            }
            Message::Exited(e) => {
                assert_eq!(e.status, ExitStatus::Code(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, TOTAL);
}

#[test]
fn env_cwd_and_clear_env() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let mut spec = argv(&["sh", "-c", "echo \"$FOO $BAR\"; pwd"]);
    spec.env = vec![
        ("FOO".into(), "one".into()),
        ("BAR".into(), "two".into()),
        ("FOO".into(), "three".into()),
    ];
    spec.cwd = Some("/tmp".into());
    let result = client.exec(1, spec);
    assert_eq!(String::from_utf8_lossy(&result.stdout), "three two\n/tmp\n");

    let mut spec = argv(&["/usr/bin/env"]);
    spec.clear_env = true;
    spec.env = vec![("ONLY".into(), "this".into())];
    let result = client.exec(2, spec);
    assert_eq!(String::from_utf8_lossy(&result.stdout), "ONLY=this\n");
}

#[test]
fn runs_as_another_user() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let mut spec = argv(&["sh", "-c", "id -u; id -G"]);
    spec.user = Some("nobody".into());
    let result = client.exec(1, spec);
    let text = String::from_utf8_lossy(&result.stdout).to_string();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("65534"));
    assert!(
        !lines.next().unwrap().split(' ').any(|g| g == "0"),
        "{text}"
    );

    let mut spec = argv(&["id", "-u"]);
    spec.user = Some("1234:4321".into());
    assert_eq!(client.exec(2, spec).stdout, b"1234\n");
}

#[test]
fn dropping_the_connection_kills_its_execs() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send(Exec {
        id: 1,
        spec: argv(&["sh", "-c", "sleep 1000 & echo $!; wait"]),
        stdin: false,
    });
    let background: u32 = read_stdout_line(&mut client, 1).parse().unwrap();
    drop(client);
    wait_gone(background);
    // The agent serves the next connection.
    let mut client = agent.connect();
    client.send(Ping { id: 1 });
    assert!(matches!(client.recv(), Message::Done(_)));
}

#[test]
fn duplicate_live_id_is_refused() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send(Exec {
        id: 5,
        spec: argv(&["sh", "-c", "echo up; exec sleep 1000"]),
        stdin: false,
    });
    assert_eq!(read_stdout_line(&mut client, 5), "up");
    client.send(Ping { id: 5 });
    match client.recv_for(5) {
        Message::ErrorMsg(e) => {
            assert_eq!(e.code, ErrorCode::DuplicateId);
            assert!(e.message.contains('5'));
        }
        other => panic!("expected DuplicateId, got {other:?}"),
    }
    client.send(Close { id: 5 });
    assert_eq!(
        client.collect(5).status,
        Some(ExitStatus::Signal(libc::SIGKILL))
    );
    // Free again.
    client.send(Ping { id: 5 });
    assert!(matches!(client.recv_for(5), Message::Done(_)));
}

#[test]
fn features_not_negotiated_are_unsupported() {
    let agent = Agent::start();
    let mut client = Client::handshake(agent.stream(), Features::empty()).unwrap();
    assert!(client.negotiated.features == Features::empty());
    let e = client.exec(1, argv(&["true"])).error.expect("an error");
    assert_eq!(e.code, ErrorCode::Unsupported);
    client.send(Ping { id: 2 });
    assert!(matches!(client.recv(), Message::Done(_)));
}

#[test]
fn a_grandchild_holding_the_pipes_does_not_hold_back_exited() {
    let agent = Agent::start();
    let mut client = agent.connect();
    // The background sleep keeps stdout and stderr open after the shell exits.
    let result = client.sh(1, "sleep 1000 & echo $!; echo bye >&2");
    assert_eq!(result.status, Some(ExitStatus::Code(0)));
    assert_eq!(result.stderr, b"bye\n");
    let sleeper: i32 = first_line(&result.stdout).parse().unwrap();
    // SAFETY: kill with plain integers; the sleep is ours to stop.
    assert_eq!(unsafe { libc::kill(sleeper, libc::SIGKILL) }, 0);
    common::wait_gone(sleeper as u32);
}

#[test]
fn stdin_beyond_the_window_is_a_protocol_error() {
    let agent = Agent::start();
    let mut client = agent.connect();
    // Without `stdin` the input is never consumed, so the window is never granted back.
    client.send(Exec {
        id: 1,
        spec: argv(&["sleep", "1000"]),
        stdin: false,
    });
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..(INITIAL_WINDOW as usize / chunk.len()) {
        client.send(Data {
            id: 1,
            stream: Stream::Stdin,
            data: chunk.clone(),
        });
    }
    client.send(Data {
        id: 1,
        stream: Stream::Stdin,
        data: b"!".to_vec(),
    });
    loop {
        match client.recv() {
            Message::Started(_) => {}
            Message::ErrorMsg(e) => {
                assert_eq!((e.id, e.code), (0, ErrorCode::Protocol));
                assert!(e.message.contains("request 1"), "{}", e.message);
                assert!(e.message.contains("window"), "{}", e.message);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    client.send(Close { id: 1 });
    assert_eq!(
        client.collect(1).status,
        Some(ExitStatus::Signal(libc::SIGKILL))
    );
}

#[test]
fn kill_with_a_bad_signal_is_reported_without_ending_the_request() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send(Exec {
        id: 3,
        spec: argv(&["sh", "-c", "echo up; exec sleep 1000"]),
        stdin: false,
    });
    assert_eq!(read_stdout_line(&mut client, 3), "up");
    client.send(Kill { id: 3, signal: 999 });
    match client.recv() {
        Message::ErrorMsg(e) => {
            assert_eq!((e.id, e.code), (0, ErrorCode::InvalidArgument));
            assert!(
                e.message.contains("999") && e.message.contains("request 3"),
                "{}",
                e.message
            );
        }
        other => panic!("expected an ErrorMsg about the Kill, got {other:?}"),
    }
    client.send(Kill {
        id: 3,
        signal: libc::SIGKILL,
    });
    assert_eq!(
        client.collect(3).status,
        Some(ExitStatus::Signal(libc::SIGKILL))
    );
}

#[test]
fn dropping_the_connection_kills_an_exec_stalled_on_its_window() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send(Exec {
        id: 1,
        spec: argv(&["yes"]),
        stdin: false,
    });
    let pid = match client.recv_for(1) {
        Message::Started(s) => s.pid,
        other => panic!("expected Started, got {other:?}"),
    };
    // Take the first window's worth and grant nothing: `yes` is now stopped by its pipe.
    let mut received = 0;
    while received < INITIAL_WINDOW as usize {
        match client.recv_for(1) {
            Message::Data(d) => received += d.data.len(),
            other => panic!("expected Data, got {other:?}"),
        }
    }
    assert_eq!(received, INITIAL_WINDOW as usize);
    drop(client);
    common::wait_gone(pid);
}

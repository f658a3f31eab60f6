//! Background processes: start, list, wait (with timeout), kill, logs (offset, follow, ring
//! drop), and life beyond the connection that started them.

mod common;

use agentvm_protocol::{
    Close, ErrorCode, ExitStatus, Message, ProcInfo, ProcKill, ProcList, ProcLogs, ProcStart,
    ProcWait, ProcessSpec, Stream,
};
use common::{argv, Client};

fn start(client: &mut Client, id: u64, spec: ProcessSpec) -> (u64, u32) {
    client.send(ProcStart { id, spec });
    match client.recv_for(id) {
        Message::ProcStarted(s) => (s.proc_id, s.pid),
        other => panic!("expected ProcStarted, got {other:?}"),
    }
}

fn wait(client: &mut Client, id: u64, proc_id: u64, timeout_ms: Option<u64>) -> Message {
    client.send(ProcWait {
        id,
        proc_id,
        timeout_ms,
    });
    client.recv_for(id)
}

fn list(client: &mut Client, id: u64) -> Vec<ProcInfo> {
    client.send(ProcList { id });
    match client.recv_for(id) {
        Message::ProcListing(l) => l.procs,
        other => panic!("expected ProcListing, got {other:?}"),
    }
}

/// LogsStart offset and the data, up to Done.
fn logs(
    client: &mut Client,
    id: u64,
    proc_id: u64,
    stream: Stream,
    offset: u64,
    follow: bool,
) -> (u64, Vec<u8>) {
    client.send(ProcLogs {
        id,
        proc_id,
        stream,
        offset,
        follow,
    });
    let start = match client.recv_for(id) {
        Message::LogsStart(s) => s.offset,
        other => panic!("expected LogsStart, got {other:?}"),
    };
    let result = client.collect(id);
    assert!(result.error.is_none(), "{:?}", result.error);
    let data = match stream {
        Stream::Stderr => result.stderr,
        _ => result.stdout,
    };
    (start, data)
}

#[test]
fn start_wait_list_and_logs() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    let (proc_id, pid) = start(
        &mut client,
        1,
        argv(&["sh", "-c", "echo hello; echo oops >&2; exit 4"]),
    );
    assert!(pid > 0);
    match wait(&mut client, 2, proc_id, None) {
        Message::Exited(e) => assert_eq!(e.status, ExitStatus::Code(4)),
        other => panic!("expected Exited, got {other:?}"),
    }
    // With follow, the log ends once the process exited and its output was all collected.
    assert_eq!(
        logs(&mut client, 3, proc_id, Stream::Stdout, 0, true),
        (0, b"hello\n".to_vec())
    );
    assert_eq!(
        logs(&mut client, 4, proc_id, Stream::Stderr, 0, false),
        (0, b"oops\n".to_vec())
    );
    assert_eq!(
        logs(&mut client, 5, proc_id, Stream::Stdout, 2, false),
        (2, b"llo\n".to_vec())
    );
    let procs = list(&mut client, 6);
    let info = procs.iter().find(|p| p.proc_id == proc_id).unwrap();
    assert_eq!(info.pid, pid);
    assert_eq!(info.status, Some(ExitStatus::Code(4)));
    assert_eq!((info.stdout_bytes, info.stderr_bytes), (6, 5));
    // proc ids are not reused.
    let (next, _) = start(&mut client, 7, argv(&["true"]));
    assert!(next > proc_id);
}

#[test]
fn processes_outlive_their_connection_and_can_be_killed() {
    let agent = common::Agent::start();
    let mut first = agent.connect();
    let (proc_id, pid) = start(
        &mut first,
        1,
        argv(&["sh", "-c", "echo started; exec sleep 1000"]),
    );
    drop(first);
    let mut client = agent.connect();
    // Following the log proves the process still runs after its connection went away.
    client.send(ProcLogs {
        id: 2,
        proc_id,
        stream: Stream::Stdout,
        offset: 0,
        follow: true,
    });
    assert!(matches!(client.recv_for(2), Message::LogsStart(_)));
    match client.recv_for(2) {
        Message::Data(d) => assert_eq!(d.data, b"started\n"),
        other => panic!("expected Data, got {other:?}"),
    }
    let info = list(&mut client, 3)
        .into_iter()
        .find(|p| p.proc_id == proc_id)
        .unwrap();
    assert_eq!((info.pid, info.status), (pid, None));
    match wait(&mut client, 4, proc_id, Some(50)) {
        Message::ErrorMsg(e) => {
            assert_eq!(e.code, ErrorCode::TimedOut);
            assert!(e.message.contains("still running"), "{}", e.message);
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
    client.send(ProcKill {
        id: 5,
        proc_id,
        signal: libc::SIGTERM,
    });
    assert!(matches!(client.recv_for(5), Message::Done(_)));
    match wait(&mut client, 6, proc_id, None) {
        Message::Exited(e) => assert_eq!(e.status, ExitStatus::Signal(libc::SIGTERM)),
        other => panic!("expected Exited, got {other:?}"),
    }
    // The follower ends once the process is gone.
    assert!(client.collect(2).error.is_none());
    common::wait_gone(pid);
}

#[test]
fn follow_streams_new_output_and_close_stops_it() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    let (proc_id, _) = start(
        &mut client,
        1,
        argv(&["sh", "-c", "echo one; sleep 0.2; echo two"]),
    );
    assert_eq!(
        logs(&mut client, 2, proc_id, Stream::Stdout, 0, true),
        (0, b"one\ntwo\n".to_vec())
    );

    let (sleeper, pid) = start(&mut client, 3, argv(&["sleep", "1000"]));
    client.send(ProcLogs {
        id: 4,
        proc_id: sleeper,
        stream: Stream::Stdout,
        offset: 0,
        follow: true,
    });
    assert!(matches!(client.recv_for(4), Message::LogsStart(_)));
    client.send(Close { id: 4 });
    assert!(matches!(client.recv_for(4), Message::Done(_)));
    client.send(ProcKill {
        id: 5,
        proc_id: sleeper,
        signal: libc::SIGKILL,
    });
    assert!(matches!(client.recv_for(5), Message::Done(_)));
    common::wait_gone(pid);
}

#[test]
fn the_log_keeps_the_newest_megabyte() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    let (proc_id, _) = start(&mut client, 1, argv(&["seq", "1", "400000"]));
    let expected: Vec<u8> = (1..=400000)
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    assert!(matches!(
        wait(&mut client, 2, proc_id, None),
        Message::Exited(_)
    ));
    let (start_offset, data) = logs(&mut client, 3, proc_id, Stream::Stdout, 0, true);
    let kept = 1 << 20;
    assert_eq!(start_offset as usize, expected.len() - kept);
    assert!(
        data == expected[expected.len() - kept..],
        "log tail differs"
    );
    let info = list(&mut client, 4)
        .into_iter()
        .find(|p| p.proc_id == proc_id)
        .unwrap();
    assert_eq!(info.stdout_bytes as usize, expected.len());
}

#[test]
fn unknown_proc_ids_are_not_found() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    for message in [
        wait(&mut client, 1, 999, None),
        {
            client.send(ProcKill {
                id: 2,
                proc_id: 999,
                signal: libc::SIGTERM,
            });
            client.recv_for(2)
        },
        {
            client.send(ProcLogs {
                id: 3,
                proc_id: 999,
                stream: Stream::Stdout,
                offset: 0,
                follow: false,
            });
            client.recv_for(3)
        },
    ] {
        match message {
            Message::ErrorMsg(e) => {
                assert_eq!(e.code, ErrorCode::NotFound);
                assert!(e.message.contains("999"), "{}", e.message);
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
    let e = {
        client.send(ProcStart {
            id: 4,
            spec: argv(&["/nonexistent/agentvm-bg"]),
        });
        client.recv_for(4)
    };
    assert!(
        matches!(e, Message::ErrorMsg(e) if e.code == ErrorCode::SpawnFailed && e.message.contains("/nonexistent/agentvm-bg"))
    );
}

#[test]
fn timeout_kills_a_background_process_group() {
    let agent = common::Agent::start();
    let mut client = agent.connect();
    let mut spec = argv(&["sh", "-c", "sleep 1000 & echo $!; wait"]);
    spec.timeout_ms = Some(200);
    let (proc_id, _) = start(&mut client, 1, spec);
    match wait(&mut client, 2, proc_id, None) {
        Message::Exited(e) => {
            assert_eq!(e.status, ExitStatus::Signal(libc::SIGKILL));
            assert!(e.timed_out);
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    let (_, out) = logs(&mut client, 3, proc_id, Stream::Stdout, 0, true);
    let sleeper: u32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    common::wait_gone(sleeper);
}

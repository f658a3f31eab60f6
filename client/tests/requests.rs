//! Request ids, multiplexing, answers and error mapping, against a fake agent.

mod common;

use std::collections::HashSet;
use std::thread;
use std::time::Duration;

use agentvm_client::{ClientError, ErrorCode, ExitStatus, FileType, ProcessSpec, ProcessSpecExt};
use agentvm_protocol::{
    Command, DirEntries, DirEntry, Done, ErrorMsg, Exec, Exited, FileMetadata, LogsStart, Message,
    Metadata, ProcInfo, ProcListing, ProcStarted, Ready, Started, WatchEvent, WatchEvents,
};
use common::{connect, within_guard};

fn metadata(size: u64) -> FileMetadata {
    FileMetadata {
        file_type: FileType::File,
        size,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 1,
        symlink_target: None,
    }
}

#[test]
fn handshake_reports_the_agent_and_the_common_features() {
    let (client, _agent) = connect();
    let negotiated = client.negotiated();
    assert_eq!(negotiated.peer.software_version, "fake-agent 9.9.9");
    assert_eq!(negotiated.features, agentvm_protocol::Features::ALL);
    assert_eq!(negotiated.version, agentvm_protocol::PROTOCOL_VERSION);
}

#[test]
fn concurrent_requests_get_distinct_ids_and_their_own_answers() {
    let (client, mut agent) = connect();
    const N: usize = 8;
    // Each thread stats its own path; the agent answers in reverse order of arrival, so a
    // client that matched answers by arrival order would hand out the wrong sizes.
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            thread::spawn(move || client.stat(&format!("/file{i}"), true).unwrap().size)
        })
        .collect();
    let mut requests = Vec::new();
    for _ in 0..N {
        match agent.recv() {
            Message::StatPath(stat) => requests.push(stat),
            other => panic!("expected StatPath, got {other:?}"),
        }
    }
    let ids: HashSet<u64> = requests.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), N, "ids must be unique");
    assert!(!ids.contains(&0), "id 0 is reserved");
    for request in requests.iter().rev() {
        let size: u64 = request.path.trim_start_matches("/file").parse().unwrap();
        agent.send(Metadata {
            id: request.id,
            metadata: metadata(size),
        });
    }
    let sizes: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let expected: Vec<u64> = (0..N as u64).collect();
    // Thread i asked for /file{i}: its answer must be i.
    assert_eq!(sizes, expected);
}

#[test]
fn agent_errors_keep_their_code_and_message() {
    let (client, mut agent) = connect();
    let call = thread::spawn(move || client.read_to_vec("/missing"));
    let Message::ReadFile(read) = agent.recv() else {
        panic!("expected ReadFile")
    };
    agent.send(ErrorMsg {
        id: read.id,
        code: ErrorCode::NotFound,
        message: "/missing: No such file or directory".into(),
    });
    let err = call.join().unwrap().unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
    assert!(
        err.to_string()
            .contains("/missing: No such file or directory"),
        "{err}"
    );
}

#[test]
fn unknown_error_codes_are_kept() {
    let (client, mut agent) = connect();
    let call = thread::spawn(move || client.ping());
    let Message::Ping(ping) = agent.recv() else {
        panic!("expected Ping")
    };
    agent.send(ErrorMsg {
        id: ping.id,
        code: ErrorCode::Other(99),
        message: "newer agent".into(),
    });
    let err = call.join().unwrap().unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::Other(99)));
}

#[test]
fn ping_and_after_restore() {
    let (client, mut agent) = connect();
    let call = thread::spawn(move || {
        client.ping()?;
        client.after_restore(1_700_000_000_000_000_000, &[7; 32])
    });
    let Message::Ping(ping) = agent.recv() else {
        panic!("expected Ping")
    };
    agent.send(Done { id: ping.id });
    let Message::AfterRestore(restore) = agent.recv() else {
        panic!("expected AfterRestore")
    };
    assert_eq!(restore.realtime_ns, 1_700_000_000_000_000_000);
    assert_eq!(restore.entropy, vec![7; 32]);
    agent.send(Done { id: restore.id });
    call.join().unwrap().unwrap();
}

#[test]
fn an_unexpected_answer_is_a_protocol_error_and_the_request_is_closed() {
    let (client, mut agent) = connect();
    let call = thread::spawn(move || client.ping());
    let Message::Ping(ping) = agent.recv() else {
        panic!("expected Ping")
    };
    agent.send(Ready { id: ping.id });
    let err = call.join().unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("unexpected Ready"), "{err}");
    // The client tells the agent and closes the request.
    match agent.recv() {
        Message::ErrorMsg(e) => {
            assert_eq!(e.id, ping.id);
            assert_eq!(e.code, ErrorCode::Protocol);
        }
        other => panic!("expected ErrorMsg, got {other:?}"),
    }
    assert!(matches!(agent.recv(), Message::Close(c) if c.id == ping.id));
}

#[test]
fn a_host_only_message_from_the_agent_fails_that_request_only() {
    let (client, mut agent) = connect();
    let other_client = client.clone();
    let call = thread::spawn(move || client.ping());
    let Message::Ping(ping) = agent.recv() else {
        panic!("expected Ping")
    };
    agent.send(Exec {
        id: ping.id,
        spec: ProcessSpec::argv(["x"]),
        stdin: false,
    });
    let err = call.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("not allowed"), "{err}");
    assert!(matches!(agent.recv(), Message::ErrorMsg(e) if e.code == ErrorCode::Protocol));
    assert!(matches!(agent.recv(), Message::Close(_)));
    // The connection still works.
    let call = thread::spawn(move || other_client.ping());
    let Message::Ping(ping) = agent.recv() else {
        panic!("expected Ping")
    };
    agent.send(Done { id: ping.id });
    call.join().unwrap().unwrap();
}

#[test]
fn messages_for_ended_requests_are_ignored() {
    let (client, mut agent) = connect();
    let pinger = client.clone();
    let call = thread::spawn(move || pinger.ping());
    let Message::Ping(ping) = agent.recv() else {
        panic!("expected Ping")
    };
    agent.send(Done { id: ping.id });
    call.join().unwrap().unwrap();
    // Late and unknown ids: ignored, the connection carries on.
    agent.send(Done { id: ping.id });
    agent.send(Done { id: 12345 });
    agent.send(ErrorMsg {
        id: 0,
        code: ErrorCode::Internal,
        message: "about the connection".into(),
    });
    let call = thread::spawn(move || client.ping());
    let Message::Ping(ping) = agent.recv() else {
        panic!("expected Ping")
    };
    agent.send(Done { id: ping.id });
    call.join().unwrap().unwrap();
}

#[test]
fn one_shot_calls_time_out() {
    let (client, mut agent) = connect();
    let client = client.with_call_timeout(Duration::from_millis(50));
    let err = within_guard(move || client.ping()).unwrap_err();
    assert!(matches!(err, ClientError::TimedOut { .. }), "{err}");
    assert!(err.to_string().contains("Ping"), "{err}");
    assert!(matches!(agent.recv(), Message::Ping(_)));
    // Giving up on a request closes it in the guest.
    assert!(matches!(agent.recv(), Message::Close(_)));
}

#[test]
fn file_operations_send_their_arguments_and_return_the_answers() {
    let (client, mut agent) = connect();
    let call = thread::spawn(move || {
        let entries = client.list_dir("/d")?;
        client.mkdir("/d/new", true, Some(0o700))?;
        client.remove("/d/old", true)?;
        let stat = client.stat("/d/link", false)?;
        Ok::<_, ClientError>((entries, stat))
    });
    let Message::ListDir(list) = agent.recv() else {
        panic!("expected ListDir")
    };
    assert_eq!(list.path, "/d");
    for name in ["a", "b"] {
        agent.send(DirEntries {
            id: list.id,
            entries: vec![DirEntry {
                name: name.into(),
                metadata: metadata(1),
            }],
        });
    }
    agent.send(Done { id: list.id });
    let Message::MakeDir(mkdir) = agent.recv() else {
        panic!("expected MakeDir")
    };
    assert_eq!(
        (mkdir.path.as_str(), mkdir.parents, mkdir.mode),
        ("/d/new", true, Some(0o700))
    );
    agent.send(Done { id: mkdir.id });
    let Message::RemovePath(remove) = agent.recv() else {
        panic!("expected RemovePath")
    };
    assert_eq!((remove.path.as_str(), remove.recursive), ("/d/old", true));
    agent.send(Done { id: remove.id });
    let Message::StatPath(stat) = agent.recv() else {
        panic!("expected StatPath")
    };
    assert!(!stat.follow_symlinks);
    let mut link = metadata(4);
    link.file_type = FileType::Symlink;
    link.symlink_target = Some("/x".into());
    agent.send(Metadata {
        id: stat.id,
        metadata: link.clone(),
    });
    let (entries, stat) = call.join().unwrap().unwrap();
    let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(stat, link);
}

#[test]
fn background_processes() {
    let (client, mut agent) = connect();
    let call = thread::spawn(move || {
        let started = client.proc_start(ProcessSpec::shell("sleep 1").cwd("/tmp"))?;
        let listing = client.proc_list()?;
        client.proc_kill(started.proc_id, 15)?;
        let exit = client.proc_wait(started.proc_id, Some(Duration::from_secs(3)))?;
        let timed_out = client
            .proc_wait(started.proc_id, Some(Duration::from_millis(5)))
            .unwrap_err();
        Ok::<_, ClientError>((started, listing, exit, timed_out))
    });
    let Message::ProcStart(start) = agent.recv() else {
        panic!("expected ProcStart")
    };
    assert_eq!(start.spec.command, Command::Shell("sleep 1".into()));
    assert_eq!(start.spec.cwd.as_deref(), Some("/tmp"));
    agent.send(ProcStarted {
        id: start.id,
        proc_id: 3,
        pid: 77,
    });
    let Message::ProcList(list) = agent.recv() else {
        panic!("expected ProcList")
    };
    let info = ProcInfo {
        proc_id: 3,
        pid: 77,
        command: Command::Shell("sleep 1".into()),
        started_unix_ms: 5,
        status: None,
        stdout_bytes: 0,
        stderr_bytes: 0,
    };
    agent.send(ProcListing {
        id: list.id,
        procs: vec![info.clone()],
    });
    let Message::ProcKill(kill) = agent.recv() else {
        panic!("expected ProcKill")
    };
    assert_eq!((kill.proc_id, kill.signal), (3, 15));
    agent.send(Done { id: kill.id });
    let Message::ProcWait(wait) = agent.recv() else {
        panic!("expected ProcWait")
    };
    assert_eq!((wait.proc_id, wait.timeout_ms), (3, Some(3000)));
    agent.send(Exited {
        id: wait.id,
        status: ExitStatus::Signal(15),
        timed_out: false,
    });
    let Message::ProcWait(wait) = agent.recv() else {
        panic!("expected ProcWait")
    };
    agent.send(ErrorMsg {
        id: wait.id,
        code: ErrorCode::TimedOut,
        message: "process 3 still running after 5 ms".into(),
    });
    let (started, listing, exit, timed_out) = call.join().unwrap().unwrap();
    assert_eq!((started.proc_id, started.pid), (3, 77));
    assert_eq!(listing, vec![info]);
    assert_eq!(exit.status, ExitStatus::Signal(15));
    assert_eq!(timed_out.agent_code(), Some(ErrorCode::TimedOut));
}

#[test]
fn process_logs_read_to_the_end() {
    use std::io::Read;
    let (client, mut agent) = connect();
    let call = thread::spawn(move || {
        let mut logs = client.proc_logs(3, agentvm_client::Stream::Stderr, 10, false)?;
        let mut text = String::new();
        logs.read_to_string(&mut text)?;
        Ok::<_, ClientError>((logs.start_offset(), text))
    });
    let Message::ProcLogs(logs) = agent.recv() else {
        panic!("expected ProcLogs")
    };
    assert_eq!((logs.proc_id, logs.offset, logs.follow), (3, 10, false));
    agent.send(LogsStart {
        id: logs.id,
        offset: 12,
    });
    let mut window = agentvm_protocol::SendWindow::new();
    agent.send_stream(
        logs.id,
        agentvm_protocol::Stream::Stderr,
        b"log line\n",
        &mut window,
    );
    agent.send(Done { id: logs.id });
    let (offset, text) = call.join().unwrap().unwrap();
    assert_eq!(offset, 12);
    assert_eq!(text, "log line\n");
}

#[test]
fn watch_reports_batches_and_stops() {
    let (client, mut agent) = connect();
    let (tx, rx) = std::sync::mpsc::channel();
    let call = thread::spawn(move || {
        let mut watch = client.watch("/w", true, &["**/*.rs"], &["target/**"])?;
        tx.send(()).unwrap();
        let events = watch.next_events(common::GUARD)?;
        let quiet = watch.next_events(Duration::from_millis(1))?;
        watch.stop()?;
        Ok::<_, ClientError>((events, quiet))
    });
    let Message::WatchStart(start) = agent.recv() else {
        panic!("expected WatchStart")
    };
    assert_eq!(start.path, "/w");
    assert!(start.recursive);
    assert_eq!(start.include, ["**/*.rs"]);
    assert_eq!(start.exclude, ["target/**"]);
    agent.send(Ready { id: start.id });
    rx.recv_timeout(common::GUARD).unwrap();
    let events = vec![
        WatchEvent::Created {
            path: "/w/a.rs".into(),
            is_dir: false,
        },
        WatchEvent::Overflow,
    ];
    agent.send(WatchEvents {
        id: start.id,
        events: events.clone(),
    });
    assert!(matches!(agent.recv(), Message::Close(c) if c.id == start.id));
    agent.send(Done { id: start.id });
    let (got, quiet) = call.join().unwrap().unwrap();
    assert_eq!(got, events);
    assert!(quiet.is_empty());
}

#[test]
fn exec_streams_events_in_order_and_forwards_stdin() {
    use std::io::Write;
    let (client, mut agent) = connect();
    let call = thread::spawn(move || {
        let mut exec = client.exec(ProcessSpec::argv(["cat"]).env("A", "1").user("1000"), true)?;
        let pid = exec.pid();
        let mut stdin = exec.take_stdin().unwrap();
        stdin.write_all(b"hello\n")?;
        stdin.close()?;
        let events: Vec<_> = exec.events().collect::<Result<_, _>>()?;
        Ok::<_, ClientError>((pid, events))
    });
    let Message::Exec(exec) = agent.recv() else {
        panic!("expected Exec")
    };
    assert!(exec.stdin);
    assert_eq!(exec.spec.env, [("A".to_string(), "1".to_string())]);
    assert_eq!(exec.spec.user.as_deref(), Some("1000"));
    agent.send(Started {
        id: exec.id,
        pid: 42,
    });
    let input = agent.recv_stream(exec.id, agentvm_protocol::Stream::Stdin);
    assert_eq!(input, b"hello\n");
    let mut out = agentvm_protocol::SendWindow::new();
    let mut err = agentvm_protocol::SendWindow::new();
    agent.send_stream(exec.id, agentvm_protocol::Stream::Stdout, b"hel", &mut out);
    agent.send_stream(exec.id, agentvm_protocol::Stream::Stderr, b"warn", &mut err);
    agent.send_stream(exec.id, agentvm_protocol::Stream::Stdout, b"lo\n", &mut out);
    agent.send(Exited {
        id: exec.id,
        status: ExitStatus::Code(3),
        timed_out: false,
    });
    let (pid, events) = call.join().unwrap().unwrap();
    assert_eq!(pid, 42);
    use agentvm_client::ExecEvent;
    assert_eq!(
        events,
        [
            ExecEvent::Stdout(b"hel".to_vec()),
            ExecEvent::Stderr(b"warn".to_vec()),
            ExecEvent::Stdout(b"lo\n".to_vec()),
            ExecEvent::Exited {
                status: ExitStatus::Code(3),
                timed_out: false
            }
        ]
    );
}

#[test]
fn exec_output_collects_and_truncates() {
    let (client, mut agent) = connect();
    let call = thread::spawn(move || {
        let exec = client.exec(ProcessSpec::shell("yes | head -c 10"), false)?;
        exec.wait_with_output(4)
    });
    let Message::Exec(exec) = agent.recv() else {
        panic!("expected Exec")
    };
    assert!(!exec.stdin);
    agent.send(Started {
        id: exec.id,
        pid: 1,
    });
    let mut out = agentvm_protocol::SendWindow::new();
    agent.send_stream(
        exec.id,
        agentvm_protocol::Stream::Stdout,
        b"y\ny\ny\ny\ny\n",
        &mut out,
    );
    agent.send(Exited {
        id: exec.id,
        status: ExitStatus::Code(0),
        timed_out: true,
    });
    let output = call.join().unwrap().unwrap();
    assert_eq!(output.stdout, b"y\ny\n");
    assert!(output.truncated);
    assert!(output.timed_out);
    assert!(output.success());
}

#[test]
fn exec_kill_close_and_drop_reach_the_agent() {
    let (client, mut agent) = connect();
    let (tx, rx) = std::sync::mpsc::channel();
    let call = thread::spawn(move || {
        let killed = client.exec(ProcessSpec::argv(["sleep", "9"]), false)?;
        killed.kill(2)?;
        rx.recv().unwrap();
        // Dropping an exec that has not exited closes it.
        drop(killed);
        let closed = client.exec(ProcessSpec::argv(["sleep", "8"]), false)?;
        closed.controller().close()?;
        // Already closed: dropping does not repeat it.
        drop(closed);
        client.ping()
    });
    let Message::Exec(first) = agent.recv() else {
        panic!("expected Exec")
    };
    agent.send(Started {
        id: first.id,
        pid: 5,
    });
    assert!(matches!(agent.recv(), Message::Kill(k) if k.id == first.id && k.signal == 2));
    tx.send(()).unwrap();
    assert!(matches!(agent.recv(), Message::Close(c) if c.id == first.id));
    let Message::Exec(second) = agent.recv() else {
        panic!("expected Exec")
    };
    agent.send(Started {
        id: second.id,
        pid: 6,
    });
    assert!(matches!(agent.recv(), Message::Close(c) if c.id == second.id));
    match agent.recv() {
        Message::Ping(p) => agent.send(Done { id: p.id }),
        other => panic!("expected Ping (and no second Close), got {other:?}"),
    }
    call.join().unwrap().unwrap();
}

#[test]
fn exec_spawn_failure_is_an_agent_error() {
    let (client, mut agent) = connect();
    let call = thread::spawn(move || client.exec_output(ProcessSpec::argv(["/nope"])));
    let Message::Exec(exec) = agent.recv() else {
        panic!("expected Exec")
    };
    agent.send(ErrorMsg {
        id: exec.id,
        code: ErrorCode::SpawnFailed,
        message: "/nope: No such file or directory".into(),
    });
    let err = call.join().unwrap().unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::SpawnFailed));
    assert!(err.to_string().contains("/nope"), "{err}");
}

#[test]
fn empty_argv_is_refused_before_sending() {
    let (client, _agent) = connect();
    let err = client
        .exec(ProcessSpec::argv(Vec::<String>::new()), false)
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("empty argv"), "{err}");
}

#[test]
fn a_following_log_can_time_out_and_be_stopped_from_another_thread() {
    use std::io::Read;
    let (client, mut agent) = connect();
    let (tx, rx) = std::sync::mpsc::channel();
    let call = thread::spawn(move || {
        let mut logs = client.proc_logs(4, agentvm_client::Stream::Stdout, 0, true)?;
        logs.set_read_timeout(Some(Duration::from_millis(1)));
        let timed_out = logs.read(&mut [0; 8]).unwrap_err();
        logs.set_read_timeout(None);
        tx.send(logs.stopper()).unwrap();
        let mut rest = Vec::new();
        logs.read_to_end(&mut rest)?;
        Ok::<_, ClientError>((timed_out, rest))
    });
    let Message::ProcLogs(logs) = agent.recv() else {
        panic!("expected ProcLogs")
    };
    assert!(logs.follow);
    agent.send(LogsStart {
        id: logs.id,
        offset: 0,
    });
    let stopper = rx.recv_timeout(common::GUARD).unwrap();
    stopper.stop().unwrap();
    assert!(matches!(agent.recv(), Message::Close(c) if c.id == logs.id));
    agent.send(Done { id: logs.id });
    let (timed_out, rest) = call.join().unwrap().unwrap();
    assert_eq!(timed_out.kind(), std::io::ErrorKind::TimedOut);
    assert!(rest.is_empty());
}

//! The files, watch, port-forward and after-restore services end to end: the agent binary in
//! host mode, driven with raw protocol frames.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use agentvm_protocol::{
    AfterRestore, Close, Connect, Data, DirEntry, Eof, ErrorCode, ErrorMsg, Features, FileType,
    ListDir, MakeDir, Message, Ping, ReadFile, RecvWindow, RemovePath, SendWindow, StatPath,
    Stream, WatchEvent, WatchStart, WriteFile, MAX_CHUNK,
};
use common::{Agent, Client};
use sha2::{Digest, Sha256};

/// Deterministic pseudo-random bytes (xorshift), generated piecewise so 50 MiB never sit in
/// memory at once.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn expect_error(message: Message, id: u64, code: ErrorCode) -> String {
    match message {
        Message::ErrorMsg(ErrorMsg {
            id: got,
            code: got_code,
            message,
        }) if got == id && got_code == code => message,
        other => panic!("expected ErrorMsg {code:?} for {id}, got {other:?}"),
    }
}

fn expect_done(message: Message, id: u64) {
    assert_eq!(message, Message::Done(agentvm_protocol::Done { id }));
}

/// Uploads `total` bytes of `noise` as request `id`'s stdin, never beyond the agent's window,
/// and returns their digest.
fn upload(client: &mut Client, id: u64, total: usize, noise: &mut Noise) -> Vec<u8> {
    let mut window = SendWindow::new();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut sent = 0;
    while sent < total {
        let n = window.next_chunk(total - sent);
        if n == 0 {
            match client.recv_for(id) {
                Message::Window(w) => {
                    assert_eq!(w.stream, Stream::Stdin);
                    window.grant(w.bytes).unwrap();
                }
                other => panic!("expected a Window grant, got {other:?}"),
            }
            continue;
        }
        noise.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        client.send(Data {
            id,
            stream: Stream::Stdin,
            data: buf[..n].to_vec(),
        });
        window.consume(n).unwrap();
        sent += n;
    }
    client.send(Eof {
        id,
        stream: Stream::Stdin,
    });
    hash.finalize().to_vec()
}

/// The final message of an upload; `Window` grants for the rest of it may come first.
fn final_after_grants(client: &mut Client, id: u64) -> Message {
    loop {
        match client.recv_for(id) {
            Message::Window(_) => {}
            other => return other,
        }
    }
}

/// Reads request `id`'s Stdout to its final message, checking that the agent stays within the
/// window this client grants; returns the digest, the byte count and the final message.
fn download(client: &mut Client, id: u64) -> (Vec<u8>, u64, Message) {
    let mut window = RecvWindow::new();
    let mut hash = Sha256::new();
    let mut total = 0u64;
    loop {
        match client.recv_for(id) {
            Message::Data(d) => {
                assert_eq!(d.stream, Stream::Stdout);
                assert!(d.data.len() <= MAX_CHUNK);
                window
                    .received(d.data.len())
                    .expect("the agent sent beyond its window");
                hash.update(&d.data);
                total += d.data.len() as u64;
                if let Some(bytes) = window.consumed(d.data.len()) {
                    client.grant(id, Stream::Stdout, bytes);
                }
            }
            Message::Metadata(_) | Message::Eof(_) => {}
            last => return (hash.finalize().to_vec(), total, last),
        }
    }
}

#[test]
fn fifty_mib_round_trip_is_streamed_within_windows() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let dir = tempfile::tempdir().unwrap();
    let path = path_str(&dir.path().join("big.bin"));
    const SIZE: usize = 50 << 20;

    client.send(WriteFile {
        id: 1,
        path: path.clone(),
        mode: Some(0o600),
        create_parents: false,
        atomic: true,
    });
    let sent_digest = upload(&mut client, 1, SIZE, &mut Noise(0x9e37_79b9_7f4a_7c15));
    assert_eq!(
        final_after_grants(&mut client, 1),
        Message::Written(agentvm_protocol::Written {
            id: 1,
            bytes: SIZE as u64
        })
    );

    client.send(ReadFile {
        id: 2,
        path: path.clone(),
        offset: 0,
        len: None,
    });
    match client.recv_for(2) {
        Message::Metadata(m) => {
            assert_eq!(m.metadata.size, SIZE as u64);
            assert_eq!(m.metadata.mode, 0o600);
            assert_eq!(m.metadata.file_type, FileType::File);
        }
        other => panic!("expected Metadata first, got {other:?}"),
    }
    let (digest, total, last) = download(&mut client, 2);
    assert_eq!(total, SIZE as u64);
    assert_eq!(digest, sent_digest);
    expect_done(last, 2);

    // A range from the middle.
    client.send(ReadFile {
        id: 3,
        path,
        offset: 1000,
        len: Some(10),
    });
    let mut expected = vec![0u8; 1010];
    Noise(0x9e37_79b9_7f4a_7c15).fill(&mut expected);
    let (digest, total, last) = download(&mut client, 3);
    assert_eq!(total, 10);
    assert_eq!(digest, Sha256::digest(&expected[1000..]).to_vec());
    expect_done(last, 3);
}

#[test]
fn a_download_stops_at_the_window_and_ends_on_close() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one-mib");
    std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
    client.send(ReadFile {
        id: 6,
        path: path_str(&path),
        offset: 0,
        len: None,
    });
    assert!(matches!(client.recv_for(6), Message::Metadata(_)));
    // No grants: exactly the initial window arrives, then the agent waits.
    let mut received = 0usize;
    while received < agentvm_protocol::INITIAL_WINDOW as usize {
        match client.recv_for(6) {
            Message::Data(d) => received += d.data.len(),
            other => panic!("expected Data, got {other:?}"),
        }
    }
    assert_eq!(received, agentvm_protocol::INITIAL_WINDOW as usize);
    client.send(Close { id: 6 });
    expect_done(client.recv_for(6), 6);
}

#[test]
fn closing_an_upload_before_its_eof_keeps_the_old_file() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("keep.txt");
    std::fs::write(&target, b"old").unwrap();
    client.send(WriteFile {
        id: 5,
        path: path_str(&target),
        mode: None,
        create_parents: false,
        atomic: true,
    });
    client.send(Data {
        id: 5,
        stream: Stream::Stdin,
        data: b"partial new contents".to_vec(),
    });
    client.send(Close { id: 5 });
    let message = expect_error(client.recv_for(5), 5, ErrorCode::Io);
    assert!(message.contains("upload ended before its Eof"), "{message}");
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // A connection that drops mid-upload leaves nothing behind either.
    let mut other = agent.connect();
    other.send(WriteFile {
        id: 1,
        path: path_str(&target),
        mode: None,
        create_parents: false,
        atomic: true,
    });
    other.send(Data {
        id: 1,
        stream: Stream::Stdin,
        data: b"x".repeat(1000),
    });
    other.send(Ping { id: 2 });
    expect_done(other.recv_for(2), 2);
    drop(other);
    // The agent answers later requests only after it processed everything before them, and
    // the upload's failure removes its temporary file before the handler ends; wait for that
    // through a listing that shows only the old file.
    let deadline = std::time::Instant::now() + common::WAIT;
    while std::fs::read_dir(dir.path()).unwrap().count() != 1 {
        assert!(std::time::Instant::now() < deadline, "temporary file left");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
}

#[test]
fn file_operations_and_their_errors() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let dir = tempfile::tempdir().unwrap();
    let root = path_str(dir.path());

    // MakeDir with parents, StatPath, ListDir, RemovePath.
    client.send(MakeDir {
        id: 1,
        path: format!("{root}/a/b"),
        parents: true,
        mode: Some(0o750),
    });
    expect_done(client.recv_for(1), 1);
    std::fs::write(dir.path().join("a/file"), b"12345").unwrap();
    client.send(StatPath {
        id: 2,
        path: format!("{root}/a/b"),
        follow_symlinks: true,
    });
    match client.recv_for(2) {
        Message::Metadata(m) => {
            assert_eq!(
                (m.metadata.file_type, m.metadata.mode),
                (FileType::Dir, 0o750)
            )
        }
        other => panic!("{other:?}"),
    }
    client.send(ListDir {
        id: 3,
        path: format!("{root}/a"),
    });
    let mut entries: Vec<DirEntry> = Vec::new();
    loop {
        match client.recv_for(3) {
            Message::DirEntries(batch) => entries.extend(batch.entries),
            last => {
                expect_done(last, 3);
                break;
            }
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (entries[0].name.as_str(), entries[0].metadata.file_type),
        ("b", FileType::Dir)
    );
    assert_eq!(
        (entries[1].name.as_str(), entries[1].metadata.size),
        ("file", 5)
    );

    // Errors, each naming the path.
    let cases: Vec<(Message, ErrorCode, String)> = vec![
        (
            ReadFile {
                id: 10,
                path: format!("{root}/missing"),
                offset: 0,
                len: None,
            }
            .into(),
            ErrorCode::NotFound,
            format!("cannot read {root}/missing: No such file or directory"),
        ),
        (
            ReadFile {
                id: 11,
                path: "relative/x".into(),
                offset: 0,
                len: None,
            }
            .into(),
            ErrorCode::InvalidArgument,
            "cannot read relative/x: the path must be absolute".into(),
        ),
        (
            ReadFile {
                id: 12,
                path: format!("{root}/a"),
                offset: 0,
                len: None,
            }
            .into(),
            ErrorCode::InvalidArgument,
            format!("cannot read {root}/a: Is a directory"),
        ),
        (
            ListDir {
                id: 13,
                path: format!("{root}/a/file"),
            }
            .into(),
            ErrorCode::Io,
            format!("cannot list {root}/a/file: Not a directory"),
        ),
        (
            StatPath {
                id: 14,
                path: format!("{root}/nope"),
                follow_symlinks: false,
            }
            .into(),
            ErrorCode::NotFound,
            format!("cannot stat {root}/nope: No such file or directory"),
        ),
        (
            MakeDir {
                id: 15,
                path: format!("{root}/a"),
                parents: false,
                mode: None,
            }
            .into(),
            ErrorCode::AlreadyExists,
            format!("cannot create directory {root}/a: File exists"),
        ),
        (
            RemovePath {
                id: 16,
                path: format!("{root}/a"),
                recursive: false,
            }
            .into(),
            ErrorCode::Io,
            format!("cannot remove {root}/a: Directory not empty"),
        ),
        (
            RemovePath {
                id: 17,
                path: format!("{root}/gone"),
                recursive: true,
            }
            .into(),
            ErrorCode::NotFound,
            format!("cannot remove {root}/gone: No such file or directory"),
        ),
        (
            WriteFile {
                id: 18,
                path: format!("{root}/no/such/dir/f"),
                mode: None,
                create_parents: false,
                atomic: true,
            }
            .into(),
            ErrorCode::NotFound,
            format!("cannot write {root}/no/such/dir/f: No such file or directory"),
        ),
    ];
    for (request, code, text) in cases {
        let id = request.request_id().unwrap();
        client.send(request);
        if id == 18 {
            // The host pipelines the contents; they are discarded with the failed request.
            client.send(Data {
                id,
                stream: Stream::Stdin,
                data: b"data".to_vec(),
            });
            client.send(Eof {
                id,
                stream: Stream::Stdin,
            });
        }
        assert_eq!(expect_error(client.recv_for(id), id, code), text);
    }
    client.send(RemovePath {
        id: 20,
        path: format!("{root}/a"),
        recursive: true,
    });
    expect_done(client.recv_for(20), 20);
    assert!(!dir.path().join("a").exists());
    client.send(Ping { id: 21 });
    expect_done(client.recv(), 21);
}

/// Collects watch `id`'s events until all of `wanted` were seen.
fn watch_until(client: &mut Client, id: u64, wanted: &[WatchEvent]) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    while !wanted.iter().all(|w| events.contains(w)) {
        match client.recv_for(id) {
            Message::WatchEvents(batch) => {
                assert!(!batch.events.is_empty());
                events.extend(batch.events);
            }
            other => panic!("expected WatchEvents, got {other:?}"),
        }
    }
    events
}

#[test]
fn watch_reports_changes_in_a_new_subdirectory_until_closed() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let dir = tempfile::tempdir().unwrap();
    let root = path_str(dir.path());
    client.send(WatchStart {
        id: 7,
        path: root.clone(),
        recursive: true,
        include: vec![],
        exclude: vec!["ignored".into()],
    });
    assert_eq!(
        client.recv_for(7),
        Message::Ready(agentvm_protocol::Ready { id: 7 })
    );
    // A new directory, and a tree created in one go: whatever exists in it before the agent's
    // watch on it does is found by the scan that follows adding the watch.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::create_dir_all(dir.path().join("sub2/deep")).unwrap();
    std::fs::write(dir.path().join("sub2/deep/file"), b"1").unwrap();
    std::fs::create_dir(dir.path().join("ignored")).unwrap();
    std::fs::write(dir.path().join("ignored/x"), b"1").unwrap();
    let created = |rel: &str, is_dir: bool| WatchEvent::Created {
        path: format!("{root}/{rel}"),
        is_dir,
    };
    let mut events = watch_until(
        &mut client,
        7,
        &[created("sub", true), created("sub2/deep/file", false)],
    );
    for expected in [created("sub2", true), created("sub2/deep", true)] {
        assert_eq!(
            events.iter().filter(|e| **e == expected).count(),
            1,
            "{events:?}"
        );
    }

    // `sub` is watched once its creation was reported: changes inside it are all seen.
    std::fs::write(dir.path().join("sub/f"), b"1").unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("sub/f"))
        .unwrap()
        .write_all(b"2")
        .unwrap();
    std::fs::remove_file(dir.path().join("sub/f")).unwrap();
    let deleted = WatchEvent::Deleted {
        path: format!("{root}/sub/f"),
        is_dir: false,
    };
    events.extend(watch_until(&mut client, 7, std::slice::from_ref(&deleted)));
    let modified = WatchEvent::Modified {
        path: format!("{root}/sub/f"),
    };
    let position = |e: &WatchEvent| events.iter().position(|x| x == e).unwrap();
    assert!(position(&created("sub", true)) < position(&created("sub/f", false)));
    assert!(position(&created("sub/f", false)) < position(&modified));
    assert!(position(&modified) < position(&deleted));
    assert!(
        events.iter().all(|e| !format!("{e:?}").contains("ignored")),
        "{events:?}"
    );

    client.send(Close { id: 7 });
    loop {
        match client.recv_for(7) {
            Message::WatchEvents(_) => {}
            last => {
                expect_done(last, 7);
                break;
            }
        }
    }

    client.send(WatchStart {
        id: 8,
        path: format!("{root}/missing"),
        recursive: true,
        include: vec![],
        exclude: vec![],
    });
    let text = expect_error(client.recv_for(8), 8, ErrorCode::NotFound);
    assert_eq!(
        text,
        format!("cannot watch {root}/missing: No such file or directory")
    );
    client.send(WatchStart {
        id: 9,
        path: root,
        recursive: true,
        include: vec!["a**".into()],
        exclude: vec![],
    });
    let text = expect_error(client.recv_for(9), 9, ErrorCode::InvalidArgument);
    assert!(text.starts_with("invalid include glob \"a**\""), "{text}");
}

#[test]
fn port_forward_pumps_both_ways_through_windows() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // An echo server that reads everything, then answers with it reversed and closes.
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        conn.read_to_end(&mut request).unwrap();
        request.reverse();
        conn.write_all(&request).unwrap();
    });
    client.send(Connect { id: 4, port });
    assert_eq!(
        client.recv_for(4),
        Message::Ready(agentvm_protocol::Ready { id: 4 })
    );
    // More than one window each way.
    const SIZE: usize = 1 << 20;
    let mut noise = Noise(42);
    let sent_digest = upload(&mut client, 4, SIZE, &mut noise);
    let mut sent = vec![0u8; SIZE];
    Noise(42).fill(&mut sent);
    assert_eq!(sent_digest, Sha256::digest(&sent).to_vec());
    sent.reverse();

    let mut window = RecvWindow::new();
    let mut received = Vec::new();
    let mut saw_eof = false;
    loop {
        match client.recv_for(4) {
            Message::Data(d) => {
                window.received(d.data.len()).expect("within the window");
                received.extend_from_slice(&d.data);
                if let Some(bytes) = window.consumed(d.data.len()) {
                    client.grant(4, Stream::Stdout, bytes);
                }
            }
            Message::Eof(e) => {
                assert_eq!(e.stream, Stream::Stdout);
                saw_eof = true;
            }
            Message::Window(_) => {}
            last => {
                expect_done(last, 4);
                break;
            }
        }
    }
    assert!(saw_eof);
    assert_eq!(received.len(), SIZE);
    assert!(received == sent, "the reversed echo differs");
    server.join().unwrap();
}

#[test]
fn port_forward_close_and_refusal() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhi").unwrap();
        // Holds the connection until the agent closes it.
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
    });
    client.send(Connect { id: 1, port });
    assert_eq!(
        client.recv_for(1),
        Message::Ready(agentvm_protocol::Ready { id: 1 })
    );
    match client.recv_for(1) {
        Message::Data(d) => assert_eq!(d.data, b"HTTP/1.0 200 OK\r\n\r\nhi"),
        other => panic!("{other:?}"),
    }
    client.send(Close { id: 1 });
    expect_done(client.recv_for(1), 1);
    server.join().unwrap();

    // The listener is gone: nothing listens there now.
    client.send(Connect { id: 2, port });
    let text = expect_error(client.recv_for(2), 2, ErrorCode::ConnectionRefused);
    assert_eq!(text, format!("nothing listens on guest port {port}"));
}

#[test]
fn after_restore_refuses_a_time_before_the_epoch() {
    // The agent runs on the test host here: only requests that fail before touching the clock
    // or the RNG are sent.
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send(AfterRestore {
        id: 3,
        realtime_ns: -1,
        entropy: vec![1; 32],
    });
    let text = expect_error(client.recv_for(3), 3, ErrorCode::InvalidArgument);
    assert!(text.contains("before the Unix epoch"), "{text}");
}

#[test]
fn services_are_refused_unless_negotiated() {
    let agent = Agent::start();
    assert!(agent.connect().negotiated.features.contains(
        Features::FILES | Features::WATCH | Features::PORT_FORWARD | Features::AFTER_RESTORE
    ));
    let mut client = Client::handshake(agent.stream(), Features::EXEC).unwrap();
    client.send(StatPath {
        id: 1,
        path: "/".into(),
        follow_symlinks: true,
    });
    expect_error(client.recv_for(1), 1, ErrorCode::Unsupported);
    client.send(Connect { id: 2, port: 1 });
    expect_error(client.recv_for(2), 2, ErrorCode::Unsupported);
}

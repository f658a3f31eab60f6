//! File streaming: large transfers in both directions with bounded memory, and early refusals.

mod common;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use agentvm_client::{ClientError, ErrorCode, FileType, WriteOptions};
use agentvm_protocol::{
    Data, Done, ErrorMsg, FileMetadata, Message, Metadata, SendWindow, Stream, Written,
    INITIAL_WINDOW, MAX_CHUNK,
};
use common::connect;

const LARGE: u64 = 16 * 1024 * 1024;

/// Deterministic file contents, generated on the fly so neither side holds the whole file.
fn byte_at(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A `Write` that checks the contents and how far the sender got ahead of it.
struct CheckingSink {
    written: u64,
    sent_by_agent: Arc<AtomicU64>,
    max_ahead: u64,
}

impl Write for CheckingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for (i, b) in buf.iter().enumerate() {
            assert_eq!(
                *b,
                byte_at(self.written + i as u64),
                "byte {}",
                self.written
            );
        }
        self.written += buf.len() as u64;
        let ahead = self.sent_by_agent.load(Ordering::SeqCst) - self.written;
        self.max_ahead = self.max_ahead.max(ahead);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn reading_a_large_file_streams_with_bounded_buffering() {
    let (client, mut agent) = connect();
    let sent = Arc::new(AtomicU64::new(0));
    let sink_sent = Arc::clone(&sent);
    let reader = thread::spawn(move || {
        let mut sink = CheckingSink {
            written: 0,
            sent_by_agent: sink_sent,
            max_ahead: 0,
        };
        let metadata = client.read_file("/big", 0, None, &mut sink)?;
        Ok::<_, ClientError>((metadata, sink.written, sink.max_ahead))
    });
    let Message::ReadFile(read) = agent.recv() else {
        panic!("expected ReadFile")
    };
    assert_eq!(
        (read.path.as_str(), read.offset, read.len),
        ("/big", 0, None)
    );
    let metadata = FileMetadata {
        file_type: FileType::File,
        size: LARGE,
        mode: 0o600,
        uid: 1,
        gid: 2,
        mtime_ns: 3,
        symlink_target: None,
    };
    agent.send(Metadata {
        id: read.id,
        metadata: metadata.clone(),
    });
    let mut window = SendWindow::new();
    let mut offset = 0u64;
    while offset < LARGE {
        let n = window.next_chunk((LARGE - offset) as usize);
        if n == 0 {
            match agent.recv() {
                Message::Window(w) if w.id == read.id && w.stream == Stream::Stdout => {
                    window.grant(w.bytes).unwrap()
                }
                other => panic!("expected a Window, got {other:?}"),
            }
            continue;
        }
        window.consume(n).unwrap();
        let data = (offset..offset + n as u64).map(byte_at).collect();
        sent.fetch_add(n as u64, Ordering::SeqCst);
        agent.send(Data {
            id: read.id,
            stream: Stream::Stdout,
            data,
        });
        offset += n as u64;
    }
    agent.send(Done { id: read.id });
    let (got_metadata, written, max_ahead) = reader.join().unwrap().unwrap();
    assert_eq!(got_metadata, metadata);
    assert_eq!(written, LARGE);
    // Never more than a window in flight towards the host.
    assert!(
        max_ahead <= u64::from(INITIAL_WINDOW),
        "agent got {max_ahead} bytes ahead of the consumer"
    );
}

/// A `Read` producing `len` bytes of [`byte_at`] that records the most it was ever read ahead
/// of what the agent received.
struct CountingSource {
    len: u64,
    produced: Arc<AtomicU64>,
}

impl Read for CountingSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let at = self.produced.load(Ordering::SeqCst);
        let n = (buf.len() as u64).min(self.len - at) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = byte_at(at + i as u64);
        }
        self.produced.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
}

#[test]
fn writing_a_large_file_streams_under_the_window() {
    let (client, mut agent) = connect();
    let produced = Arc::new(AtomicU64::new(0));
    let mut source = CountingSource {
        len: LARGE,
        produced: Arc::clone(&produced),
    };
    let writer = thread::spawn(move || {
        client.write_file(
            "/dst/big",
            &mut source,
            WriteOptions {
                mode: Some(0o640),
                create_parents: true,
                atomic: true,
            },
        )
    });
    let Message::WriteFile(write) = agent.recv() else {
        panic!("expected WriteFile")
    };
    assert_eq!(write.path, "/dst/big");
    assert_eq!(write.mode, Some(0o640));
    assert!(write.create_parents && write.atomic);
    let mut window = agentvm_protocol::RecvWindow::new();
    let mut received = 0u64;
    let mut max_ahead = 0u64;
    loop {
        match agent.recv() {
            Message::Data(d) => {
                assert_eq!((d.id, d.stream), (write.id, Stream::Stdin));
                assert!(d.data.len() <= MAX_CHUNK);
                window.received(d.data.len()).expect("beyond the window");
                for (i, b) in d.data.iter().enumerate() {
                    assert_eq!(*b, byte_at(received + i as u64));
                }
                received += d.data.len() as u64;
                let ahead = produced.load(Ordering::SeqCst) - received;
                max_ahead = max_ahead.max(ahead);
                if let Some(bytes) = window.consumed(d.data.len()) {
                    agent.send(agentvm_protocol::Window {
                        id: write.id,
                        stream: Stream::Stdin,
                        bytes,
                    });
                }
            }
            Message::Eof(e) if e.id == write.id && e.stream == Stream::Stdin => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, LARGE);
    agent.send(Written {
        id: write.id,
        bytes: received,
    });
    assert_eq!(writer.join().unwrap().unwrap(), LARGE);
    // The client read its source no further ahead than the window plus one read buffer.
    assert!(
        max_ahead <= u64::from(INITIAL_WINDOW) + MAX_CHUNK as u64,
        "client read {max_ahead} bytes ahead of the agent"
    );
}

#[test]
fn a_refused_upload_returns_the_agent_error_without_sending_everything() {
    let (client, mut agent) = connect();
    let produced = Arc::new(AtomicU64::new(0));
    let mut source = CountingSource {
        len: LARGE,
        produced: Arc::clone(&produced),
    };
    let writer =
        thread::spawn(move || client.write_file("/ro/file", &mut source, WriteOptions::default()));
    let Message::WriteFile(write) = agent.recv() else {
        panic!("expected WriteFile")
    };
    assert_eq!(write.mode, None);
    agent.send(ErrorMsg {
        id: write.id,
        code: ErrorCode::PermissionDenied,
        message: "/ro/file: Read-only file system".into(),
    });
    // Like a real agent, keep reading the connection (and discard the upload's data).
    let drain = thread::spawn(move || while agent.recv_or_eof().is_some() {});
    let err = writer.join().unwrap().unwrap_err();
    drain.join().unwrap();
    assert_eq!(err.agent_code(), Some(ErrorCode::PermissionDenied));
    assert!(err.to_string().contains("/ro/file"), "{err}");
    // It stopped at the window at the latest (pipelined data only).
    assert!(produced.load(Ordering::SeqCst) <= u64::from(INITIAL_WINDOW) + MAX_CHUNK as u64);
}

#[test]
fn a_failing_source_abandons_the_upload() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }
    let (client, mut agent) = connect();
    let writer =
        thread::spawn(move || client.write_file("/dst", &mut Failing, WriteOptions::default()));
    let Message::WriteFile(write) = agent.recv() else {
        panic!("expected WriteFile")
    };
    let err = writer.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert!(err.to_string().contains("/dst"), "{err}");
    // The agent is told to discard the partial upload.
    assert!(matches!(agent.recv(), Message::Close(c) if c.id == write.id));
}

#[test]
fn read_to_vec_with_offset_and_len() {
    let (client, mut agent) = connect();
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        client.read_file("/f", 5, Some(3), &mut out).map(|_| out)
    });
    let Message::ReadFile(read) = agent.recv() else {
        panic!("expected ReadFile")
    };
    assert_eq!((read.offset, read.len), (5, Some(3)));
    agent.send(Metadata {
        id: read.id,
        metadata: FileMetadata {
            file_type: FileType::File,
            size: 8,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            symlink_target: None,
        },
    });
    agent.send_stream(read.id, Stream::Stdout, b"567", &mut SendWindow::new());
    agent.send(Done { id: read.id });
    assert_eq!(reader.join().unwrap().unwrap(), b"567");
}

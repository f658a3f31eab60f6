//! Message codec: round trips, pinned wire bytes, and decoding of hostile input.

use agentvm_protocol::*;

fn spec() -> ProcessSpec {
    ProcessSpec {
        command: Command::Argv(vec!["ls".into(), "-l".into(), "/tmp dir".into()]),
        env: vec![
            ("PATH".into(), "/bin".into()),
            ("EMPTY".into(), String::new()),
        ],
        clear_env: true,
        cwd: Some("/root".into()),
        user: Some("1000:1000".into()),
        timeout_ms: Some(30_000),
    }
}

fn metadata() -> FileMetadata {
    FileMetadata {
        file_type: FileType::Symlink,
        size: 1 << 40,
        mode: 0o4755,
        uid: 0,
        gid: u32::MAX,
        mtime_ns: -1_000_000_007,
        symlink_target: Some("../target".into()),
    }
}

/// One message of every kind, with fields chosen to exercise their encodings.
fn samples() -> Vec<Message> {
    vec![
        Hello::new(Role::Guest, "agent 0.1.0", Features::ALL).into(),
        ErrorMsg {
            id: 0,
            code: ErrorCode::Protocol,
            message: "bad frame".into(),
        }
        .into(),
        ErrorMsg {
            id: 7,
            code: ErrorCode::Other(9999),
            message: "from the future".into(),
        }
        .into(),
        Done { id: u64::MAX }.into(),
        Data {
            id: 1,
            stream: Stream::Stdout,
            data: (0..=255).collect(),
        }
        .into(),
        Data {
            id: 1,
            stream: Stream::Stderr,
            data: vec![0xee; MAX_CHUNK],
        }
        .into(),
        Data {
            id: 2,
            stream: Stream::Stdin,
            data: Vec::new(),
        }
        .into(),
        Eof {
            id: 2,
            stream: Stream::Stdin,
        }
        .into(),
        Window {
            id: 3,
            stream: Stream::Stdout,
            bytes: INITIAL_WINDOW,
        }
        .into(),
        Close { id: 4 }.into(),
        Ping { id: 5 }.into(),
        Ready { id: 6 }.into(),
        Exec {
            id: 8,
            spec: spec(),
            stdin: true,
        }
        .into(),
        Exec {
            id: 9,
            spec: ProcessSpec::new(Command::Shell("echo $HOME >&2; exit 3".into())),
            stdin: false,
        }
        .into(),
        Started { id: 8, pid: 4242 }.into(),
        Exited {
            id: 8,
            status: ExitStatus::Code(-1),
            timed_out: false,
        }
        .into(),
        Exited {
            id: 9,
            status: ExitStatus::Signal(9),
            timed_out: true,
        }
        .into(),
        Kill { id: 8, signal: 15 }.into(),
        ProcStart {
            id: 10,
            spec: spec(),
        }
        .into(),
        ProcStarted {
            id: 10,
            proc_id: 1,
            pid: 77,
        }
        .into(),
        ProcList { id: 11 }.into(),
        ProcListing {
            id: 11,
            procs: vec![
                ProcInfo {
                    proc_id: 1,
                    pid: 77,
                    command: Command::Shell("server".into()),
                    started_unix_ms: 1_700_000_000_000,
                    status: None,
                    stdout_bytes: 10,
                    stderr_bytes: 0,
                },
                ProcInfo {
                    proc_id: 2,
                    pid: 78,
                    command: Command::Argv(vec!["true".into()]),
                    started_unix_ms: 0,
                    status: Some(ExitStatus::Code(0)),
                    stdout_bytes: 0,
                    stderr_bytes: u64::MAX,
                },
            ],
        }
        .into(),
        ProcListing {
            id: 12,
            procs: Vec::new(),
        }
        .into(),
        ProcWait {
            id: 13,
            proc_id: 1,
            timeout_ms: None,
        }
        .into(),
        ProcKill {
            id: 14,
            proc_id: 1,
            signal: 2,
        }
        .into(),
        ProcLogs {
            id: 15,
            proc_id: 1,
            stream: Stream::Stderr,
            offset: 1 << 33,
            follow: true,
        }
        .into(),
        LogsStart {
            id: 15,
            offset: (1 << 33) + 5,
        }
        .into(),
        PtyOpen {
            id: 16,
            spec: ProcessSpec::new(Command::Argv(vec!["/bin/sh".into(), "-l".into()])),
            term: "xterm-256color".into(),
            rows: 24,
            cols: 80,
        }
        .into(),
        Resize {
            id: 16,
            rows: u16::MAX,
            cols: 1,
        }
        .into(),
        WatchStart {
            id: 17,
            path: "/work".into(),
            recursive: true,
            include: vec!["**/*.rs".into(), "Cargo.toml".into()],
            exclude: vec!["target/**".into()],
        }
        .into(),
        WatchEvents {
            id: 17,
            events: vec![
                WatchEvent::Created {
                    path: "/work/new".into(),
                    is_dir: true,
                },
                WatchEvent::Modified {
                    path: "/work/new/ünïcode.rs".into(),
                },
                WatchEvent::Deleted {
                    path: "/work/old".into(),
                    is_dir: false,
                },
                WatchEvent::Moved {
                    from: "/work/a".into(),
                    to: "/work/b".into(),
                    is_dir: false,
                },
                WatchEvent::Overflow,
            ],
        }
        .into(),
        ReadFile {
            id: 18,
            path: "/etc/hostname".into(),
            offset: 0,
            len: Some(100),
        }
        .into(),
        WriteFile {
            id: 19,
            path: "/tmp/x".into(),
            mode: Some(0o600),
            create_parents: true,
            atomic: true,
        }
        .into(),
        Written {
            id: 19,
            bytes: 50 << 20,
        }
        .into(),
        ListDir {
            id: 20,
            path: "/".into(),
        }
        .into(),
        DirEntries {
            id: 20,
            entries: vec![DirEntry {
                name: "link".into(),
                metadata: metadata(),
            }],
        }
        .into(),
        StatPath {
            id: 21,
            path: "/link".into(),
            follow_symlinks: false,
        }
        .into(),
        Metadata {
            id: 21,
            metadata: metadata(),
        }
        .into(),
        MakeDir {
            id: 22,
            path: "/a/b/c".into(),
            parents: true,
            mode: None,
        }
        .into(),
        RemovePath {
            id: 23,
            path: "/a".into(),
            recursive: true,
        }
        .into(),
        Connect { id: 24, port: 3000 }.into(),
        AfterRestore {
            id: 25,
            realtime_ns: 1_763_942_400_123_456_789,
            entropy: vec![0x5a; 64],
        }
        .into(),
    ]
}

#[test]
fn every_kind_round_trips() {
    let samples = samples();
    for message in &samples {
        let bytes = message.encode().unwrap();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - HEADER_LEN);
        assert_eq!(bytes[4], message.kind());
        let frame = message.to_frame().unwrap();
        assert_eq!(frame.to_bytes().unwrap(), bytes);
        assert_eq!(&Message::from_frame(&frame).unwrap(), message);
        assert_eq!(Message::kind_name(message.kind()), Some(message.name()));
    }
    // The samples cover every kind this version knows, so a new message cannot skip this test.
    let known: Vec<u8> = (0..=255u8)
        .filter(|k| Message::kind_name(*k).is_some())
        .collect();
    let mut covered: Vec<u8> = samples.iter().map(Message::kind).collect();
    covered.sort_unstable();
    covered.dedup();
    assert_eq!(covered, known);
}

#[test]
fn a_stream_of_all_messages_decodes_through_every_reader() {
    let samples = samples();
    let mut writer = FrameWriter::new(Vec::new());
    for message in &samples {
        writer.write_message(message).unwrap();
    }
    let bytes = writer.into_inner();

    let mut reader = FrameReader::new(&bytes[..]);
    for message in &samples {
        assert_eq!(reader.read_message().unwrap().as_ref(), Some(message));
    }
    assert!(reader.read_message().unwrap().is_none());

    let mut decoder = FrameDecoder::new();
    let mut decoded = Vec::new();
    for byte in &bytes {
        for frame in decoder.feed(std::slice::from_ref(byte)).unwrap() {
            decoded.push(frame.to_message().unwrap());
        }
    }
    decoder.finish().unwrap();
    assert_eq!(decoded, samples);
}

/// The README documents these bytes; changing them is a major version bump.
#[test]
fn wire_bytes_are_pinned() {
    let hello = Hello {
        magic: MAGIC,
        protocol_version: Version { major: 1, minor: 2 }.to_u32(),
        role: Role::Guest,
        software_version: "a1".into(),
        features: Features(0x81),
    };
    assert_eq!(
        Message::Hello(hello).encode().unwrap(),
        [
            13, 0, 0, 0,    // payload length
            0x01, // kind: Hello
            b'A', b'G', b'V', b'M', // magic
            0x82, 0x80, 0x04, // protocol_version 0x0001_0002 as a varint
            0x01, // role: Guest
            2, b'a', b'1', // software_version
            0x81, 0x01, // features 0x81 as a varint
        ]
    );
    let data = Data {
        id: 300,
        stream: Stream::Stderr,
        data: b"hi".to_vec(),
    };
    assert_eq!(
        Message::Data(data).encode().unwrap(),
        [6, 0, 0, 0, 0x04, 0xac, 0x02, 0x02, 0x02, b'h', b'i']
    );
    let err = ErrorMsg {
        id: 1,
        code: ErrorCode::NotFound,
        message: "x".into(),
    };
    assert_eq!(
        Message::ErrorMsg(err).encode().unwrap(),
        [4, 0, 0, 0, 0x02, 0x01, 0x04, 0x01, b'x']
    );
}

#[test]
fn unknown_kind_is_a_per_frame_error() {
    for kind in (0..=255u8).filter(|k| Message::kind_name(*k).is_none()) {
        let frame = Frame {
            kind,
            payload: vec![1, 2, 3],
        };
        let err = Message::from_frame(&frame).unwrap_err();
        assert!(matches!(err, Error::UnknownKind(k) if k == kind));
        assert!(!err.is_fatal());
    }
    // The reader goes on with the next frame.
    let mut bytes = Frame {
        kind: 0xff,
        payload: b"future".to_vec(),
    }
    .to_bytes()
    .unwrap();
    bytes.extend(Message::Ping(Ping { id: 1 }).encode().unwrap());
    let mut reader = FrameReader::new(&bytes[..]);
    assert!(matches!(
        reader.read_message(),
        Err(Error::UnknownKind(0xff))
    ));
    assert_eq!(
        reader.read_message().unwrap(),
        Some(Message::Ping(Ping { id: 1 }))
    );
}

#[test]
fn garbage_payloads_are_per_frame_errors() {
    let cases: Vec<(u8, Vec<u8>)> = vec![
        (kind::PING, vec![]),                                   // missing id
        (kind::PING, vec![0x80]),                               // unterminated varint
        (kind::PING, vec![0xff; 11]),                           // varint overflowing u64
        (kind::PING, vec![1, 0]),                               // trailing byte
        (kind::DATA, vec![1, 3, 0]),                            // stream variant 3 does not exist
        (kind::DATA, vec![1, 0, 0xff, 0xff, 0x03]),             // data longer than the payload
        (kind::EXEC, vec![1, 0, 1, 0xff]),                      // string not valid UTF-8
        (kind::HELLO, b"AGV".to_vec()),                         // truncated magic
        (kind::STARTED, vec![1, 0xff, 0xff, 0xff, 0xff, 0x7f]), // pid beyond u32
    ];
    for (kind, payload) in cases {
        let err = Message::from_frame(&Frame {
            kind,
            payload: payload.clone(),
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::BadPayload { kind: k, .. } if *k == kind),
            "{payload:?}: {err}"
        );
        assert!(!err.is_fatal());
        assert!(err.to_string().contains(Message::kind_name(kind).unwrap()));
    }
}

#[test]
fn protocol_rules_are_checked_on_both_sides() {
    let too_big = Message::Data(Data {
        id: 1,
        stream: Stream::Stdout,
        data: vec![0; MAX_CHUNK + 1],
    });
    assert!(matches!(
        too_big.encode(),
        Err(Error::InvalidMessage { name: "Data", .. })
    ));
    // A peer that sends one anyway: the frame is well-formed, the message is not.
    let mut payload = vec![1, 1];
    payload.extend(postcard_varint((MAX_CHUNK + 1) as u64));
    payload.extend(vec![0; MAX_CHUNK + 1]);
    let frame = Frame {
        kind: kind::DATA,
        payload,
    };
    let err = Message::from_frame(&frame).unwrap_err();
    assert!(
        matches!(err, Error::InvalidMessage { name: "Data", .. }),
        "{err}"
    );
    assert!(!err.is_fatal());

    let zero_id = Message::Done(Done { id: 0 });
    assert!(matches!(
        zero_id.encode(),
        Err(Error::InvalidMessage { .. })
    ));
    let err = Message::from_frame(&Frame {
        kind: kind::DONE,
        payload: vec![0],
    })
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMessage { name: "Done", .. }));

    let stdin_log = Message::ProcLogs(ProcLogs {
        id: 1,
        proc_id: 1,
        stream: Stream::Stdin,
        offset: 0,
        follow: false,
    });
    assert!(matches!(
        stdin_log.encode(),
        Err(Error::InvalidMessage {
            name: "ProcLogs",
            ..
        })
    ));

    let empty_argv = Message::Exec(Exec {
        id: 1,
        spec: ProcessSpec::new(Command::Argv(Vec::new())),
        stdin: false,
    });
    assert!(matches!(
        empty_argv.encode(),
        Err(Error::InvalidMessage { name: "Exec", .. })
    ));
}

fn postcard_varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[test]
fn messages_larger_than_a_frame_are_refused_before_sending() {
    let events = (0..20_000)
        .map(|i| WatchEvent::Modified {
            path: format!("/a/rather/long/path/to/some/file/number/{i:08}/in/the/tree"),
        })
        .collect();
    let message = Message::WatchEvents(WatchEvents { id: 1, events });
    let err = message.encode().unwrap_err();
    assert!(matches!(
        err,
        Error::MessageTooLarge { name: "WatchEvents", len, max: MAX_PAYLOAD } if len > MAX_PAYLOAD
    ));
    let mut writer = FrameWriter::new(Vec::new());
    assert!(writer.write_message(&message).is_err());
    assert!(writer.get_ref().is_empty());
}

#[test]
fn unknown_error_codes_survive_a_round_trip() {
    for raw in 0..40u32 {
        let code = ErrorCode::from(raw);
        assert_eq!(u32::from(code), raw);
    }
    assert_eq!(ErrorCode::from(4), ErrorCode::NotFound);
    assert_eq!(ErrorCode::from(1234), ErrorCode::Other(1234));
    let io = std::io::Error::from(std::io::ErrorKind::NotFound);
    assert_eq!(ErrorCode::from_io(&io), ErrorCode::NotFound);
}

#[test]
fn directions_and_ids() {
    let samples = samples();
    for message in &samples {
        match message {
            Message::Hello(_) => assert_eq!(message.request_id(), None),
            _ => assert!(message.request_id().is_some()),
        }
    }
    assert_eq!(
        Message::Exec(Exec {
            id: 1,
            spec: spec(),
            stdin: false
        })
        .direction(),
        Direction::HostToGuest
    );
    assert_eq!(
        Message::Exited(Exited {
            id: 1,
            status: ExitStatus::Code(0),
            timed_out: false
        })
        .direction(),
        Direction::GuestToHost
    );
    for message in &samples {
        let (host, guest) = (message.sent_by(Role::Host), message.sent_by(Role::Guest));
        match message.direction() {
            Direction::Both => assert!(host && guest),
            Direction::HostToGuest => assert!(host && !guest),
            Direction::GuestToHost => assert!(!host && guest),
        }
    }
    assert_eq!(
        Message::Window(Window {
            id: 1,
            stream: Stream::Stdin,
            bytes: 1
        })
        .direction(),
        Direction::Both
    );
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let valid: Vec<Vec<u8>> = samples().iter().map(|m| m.encode().unwrap()).collect();
    for round in 0..3000 {
        // Half pure noise, half valid frames with a few bytes corrupted (which reaches deep into
        // the payload decoders instead of failing at the first byte).
        let input: Vec<u8> = if round % 2 == 0 {
            let len = rng.below(256);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut bytes = valid[rng.below(valid.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            bytes
        };

        let mut decoder = FrameDecoder::new();
        let mut at = 0;
        while at < input.len() {
            let step = 1 + rng.below(16);
            let end = (at + step).min(input.len());
            decoder.push(&input[at..end]);
            at = end;
            while let Ok(Some(frame)) = decoder.next_frame() {
                let _ = frame.to_message();
            }
        }
        let _ = decoder.finish();

        let mut reader = FrameReader::new(&input[..]);
        while let Ok(Some(frame)) = reader.read_frame() {
            let _ = frame.to_message();
        }

        // Every known kind's decoder, on the raw noise as a payload.
        let kinds: Vec<u8> = (0..=255u8)
            .filter(|k| Message::kind_name(*k).is_some())
            .collect();
        let frame = Frame {
            kind: kinds[rng.below(kinds.len())],
            payload: input,
        };
        if let Ok(message) = frame.to_message() {
            // Whatever decodes re-encodes (canonically, which may differ from non-minimal
            // varints in the input) to the same message.
            let again = message.to_frame().unwrap();
            assert_eq!(again.kind, frame.kind);
            assert_eq!(again.to_message().unwrap(), message);
        }
    }
}

#[test]
fn encode_data_matches_the_owned_encoding() {
    for (id, stream, len) in [
        (1, Stream::Stdout, 0),
        (300, Stream::Stderr, 1),
        (u64::MAX, Stream::Stdin, 127),
        (7, Stream::Stdout, 128),
        (8, Stream::Stdout, MAX_CHUNK),
    ] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let owned = Message::Data(Data {
            id,
            stream,
            data: data.clone(),
        });
        assert_eq!(
            encode_data(id, stream, &data).unwrap(),
            owned.encode().unwrap()
        );
    }
    assert!(matches!(
        encode_data(1, Stream::Stdout, &vec![0; MAX_CHUNK + 1]),
        Err(Error::InvalidMessage { name: "Data", .. })
    ));
    assert!(matches!(
        encode_data(0, Stream::Stdout, b"x"),
        Err(Error::InvalidMessage { name: "Data", .. })
    ));
}

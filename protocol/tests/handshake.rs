//! The Hello handshake between two real sockets, as host and guest agent run it.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread;

use agentvm_protocol::*;

fn run(
    stream: UnixStream,
    hello: Hello,
) -> (
    Result<Negotiated, Error>,
    FrameReader<UnixStream>,
    FrameWriter<UnixStream>,
) {
    let mut reader = FrameReader::new(stream.try_clone().unwrap());
    let mut writer = FrameWriter::new(stream);
    let result = handshake(&mut reader, &mut writer, &hello);
    (result, reader, writer)
}

/// Both sides at once, as in production (each sends before it reads).
fn both(host: Hello, guest: Hello) -> (Result<Negotiated, Error>, Result<Negotiated, Error>) {
    let (a, b) = UnixStream::pair().unwrap();
    let guest_side = thread::spawn(move || run(b, guest).0);
    let host_result = run(a, host).0;
    (host_result, guest_side.join().unwrap())
}

fn hello_with_version(role: Role, software: &str, version: Version) -> Hello {
    Hello {
        protocol_version: version.to_u32(),
        ..Hello::new(role, software, Features::ALL)
    }
}

#[test]
fn matching_versions_agree_on_features_and_continue() {
    let host = Hello::new(Role::Host, "agentvm 0.1.0", Features::EXEC | Features::PTY);
    let guest = Hello::new(
        Role::Guest,
        "agent 0.1.0",
        Features::EXEC | Features::FILES | Features(1 << 63),
    );
    let (a, b) = UnixStream::pair().unwrap();
    let guest_hello = guest.clone();
    let guest_side = thread::spawn(move || {
        let (result, mut reader, mut writer) = run(b, guest_hello);
        // The connection carries on after the handshake.
        let ping = reader.read_message().unwrap().unwrap();
        assert_eq!(ping, Message::Ping(Ping { id: 1 }));
        writer.write_message(&Done { id: 1 }.into()).unwrap();
        result
    });
    let (host_result, mut reader, mut writer) = run(a, host.clone());
    writer.write_message(&Ping { id: 1 }.into()).unwrap();
    assert_eq!(
        reader.read_message().unwrap(),
        Some(Message::Done(Done { id: 1 }))
    );

    let host_view = host_result.unwrap();
    assert_eq!(host_view.version, PROTOCOL_VERSION);
    assert_eq!(host_view.features, Features::EXEC);
    assert_eq!(host_view.peer, guest);
    let guest_view = guest_side.join().unwrap().unwrap();
    assert_eq!(guest_view.features, Features::EXEC);
    assert_eq!(guest_view.peer, host);
}

#[test]
fn different_minor_versions_use_the_smaller() {
    let major = PROTOCOL_VERSION.major;
    let host = hello_with_version(Role::Host, "h", Version { major, minor: 7 });
    let guest = hello_with_version(Role::Guest, "g", Version { major, minor: 3 });
    let (h, g) = both(host, guest);
    assert_eq!(h.unwrap().version, Version { major, minor: 3 });
    assert_eq!(g.unwrap().version, Version { major, minor: 3 });
}

#[test]
fn major_version_mismatch_names_both_versions_on_both_sides() {
    let host = Hello::new(Role::Host, "agentvm 0.4.0", Features::ALL);
    let old_agent = hello_with_version(
        Role::Guest,
        "agentvm-guest-agent 0.0.9",
        Version { major: 0, minor: 5 },
    );
    let (h, g) = both(host, old_agent);

    let err = h.unwrap_err();
    assert!(err.is_fatal());
    assert!(matches!(
        &err,
        Error::VersionMismatch { local, peer, .. }
            if *local == PROTOCOL_VERSION && *peer == Version { major: 0, minor: 5 }
    ));
    let text = err.to_string();
    for needle in [
        "version mismatch",
        &format!("v{PROTOCOL_VERSION}"),
        "v0.5",
        "agentvm 0.4.0",
        "agentvm-guest-agent 0.0.9",
        "guest agent",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }

    let text = g.unwrap_err().to_string();
    assert!(text.contains("v0.5") && text.contains(&format!("v{PROTOCOL_VERSION}")));
    assert!(text.contains("agentvm 0.4.0"), "{text}");
}

#[test]
fn a_peer_with_the_same_role_is_refused() {
    let (h, _) = both(
        Hello::new(Role::Host, "a", Features::ALL),
        Hello::new(Role::Host, "b", Features::ALL),
    );
    assert!(matches!(
        h.unwrap_err(),
        Error::WrongRole {
            peer: Role::Host,
            expected: Role::Guest
        }
    ));
}

/// What the host sees from a peer that sends these bytes, then ends its side of the stream.
fn host_sees(peer_bytes: &[u8]) -> Error {
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(peer_bytes).unwrap();
    b.shutdown(Shutdown::Write).unwrap();
    let err = run(a, Hello::new(Role::Host, "h", Features::ALL))
        .0
        .unwrap_err();
    drop(b);
    err
}

#[test]
fn broken_peers_give_clear_errors() {
    assert!(matches!(host_sees(b""), Error::ClosedBeforeHello));
    // A peer that is gone altogether fails the host's own write.
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    let err = run(a, Hello::new(Role::Host, "h", Features::ALL))
        .0
        .unwrap_err();
    assert!(matches!(err, Error::ClosedBeforeHello), "{err}");
    assert!(err.to_string().contains("before the peer sent its Hello"));

    let err = host_sees(b"OK 1024\n");
    assert!(matches!(
        err,
        Error::GarbageBeforeHello { first_bytes } if &first_bytes == b"OK 1"
    ));
    assert!(err.to_string().contains("\"OK 1\""), "{err}");

    let ping = Message::Ping(Ping { id: 1 }).encode().unwrap();
    assert!(matches!(
        host_sees(&ping),
        Error::NotHello { kind: kind::PING }
    ));

    let mut bad_magic = Hello::new(Role::Guest, "g", Features::ALL);
    bad_magic.magic = *b"HTTP";
    let err = host_sees(&Message::Hello(bad_magic).encode().unwrap());
    assert!(matches!(err, Error::BadMagic { found, .. } if &found == b"HTTP"));

    let garbled = Frame {
        kind: kind::HELLO,
        payload: b"AGVM\xff".to_vec(),
    };
    let err = host_sees(&garbled.to_bytes().unwrap());
    assert!(matches!(err, Error::BadHello { .. }), "{err}");
    assert!(err.is_fatal());

    let hello = Message::Hello(Hello::new(Role::Guest, "g", Features::ALL))
        .encode()
        .unwrap();
    assert!(matches!(
        host_sees(&hello[..hello.len() - 1]),
        Error::Truncated { .. }
    ));
}

#[test]
fn a_peer_that_said_hello_and_left_is_still_diagnosed() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let newer = hello_with_version(Role::Guest, "agent 9", Version { major: 9, minor: 0 });
    b.write_all(&Message::Hello(newer).encode().unwrap())
        .unwrap();
    drop(b);
    // The host's own Hello now hits a closed socket, but the peer's Hello explains it.
    let err = run(a, Hello::new(Role::Host, "h", Features::ALL))
        .0
        .unwrap_err();
    assert!(
        matches!(&err, Error::VersionMismatch { peer, .. } if peer.major == 9),
        "{err}"
    );
}

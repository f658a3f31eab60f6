//! The handshake, with the server in-process (no child processes here, so the in-process reaper
//! cannot interfere with anything).

use std::io::BufReader;
use std::os::unix::net::UnixStream;

use agentvm_protocol::{
    handshake, Error, Features, FrameReader, FrameWriter, Hello, Role, Version,
};
use guest_agent::server::{serve_connection, ServeError, Services};

#[test]
fn version_mismatch_is_explained_on_both_sides() {
    let services = Services::new().unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || serve_connection(guest, &services));
    let mut reader = FrameReader::new(BufReader::new(host.try_clone().unwrap()));
    let mut writer = FrameWriter::new(host);
    let mut hello = Hello::new(Role::Host, "agentvm 9.9.9", Features::ALL);
    hello.protocol_version = Version { major: 2, minor: 0 }.to_u32();
    let host_error = handshake(&mut reader, &mut writer, &hello).unwrap_err();
    let text = host_error.to_string();
    assert!(
        matches!(host_error, Error::VersionMismatch { .. }),
        "{text}"
    );
    assert!(text.contains("agentvm-guest-agent "), "{text}");
    assert!(text.contains("v1.0") && text.contains("v2.0"), "{text}");

    let guest_error = server.join().unwrap().unwrap_err();
    let text = guest_error.to_string();
    assert!(
        matches!(
            guest_error,
            ServeError::Handshake(Error::VersionMismatch { .. })
        ),
        "{text}"
    );
    assert!(text.contains("agentvm 9.9.9"), "{text}");
    assert!(text.contains("v1.0") && text.contains("v2.0"), "{text}");
}

#[test]
fn a_peer_that_is_not_a_host_is_refused() {
    let services = Services::new().unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || serve_connection(guest, &services));
    let mut reader = FrameReader::new(BufReader::new(host.try_clone().unwrap()));
    let mut writer = FrameWriter::new(host);
    let hello = Hello::new(Role::Guest, "impostor", Features::ALL);
    assert!(handshake(&mut reader, &mut writer, &hello).is_err());
    let guest_error = server.join().unwrap().unwrap_err();
    assert!(matches!(
        guest_error,
        ServeError::Handshake(Error::WrongRole { .. })
    ));
}

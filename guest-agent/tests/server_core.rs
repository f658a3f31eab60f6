//! The connection core: handshake, Ping, ids, unsupported features, garbage frames.

mod common;

use agentvm_protocol::{Done, ErrorCode, Message, Ping};
use common::Agent;

#[test]
fn ping_is_answered_with_done() {
    let agent = Agent::start();
    let mut client = agent.connect();
    assert!(client
        .negotiated
        .peer
        .software_version
        .starts_with("agentvm-guest-agent "));
    for id in 1..=3 {
        client.send(Ping { id });
        assert_eq!(client.recv(), Message::Done(Done { id }));
    }
}

#[test]
fn unknown_kind_is_unsupported_and_the_connection_goes_on() {
    let agent = Agent::start();
    let mut client = agent.connect();
    // Kind 0x7f, payload = varint id 9.
    client.send_raw(&[1, 0, 0, 0, 0x7f, 9]);
    match client.recv() {
        Message::ErrorMsg(e) => {
            assert_eq!(e.id, 9);
            assert_eq!(e.code, ErrorCode::Unsupported);
            assert!(e.message.contains("0x7f"), "{}", e.message);
        }
        other => panic!("expected ErrorMsg, got {other:?}"),
    }
    client.send(Ping { id: 10 });
    assert_eq!(client.recv(), Message::Done(Done { id: 10 }));
}

#[test]
fn garbage_payloads_and_wrong_direction_are_protocol_errors() {
    let agent = Agent::start();
    let mut client = agent.connect();
    // An Exec frame whose payload does not decode.
    client.send_raw(&[2, 0, 0, 0, 0x10, 0xff, 0xff]);
    match client.recv() {
        Message::ErrorMsg(e) => {
            assert_eq!((e.id, e.code), (0, ErrorCode::Protocol));
            assert!(e.message.contains("Exec"), "{}", e.message);
        }
        other => panic!("expected ErrorMsg, got {other:?}"),
    }
    // A message only the guest sends.
    client.send(Done { id: 4 });
    match client.recv() {
        Message::ErrorMsg(e) => {
            assert_eq!((e.id, e.code), (0, ErrorCode::Protocol));
            assert!(e.message.contains("Done"), "{}", e.message);
        }
        other => panic!("expected ErrorMsg, got {other:?}"),
    }
    client.send(Ping { id: 11 });
    assert_eq!(client.recv(), Message::Done(Done { id: 11 }));
}

#[test]
fn an_oversized_frame_drops_the_connection() {
    let agent = Agent::start();
    let mut client = agent.connect();
    client.send_raw(&[0xff, 0xff, 0xff, 0x7f, 0x08]);
    assert_eq!(client.recv_wire(), None);
    // The agent itself goes on.
    let mut client = agent.connect();
    client.send(Ping { id: 1 });
    assert_eq!(client.recv(), Message::Done(Done { id: 1 }));
}

#[test]
fn services_outside_the_negotiated_features_are_unsupported() {
    use agentvm_protocol::{Connect, Features, ReadFile, WatchStart};
    let agent = Agent::start();
    // The agent implements files, watch and port forwarding, but this host offers only exec.
    let mut client = common::Client::handshake(agent.stream(), Features::EXEC).unwrap();
    let offered = client.negotiated.peer.features;
    assert!(offered.contains(Features::FILES | Features::WATCH | Features::PORT_FORWARD));
    let requests: Vec<Message> = vec![
        ReadFile {
            id: 1,
            path: "/etc/hostname".into(),
            offset: 0,
            len: None,
        }
        .into(),
        WatchStart {
            id: 2,
            path: "/tmp".into(),
            recursive: false,
            include: vec![],
            exclude: vec![],
        }
        .into(),
        Connect { id: 3, port: 80 }.into(),
    ];
    for request in requests {
        let id = request.request_id().unwrap();
        client.send(request);
        match client.recv() {
            Message::ErrorMsg(e) => {
                assert_eq!((e.id, e.code), (id, ErrorCode::Unsupported));
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
    assert!(offered.contains(agentvm_protocol::Features::EXEC));
}

//! The guest agent protocol as the host receives it: arbitrary bytes claiming to come from the
//! guest go through the handshake, the framers and the message decoder (see
//! src/protocol_stream.rs for the checks).
#![no_main]

use agentvm_protocol::Role;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    agentvm_fuzz::protocol_stream::receive(input, Role::Host);
});

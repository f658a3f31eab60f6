//! What a peer of the guest agent protocol does with the bytes the other side sends: the Hello
//! handshake, then frames decoded into messages, as the guest agent (receiving from the host) and
//! the host's client (receiving from the guest) do. Besides "no panic", it checks that the two
//! framers agree (the blocking `FrameReader` and the event loop's incremental `FrameDecoder`, fed
//! in arbitrary chunks) and that every message that decodes encodes back to itself.

use agentvm_protocol::{
    handshake, Features, Frame, FrameDecoder, FrameReader, FrameWriter, Hello, Message, Role,
};

/// `input`: one byte choosing the chunk size the event loop sees, then the byte stream the peer
/// sent. `local`: the receiving side.
pub fn receive(input: &[u8], local: Role) {
    let Some((&chunk, stream)) = input.split_first() else {
        return;
    };
    as_a_connection(stream, local);
    framers_agree(stream, usize::from(chunk % 64) + 1);
}

/// The receiver's path: handshake, then read frames until the stream ends or breaks.
fn as_a_connection(stream: &[u8], local: Role) {
    let mut reader = FrameReader::new(stream);
    let mut sent = Vec::new();
    let mut writer = FrameWriter::new(&mut sent);
    let hello = Hello::new(local, "fuzz", Features::ALL);
    if let Ok(negotiated) = handshake(&mut reader, &mut writer, &hello) {
        assert_eq!(
            negotiated.peer.role,
            local.peer(),
            "a Hello of our own role was taken"
        );
    }
    loop {
        match reader.read_frame() {
            Ok(Some(frame)) => decode_checked(&frame, local.peer()),
            Ok(None) | Err(_) => return,
        }
    }
}

/// Decodes one frame; whatever decodes must survive a round trip unchanged.
fn decode_checked(frame: &Frame, sender: Role) {
    let Ok(message) = Message::from_frame(frame) else {
        return;
    };
    // What a receiver checks next (the direction rule); must not panic on any message.
    let _ = message.sent_by(sender);
    let _ = message.request_id();
    let encoded = message
        .to_frame()
        .unwrap_or_else(|e| panic!("{} decoded but does not encode: {e}", message.name()));
    let again = Message::from_frame(&encoded)
        .unwrap_or_else(|e| panic!("{} re-encoded does not decode: {e}", message.name()));
    assert_eq!(again, message, "round trip changed the message");
}

/// The blocking reader and the incremental decoder see the same frames and the same fate.
fn framers_agree(stream: &[u8], chunk: usize) {
    let mut reader = FrameReader::new(stream);
    let mut by_reader = Vec::new();
    let reader_failed = loop {
        match reader.read_frame() {
            Ok(Some(frame)) => by_reader.push(frame),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };

    let mut decoder = FrameDecoder::new();
    let mut by_decoder = Vec::new();
    let mut decoder_failed = false;
    'chunks: for piece in stream.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => by_decoder.push(frame),
                Ok(None) => break,
                Err(_) => {
                    decoder_failed = true;
                    break 'chunks;
                }
            }
        }
    }
    if !decoder_failed {
        decoder_failed = decoder.finish().is_err();
    }
    assert_eq!(
        by_reader, by_decoder,
        "the two framers found different frames"
    );
    assert_eq!(
        reader_failed, decoder_failed,
        "one framer failed and the other did not"
    );
}

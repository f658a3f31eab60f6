//! What the egress filter reads from the first bytes of a guest's TCP connection: the TLS
//! ClientHello (SNI) and HTTP request head sniffing, and the request stream rewriter that injects
//! credentials into every request head on a connection. Besides "no panic", the answers must not
//! depend on how the bytes were split into segments: a verdict given on a prefix holds for the
//! whole, and the rewriter's output is the same fed at once or in pieces.
#![no_main]

use arbitrary::Arbitrary;
use egress::inspect::http::parse_head;
use egress::inspect::sni::parse_client_hello;
use egress::inspect::{host_name, peek, Peek, RequestRewriter, PEEK_LIMIT};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Where the first segment ends, and the size of the later ones.
    split: u16,
    inject: Vec<(String, String)>,
    bytes: Vec<u8>,
}

fn verdicts_hold(bytes: &[u8], split: usize) {
    let prefix = &bytes[..split.min(bytes.len())];
    let early = peek(prefix);
    let late = peek(bytes);
    if early != Peek::NeedMore && prefix.len() < PEEK_LIMIT {
        assert_eq!(early, late, "the verdict changed when more bytes arrived");
    }
    let _ = parse_client_hello(bytes);
    if let Ok(Some((head, len))) = parse_head(bytes) {
        assert!(len <= bytes.len(), "the head is longer than the input");
        if let Some(host) = &head.host {
            let _ = host_name(host);
        }
    }
}

fn feed_in_pieces(
    rewriter: &mut RequestRewriter,
    bytes: &[u8],
    piece: usize,
) -> Result<(Vec<u8>, Vec<egress::inspect::RequestHead>), egress::inspect::HttpError> {
    let mut out = Vec::new();
    let mut heads = Vec::new();
    for chunk in bytes.chunks(piece) {
        heads.extend(rewriter.feed(chunk, &mut out)?);
    }
    Ok((out, heads))
}

fuzz_target!(|input: Input| {
    let split = usize::from(input.split);
    verdicts_hold(&input.bytes, split);

    let inject: Vec<(String, String)> = input.inject.into_iter().take(4).collect();
    let mut whole = RequestRewriter::new(inject.clone());
    let mut pieces = RequestRewriter::new(inject);
    let at_once = feed_in_pieces(&mut whole, &input.bytes, input.bytes.len().max(1));
    let in_pieces = feed_in_pieces(&mut pieces, &input.bytes, split % 97 + 1);
    match (&at_once, &in_pieces) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.1, b.1, "different request heads when fed in pieces");
            assert_eq!(a.0, b.0, "different bytes upstream when fed in pieces");
            assert_eq!(whole.is_idle(), pieces.is_idle());
        }
        (Err(_), Err(_)) => {}
        _ => panic!("fed at once: {at_once:?}; in pieces: {in_pieces:?}"),
    }
});

//! What the egress filter reads from the first bytes of a guest's TCP connection: the TLS
//! ClientHello (SNI) and HTTP request head sniffing, and the request stream rewriter that injects
//! credentials into every request head on a connection. Besides "no panic", the answers must not
//! depend on how the bytes were split into segments: a verdict given on a prefix holds for the
//! whole, and the rewriter forwards the same bytes fed at once or in pieces.
#![no_main]

use arbitrary::Arbitrary;
use egress::inspect::http::parse_head;
use egress::inspect::sni::parse_client_hello;
use egress::inspect::{host_name, peek, HttpError, Peek, RequestHead, RequestRewriter, PEEK_LIMIT};
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

/// Feeds `bytes` in pieces of `piece` bytes: what went upstream, the heads found, and the error
/// that stopped the stream, if one did.
fn feed_in_pieces(
    rewriter: &mut RequestRewriter,
    bytes: &[u8],
    piece: usize,
) -> (Vec<u8>, Vec<RequestHead>, Option<HttpError>) {
    let mut out = Vec::new();
    let mut heads = Vec::new();
    for chunk in bytes.chunks(piece) {
        match rewriter.feed(chunk, &mut out) {
            Ok(found) => heads.extend(found),
            Err(e) => return (out, heads, Some(e)),
        }
    }
    (out, heads, None)
}

fuzz_target!(|input: Input| {
    let split = usize::from(input.split);
    verdicts_hold(&input.bytes, split);

    let inject: Vec<(String, String)> = input.inject.into_iter().take(4).collect();
    let mut whole = RequestRewriter::new(inject.clone());
    let mut pieces = RequestRewriter::new(inject);
    let (whole_out, whole_heads, whole_err) =
        feed_in_pieces(&mut whole, &input.bytes, input.bytes.len().max(1));
    let (piece_out, piece_heads, piece_err) =
        feed_in_pieces(&mut pieces, &input.bytes, split % 97 + 1);
    match (&whole_err, &piece_err) {
        (None, None) => {
            assert_eq!(
                whole_heads, piece_heads,
                "different request heads when fed in pieces"
            );
            assert_eq!(
                whole_out, piece_out,
                "different bytes upstream when fed in pieces"
            );
            assert_eq!(whole.is_idle(), pieces.is_idle());
        }
        // A head is checked in full once its blank line may have arrived, and only its first
        // segment is checked before that (re-parsing on every segment would be quadratic), so
        // garbage in a later segment fails the stream later. Until then the rewriter must be
        // holding the bytes back, not forwarding them.
        (Some(_), None) => assert!(!pieces.is_idle(), "garbage was let through: {whole_err:?}"),
        (None, Some(_)) => assert!(!whole.is_idle(), "garbage was let through: {piece_err:?}"),
        (Some(_), Some(_)) => {}
    }
    // Whatever went upstream is the same stream, however it was split.
    let common = whole_out.len().min(piece_out.len());
    assert_eq!(
        whole_out[..common],
        piece_out[..common],
        "the bytes upstream differ when fed in pieces"
    );
    let common = whole_heads.len().min(piece_heads.len());
    assert_eq!(whole_heads[..common], piece_heads[..common]);
});

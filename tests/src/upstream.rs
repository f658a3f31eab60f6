//! A local HTTP upstream for egress tests: it answers every request on 127.0.0.1 with the same
//! small response and keeps each request head it received.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

/// What [`hello_upstream`] answers, byte for byte.
pub const HELLO_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Reply: yes\r\n\r\nhello";
/// The same as an isolate's `agentvm.fetch` hands it to the module.
pub const HELLO_AS_FETCHED: &str = "200\r\nContent-Length: 5\r\nX-Reply: yes\r\n\r\nhello";

/// Starts the upstream on an ephemeral port of 127.0.0.1 (its thread lives as long as the test
/// process): the port, and the request heads received so far.
pub fn hello_upstream() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local address").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            if let Ok(mut heads) = record.lock() {
                heads.push(String::from_utf8_lossy(&head).into_owned());
            }
            let _ = stream.write_all(HELLO_RESPONSE);
        }
    });
    (port, seen)
}

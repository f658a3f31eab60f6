//! Forwarding the host's input for a request (`Data` on `Stdin`) to a process's stdin pipe or a
//! PTY master, on a thread of its own.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use agentvm_protocol::MAX_CHUNK;

use super::context::{CloseSignal, InputStream};
use super::dispatch::HELPER_STACK;
use super::fd::{poll_ready, set_nonblocking};

/// Starts the forwarding thread. It ends at the input's `Eof` (closing `target`, so the process
/// sees end of file), when the request ends, or when `close` fires while the process is not
/// reading. Input the process no longer takes (it closed stdin) is consumed and dropped, so the
/// host is never left waiting for window.
pub(crate) fn spawn_input_feeder(
    input: Arc<InputStream>,
    close: CloseSignal,
    target: OwnedFd,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("stdin-feeder".into())
        .stack_size(HELPER_STACK)
        .spawn(move || feed(&input, &close, target))
        .map(|_| ())
}

fn feed(input: &InputStream, close: &CloseSignal, target: OwnedFd) {
    let mut target = File::from(target);
    // Non-blocking, so that a process that stops reading cannot hold this thread past the end of
    // the request: writes wait in poll() next to the close signal instead.
    if set_nonblocking(target.as_fd()).is_err() {
        return;
    }
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = match input.read_timeout(&mut buf, None) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match target.write(rest) {
                Ok(written) => rest = &rest[written..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let ready = poll_ready(
                        &[(target.as_fd(), libc::POLLOUT), (close.fd(), libc::POLLIN)],
                        None,
                    );
                    match ready {
                        Ok(ready) if !ready[1] => {}
                        _ => return,
                    }
                }
                Err(_) => {
                    while matches!(input.read_timeout(&mut buf, None), Ok(n) if n > 0) {}
                    return;
                }
            }
        }
    }
}

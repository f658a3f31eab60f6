//! Forwarding a process's output (a pipe or a PTY master) to a sink, one thread per source.
//!
//! A process is done when it exits, not when its output reaches end of file: a background
//! grandchild may hold the pipe open for ever. So after the exit, the owner gives the pumps a
//! short grace to reach end of file, then fires a [`Trigger`]: each pump then forwards what is
//! already buffered (up to [`DRAIN_LIMIT`]) without waiting for more, and stops.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use agentvm_protocol::MAX_CHUNK;

use super::fd::{poll_ready, set_nonblocking, Trigger};

/// After the stop, at most this much leftover output is forwarded per source, so a grandchild
/// that keeps writing cannot hold back the end of the request.
pub(crate) const DRAIN_LIMIT: usize = 1 << 20;

/// How long a process's output may take to reach end of file after the process exited.
pub(crate) const EXIT_GRACE: Duration = Duration::from_millis(200);

/// Forwards `source` to `sink` until end of file, a read error (a PTY master reads `EIO` once the
/// terminal is gone), `sink` returning false, or `stop` firing. `done` is dropped at the end, so
/// the owner's receiver learns when every pump finished.
pub(crate) fn pump(
    source: OwnedFd,
    stop: &Trigger,
    done: Sender<()>,
    mut sink: impl FnMut(&[u8]) -> bool,
) {
    let mut source = File::from(source);
    let mut buf = vec![0u8; MAX_CHUNK];
    while let Ok(ready) = poll_ready(
        &[(stop.fd(), libc::POLLIN), (source.as_fd(), libc::POLLIN)],
        None,
    ) {
        if ready[0] {
            drain(&mut source, &mut buf, &mut sink);
            break;
        }
        match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !sink(&buf[..n]) {
                    break;
                }
            }
            // A PTY master shares its file status with the input side, which is non-blocking.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => break,
        }
    }
    drop(done);
}

fn drain(source: &mut File, buf: &mut [u8], sink: &mut impl FnMut(&[u8]) -> bool) {
    if set_nonblocking(source.as_fd()).is_err() {
        return;
    }
    let mut forwarded = 0;
    while forwarded < DRAIN_LIMIT {
        let want = buf.len().min(DRAIN_LIMIT - forwarded);
        match source.read(&mut buf[..want]) {
            Ok(0) => return,
            Ok(n) => {
                if !sink(&buf[..n]) {
                    return;
                }
                forwarded += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// After the process exited: waits up to `grace` for every pump holding a sender of `done` to
/// finish, then fires `stop` so the rest drain and stop. The caller still joins the threads.
pub(crate) fn stop_after_grace(done: &Receiver<()>, stop: &Trigger, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match done.recv_timeout(left) {
            Ok(()) => {}
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => break,
        }
    }
    stop.fire();
}

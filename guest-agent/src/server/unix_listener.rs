//! Host-process mode, for tests and development: the same server on a Unix socket, with the agent
//! as an ordinary process instead of the guest's PID 1.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;

use super::{serve_listener_forever, Services};

/// Binds `path` (replacing a stale socket) and serves connections on it until accepting fails;
/// `on_listening` runs once connections are accepted (the socket file appears a moment before).
/// Makes the process a child subreaper first, so orphaned grandchildren come back to the agent's
/// reaper as they would to PID 1 in the guest, and blocks the signals PID 1 blocks.
pub fn serve_unix_socket(path: &Path, on_listening: impl FnOnce()) -> io::Error {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return io::Error::last_os_error();
    }
    // PID 1 serves with its power signals and SIGCHLD blocked in every thread (it reads them
    // through a signalfd); so does host mode, so that tests see what guest commands inherit.
    let _signals = match crate::power::SignalWatcher::install() {
        Ok(watcher) => watcher,
        Err(e) => {
            return io::Error::new(e.kind(), format!("cannot block the agent's signals: {e}"))
        }
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return io::Error::new(
                e.kind(),
                format!("cannot remove the old socket {}: {e}", path.display()),
            )
        }
    }
    let listener = match UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(e) => {
            return io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        }
    };
    let services = match Services::new() {
        Ok(services) => services,
        Err(e) => return io::Error::new(e.kind(), format!("cannot start the reaper: {e}")),
    };
    on_listening();
    serve_listener_forever(|| listener.accept().map(|(stream, _)| stream), &services)
}

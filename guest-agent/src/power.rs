//! Signals PID 1 cares about, and powering the guest off.
//!
//! busybox `halt`, `poweroff` and `reboot` ask init to act by sending SIGUSR1, SIGUSR2 and SIGTERM.
//! Every one of them ends the VM the same way: sync, then reboot(RESTART), which with `reboot=k`
//! is an i8042 reset the VMM turns into a clean exit. SIGCHLD is in the watched set too, only to be
//! drained: PID 1 inherits every orphan, and the server's reaper thread reaps them.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::console::ConsoleWriter;
use crate::console_protocol::Marker;

/// Signals that mean "power off" for the agent.
pub const POWER_SIGNALS: [libc::c_int; 3] = [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM];

pub fn is_power_signal(signal: libc::c_int) -> bool {
    POWER_SIGNALS.contains(&signal)
}

/// A readable name for console diagnostics.
pub fn signal_name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGUSR1 => "SIGUSR1 (halt)".to_string(),
        libc::SIGUSR2 => "SIGUSR2 (poweroff)".to_string(),
        libc::SIGTERM => "SIGTERM (reboot)".to_string(),
        libc::SIGCHLD => "SIGCHLD".to_string(),
        other => format!("signal {other}"),
    }
}

/// The watched signals, blocked in the calling thread and delivered through a signalfd instead, so
/// they can be waited for with poll(). Blocking them first also keeps a poweroff that arrives
/// during boot pending until the agent looks. Dropping the watcher
/// restores the previous signal mask. Children do not inherit the mask: std resets it before exec.
pub struct SignalWatcher {
    fd: File,
    previous_mask: libc::sigset_t,
}

fn watched_set() -> io::Result<libc::sigset_t> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset only edits it, with valid signal numbers.
    unsafe {
        if libc::sigemptyset(set.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        for signal in POWER_SIGNALS.iter().chain(&[libc::SIGCHLD]) {
            if libc::sigaddset(set.as_mut_ptr(), *signal) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(set.assume_init())
    }
}

impl SignalWatcher {
    pub fn install() -> io::Result<Self> {
        let set = watched_set()?;
        let mut previous = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: blocks signals for this thread; both sets are valid for the call.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, previous.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: pthread_sigmask succeeded and wrote the previous mask.
        let previous_mask = unsafe { previous.assume_init() };
        // SAFETY: creates a new signalfd for a valid set; the returned fd is checked below.
        let raw = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if raw < 0 {
            let err = io::Error::last_os_error();
            // SAFETY: restores the mask saved above.
            unsafe {
                libc::pthread_sigmask(libc::SIG_SETMASK, &previous_mask, std::ptr::null_mut())
            };
            return Err(err);
        }
        // SAFETY: raw is a fresh fd from signalfd that nothing else owns.
        let fd = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        Ok(Self { fd, previous_mask })
    }

    /// Every signal queued so far, without blocking (empty if none).
    pub fn take_pending(&mut self) -> io::Result<Vec<libc::c_int>> {
        const INFO_SIZE: usize = std::mem::size_of::<libc::signalfd_siginfo>();
        let mut buf = [0u8; INFO_SIZE * 8];
        let mut signals = Vec::new();
        loop {
            match self.fd.read(&mut buf) {
                Ok(0) => return Ok(signals),
                Ok(n) => {
                    // ssi_signo is the first field of each signalfd_siginfo record.
                    for record in buf[..n].chunks_exact(INFO_SIZE) {
                        let signo =
                            u32::from_ne_bytes([record[0], record[1], record[2], record[3]]);
                        signals.push(signo as libc::c_int);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(signals),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Blocks until at least one watched signal is pending and returns what is queued.
    pub fn wait(&mut self) -> io::Result<Vec<libc::c_int>> {
        loop {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one valid pollfd that lives across the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let signals = self.take_pending()?;
            if !signals.is_empty() {
                return Ok(signals);
            }
        }
    }
}

impl AsFd for SignalWatcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SignalWatcher {
    fn drop(&mut self) {
        // SAFETY: restores the mask this thread had before install().
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous_mask, std::ptr::null_mut())
        };
    }
}

/// PID 1's main thread once the agent's server runs: wait for a power signal and return it.
/// SIGCHLD is only drained here: the server's reaper thread owns `waitpid` (orphans included).
/// Without a signal watcher there is no way to hear one: sleep until the VM is stopped.
pub fn wait_for_power_signal<W: Write>(
    signals: Option<&mut SignalWatcher>,
    console: &mut ConsoleWriter<W>,
) -> libc::c_int {
    if let Some(watcher) = signals {
        loop {
            match watcher.wait() {
                Ok(received) => {
                    if let Some(signal) = received.into_iter().find(|s| is_power_signal(*s)) {
                        return signal;
                    }
                }
                Err(e) => {
                    console.error(format!("waiting for signals failed: {e}"));
                    break;
                }
            }
        }
    }
    console.error(
        "no signal watcher: cannot be powered off from inside; waiting until the VM is stopped",
    );
    loop {
        // SAFETY: pause() just sleeps until a signal; nothing is passed.
        unsafe { libc::pause() };
    }
}

/// Ends the VM: poweroff marker, sync, reboot(RESTART) (an i8042 reset with `reboot=k`). If the
/// kernel refuses, exiting PID 1 makes it panic, and with `panic=-1` that resets too.
pub fn power_off<W: Write>(console: &mut ConsoleWriter<W>) -> ! {
    console.marker(&Marker::Poweroff);
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot with a valid command; on success it does not return.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    let err = io::Error::last_os_error();
    console.error(format!(
        "reboot failed: {err}; exiting init to force a kernel panic"
    ));
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watcher_delivers_blocked_signals_through_the_fd() {
        let mut watcher = SignalWatcher::install().unwrap();
        assert!(watcher.take_pending().unwrap().is_empty());
        // raise() targets this thread, where the signals are blocked, so they stay queued for the
        // signalfd instead of killing the test process.
        // SAFETY: raising a blocked signal in the current thread.
        unsafe {
            libc::raise(libc::SIGUSR2);
            libc::raise(libc::SIGTERM);
        }
        let mut got = watcher.wait().unwrap();
        got.extend(watcher.take_pending().unwrap());
        got.sort_unstable();
        assert_eq!(got, vec![libc::SIGUSR2, libc::SIGTERM]);
        assert!(got.iter().all(|&s| is_power_signal(s)));
        assert!(!is_power_signal(libc::SIGCHLD));
    }

    #[test]
    fn dropping_the_watcher_restores_the_mask() {
        let current_mask = || {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            // SAFETY: queries this thread's mask into a local set.
            unsafe {
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), set.as_mut_ptr());
                libc::sigismember(set.as_ptr(), libc::SIGUSR1)
            }
        };
        assert_eq!(current_mask(), 0);
        let watcher = SignalWatcher::install().unwrap();
        assert_eq!(current_mask(), 1);
        drop(watcher);
        assert_eq!(current_mask(), 0);
    }

    #[test]
    fn waiting_skips_sigchld_and_returns_the_power_signal() {
        let mut watcher = SignalWatcher::install().unwrap();
        // SAFETY: raising blocked signals in the current thread.
        unsafe {
            libc::raise(libc::SIGCHLD);
            libc::raise(libc::SIGUSR1);
        }
        let mut console = ConsoleWriter::new(Vec::new());
        assert_eq!(
            wait_for_power_signal(Some(&mut watcher), &mut console),
            libc::SIGUSR1
        );
        assert!(console.get_ref().is_empty());
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGUSR2), "SIGUSR2 (poweroff)");
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM (reboot)");
        assert_eq!(signal_name(2), "signal 2");
    }
}

//! The serial console: opening it as init's stdio, raw mode, and a writer for the agent's
//! diagnostic lines (markers of [`crate::console_protocol`] and log lines).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::console_protocol::Marker;

pub const CONSOLE: &str = "/dev/console";
/// Prefix of the agent's own human-readable console lines.
pub const DIAG_PREFIX: &str = "agentvm-agent: ";

/// Opens /dev/console and makes it fds 0, 1 and 2, since the kernel leaves init without stdio
/// when the initramfs has no /dev/console node. Returns the console for the agent's own writes.
pub fn open_console() -> io::Result<File> {
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(CONSOLE)?;
    for target in 0..=2 {
        if console.as_raw_fd() == target {
            continue;
        }
        // SAFETY: dup2 on a valid open fd onto a stdio slot; it touches no Rust-owned fd (the
        // console's own fd is skipped above), so no owner is invalidated.
        if unsafe { libc::dup2(console.as_raw_fd(), target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(console)
}

/// Puts a terminal in raw mode: no `\n` -> `\r\n` translation on output (the host sees the
/// agent's lines as written), and no echo, line editing or signal characters for what arrives on
/// the console's input.
pub fn set_raw(tty: &impl AsFd) -> io::Result<()> {
    let fd = tty.as_fd().as_raw_fd();
    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills the termios struct it is given on success; fd is a valid open fd.
    if unsafe { libc::tcgetattr(fd, termios.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tcgetattr succeeded, so the struct is initialised.
    let mut termios = unsafe { termios.assume_init() };
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut termios) };
    // SAFETY: applies a fully initialised termios to a valid fd.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the agent's marker and log lines to the console, each line whole.
///
/// Write errors are swallowed on purpose: a console that cannot be written to leaves nobody to
/// report to, and the agent must still serve the host and power off.
pub struct ConsoleWriter<W: Write> {
    inner: W,
    debug: bool,
}

impl<W: Write> ConsoleWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            debug: false,
        }
    }

    /// Enables [`Self::debug`] lines (`agentvm.debug` on the kernel command line).
    pub fn set_debug(&mut self, on: bool) {
        self.debug = on;
    }

    pub fn debug_enabled(&self) -> bool {
        self.debug
    }

    /// `line` ends in `\n`.
    fn write_line(&mut self, line: &str) {
        let _ = self.inner.write_all(line.as_bytes());
        let _ = self.inner.flush();
    }

    /// A diagnostic marker line.
    pub fn marker(&mut self, marker: &Marker) {
        self.write_line(&marker.to_line());
    }

    /// An `@@agentvm:error` marker.
    pub fn error(&mut self, message: impl fmt::Display) {
        self.marker(&Marker::Error(message.to_string()));
    }

    /// A human-readable diagnostic line.
    pub fn info(&mut self, message: impl fmt::Display) {
        self.write_line(&format!("{DIAG_PREFIX}{message}\n"));
    }

    /// A diagnostic line shown only with `agentvm.debug`.
    pub fn debug(&mut self, message: impl fmt::Display) {
        if self.debug {
            self.info(message);
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn text(writer: &ConsoleWriter<Vec<u8>>) -> String {
        String::from_utf8(writer.get_ref().clone()).unwrap()
    }

    #[test]
    fn markers_and_log_lines_are_written_whole() {
        let mut w = ConsoleWriter::new(Vec::new());
        w.marker(&Marker::Ready { boot_ns: 5 });
        w.error("oops\nsecond line");
        w.info("received SIGUSR2");
        w.marker(&Marker::Poweroff);
        assert_eq!(
            text(&w),
            "@@agentvm:ready boot_ns=5\n@@agentvm:error oops second line\n\
             agentvm-agent: received SIGUSR2\n@@agentvm:poweroff\n"
        );
    }

    #[test]
    fn diagnostics_and_debug_switch() {
        let mut w = ConsoleWriter::new(Vec::new());
        w.debug("hidden");
        w.info("shown");
        w.set_debug(true);
        assert!(w.debug_enabled());
        w.debug("now shown");
        assert_eq!(text(&w), "agentvm-agent: shown\nagentvm-agent: now shown\n");
    }

    #[test]
    fn write_errors_do_not_stop_the_writer() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
        let mut w = ConsoleWriter::new(Broken);
        w.marker(&Marker::Ready { boot_ns: 1 });
        w.error("lost");
        w.info("also lost");
    }

    fn openpty() -> (OwnedFd, OwnedFd) {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two fds into the given ints; name, termios and winsize are
        // optional and passed as null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: both fds were just returned by openpty and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
    }

    fn termios_of(fd: &OwnedFd) -> libc::termios {
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: valid fd; tcgetattr initialises the struct on success, checked below.
        assert_eq!(
            unsafe { libc::tcgetattr(fd.as_raw_fd(), t.as_mut_ptr()) },
            0
        );
        // SAFETY: initialised by the successful tcgetattr above.
        unsafe { t.assume_init() }
    }

    #[test]
    fn raw_mode_turns_off_output_translation_and_line_discipline() {
        let (_master, slave) = openpty();
        let before = termios_of(&slave);
        assert_ne!(
            before.c_oflag & libc::OPOST,
            0,
            "a new pty translates output"
        );
        set_raw(&slave).unwrap();
        let after = termios_of(&slave);
        assert_eq!(after.c_oflag & libc::OPOST, 0);
        assert_eq!(after.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
    }

    #[test]
    fn raw_mode_on_a_non_terminal_fails() {
        let file = File::open("/dev/null").unwrap();
        let err = set_raw(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }
}

//! The host terminal for `agentvm run -it`: raw mode for as long as the session lasts (restored on
//! every way out, panics included) and the window size, read now and whenever SIGWINCH says it
//! changed.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Puts a terminal in raw mode; dropping it restores the saved settings.
pub struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: libc::termios,
}

impl<'a> RawMode<'a> {
    pub fn enter(fd: BorrowedFd<'a>) -> io::Result<Self> {
        let mut saved = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills the termios it is given for a valid fd.
        if unsafe { libc::tcgetattr(fd.as_raw_fd(), saved.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: tcgetattr succeeded, so the struct is initialised.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: sets attributes from a valid termios on a valid fd.
        if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved by enter() on the same fd.
        unsafe { libc::tcsetattr(self.fd.as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty takes no pointers.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// The terminal's size as (rows, cols); None when `fd` is not a terminal or reports 0x0.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct it is given.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// Calls `resized` on a background thread after every SIGWINCH, for the rest of the process.
pub fn on_resize(resized: impl Fn() + Send + 'static) -> io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGWINCH])?;
    std::thread::Builder::new()
        .name("sigwinch".into())
        .spawn(move || {
            for _ in signals.forever() {
                resized();
            }
        })?;
    Ok(())
}

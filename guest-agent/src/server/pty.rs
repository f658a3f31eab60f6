//! `PtyOpen`: a program on a new pseudo-terminal, as session leader with the terminal as its
//! controlling tty. Terminal output goes to the host as `Data` on `Stdout` under its window,
//! `Data` on `Stdin` is typed in, `Resize` sets the window size (the kernel sends SIGWINCH to the
//! foreground group), and `Close` hangs up.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use agentvm_protocol::{ErrorCode, Message, PtyOpen, Started, Stream};

use super::context::{Control, RequestContext};
use super::dispatch::HELPER_STACK;
use super::fd::{signal_group, Trigger};
use super::input::spawn_input_feeder;
use super::output::{pump, stop_after_grace, EXIT_GRACE};
use super::process_spec::{build_command, program_name};
use super::supervise::{finish, spawn_supervised, supervise, Event, OnClose};

pub(crate) fn run_pty(ctx: RequestContext, request: PtyOpen) {
    let id = ctx.id();
    if request.term.is_empty() || request.term.contains('\0') {
        return ctx.fail(
            ErrorCode::InvalidArgument,
            format!(
                "PtyOpen {id}: term {:?} is not a terminal type",
                request.term
            ),
        );
    }
    let mut command = match build_command(&request.spec) {
        Ok(command) => command,
        Err(e) => return ctx.fail(e.code, e.message),
    };
    let (master, slave) = match open_pty(request.rows, request.cols) {
        Ok(pair) => pair,
        Err(e) => {
            return ctx.fail(
                ErrorCode::from_io(&e),
                format!("PtyOpen {id}: cannot open a pseudo-terminal: {e}"),
            )
        }
    };
    let stdio = (|| Ok::<_, io::Error>((slave.try_clone()?, slave.try_clone()?, slave)))();
    let (stdin, stdout, stderr) = match stdio {
        Ok(fds) => fds,
        Err(e) => {
            return ctx.fail(
                ErrorCode::ResourceLimit,
                format!("PtyOpen {id}: cannot set up the terminal: {e}"),
            )
        }
    };
    let stop = match Trigger::new() {
        Ok(stop) => stop,
        Err(e) => return ctx.fail(ErrorCode::ResourceLimit, format!("PtyOpen {id}: {e}")),
    };
    command
        .env("TERM", &request.term)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    // SAFETY: setsid and ioctl are async-signal-safe, and the closure touches no memory of the
    // parent's beyond its own stack.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (events_tx, events) = mpsc::channel();
    let spawned = spawn_supervised(&ctx, &mut command, &events_tx);
    // The command holds the slave's descriptors: the master reads end of file only once the
    // session's processes are all that is left holding it.
    drop(command);
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return ctx.fail(
                ErrorCode::SpawnFailed,
                format!(
                    "cannot run {} on a terminal: {e}",
                    program_name(&request.spec)
                ),
            )
        }
    };
    let pid = child.id();
    drop(child);

    let master = Arc::new(master);
    let _ = ctx.send(&Message::Started(Started { id, pid }));
    let resize_master = Arc::clone(&master);
    ctx.on_control(move |control| match control {
        // Applied right here on the reading loop, so input sent after a Resize is read by a
        // program that already sees the new size.
        Control::Resize { rows, cols } => {
            let _ = set_window_size(resize_master.as_fd(), rows, cols);
        }
        other => {
            let _ = events_tx.send(Event::Control(other));
        }
    });
    match master.try_clone() {
        Ok(input) => {
            if let Err(e) = spawn_input_feeder(ctx.input().clone(), ctx.on_close(), input) {
                eprintln!("agentvm-guest-agent: no input thread for PTY {id}: {e}");
            }
        }
        Err(e) => eprintln!("agentvm-guest-agent: no input for PTY {id}: {e}"),
    }

    let outcome = std::thread::scope(|scope| {
        let (done_tx, done) = mpsc::channel();
        match master.try_clone() {
            Ok(output) => {
                let (ctx, stop) = (&ctx, &stop);
                let spawned = std::thread::Builder::new()
                    .name(format!("pty-{id}"))
                    .stack_size(HELPER_STACK)
                    .spawn_scoped(scope, move || {
                        pump(output, stop, done_tx, |data| {
                            ctx.send_data(Stream::Stdout, data).is_ok()
                        })
                    });
                if let Err(e) = spawned {
                    eprintln!("agentvm-guest-agent: no output thread for PTY {id}: {e}");
                    let _ = signal_group(pid, libc::SIGKILL);
                }
            }
            Err(e) => {
                eprintln!("agentvm-guest-agent: no output for PTY {id}: {e}");
                let _ = signal_group(pid, libc::SIGKILL);
            }
        }
        let timeout = request.spec.timeout_ms.map(Duration::from_millis);
        let outcome = supervise(&ctx, pid, &events, timeout, OnClose::HangUp);
        stop_after_grace(&done, &stop, EXIT_GRACE);
        outcome
    });
    finish(ctx, pid, outcome, "PTY");
}

/// A new pseudo-terminal (master, slave) of the given size. Both ends are close-on-exec; the
/// child gets the slave through its stdio.
fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes flags only and returns a new descriptor.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt take our master descriptor; ptsname_r writes a NUL-terminated name
    // of at most `name.len()` bytes into the buffer.
    unsafe {
        if libc::grantpt(master.as_raw_fd()) != 0
            || libc::unlockpt(master.as_raw_fd()) != 0
            || libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: ptsname_r succeeded, so the buffer holds a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    let slave = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path.to_string_lossy().as_ref())?;
    set_window_size(master.as_fd(), rows, cols)?;
    Ok((master, slave.into()))
}

fn set_window_size(master: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

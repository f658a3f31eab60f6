//! Interactive processes on a guest pseudo-terminal.

use std::io::{self, Read};
use std::time::Duration;

use agentvm_protocol::{ExitStatus, Message, ProcessSpec, PtyOpen, Resize, Stream};

use crate::client::AgentClient;
use crate::connection::{Call, CallLink};
use crate::error::{ClientError, Result};
use crate::exec::send_error_to_io;
use crate::inbound::Inbound;

impl AgentClient {
    /// Starts `spec` on a new terminal of `rows` x `cols` with `TERM=term`; returns once it runs.
    pub fn pty_open(
        &self,
        spec: ProcessSpec,
        term: &str,
        rows: u16,
        cols: u16,
    ) -> Result<PtySession> {
        let term = term.to_string();
        let mut call = self.start(|id| {
            Message::PtyOpen(PtyOpen {
                id,
                spec,
                term,
                rows,
                cols,
            })
        })?;
        let what = "the terminal process to start";
        let pid = match self.next(&mut call, what)? {
            Message::Started(started) => started.pid,
            other => return Err(call.unexpected(&other, what)),
        };
        Ok(PtySession {
            input: PtyInput {
                link: call.link().clone(),
            },
            call,
            pid,
            output: Inbound::new(Stream::Stdout),
            exit: None,
            read_timeout: None,
        })
    }
}

/// A process on a guest terminal. `Read` gives the terminal output and returns 0 once the
/// process exited (then [`exit`](Self::exit) has its status). Dropping the session hangs up.
pub struct PtySession {
    call: Call,
    input: PtyInput,
    pid: u32,
    output: Inbound,
    exit: Option<(ExitStatus, bool)>,
    read_timeout: Option<Duration>,
}

impl PtySession {
    /// Bounds each `read`'s wait for output (an `io::ErrorKind::TimedOut` error; the session
    /// stays usable). `None`, the default, waits as long as the process runs.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends keyboard input, waiting for window credit if the program does not read it.
    pub fn write_input(&self, data: &[u8]) -> Result<()> {
        self.input.write_input(data)
    }

    /// A writer for input that can be moved to another thread (e.g. a stdin pump).
    pub fn input(&self) -> PtyInput {
        self.input.clone()
    }

    /// Sets the terminal size; the foreground program gets SIGWINCH.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.input.resize(rows, cols)
    }

    /// Hangs up (SIGHUP to the session); the output then ends with the exit status.
    pub fn close(&self) -> Result<()> {
        self.input.close()
    }

    /// The exit status and whether the spec's timeout killed it, once `read` returned 0.
    pub fn exit(&self) -> Option<(ExitStatus, bool)> {
        self.exit
    }
}

impl Read for PtySession {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while !self.output.has_pending() {
            if self.exit.is_some() {
                return Ok(0);
            }
            let what = format!("terminal output of process {}", self.pid);
            match self
                .call
                .next(self.read_timeout, &what)
                .map_err(ClientError::into_io)?
            {
                Message::Data(data) if data.stream == Stream::Stdout => self.output.push(data.data),
                Message::Eof(eof) if eof.stream == Stream::Stdout => {}
                Message::Exited(exited) => self.exit = Some((exited.status, exited.timed_out)),
                other => return Err(self.call.unexpected(&other, &what).into_io()),
            }
        }
        self.output
            .take_into(self.call.link(), buf)
            .map_err(ClientError::into_io)
    }
}

/// Input side of a [`PtySession`]; cheap to clone.
#[derive(Clone)]
pub struct PtyInput {
    link: CallLink,
}

impl PtyInput {
    pub fn write_input(&self, data: &[u8]) -> Result<()> {
        self.link
            .send_all(Stream::Stdin, data, None)
            .map_err(|e| ClientError::Io(send_error_to_io(e, "the terminal process exited")))
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.link.send_control(&Message::Resize(Resize {
            id: self.link.id(),
            rows,
            cols,
        }))
    }

    pub fn close(&self) -> Result<()> {
        self.link.close()
    }
}

impl io::Write for PtyInput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.link
            .send_data(Stream::Stdin, buf, None)
            .map_err(|e| send_error_to_io(e, "the terminal process exited"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

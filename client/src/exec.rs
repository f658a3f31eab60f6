//! Running a process with streamed stdin/stdout/stderr (`Exec`).

use std::io;
use std::time::Duration;

use agentvm_protocol::{Eof, Exec, ExitStatus, Kill, Message, ProcessSpec, Stream};

use crate::client::AgentClient;
use crate::connection::{Call, CallLink, Ended, SendError};
use crate::error::{ClientError, Result};

/// Output kept per stream by [`AgentClient::exec_output`].
pub const DEFAULT_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// What a running exec reports, in the order the agent sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last event: the process ended (after all its output).
    Exited {
        status: ExitStatus,
        timed_out: bool,
    },
}

/// Collected output of a finished process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
    /// The spec's timeout expired and the agent killed the process group.
    pub timed_out: bool,
    /// Output beyond the limit was read and dropped.
    pub truncated: bool,
}

impl Output {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.status == ExitStatus::Code(0)
    }
}

impl AgentClient {
    /// Starts `spec`. With `stdin`, take the writer with [`ExecHandle::take_stdin`] (dropping it
    /// sends end of file); without, the process reads `/dev/null`. Returns once the agent reports
    /// the process started (within the call timeout).
    pub fn exec(&self, spec: ProcessSpec, stdin: bool) -> Result<ExecHandle> {
        let mut call = self.start(|id| Message::Exec(Exec { id, spec, stdin }))?;
        let what = "the process to start";
        let pid = match self.next(&mut call, what)? {
            Message::Started(started) => started.pid,
            other => return Err(call.unexpected(&other, what)),
        };
        let stdin = stdin.then(|| ExecStdin {
            link: call.link().clone(),
            closed: false,
        });
        Ok(ExecHandle {
            call,
            pid,
            stdin,
            exited: false,
        })
    }

    /// Runs `spec` without stdin and collects its output (up to [`DEFAULT_OUTPUT_LIMIT`] per
    /// stream).
    pub fn exec_output(&self, spec: ProcessSpec) -> Result<Output> {
        self.exec(spec, false)?
            .wait_with_output(DEFAULT_OUTPUT_LIMIT)
    }
}

/// A running process. Dropping it before the process exited kills the process group (`Close`).
pub struct ExecHandle {
    call: Call,
    pid: u32,
    stdin: Option<ExecStdin>,
    exited: bool,
}

impl ExecHandle {
    /// The process id in the guest (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The stdin writer, once (`None` without `stdin` or when already taken).
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// A handle that can kill or close this process from another thread.
    pub fn controller(&self) -> ExecController {
        ExecController {
            link: self.call.link().clone(),
        }
    }

    /// Sends `signal` to the process group.
    pub fn kill(&self, signal: i32) -> Result<()> {
        self.controller().kill(signal)
    }

    /// Ends the process early (SIGKILL to its group); the `Exited` event still follows.
    pub fn close(&self) -> Result<()> {
        self.controller().close()
    }

    /// The next event, waiting as long as the process runs; `None` after `Exited`.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>> {
        self.next_event_within(None)
    }

    /// Like [`next_event`](Self::next_event) but fails with `TimedOut` after `timeout` (the
    /// process keeps running and the handle stays usable).
    pub fn next_event_timeout(&mut self, timeout: Duration) -> Result<Option<ExecEvent>> {
        self.next_event_within(Some(timeout))
    }

    fn next_event_within(&mut self, timeout: Option<Duration>) -> Result<Option<ExecEvent>> {
        if self.exited {
            return Ok(None);
        }
        let what = format!("output of process {}", self.pid);
        let message = self.call.next(timeout, &what)?;
        let event = match message {
            Message::Data(data) if data.stream != Stream::Stdin => {
                // Handing the bytes to the caller is what consumes them.
                self.call.link().consumed(data.stream, data.data.len())?;
                if data.stream == Stream::Stdout {
                    ExecEvent::Stdout(data.data)
                } else {
                    ExecEvent::Stderr(data.data)
                }
            }
            Message::Exited(exited) => {
                self.exited = true;
                ExecEvent::Exited {
                    status: exited.status,
                    timed_out: exited.timed_out,
                }
            }
            Message::Eof(eof) if eof.stream != Stream::Stdin => {
                return self.next_event_within(timeout);
            }
            other => return Err(self.call.unexpected(&other, &what)),
        };
        Ok(Some(event))
    }

    /// The events until the process exits.
    pub fn events(&mut self) -> impl Iterator<Item = Result<ExecEvent>> + '_ {
        std::iter::from_fn(move || self.next_event().transpose())
    }

    /// Closes stdin (if not taken), then collects output until the process exits, keeping at
    /// most `limit` bytes per stream (the rest is read and dropped, so the process never stalls).
    pub fn wait_with_output(mut self, limit: usize) -> Result<Output> {
        drop(self.stdin.take());
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut truncated = false;
        while let Some(event) = self.next_event()? {
            let (buf, chunk) = match event {
                ExecEvent::Stdout(chunk) => (&mut stdout, chunk),
                ExecEvent::Stderr(chunk) => (&mut stderr, chunk),
                ExecEvent::Exited { status, timed_out } => {
                    return Ok(Output {
                        stdout,
                        stderr,
                        status,
                        timed_out,
                        truncated,
                    })
                }
            };
            let room = limit.saturating_sub(buf.len());
            truncated |= chunk.len() > room;
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Err(ClientError::Protocol(format!(
            "process {} ended without an exit status",
            self.pid
        )))
    }
}

/// Kills or closes an exec from any thread.
#[derive(Clone)]
pub struct ExecController {
    link: CallLink,
}

impl ExecController {
    /// Sends `signal` to the process group; a no-op once the process exited.
    pub fn kill(&self, signal: i32) -> Result<()> {
        self.link.send_control(&Message::Kill(Kill {
            id: self.link.id(),
            signal,
        }))
    }

    /// SIGKILLs the process group; a no-op once the process exited.
    pub fn close(&self) -> Result<()> {
        self.link.close()
    }
}

/// The process's stdin. Writes wait for window credit (the process reads slowly → the writer
/// waits). [`close`](Self::close), or dropping it, sends end of file.
pub struct ExecStdin {
    link: CallLink,
    closed: bool,
}

impl ExecStdin {
    /// Sends end of file.
    pub fn close(mut self) -> Result<()> {
        self.send_eof()
    }

    fn send_eof(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.link.send_control(&Message::Eof(Eof {
            id: self.link.id(),
            stream: Stream::Stdin,
        }))
    }
}

impl io::Write for ExecStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin was already closed",
            ));
        }
        self.link
            .send_data(Stream::Stdin, buf, None)
            .map_err(|e| send_error_to_io(e, "the process exited; its stdin is closed"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        let _ = self.send_eof();
    }
}

/// Maps a failed send to the `io::Error` a `Write` user expects.
pub(crate) fn send_error_to_io(error: SendError, finished: &str) -> io::Error {
    match error {
        SendError::Ended(Ended::Finished) => {
            io::Error::new(io::ErrorKind::BrokenPipe, finished.to_string())
        }
        SendError::Ended(Ended::Failed(failure)) => failure.to_error().into_io(),
        SendError::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            "timed out waiting for the guest to accept more data",
        ),
        SendError::Failed(error) => error.into_io(),
    }
}

//! Background processes: start, list, wait, kill, and read their logs.

use std::io::{self, Read};
use std::time::Duration;

use agentvm_protocol::{
    ExitStatus, Message, ProcInfo, ProcKill, ProcList, ProcLogs, ProcStart, ProcWait, ProcessSpec,
    Stream,
};

use crate::call_reader::CallReader;
use crate::client::AgentClient;
use crate::connection::CallLink;
use crate::error::{ClientError, Result};

/// A background process the agent started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackgroundProcess {
    /// The agent's id for it (never reused while the agent runs).
    pub proc_id: u64,
    pub pid: u32,
}

/// How a background process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcExit {
    pub status: ExitStatus,
    pub timed_out: bool,
}

impl AgentClient {
    /// Starts `spec` in the background; the agent keeps its output in a bounded log.
    pub fn proc_start(&self, spec: ProcessSpec) -> Result<BackgroundProcess> {
        let mut call = self.start(|id| Message::ProcStart(ProcStart { id, spec }))?;
        let what = "the background process to start";
        match self.next(&mut call, what)? {
            Message::ProcStarted(started) => Ok(BackgroundProcess {
                proc_id: started.proc_id,
                pid: started.pid,
            }),
            other => Err(call.unexpected(&other, what)),
        }
    }

    /// Every background process the agent knows, running or exited.
    pub fn proc_list(&self) -> Result<Vec<ProcInfo>> {
        let mut call = self.start(|id| Message::ProcList(ProcList { id }))?;
        let what = "the process list";
        match self.next(&mut call, what)? {
            Message::ProcListing(listing) => Ok(listing.procs),
            other => Err(call.unexpected(&other, what)),
        }
    }

    /// Waits for background process `proc_id` to exit. With `timeout`, the agent gives up after
    /// it (an `Agent` error with code `TimedOut`; the process keeps running); without, this waits
    /// as long as the process runs.
    pub fn proc_wait(&self, proc_id: u64, timeout: Option<Duration>) -> Result<ProcExit> {
        let timeout_ms = timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        let mut call = self.start(|id| {
            Message::ProcWait(ProcWait {
                id,
                proc_id,
                timeout_ms,
            })
        })?;
        let what = format!("background process {proc_id} to exit");
        // The agent enforces `timeout`; ours only covers an agent that never answers.
        let ours = timeout.map(|t| t.saturating_add(self.call_timeout));
        match call.next(ours, &what)? {
            Message::Exited(exited) => Ok(ProcExit {
                status: exited.status,
                timed_out: exited.timed_out,
            }),
            other => Err(call.unexpected(&other, &what)),
        }
    }

    /// Sends `signal` to the background process's group.
    pub fn proc_kill(&self, proc_id: u64, signal: i32) -> Result<()> {
        let mut call = self.start(|id| {
            Message::ProcKill(ProcKill {
                id,
                proc_id,
                signal,
            })
        })?;
        self.expect_done(&mut call, &format!("the answer to ProcKill {proc_id}"))
    }

    /// Reads `stream` (`Stdout` or `Stderr`) of a background process from byte `offset`. With
    /// `follow`, the stream goes on until the process exits (or the `LogStream` is dropped).
    pub fn proc_logs(
        &self,
        proc_id: u64,
        stream: Stream,
        offset: u64,
        follow: bool,
    ) -> Result<LogStream> {
        if stream == Stream::Stdin {
            return Err(ClientError::InvalidArgument(
                "a process log is Stdout or Stderr, not Stdin".to_string(),
            ));
        }
        let mut call = self.start(|id| {
            Message::ProcLogs(ProcLogs {
                id,
                proc_id,
                stream,
                offset,
                follow,
            })
        })?;
        let what = format!("the log of background process {proc_id}");
        let start_offset = match self.next(&mut call, &what)? {
            Message::LogsStart(start) => start.offset,
            other => return Err(call.unexpected(&other, &what)),
        };
        Ok(LogStream {
            stream: CallReader::new(call, stream),
            start_offset,
            proc_id,
        })
    }
}

/// A background process's log as a reader. `read` returns 0 at the end of the log (with
/// `follow`: once the process exited and everything was read).
pub struct LogStream {
    stream: CallReader,
    start_offset: u64,
    proc_id: u64,
}

impl LogStream {
    /// Bounds each `read`'s wait for data (an `io::ErrorKind::TimedOut` error; the stream stays
    /// usable). `None`, the default, waits as long as the log goes on.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.stream.read_timeout = timeout;
    }

    /// A handle that stops a following log from another thread (the reader then sees the end).
    pub fn stopper(&self) -> LogStopper {
        LogStopper {
            link: self.stream.call.link().clone(),
        }
    }

    /// The log offset of the first byte read: later than asked if older output was dropped.
    pub fn start_offset(&self) -> u64 {
        self.start_offset
    }
}

impl Read for LogStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let proc_id = self.proc_id;
        self.stream
            .read(buf, || format!("the log of background process {proc_id}"))
    }
}

/// Stops a [`LogStream`] from any thread.
#[derive(Clone)]
pub struct LogStopper {
    link: CallLink,
}

impl LogStopper {
    /// Ends the log stream (`Close`); a no-op once it ended.
    pub fn stop(&self) -> Result<()> {
        self.link.close()
    }
}

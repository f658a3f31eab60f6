//! Reading one guest → host byte stream of a call as `io::Read` until its end of file or the
//! call's end: what a forwarded port's reader and a background process's log share.

use std::io;
use std::time::Duration;

use agentvm_protocol::{Message, Stream};

use crate::connection::Call;
use crate::error::ClientError;
use crate::inbound::Inbound;

pub(crate) struct CallReader {
    pub(crate) call: Call,
    inbound: Inbound,
    ended: bool,
    /// Bounds each `read`'s wait for data; `None` waits as long as the call lasts.
    pub(crate) read_timeout: Option<Duration>,
}

impl CallReader {
    pub(crate) fn new(call: Call, stream: Stream) -> Self {
        Self {
            call,
            inbound: Inbound::new(stream),
            ended: false,
            read_timeout: None,
        }
    }

    /// `io::Read::read` of the stream; `what` names what is awaited in a timeout or protocol
    /// error (built only when a message is awaited).
    pub(crate) fn read(&mut self, buf: &mut [u8], what: impl Fn() -> String) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while !self.inbound.has_pending() {
            if self.ended {
                return Ok(0);
            }
            let what = what();
            match self
                .call
                .next(self.read_timeout, &what)
                .map_err(ClientError::into_io)?
            {
                Message::Data(data) if data.stream == self.inbound.stream() => {
                    self.inbound.push(data.data)
                }
                Message::Eof(eof) if eof.stream == self.inbound.stream() => self.ended = true,
                Message::Done(_) => self.ended = true,
                other => return Err(self.call.unexpected(&other, &what).into_io()),
            }
        }
        self.inbound
            .take_into(self.call.link(), buf)
            .map_err(ClientError::into_io)
    }
}

//! The consumer end of one incoming byte stream: hands out a received chunk piece by piece and
//! returns window credit as the bytes are actually taken, so a reader that stops reading holds
//! back only its own stream.

use agentvm_protocol::Stream;

use crate::connection::CallLink;
use crate::error::Result;

pub(crate) struct Inbound {
    stream: Stream,
    pending: Vec<u8>,
    taken: usize,
}

impl Inbound {
    pub(crate) fn new(stream: Stream) -> Self {
        Self {
            stream,
            pending: Vec::new(),
            taken: 0,
        }
    }

    pub(crate) fn stream(&self) -> Stream {
        self.stream
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.taken < self.pending.len()
    }

    /// Holds a new chunk (the previous one must be used up).
    pub(crate) fn push(&mut self, data: Vec<u8>) {
        debug_assert!(!self.has_pending());
        self.pending = data;
        self.taken = 0;
    }

    /// Copies pending bytes into `buf` and grants what was taken.
    pub(crate) fn take_into(&mut self, link: &CallLink, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(self.pending.len() - self.taken);
        buf[..n].copy_from_slice(&self.pending[self.taken..self.taken + n]);
        self.taken += n;
        link.consumed(self.stream, n)?;
        Ok(n)
    }
}

//! A smoltcp `phy::Device` over a non-blocking `SOCK_SEQPACKET` socket: one message is one
//! Ethernet frame (no virtio_net_hdr), as the virtio-net device on the other end sends them.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use agentvm_protocol::net::LINK_MTU;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Ethernet header in front of every IP packet.
const ETHERNET_HEADER: usize = 14;
/// The largest frame either side may send.
pub const MAX_FRAME: usize = LINK_MTU as usize + ETHERNET_HEADER;
/// Frames waiting for room in the socket buffer; beyond this, frames are dropped (TCP resends).
const TX_BACKLOG_FRAMES: usize = 512;

/// What one read from the frame socket gave.
pub enum Received {
    /// A frame of this many bytes is in the buffer.
    Frame(usize),
    /// Nothing to read now.
    Empty,
    /// The other end closed: the device (the VM) is gone.
    Closed,
}

/// The frame socket, plus the frames taken from it that smoltcp has not consumed yet and the
/// frames smoltcp produced that the socket had no room for.
pub struct FrameDevice {
    fd: OwnedFd,
    rx_queue: VecDeque<Vec<u8>>,
    tx_backlog: VecDeque<Vec<u8>>,
}

impl FrameDevice {
    /// Takes the socket and makes it non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take and return plain ints.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            rx_queue: VecDeque::new(),
            tx_backlog: VecDeque::new(),
        })
    }

    /// The descriptor, for registering with an event loop.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one frame into `buffer` (at least [`MAX_FRAME`] bytes).
    pub fn receive_frame(&self, buffer: &mut [u8]) -> io::Result<Received> {
        // SAFETY: recv writes at most `buffer.len()` bytes into the buffer we own.
        let length = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match length {
            0 => Ok(Received::Closed),
            n if n > 0 => Ok(Received::Frame(n as usize)),
            _ => {
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Received::Empty),
                    _ => Err(error),
                }
            }
        }
    }

    /// Hands a received frame to smoltcp at its next poll.
    pub fn queue_for_stack(&mut self, frame: Vec<u8>) {
        self.rx_queue.push_back(frame);
    }

    /// Sends frames that found the socket full earlier; call when it turns writable.
    pub fn flush_backlog(&mut self) -> io::Result<()> {
        while let Some(frame) = self.tx_backlog.front() {
            if !send_frame(self.fd.as_raw_fd(), frame)? {
                return Ok(());
            }
            self.tx_backlog.pop_front();
        }
        Ok(())
    }

    /// Whether frames wait for room in the socket: the loop then waits for the socket to turn
    /// writable instead of polling smoltcp, which has nothing it can send before that.
    pub fn is_backlogged(&self) -> bool {
        !self.tx_backlog.is_empty()
    }

    fn send_or_keep(&mut self, frame: Vec<u8>) {
        if self.tx_backlog.is_empty() {
            match send_frame(self.fd.as_raw_fd(), &frame) {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    tracing::debug!(%error, "frame dropped");
                    return;
                }
            }
        }
        if self.tx_backlog.len() < TX_BACKLOG_FRAMES {
            self.tx_backlog.push_back(frame);
        }
    }
}

/// Ok(false): the socket buffer is full. A peer that is gone (EPIPE, ECONNREFUSED) is an error.
fn send_frame(fd: RawFd, frame: &[u8]) -> io::Result<bool> {
    // SAFETY: send reads `frame.len()` bytes from a slice we borrow.
    let sent = unsafe {
        libc::send(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent >= 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
        _ => Err(error),
    }
}

pub struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct TxToken<'a>(&'a mut FrameDevice);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.send_or_keep(frame);
        result
    }
}

impl phy::Device for FrameDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx_queue.pop_front()?;
        Some((RxToken(frame), TxToken(self)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        // While older frames wait for the socket, smoltcp keeps its data (backpressure).
        if self.tx_backlog.len() >= TX_BACKLOG_FRAMES {
            return None;
        }
        Some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = MAX_FRAME;
        capabilities
    }
}

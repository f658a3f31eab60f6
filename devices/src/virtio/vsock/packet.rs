//! The virtio-vsock packet header (virtio 1.2 section 5.10.6) and moving packets between
//! descriptor chains and host buffers.
//!
//! The rust-vmm `virtio-vsock` crate (0.12) matches our virtio-queue/vm-memory versions, but it
//! accepts only chains whose payload sits in a single descriptor. Drivers may split a packet
//! over any number of descriptors (Linux 6.1 puts header and payload in separate ones, newer
//! kernels one buffer), so this module gathers and scatters over whole chains itself.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError};

use crate::GuestMemoryMmap;

/// Size of the packet header on the wire.
pub const HDR_LEN: usize = 44;
/// The host's CID: the only destination this device serves.
pub const HOST_CID: u64 = 2;
/// VIRTIO_VSOCK_TYPE_STREAM, the only socket type supported.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload accepted from, or sent to, the guest in one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// VIRTIO_VSOCK_SHUTDOWN_RCV: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// VIRTIO_VSOCK_SHUTDOWN_SEND: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset.
    Rst = 3,
    /// Half or full close, `flags` says which directions.
    Shutdown = 4,
    /// Stream data.
    Rw = 5,
    /// Unsolicited credit announcement.
    CreditUpdate = 6,
    /// Asks the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The op for a wire value, if it is one.
    pub fn from_wire(op: u16) -> Option<Self> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// Why a packet from the guest was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain's device-readable part is shorter than a header.
    #[error("chain carries {0} readable bytes, less than a {HDR_LEN}-byte header")]
    ShortHeader(usize),
    /// A buffer of the chain is outside guest memory.
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    /// Source CID is not the guest's.
    #[error("source CID {got} is not the guest's ({expected})")]
    BadSrcCid {
        /// CID in the header.
        got: u64,
        /// The guest's configured CID.
        expected: u64,
    },
    /// Destination CID is not the host.
    #[error("destination CID {0} is not the host")]
    BadDstCid(u64),
    /// Socket type other than stream.
    #[error("unsupported socket type {0}")]
    BadType(u16),
    /// Unknown operation.
    #[error("unknown operation {0}")]
    BadOp(u16),
    /// Payload length above [`MAX_PAYLOAD`], or on an op that carries none.
    #[error("payload length {len} not allowed for op {op}")]
    BadLen {
        /// Length in the header.
        len: u32,
        /// Op in the header.
        op: u16,
    },
    /// The header announces more payload than the chain holds.
    #[error("header announces {len} payload bytes, chain holds {avail}")]
    PayloadBeyondChain {
        /// Length in the header.
        len: u32,
        /// Readable bytes after the header.
        avail: usize,
    },
}

/// A packet header (all fields little endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags (shutdown directions).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decodes a wire header.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encodes the header for the wire.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header from the guest: addressing, type, op and payload length.
    pub fn validate(&self, guest_cid: u64) -> Result<Op, PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::BadSrcCid {
                got: self.src_cid,
                expected: guest_cid,
            });
        }
        if self.dst_cid != HOST_CID {
            return Err(PacketError::BadDstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::BadType(self.type_));
        }
        let op = Op::from_wire(self.op).ok_or(PacketError::BadOp(self.op))?;
        let len_ok = match op {
            Op::Rw => self.len as usize <= MAX_PAYLOAD,
            _ => self.len == 0,
        };
        if !len_ok {
            return Err(PacketError::BadLen {
                len: self.len,
                op: self.op,
            });
        }
        Ok(op)
    }
}

/// The buffers of one descriptor chain in one direction, as (guest address, length).
#[derive(Debug, Default)]
pub struct Buffers(pub Vec<(GuestAddress, u32)>);

impl Buffers {
    /// Total bytes.
    pub fn capacity(&self) -> usize {
        self.0.iter().map(|&(_, len)| len as usize).sum()
    }

    /// Copies bytes starting `skip` bytes into the buffers into `out`, as many as fit both.
    /// Returns the count copied.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        skip: usize,
        out: &mut [u8],
    ) -> Result<usize, GuestMemoryError> {
        self.walk(skip, out.len(), |range, addr| {
            mem.read_slice(&mut out[range], addr)
        })
    }

    /// Copies `data` into the buffers starting `skip` bytes in, as much as fits. Returns the
    /// count copied.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        skip: usize,
        data: &[u8],
    ) -> Result<usize, GuestMemoryError> {
        self.walk(skip, data.len(), |range, addr| {
            mem.write_slice(&data[range], addr)
        })
    }

    /// Visits the guest pieces of bytes `skip..skip + want` of the buffers (clipped to their
    /// capacity) in order: `copy(range within the caller's slice, guest address)`. Returns the
    /// number of bytes visited.
    fn walk(
        &self,
        mut skip: usize,
        want: usize,
        mut copy: impl FnMut(std::ops::Range<usize>, GuestAddress) -> Result<(), GuestMemoryError>,
    ) -> Result<usize, GuestMemoryError> {
        let mut done = 0;
        for &(addr, len) in &self.0 {
            if done == want {
                break;
            }
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(want - done);
            let start = addr
                .checked_add(skip as u64)
                .ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
            copy(done..done + n, start)?;
            done += n;
            skip = 0;
        }
        Ok(done)
    }
}

/// Reads a packet the guest queued on the tx queue: returns its header, validated, and fills
/// `payload` with its data (cleared first).
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    bufs: &Buffers,
    guest_cid: u64,
    payload: &mut Vec<u8>,
) -> Result<(Header, Op), (Option<Header>, PacketError)> {
    payload.clear();
    let mut raw = [0u8; HDR_LEN];
    let got = bufs
        .read_at(mem, 0, &mut raw)
        .map_err(|e| (None, e.into()))?;
    if got < HDR_LEN {
        return Err((None, PacketError::ShortHeader(got)));
    }
    let hdr = Header::from_bytes(&raw);
    let op = hdr.validate(guest_cid).map_err(|e| (Some(hdr), e))?;
    let len = hdr.len as usize;
    let avail = bufs.capacity() - HDR_LEN;
    if len > avail {
        return Err((
            Some(hdr),
            PacketError::PayloadBeyondChain {
                len: hdr.len,
                avail,
            },
        ));
    }
    payload.resize(len, 0);
    bufs.read_at(mem, HDR_LEN, payload)
        .map_err(|e| (Some(hdr), e.into()))?;
    Ok((hdr, op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::guest_memory;

    fn rw(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            fwd_cnt: 0xdead_beef,
            ..rw(9)
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[40..44], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn validation_refuses_each_bad_field() {
        assert_eq!(rw(10).validate(3).unwrap(), Op::Rw);
        let cases = [
            Header {
                src_cid: 4,
                ..rw(0)
            },
            Header {
                dst_cid: 3,
                ..rw(0)
            },
            Header { type_: 2, ..rw(0) },
            Header { op: 0, ..rw(0) },
            Header { op: 8, ..rw(0) },
            rw(MAX_PAYLOAD as u32 + 1),
            Header {
                op: Op::Request as u16,
                ..rw(1)
            },
        ];
        let errs: Vec<_> = cases.iter().map(|h| h.validate(3).unwrap_err()).collect();
        assert!(matches!(errs[0], PacketError::BadSrcCid { got: 4, .. }));
        assert!(matches!(errs[1], PacketError::BadDstCid(3)));
        assert!(matches!(errs[2], PacketError::BadType(2)));
        assert!(matches!(errs[3], PacketError::BadOp(0)));
        assert!(matches!(errs[4], PacketError::BadOp(8)));
        assert!(matches!(errs[5], PacketError::BadLen { .. }));
        assert!(matches!(errs[6], PacketError::BadLen { len: 1, op: 1 }));
    }

    #[test]
    fn packets_are_gathered_across_descriptors() {
        let mem = guest_memory();
        let h = rw(10);
        let bytes = h.to_bytes();
        // Header split 30/14, payload split 4/6.
        mem.write_slice(&bytes[..30], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&bytes[30..], GuestAddress(0x2000)).unwrap();
        mem.write_slice(b"0123", GuestAddress(0x200e)).unwrap();
        mem.write_slice(b"456789", GuestAddress(0x3000)).unwrap();
        let bufs = Buffers(vec![
            (GuestAddress(0x1000), 30),
            (GuestAddress(0x2000), 18),
            (GuestAddress(0x3000), 100),
        ]);
        let mut payload = Vec::new();
        let (got, op) = read_tx_packet(&mem, &bufs, 3, &mut payload).unwrap();
        assert_eq!((got, op), (h, Op::Rw));
        assert_eq!(payload, b"0123456789");
    }

    #[test]
    fn short_chains_and_overlong_lengths_are_refused() {
        let mem = guest_memory();
        mem.write_slice(&rw(10).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let mut payload = Vec::new();
        let short = Buffers(vec![(GuestAddress(0x1000), 40)]);
        let err = read_tx_packet(&mem, &short, 3, &mut payload).unwrap_err();
        assert!(matches!(err, (None, PacketError::ShortHeader(40))));
        let no_room = Buffers(vec![(GuestAddress(0x1000), 50)]);
        let err = read_tx_packet(&mem, &no_room, 3, &mut payload).unwrap_err();
        assert!(matches!(
            err,
            (
                Some(_),
                PacketError::PayloadBeyondChain { len: 10, avail: 6 }
            )
        ));
        let outside = Buffers(vec![(GuestAddress(0xffff_ffff_0000), 64)]);
        let err = read_tx_packet(&mem, &outside, 3, &mut payload).unwrap_err();
        assert!(matches!(err, (None, PacketError::Memory(_))));
    }

    #[test]
    fn writes_scatter_over_buffers() {
        let mem = guest_memory();
        let bufs = Buffers(vec![(GuestAddress(0x1000), 44), (GuestAddress(0x2000), 8)]);
        assert_eq!(bufs.capacity(), 52);
        assert_eq!(bufs.write_at(&mem, 40, b"abcdefghijklmnop").unwrap(), 12);
        let mut out = [0u8; 12];
        assert_eq!(bufs.read_at(&mem, 40, &mut out).unwrap(), 12);
        assert_eq!(&out, b"abcdefghijkl");
    }
}

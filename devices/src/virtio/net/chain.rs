//! One descriptor chain's guest buffers, checked against guest memory when collected so that
//! copying in or out later cannot fail half way for a reason the guest chose.
//!
//! vsock has a similar gatherer, but it checks addresses only when it copies; here a frame may
//! be spread over several rx chains (merged buffers), and finding a bad chain after the first
//! ones were filled would leave the used ring in a state no driver expects.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::GuestMemoryMmap;

/// Why a chain cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum ChainError {
    /// An rx chain holds a device-readable descriptor or a tx chain a device-writable one.
    #[error("descriptor of the wrong direction ({0})")]
    WrongDirection(&'static str),
    /// A descriptor names memory the guest does not have.
    #[error("descriptor {addr:#x}+{len} lies outside guest memory")]
    OutsideMemory {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The chain has no bytes at all.
    #[error("chain of zero bytes")]
    Empty,
    /// The chain holds more than `limit` bytes.
    #[error("chain of more than {limit} bytes")]
    TooLong {
        /// The most the caller accepts.
        limit: usize,
    },
}

/// Which way the device uses a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// Device-readable (tx).
    Readable,
    /// Device-writable (rx).
    Writable,
}

/// The validated pieces of one chain, in order.
#[derive(Debug, Default)]
pub(super) struct GuestBuffers {
    pieces: Vec<(GuestAddress, usize)>,
    len: usize,
}

impl GuestBuffers {
    /// Collects the descriptors of a chain (as virtio-queue yields them: it bounds the walk
    /// by the queue size and follows indirect tables), all of `direction`, each inside `mem`,
    /// at most `limit` bytes in total. Zero-length descriptors are skipped.
    pub(super) fn collect<I>(
        descriptors: I,
        mem: &GuestMemoryMmap,
        direction: Direction,
        limit: usize,
    ) -> Result<Self, ChainError>
    where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let mut out = Self::default();
        for desc in descriptors {
            let writable = desc.is_write_only();
            match (direction, writable) {
                (Direction::Readable, true) => {
                    return Err(ChainError::WrongDirection(
                        "device-writable descriptor in tx",
                    ))
                }
                (Direction::Writable, false) => {
                    return Err(ChainError::WrongDirection(
                        "device-readable descriptor in rx",
                    ))
                }
                _ => {}
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            if !mem.check_range(desc.addr(), len) {
                return Err(ChainError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            out.len = out.len.saturating_add(len);
            if out.len > limit {
                return Err(ChainError::TooLong { limit });
            }
            out.pieces.push((desc.addr(), len));
        }
        if out.len == 0 {
            return Err(ChainError::Empty);
        }
        Ok(out)
    }

    /// Total bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Copies `out.len()` bytes starting `skip` bytes into the chain (the caller keeps within
    /// [`Self::len`]).
    pub(super) fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        skip: usize,
        out: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        self.walk(skip, out.len(), |range, addr| {
            mem.read_slice(&mut out[range], addr)
        })
    }

    /// Copies `data` into the chain from its start (the caller keeps within [`Self::len`]).
    pub(super) fn write(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.walk(0, data.len(), |range, addr| {
            mem.write_slice(&data[range], addr)
        })
    }

    /// Visits the guest pieces holding bytes `skip..skip + want` of the chain in order:
    /// `copy(range within the caller's slice, guest address)`.
    fn walk(
        &self,
        mut skip: usize,
        want: usize,
        mut copy: impl FnMut(std::ops::Range<usize>, GuestAddress) -> Result<(), GuestMemoryError>,
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for &(addr, len) in &self.pieces {
            if done == want {
                break;
            }
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(want - done);
            copy(done..done + n, addr.unchecked_add(skip as u64))?;
            done += n;
            skip = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{guest_memory, MEM_SIZE, RO, WO};
    use virtio_queue::desc::split::Descriptor;

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    #[test]
    fn pieces_are_read_and_written_across_descriptors() {
        let mem = guest_memory();
        let bufs = GuestBuffers::collect(
            [d(0x1000, 3, WO), d(0x2000, 0, WO), d(0x3000, 5, WO)],
            &mem,
            Direction::Writable,
            usize::MAX,
        )
        .unwrap();
        assert_eq!(bufs.len(), 8);
        bufs.write(&mem, b"abcdefg").unwrap();
        let mut out = [0u8; 4];
        bufs.read_at(&mem, 2, &mut out).unwrap();
        assert_eq!(&out, b"cdef");
        let mut tail = [0u8; 2];
        mem.read_slice(&mut tail, GuestAddress(0x3000)).unwrap();
        assert_eq!(&tail, b"de");
    }

    #[test]
    fn bad_chains_are_refused() {
        let mem = guest_memory();
        let collect = |descs: &[Descriptor], dir, limit| {
            GuestBuffers::collect(descs.iter().copied(), &mem, dir, limit)
        };
        assert!(matches!(
            collect(&[d(0x1000, 4, WO)], Direction::Readable, 100),
            Err(ChainError::WrongDirection(_))
        ));
        assert!(matches!(
            collect(&[d(0x1000, 4, RO)], Direction::Writable, 100),
            Err(ChainError::WrongDirection(_))
        ));
        assert_eq!(
            collect(&[d(MEM_SIZE as u64 - 2, 4, RO)], Direction::Readable, 100).unwrap_err(),
            ChainError::OutsideMemory {
                addr: MEM_SIZE as u64 - 2,
                len: 4
            }
        );
        assert_eq!(
            collect(&[d(0x1000, 0, RO)], Direction::Readable, 100).unwrap_err(),
            ChainError::Empty
        );
        assert_eq!(
            collect(
                &[d(0x1000, 60, RO), d(0x2000, 60, RO)],
                Direction::Readable,
                100
            )
            .unwrap_err(),
            ChainError::TooLong { limit: 100 }
        );
    }
}

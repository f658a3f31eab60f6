//! Serving entropy requests (virtio 1.2 section 5.4): every descriptor chain the driver makes
//! available is a request to fill its device-writable buffers with random bytes.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use tracing::{debug, error, warn};

use crate::virtio::log_throttle::{guest_warn, LogThrottle};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use crate::GuestMemoryMmap;

/// The most bytes one request (descriptor chain) gets, however large its buffers are, so the
/// work done per request is bounded. The driver sees the shorter used length and asks again.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// Bytes served per [`RequestHandler::process_queue`] call before yielding to the event loop.
const PASS_BYTE_BUDGET: u64 = 1 << 20;

/// Random bytes are produced into a stack buffer of this size and copied into guest memory.
const CHUNK_BYTES: u32 = 4096;

/// Where the random bytes come from.
pub trait EntropySource: Send {
    /// Fills all of `buf` or fails.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

/// The host kernel's CSPRNG via getrandom(2). Needs no file descriptor, so it keeps working
/// inside a jail without /dev.
#[derive(Debug, Default, Clone, Copy)]
pub struct GetRandom;

impl EntropySource for GetRandom {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: the pointer and length describe `rest`, a live and exclusively borrowed
            // byte slice; getrandom(2) writes at most `rest.len()` bytes through it.
            let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            match usize::try_from(ret) {
                Ok(n) => done += n,
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
        Ok(())
    }
}

/// What one pass over the queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Descriptor chains returned to the driver.
    pub chains: usize,
    /// The driver wants an interrupt for them.
    pub notify: bool,
    /// The pass stopped at its budget with requests still pending: call again later (with
    /// guest notifications left disabled, nothing else will).
    pub more: bool,
}

/// Fills entropy requests from an [`EntropySource`].
pub struct RequestHandler {
    source: Box<dyn EntropySource>,
    /// Requests whose buffers lie outside guest memory: a driver bug or an attack, logged
    /// throttled.
    bad_buffers: LogThrottle,
}

impl std::fmt::Debug for RequestHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHandler").finish_non_exhaustive()
    }
}

impl RequestHandler {
    /// A handler drawing from `source`.
    pub fn new(source: Box<dyn EntropySource>) -> Self {
        Self {
            source,
            bad_buffers: LogThrottle::default(),
        }
    }

    /// Serves the available requests, up to a per-pass budget (one ring's worth of chains or
    /// 1 MiB). An error means the ring itself is unusable (an available index that runs ahead
    /// of the queue size, a used ring outside guest memory): the device needs a reset.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<ProcessOutcome, virtio_queue::Error> {
        let mut outcome = ProcessOutcome::default();
        let chain_budget = usize::from(queue.size());
        let mut bytes = 0u64;
        'passes: loop {
            queue.disable_notification(mem)?;
            loop {
                if outcome.chains >= chain_budget || bytes >= PASS_BYTE_BUDGET {
                    let avail = queue.avail_idx(mem, Ordering::Acquire)?;
                    outcome.more = avail != Wrapping(queue.next_avail());
                    break 'passes;
                }
                let Some(chain) = queue.iter(mem)?.next() else {
                    break;
                };
                let head = chain.head_index();
                let len = self.fill_chain(mem, chain);
                queue.add_used(mem, head, len)?;
                outcome.chains += 1;
                bytes += u64::from(len);
            }
            // Re-enabling can race with the driver adding more: if it did, go round again
            // rather than wait for a kick the driver may have suppressed.
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        if outcome.chains > 0 {
            outcome.notify = queue.needs_notification(mem)?;
        }
        Ok(outcome)
    }

    /// Fills the chain's writable buffers, at most [`MAX_REQUEST_BYTES`] in total, and returns
    /// how many bytes were written. Device-readable descriptors carry nothing for this device
    /// and are skipped. A buffer outside guest memory ends the request with what was written
    /// before it.
    fn fill_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let head = chain.head_index();
        let mut chunk = [0u8; CHUNK_BYTES as usize];
        let mut written = 0u32;
        for desc in chain.writable() {
            let want = desc.len().min(MAX_REQUEST_BYTES - written);
            if !mem.check_range(desc.addr(), want as usize) {
                guest_warn!(
                    self.bad_buffers,
                    "virtio-rng: request {head}: buffer {:#x}+{want:#x} is outside guest memory",
                    desc.addr().raw_value()
                );
                break;
            }
            let mut done = 0u32;
            while done < want {
                let n = (want - done).min(CHUNK_BYTES);
                let part = &mut chunk[..n as usize];
                if let Err(e) = self.source.fill(part) {
                    error!("virtio-rng: entropy source failed: {e}");
                    return written;
                }
                let Some(addr) = desc.addr().checked_add(u64::from(done)) else {
                    return written;
                };
                if let Err(e) = mem.write_slice(part, addr) {
                    warn!("virtio-rng: request {head}: write to guest memory failed: {e}");
                    return written;
                }
                done += n;
                written += n;
            }
            if written == MAX_REQUEST_BYTES {
                debug!("virtio-rng: request {head} capped at {MAX_REQUEST_BYTES} bytes");
                break;
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{
        add_chain, guest_memory, read_used, CountingSource, FailingSource, RO, WO,
    };
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const QUEUE_SIZE: u16 = 16;

    fn handler() -> RequestHandler {
        RequestHandler::new(Box::new(CountingSource::default()))
    }

    fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// The bytes `CountingSource` produces, starting after `skip` earlier bytes.
    fn counting(skip: usize, len: usize) -> Vec<u8> {
        (skip..skip + len).map(|i| i as u8).collect()
    }

    #[test]
    fn fills_a_single_writable_buffer() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        add_chain(&vq, 0, &[(0x10_000, 64, WO)]);
        let mut queue: Queue = vq.create_queue().unwrap();

        let outcome = handler().process_queue(&mem, &mut queue).unwrap();

        assert_eq!(
            outcome,
            ProcessOutcome {
                chains: 1,
                notify: true,
                more: false
            }
        );
        assert_eq!(read_used(&vq), vec![(0, 64)]);
        assert_eq!(read_bytes(&mem, 0x10_000, 64), counting(0, 64));
        // Nothing past the buffer.
        assert_eq!(read_bytes(&mem, 0x10_040, 16), vec![0; 16]);
    }

    #[test]
    fn fills_every_writable_buffer_of_a_chain_and_skips_readable_ones() {
        let mem = guest_memory();
        mem.write_slice(&[0xaa; 32], GuestAddress(0x20_000))
            .unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        add_chain(
            &vq,
            0,
            &[(0x20_000, 32, RO), (0x10_000, 100, WO), (0x18_000, 28, WO)],
        );
        let mut queue: Queue = vq.create_queue().unwrap();

        handler().process_queue(&mem, &mut queue).unwrap();

        assert_eq!(read_used(&vq), vec![(0, 128)]);
        assert_eq!(read_bytes(&mem, 0x10_000, 100), counting(0, 100));
        assert_eq!(read_bytes(&mem, 0x18_000, 28), counting(100, 28));
        assert_eq!(read_bytes(&mem, 0x20_000, 32), vec![0xaa; 32]);
    }

    #[test]
    fn readonly_only_chain_is_returned_empty() {
        let mem = guest_memory();
        mem.write_slice(&[0x55; 16], GuestAddress(0x10_000))
            .unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        add_chain(&vq, 0, &[(0x10_000, 16, RO)]);
        let mut queue: Queue = vq.create_queue().unwrap();

        let outcome = handler().process_queue(&mem, &mut queue).unwrap();

        assert_eq!(outcome.chains, 1);
        assert_eq!(read_used(&vq), vec![(0, 0)]);
        assert_eq!(read_bytes(&mem, 0x10_000, 16), vec![0x55; 16]);
    }

    #[test]
    fn oversized_request_is_capped() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        // Two buffers that together ask for 64 KiB + 8 KiB.
        add_chain(&vq, 0, &[(0x100_000, 0xF000, WO), (0x200_000, 0x3000, WO)]);
        let mut queue: Queue = vq.create_queue().unwrap();

        handler().process_queue(&mem, &mut queue).unwrap();

        assert_eq!(read_used(&vq), vec![(0, MAX_REQUEST_BYTES)]);
        assert_eq!(
            read_bytes(&mem, 0x200_000, 0x1000),
            counting(0xF000, 0x1000)
        );
        assert_eq!(read_bytes(&mem, 0x201_000, 0x2000), vec![0; 0x2000]);
    }

    #[test]
    fn buffer_outside_guest_memory_ends_the_request() {
        let mem = guest_memory();
        let end = crate::virtio::test_utils::MEM_SIZE as u64;
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        add_chain(
            &vq,
            0,
            &[
                (0x10_000, 8, WO),
                // Starts inside, ends outside.
                (end - 4, 8, WO),
                (0x18_000, 8, WO),
            ],
        );
        add_chain(&vq, 3, &[(0xdead_0000_0000, 8, WO)]);
        let mut queue: Queue = vq.create_queue().unwrap();

        let outcome = handler().process_queue(&mem, &mut queue).unwrap();

        assert_eq!(outcome.chains, 2);
        assert_eq!(read_used(&vq), vec![(0, 8), (3, 0)]);
        assert_eq!(read_bytes(&mem, end - 4, 4), vec![0; 4]);
        assert_eq!(read_bytes(&mem, 0x18_000, 8), vec![0; 8]);
    }

    #[test]
    fn serves_chains_in_order() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        add_chain(&vq, 0, &[(0x10_000, 4, WO)]);
        add_chain(&vq, 1, &[(0x11_000, 8, WO), (0x12_000, 8, WO)]);
        add_chain(&vq, 3, &[(0x13_000, 16, WO)]);
        let mut queue: Queue = vq.create_queue().unwrap();

        let outcome = handler().process_queue(&mem, &mut queue).unwrap();

        assert_eq!(outcome.chains, 3);
        assert_eq!(read_used(&vq), vec![(0, 4), (1, 16), (3, 16)]);
        assert_eq!(read_bytes(&mem, 0x13_000, 16), counting(20, 16));
    }

    #[test]
    fn a_pass_stops_at_its_byte_budget() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 32);
        for i in 0..20u16 {
            let addr = 0x100_000 + u64::from(i) * 0x10_000;
            add_chain(&vq, i, &[(addr, MAX_REQUEST_BYTES, WO)]);
        }
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut h = handler();

        let first = h.process_queue(&mem, &mut queue).unwrap();
        assert_eq!(first.chains, 16);
        assert!(first.more);
        let second = h.process_queue(&mem, &mut queue).unwrap();
        assert_eq!(second.chains, 4);
        assert!(!second.more);
        let used = read_used(&vq);
        assert_eq!(used.len(), 20);
        assert!(used.iter().all(|&(_, len)| len == MAX_REQUEST_BYTES));
    }

    #[test]
    fn failing_source_returns_requests_empty() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        add_chain(&vq, 0, &[(0x10_000, 64, WO)]);
        let mut queue: Queue = vq.create_queue().unwrap();

        let outcome = RequestHandler::new(Box::new(FailingSource))
            .process_queue(&mem, &mut queue)
            .unwrap();

        assert_eq!(outcome.chains, 1);
        assert_eq!(read_used(&vq), vec![(0, 0)]);
        assert_eq!(read_bytes(&mem, 0x10_000, 64), vec![0; 64]);
    }

    #[test]
    fn runaway_available_index_is_an_error() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        vq.avail().idx().store(QUEUE_SIZE + 1);
        let mut queue: Queue = vq.create_queue().unwrap();

        let result = handler().process_queue(&mem, &mut queue);

        assert!(matches!(
            result,
            Err(virtio_queue::Error::InvalidAvailRingIndex)
        ));
    }

    #[test]
    fn empty_queue_needs_no_interrupt() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();

        let outcome = handler().process_queue(&mem, &mut queue).unwrap();

        assert_eq!(outcome, ProcessOutcome::default());
    }

    #[test]
    fn getrandom_produces_distinct_buffers() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        GetRandom.fill(&mut a).unwrap();
        GetRandom.fill(&mut b).unwrap();
        assert_ne!(a, [0u8; 64]);
        assert_ne!(a, b);
    }

    #[test]
    fn getrandom_fills_large_buffers_completely() {
        // Above 256 bytes getrandom may return short reads; the tail must still be filled.
        let mut buf = vec![0u8; 1 << 20];
        GetRandom.fill(&mut buf).unwrap();
        let zero_tail = buf[buf.len() - 64..].iter().all(|&b| b == 0);
        assert!(!zero_tail);
    }
}

//! The device driven like a guest driver would (mock split queues) against a real
//! `SOCK_SEQPACKET` socketpair whose other end plays the egress filter. Every step runs the
//! event loop until it has nothing left to do with zero timeouts, so a busy loop fails the
//! test instead of hanging it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueState};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::frames::set_sndbuf;
use super::*;
use crate::virtio::test_utils::{guest_memory, MEM_SIZE, RO, WO};
use crate::virtio::{ActivatedQueue, Interrupt, MmioTransport, VirtioDevice};
use crate::GuestMemoryMmap;

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

const MAC: [u8; 6] = [0x02, 0x61, 0x67, 0x00, 0x00, 0x0f];
const MTU: u16 = 65520;
const QSIZE: u16 = QUEUE_SIZE;
const RX_AREA: u64 = 0x100_000;
const RX_AREA_END: u64 = 0x200_000;
const TX_AREA: u64 = 0x200_000;
const TX_AREA_END: u64 = 0x400_000;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const MRG: u64 = VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF);
/// The largest frame a 65520-byte MTU allows.
const JUMBO: usize = MTU as usize + ETH_HLEN;

/// A connected non-blocking `SOCK_SEQPACKET` pair: (device end, peer end).
fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    frame_channel().unwrap()
}

/// Whether a frame waits to be read on `fd` (looked at without reading it).
fn has_unread_frame(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 1];
    // SAFETY: recv writes at most buf.len() bytes into buf, which outlives the call.
    let rc = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    rc > 0
}

/// A frame of `len` bytes whose content differs by `seed` and position.
fn frame(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Makes a chain available on `vq` (wrapping the avail ring, which the mock's helper does not).
fn push_chain(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, descs: &[(u64, u32, u16)]) {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let i = i as u16;
        let (flags, next) = if usize::from(i) + 1 == descs.len() {
            (flags, 0)
        } else {
            (flags | VRING_DESC_F_NEXT as u16, first + i + 1)
        };
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        vq.desc_table().store(first + i, d).unwrap();
    }
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % QSIZE))
        .unwrap()
        .store(first);
    vq.avail().idx().store(idx.wrapping_add(1));
}

struct Guest {
    mem: &'static GuestMemoryMmap,
    manager: Manager,
    dev: Arc<Mutex<Net>>,
    rxq: MockSplitQueue<'static, GuestMemoryMmap>,
    txq: MockSplitQueue<'static, GuestMemoryMmap>,
    notify: Vec<Arc<EventFd>>,
    irq: Arc<Interrupt>,
    /// The egress filter's end.
    peer: File,
    /// A second handle on the device's end, to look at what it has not read.
    device_end: OwnedFd,
    rx_next_desc: u16,
    rx_next_addr: u64,
    /// Buffers of each posted rx chain, by head index.
    rx_chains: HashMap<u16, Vec<(u64, u32)>>,
    rx_seen: u16,
    tx_next_desc: u16,
    tx_next_addr: u64,
}

impl Guest {
    fn new(features: u64) -> Self {
        Self::with_device(features, |dev_end| Net::new(MAC, MTU, dev_end).unwrap())
    }

    fn with_device(features: u64, build: impl FnOnce(OwnedFd) -> Net) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_memory()));
        let rxq = MockSplitQueue::create(mem, GuestAddress(0x10_000), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x20_000), QSIZE);
        let queues = vec![
            rxq.create_queue::<Queue>().unwrap(),
            txq.create_queue::<Queue>().unwrap(),
        ];
        Self::activated(mem, rxq, txq, queues, features, build)
    }

    fn activated(
        mem: &'static GuestMemoryMmap,
        rxq: MockSplitQueue<'static, GuestMemoryMmap>,
        txq: MockSplitQueue<'static, GuestMemoryMmap>,
        queues: Vec<Queue>,
        features: u64,
        build: impl FnOnce(OwnedFd) -> Net,
    ) -> Self {
        let (dev_end, peer_end) = seqpacket_pair();
        let device_end = dev_end.try_clone().unwrap();
        let dev = Arc::new(Mutex::new(build(dev_end)));
        let mut manager = Manager::new().unwrap();
        manager.add_subscriber(dev.clone());
        let notify: Vec<Arc<EventFd>> = (0..2)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        let irq = Arc::new(Interrupt::new().unwrap());
        {
            let mut d = dev.lock().unwrap();
            d.set_acked_features(features);
            let queues = queues
                .into_iter()
                .zip(&notify)
                .map(|(queue, n)| ActivatedQueue {
                    queue,
                    notify: n.clone(),
                })
                .collect();
            d.activate(mem.clone(), queues, irq.clone()).unwrap();
        }
        let mut g = Self {
            mem,
            manager,
            dev,
            rxq,
            txq,
            notify,
            irq,
            peer: File::from(peer_end),
            device_end,
            rx_next_desc: 0,
            rx_next_addr: RX_AREA,
            rx_chains: HashMap::new(),
            rx_seen: 0,
            tx_next_desc: 0,
            tx_next_addr: TX_AREA,
        };
        g.run();
        g
    }

    fn run(&mut self) {
        for _ in 0..256 {
            if self.manager.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("events still pending after 256 rounds: something is spinning");
    }

    fn counts(&self) -> NetCounts {
        self.dev.lock().unwrap().metrics().snapshot()
    }

    fn needs_reset(&self) -> bool {
        self.irq.needs_reset()
    }

    /// Posts one rx chain of device-writable descriptors of `lens` bytes, without kicking.
    fn post_rx_chain(&mut self, lens: &[u32]) -> u16 {
        if self.rx_next_desc as usize + lens.len() > usize::from(QSIZE) {
            self.rx_next_desc = 0;
        }
        let first = self.rx_next_desc;
        let mut chain = Vec::new();
        for &len in lens {
            if self.rx_next_addr + u64::from(len) > RX_AREA_END {
                self.rx_next_addr = RX_AREA;
            }
            chain.push((self.rx_next_addr, len));
            self.rx_next_addr += (u64::from(len) + 15) & !15;
        }
        let descs: Vec<_> = chain.iter().map(|&(a, l)| (a, l, WO)).collect();
        push_chain(&self.rxq, first, &descs);
        self.rx_chains.insert(first, chain);
        self.rx_next_desc += lens.len() as u16;
        first
    }

    fn kick(&mut self, queue: usize) {
        self.notify[queue].write(1).unwrap();
        self.run();
    }

    /// Posts `n` single-buffer rx chains of `len` bytes and kicks.
    fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            self.post_rx_chain(&[len]);
        }
        self.kick(RX_QUEUE);
    }

    /// The used rx entries since the last call, as (head, bytes written, those bytes).
    fn used_rx(&mut self) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let used_idx = self.rxq.used().idx().load();
        while self.rx_seen != used_idx {
            let elem = self
                .rxq
                .used()
                .ring()
                .ref_at(usize::from(self.rx_seen % QSIZE))
                .unwrap()
                .load();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let head = elem.id() as u16;
            let mut bytes = Vec::new();
            for &(addr, len) in &self.rx_chains[&head] {
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                bytes.extend_from_slice(&b);
            }
            bytes.truncate(elem.len() as usize);
            out.push((head, bytes));
        }
        out
    }

    /// Reassembles received frames from the used rx entries the way Linux does: the header's
    /// num_buffers says how many entries the frame spans.
    fn received(&mut self) -> Vec<(u16, Vec<u8>)> {
        let used = self.used_rx();
        let mut frames = Vec::new();
        let mut i = 0;
        while i < used.len() {
            let first = &used[i].1;
            assert!(first.len() >= NET_HDR_LEN, "used entry below a header");
            assert_eq!(&first[..10], &[0u8; 10], "no offload fields are set");
            let num_buffers = u16::from_le_bytes([first[10], first[11]]);
            assert!(num_buffers >= 1);
            let mut data = first[NET_HDR_LEN..].to_vec();
            for (_, more) in &used[i + 1..i + usize::from(num_buffers)] {
                data.extend_from_slice(more);
            }
            frames.push((num_buffers, data));
            i += usize::from(num_buffers);
        }
        assert_eq!(i, used.len(), "a merged frame's buffers are all published");
        frames
    }

    fn tx_alloc(&mut self, len: usize) -> u64 {
        if self.tx_next_addr + len as u64 > TX_AREA_END {
            self.tx_next_addr = TX_AREA;
        }
        let a = self.tx_next_addr;
        self.tx_next_addr += (len as u64 + 15) & !15;
        a
    }

    /// Queues one tx chain of raw descriptors (address, length, flags) without kicking.
    fn queue_tx_descs(&mut self, descs: &[(u64, u32, u16)]) {
        if self.tx_next_desc as usize + descs.len() > usize::from(QSIZE) {
            self.tx_next_desc = 0;
        }
        let first = self.tx_next_desc;
        push_chain(&self.txq, first, descs);
        self.tx_next_desc += descs.len() as u16;
    }

    /// Queues `frame` behind a virtio-net header, header and frame in descriptors of their own
    /// (as Linux does), without kicking.
    fn queue_tx(&mut self, frame: &[u8]) {
        let hdr = self.tx_alloc(NET_HDR_LEN);
        self.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(hdr))
            .unwrap();
        let data = self.tx_alloc(frame.len());
        self.mem.write_slice(frame, GuestAddress(data)).unwrap();
        self.queue_tx_descs(&[
            (hdr, NET_HDR_LEN as u32, RO),
            (data, frame.len() as u32, RO),
        ]);
    }

    fn send(&mut self, frame: &[u8]) {
        self.queue_tx(frame);
        self.kick(TX_QUEUE);
    }

    /// The used ring's flags: non-zero (VRING_USED_F_NO_NOTIFY) while the device asks for no
    /// kicks.
    fn tx_used_flags(&self) -> u16 {
        self.mem.read_obj(self.txq.used_addr()).unwrap()
    }

    fn tx_used(&self) -> u16 {
        self.txq.used().idx().load()
    }

    /// The frames waiting at the peer, read now.
    fn peer_frames(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        loop {
            match self.peer.read(&mut buf) {
                Ok(0) => panic!("the device end closed"),
                Ok(n) => out.push(buf[..n].to_vec()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
                Err(e) => panic!("peer read: {e}"),
            }
        }
    }

    fn peer_send(&mut self, frame: &[u8]) {
        assert_eq!(self.peer.write(frame).unwrap(), frame.len());
        self.run();
    }
}

#[test]
fn config_space_and_features() {
    let (dev_end, _peer) = seqpacket_pair();
    let net = Net::new(MAC, 1500, dev_end).unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let f = net.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit} offered");
    }
    // No checksum or segmentation offloads (bits 0, 1, 7..=14).
    assert_eq!(f & 0x7f83, 0, "no offloads offered: {f:#x}");

    let mut config = [0xffu8; 12];
    net.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1, "one pair");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1500, "mtu");
    // Partial and out-of-range reads.
    let mut mtu = [0u8; 2];
    net.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1500);
    let mut beyond = [0u8; 4];
    net.read_config(12, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    net.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn bad_identity_is_refused() {
    let (a, _pa) = seqpacket_pair();
    let err = Net::new([0x03, 0, 0, 0, 0, 1], 1500, a).unwrap_err();
    assert!(err.to_string().contains("03:00:00:00:00:01"), "{err}");
    let (b, _pb) = seqpacket_pair();
    assert!(matches!(
        Net::new([0; 6], 1500, b),
        Err(NetError::InvalidMac(_))
    ));
    let (c, _pc) = seqpacket_pair();
    assert!(matches!(
        Net::new(MAC, 67, c),
        Err(NetError::InvalidMtu(67))
    ));
}

#[test]
fn tx_frame_reaches_the_peer_without_its_header() {
    let mut g = Guest::new(VERSION_1);
    let f = frame(1, 60);
    g.send(&f);
    // Header and frame in one descriptor works the same.
    let g2 = frame(2, 1514);
    let mut both = vec![0u8; NET_HDR_LEN];
    both.extend_from_slice(&g2);
    let addr = g.tx_alloc(both.len());
    g.mem.write_slice(&both, GuestAddress(addr)).unwrap();
    g.queue_tx_descs(&[(addr, both.len() as u32, RO)]);
    g.kick(TX_QUEUE);

    assert_eq!(g.peer_frames(), vec![f, g2]);
    assert_eq!(g.tx_used(), 2);
    assert_eq!(g.tx_used_flags(), 0, "kicks are on at rest");
    let c = g.counts();
    assert_eq!((c.tx_frames, c.tx_bytes), (2, 60 + 1514));
    assert_ne!(g.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
}

#[test]
fn peer_frame_lands_in_an_rx_buffer_with_a_header() {
    let mut g = Guest::new(VERSION_1);
    g.post_rx(2, 1526);
    let f = frame(3, 60);
    g.peer_send(&f);
    let got = g.received();
    assert_eq!(got, vec![(1, f)]);
    assert_ne!(g.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    let c = g.counts();
    assert_eq!((c.rx_frames, c.rx_bytes), (1, 60));
}

#[test]
fn merged_rx_spreads_a_frame_over_small_buffers() {
    let mut g = Guest::new(MRG);
    g.post_rx(5, 100);
    let f = frame(4, 300);
    g.peer_send(&f);
    // 12 + 300 bytes: three full 100-byte buffers and 12 bytes of a fourth.
    let used = g.used_rx();
    assert_eq!(
        used.iter().map(|(_, b)| b.len()).collect::<Vec<_>>(),
        vec![100, 100, 100, 12]
    );
    g.rx_seen = g.rx_seen.wrapping_sub(4);
    assert_eq!(g.received(), vec![(4, f)]);
    // The fifth buffer is still there for the next frame.
    let small = frame(5, 40);
    g.peer_send(&small);
    assert_eq!(g.received(), vec![(1, small)]);
}

#[test]
fn merged_rx_waits_for_enough_buffers_then_uses_the_first_ones_too() {
    let mut g = Guest::new(MRG);
    g.post_rx(1, 100);
    let stalls = g.counts().rx_stalls;
    let f = frame(6, 250);
    g.peer_send(&f);
    assert!(
        g.used_rx().is_empty(),
        "one buffer cannot hold it: nothing used"
    );
    assert_eq!(g.counts().rx_stalls, stalls + 1);
    g.post_rx(2, 100);
    assert_eq!(g.received(), vec![(3, f)]);
}

#[test]
fn jumbo_frames_both_ways() {
    // Merged buffers: page-sized buffers, as Linux posts for a 65520 MTU.
    let mut g = Guest::new(MRG);
    g.post_rx(20, 4096);
    let f = frame(7, JUMBO);
    g.peer_send(&f);
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0 as usize, (NET_HDR_LEN + JUMBO).div_ceil(4096));
    assert!(got[0].1 == f, "jumbo frame content");
    let t = frame(8, JUMBO);
    g.send(&t);
    let sent = g.peer_frames();
    assert!(sent.len() == 1 && sent[0] == t, "jumbo tx frame content");

    // Without merged buffers Linux posts "big packets": one chain of many pages.
    let mut g = Guest::new(VERSION_1);
    let mut lens = vec![NET_HDR_LEN as u32];
    lens.extend(std::iter::repeat_n(4096, 17));
    g.post_rx_chain(&lens);
    g.kick(RX_QUEUE);
    g.peer_send(&f);
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 1);
    assert!(got[0].1 == f, "jumbo frame over one chain");
}

#[test]
fn without_rx_buffers_the_fd_is_not_read() {
    let mut g = Guest::new(VERSION_1);
    let a = frame(9, 100);
    let b = frame(10, 200);
    g.peer_send(&a);
    g.peer_send(&b);
    assert_eq!(g.counts().rx_frames, 0);
    assert!(has_unread_frame(&g.device_end), "frames stay in the socket");
    assert!(g.counts().rx_stalls >= 1);
    g.run();
    g.post_rx(2, 1526);
    assert_eq!(g.received(), vec![(1, a), (1, b)]);
    assert!(!has_unread_frame(&g.device_end));
    // The fd is read again: a later frame needs no kick beyond the buffer.
    g.post_rx(1, 1526);
    let c = frame(11, 64);
    g.peer_send(&c);
    assert_eq!(g.received(), vec![(1, c)]);
}

#[test]
fn a_full_peer_makes_tx_wait_then_proceed() {
    let mut g = Guest::with_device(VERSION_1, |dev_end| {
        // Room for a few frames (the kernel doubles it), none larger than it.
        set_sndbuf(dev_end.as_raw_fd(), 65536).unwrap();
        Net::new(MAC, MTU, dev_end).unwrap()
    });
    let frames: Vec<Vec<u8>> = (0..16).map(|i| frame(100 + i, 30_000)).collect();
    for f in &frames {
        g.queue_tx(f);
    }
    g.kick(TX_QUEUE);
    assert!(g.counts().tx_stalls >= 1, "the socket filled up");
    assert!(g.tx_used() < 16, "the device stopped taking buffers");
    assert_ne!(g.tx_used_flags(), 0, "no kicks while the fd is full");
    let mut got = Vec::new();
    for _ in 0..64 {
        got.extend(g.peer_frames());
        if got.len() == frames.len() {
            break;
        }
        g.run();
    }
    assert!(got == frames, "all frames arrive, in order and intact");
    assert_eq!(g.tx_used(), 16);
    assert_eq!(g.tx_used_flags(), 0, "kicks are on again");
    let c = g.counts();
    assert_eq!(c.tx_frames, 16);
    assert_eq!(c.tx_dropped_backend, 0);
}

#[test]
fn hostile_tx_chains_are_dropped_and_counted() {
    let mut g = Guest::new(VERSION_1);
    let outside = MEM_SIZE as u64 - 8;
    // Outside guest memory.
    g.queue_tx_descs(&[(outside, 64, RO)]);
    // A device-writable descriptor in a tx chain.
    g.queue_tx_descs(&[(TX_AREA, 12, RO), (TX_AREA + 0x100, 64, WO)]);
    // Zero bytes.
    g.queue_tx_descs(&[(TX_AREA, 0, RO)]);
    // Shorter than the header plus an Ethernet header.
    g.queue_tx_descs(&[(TX_AREA, 20, RO)]);
    // Longer than any frame.
    g.queue_tx_descs(&[(TX_AREA, 40_000, RO), (TX_AREA + 0x10_000, 40_000, RO)]);
    g.kick(TX_QUEUE);
    let c = g.counts();
    assert_eq!(c.tx_dropped_malformed, 4);
    assert_eq!(c.tx_dropped_oversized, 1);
    assert_eq!(g.tx_used(), 5, "every chain goes back to the guest");
    assert!(g.peer_frames().is_empty());
    assert!(!g.needs_reset());
    // The queue still works.
    let f = frame(12, 80);
    g.send(&f);
    assert_eq!(g.peer_frames(), vec![f]);
}

#[test]
fn hostile_rx_chains_break_the_device_without_a_panic() {
    let hostile: [&[(u64, u32, u16)]; 3] = [
        &[(MEM_SIZE as u64 - 8, 4096, WO)],
        &[(RX_AREA, 4096, RO)],
        &[(RX_AREA, 0, WO)],
    ];
    for descs in hostile {
        let mut g = Guest::new(MRG);
        push_chain(&g.rxq, 0, descs);
        g.kick(RX_QUEUE);
        g.peer_send(&frame(13, 100));
        assert!(g.needs_reset(), "{descs:?}");
        assert_eq!(g.counts().rx_dropped_malformed, 1);
        assert_eq!(g.rxq.used().idx().load(), 0);
        // A broken device ignores the fd and the queues without spinning.
        g.peer_send(&frame(14, 100));
        g.send(&frame(15, 100));
        assert_eq!(g.tx_used(), 0);
    }
}

#[test]
fn a_garbage_avail_index_breaks_the_device() {
    let mut g = Guest::new(VERSION_1);
    g.txq.avail().idx().store(1000);
    g.kick(TX_QUEUE);
    assert!(g.needs_reset());
}

#[test]
fn frames_that_do_not_fit_are_dropped_and_counted() {
    let mut g = Guest::new(VERSION_1);
    g.post_rx(1, 100);
    g.peer_send(&frame(16, 200));
    g.peer_send(&[1, 2, 3, 4, 5]);
    let c = g.counts();
    assert_eq!(c.rx_dropped_oversized, 1);
    assert_eq!(c.rx_dropped_runt, 1);
    // The buffer was kept for a frame that fits.
    let f = frame(17, 80);
    g.peer_send(&f);
    assert_eq!(g.received(), vec![(1, f)]);
    // Longer than any frame the device carries.
    g.post_rx(1, 100);
    g.peer_send(&frame(18, MAX_FRAME_LEN + 1));
    assert_eq!(g.counts().rx_dropped_oversized, 2);
}

#[test]
fn a_closed_peer_is_let_go() {
    let mut g = Guest::with_device(VERSION_1, |dev_end| {
        set_sndbuf(dev_end.as_raw_fd(), 65536).unwrap();
        Net::new(MAC, MTU, dev_end).unwrap()
    });
    g.post_rx(1, 1526);
    // Fill the socket so a frame waits in the device and more in the ring.
    for i in 0..16 {
        g.queue_tx(&frame(200 + i, 30_000));
    }
    g.kick(TX_QUEUE);
    let sent = g.counts().tx_frames;
    assert!(g.tx_used() < 16, "the socket filled up");
    // Replace the peer with an unrelated socket, closing the real one.
    let (_, unrelated) = seqpacket_pair();
    g.peer = File::from(unrelated);
    g.run();
    assert!(g.dev.lock().unwrap().peer_gone);
    assert_eq!(
        g.dev.lock().unwrap().registered,
        None,
        "the fd is not watched"
    );
    // Everything the guest queued went back to it, each frame counted as refused.
    assert_eq!(g.tx_used(), 16);
    assert_eq!(g.counts().tx_dropped_backend, 16 - sent);
    g.send(&frame(19, 100));
    assert_eq!(g.counts().tx_dropped_backend, 17 - sent);
    assert_eq!(g.tx_used(), 17);
}

#[test]
fn reset_stops_reading_and_reactivation_resumes() {
    let mut g = Guest::new(VERSION_1);
    g.post_rx(1, 1526);
    g.dev.lock().unwrap().reset();
    assert!(!g.dev.lock().unwrap().is_activated());
    assert_eq!(g.dev.lock().unwrap().acked_features(), 0);
    let f = frame(20, 100);
    g.peer_send(&f);
    assert!(
        has_unread_frame(&g.device_end),
        "a reset device reads nothing"
    );
    assert_eq!(
        g.dev.lock().unwrap().registered,
        Some(event_manager::EventSet::empty()),
        "and asks for no events"
    );
    assert_eq!(g.rxq.used().idx().load(), 0);

    // The driver brings it up again on the same rings (its posted buffer still there).
    {
        let mut d = g.dev.lock().unwrap();
        d.set_acked_features(VERSION_1);
        let queues = [&g.rxq, &g.txq]
            .iter()
            .zip(&g.notify)
            .map(|(vq, n)| ActivatedQueue {
                queue: vq.create_queue::<Queue>().unwrap(),
                notify: n.clone(),
            })
            .collect();
        d.activate(g.mem.clone(), queues, g.irq.clone()).unwrap();
    }
    g.run();
    assert_eq!(g.received(), vec![(1, f)]);
}

#[test]
fn a_stream_socket_is_refused() {
    let (stream, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = Net::new(MAC, MTU, OwnedFd::from(stream)).unwrap_err();
    assert!(err.to_string().contains("SOCK_SEQPACKET"), "{err}");
    let (dgram, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
    assert!(Net::new(MAC, MTU, OwnedFd::from(dgram)).is_ok());
}

#[test]
fn persist_round_trip() {
    // The device's own state.
    let mut g = Guest::new(MRG);
    let f = frame(21, 500);
    g.send(&f);
    assert_eq!(g.peer_frames(), vec![f]);
    g.post_rx(1, 1526);
    let state = g.dev.lock().unwrap().save_state();
    assert_eq!(
        state,
        NetState {
            mac: MAC,
            mtu: MTU,
            acked_features: MRG
        }
    );
    let queue_states: Vec<QueueState> = g.dev.lock().unwrap().queue_states();
    assert_eq!(queue_states[TX_QUEUE].next_avail, 1);
    assert_eq!(queue_states[TX_QUEUE].next_used, 1);

    // A frame queued after the snapshot's ring positions were taken, with kicks off in the
    // used ring (a snapshot taken while the fd was full): the restored device must still
    // send it and turn kicks back on.
    let unkicked = frame(22, 700);
    g.queue_tx(&unkicked);
    g.mem
        .write_obj(1u16, g.txq.used_addr())
        .expect("used ring flags");

    // A restored device over a new frame fd, on the same rings, carries on where the old
    // one stopped.
    let (tx_next_desc, tx_next_addr) = (g.tx_next_desc, g.tx_next_addr);
    let (rx_next_desc, rx_next_addr) = (g.rx_next_desc, g.rx_next_addr);
    let (rx_chains, rx_seen) = (std::mem::take(&mut g.rx_chains), g.rx_seen);
    let Guest { mem, rxq, txq, .. } = g;
    let queues = queue_states
        .iter()
        .map(|s| Queue::try_from(*s).unwrap())
        .collect();
    let mut g = Guest::activated(mem, rxq, txq, queues, MRG, |fd| {
        Net::restore(&state, fd).unwrap()
    });
    (g.tx_next_desc, g.tx_next_addr) = (tx_next_desc, tx_next_addr);
    (g.rx_next_desc, g.rx_next_addr) = (rx_next_desc, rx_next_addr);
    (g.rx_chains, g.rx_seen) = (rx_chains, rx_seen);
    assert_eq!(g.dev.lock().unwrap().save_state(), state);
    assert_eq!(g.peer_frames(), vec![unkicked]);
    assert_eq!(g.tx_used_flags(), 0, "kicks are on again");
    let f3 = frame(23, 900);
    g.send(&f3);
    assert_eq!(g.peer_frames(), vec![f3]);
    assert_eq!(g.tx_used(), 3);
    // The rx buffer posted before the snapshot is used for the first frame after it.
    let back = frame(24, 90);
    g.peer_send(&back);
    assert_eq!(g.received(), vec![(1, back)]);

    // Untrusted state.
    let (fd, _p) = seqpacket_pair();
    let bad = NetState {
        mac: [0xff; 6],
        ..state.clone()
    };
    assert!(Net::restore(&bad, fd).is_err());
    let (fd, _p) = seqpacket_pair();
    let extra = NetState {
        acked_features: u64::MAX,
        ..state.clone()
    };
    assert_eq!(
        Net::restore(&extra, fd).unwrap().acked_features(),
        Net::new(MAC, MTU, seqpacket_pair().0)
            .unwrap()
            .avail_features()
    );
}

#[test]
fn transport_snapshot_reactivates_the_device() {
    use crate::virtio::mmio::tests::{bring_up, read};
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;

    let mem = guest_memory();
    let (dev_end, _peer) = seqpacket_pair();
    let net = Arc::new(Mutex::new(Net::new(MAC, MTU, dev_end).unwrap()));
    let mut t = MmioTransport::new(mem.clone(), net.clone()).unwrap();
    bring_up(&mut t);
    assert!(net.lock().unwrap().is_activated());
    let transport_state = t.save_state();
    let net_state = net.lock().unwrap().save_state();

    let (new_end, _new_peer) = seqpacket_pair();
    let restored = Arc::new(Mutex::new(Net::restore(&net_state, new_end).unwrap()));
    let mut t2 = MmioTransport::new(mem, restored.clone()).unwrap();
    t2.restore_state(&transport_state).unwrap();
    assert!(restored.lock().unwrap().is_activated());
    assert_eq!(
        read(&mut t2, VIRTIO_MMIO_STATUS),
        read(&mut t, VIRTIO_MMIO_STATUS)
    );
    assert_eq!(t2.save_state(), transport_state);
}

//! The device driven like a guest driver would (mock split queues) against real Unix sockets
//! in a temporary directory. Every step runs the event loop until it has nothing left to do
//! with zero timeouts, so a busy loop fails the test instead of hanging it.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::virtio::test_utils::guest_memory;
use crate::virtio::{ActivatedQueue, Interrupt, VirtioDevice};
use crate::GuestMemoryMmap;

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

const CID: u64 = 3;
const QSIZE: u16 = 256;
const RX_BUFS: u64 = 0x100_000;
const TX_AREA: u64 = 0x200_000;
const TX_AREA_END: u64 = 0x400_000;
const GUEST_BUF: u32 = 256 * 1024;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "agentvm-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes a chain available on `vq`, wrapping the avail ring (the mock's own helper does not).
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

fn pkt(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

/// A byte pattern that differs by seed and position.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
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

/// Reads whatever the socket holds now; `None` at EOF with nothing read.
fn read_now(s: &mut UnixStream) -> Option<Vec<u8>> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) if out.is_empty() => return None,
            Ok(0) => return Some(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(out),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("read: {e}"),
        }
    }
}

struct Guest {
    mem: &'static GuestMemoryMmap,
    manager: Manager,
    dev: Arc<Mutex<Vsock>>,
    rxq: MockSplitQueue<'static, GuestMemoryMmap>,
    txq: MockSplitQueue<'static, GuestMemoryMmap>,
    evq: MockSplitQueue<'static, GuestMemoryMmap>,
    notify: Vec<Arc<EventFd>>,
    irq: Arc<Interrupt>,
    _dir: TempDir,
    uds: PathBuf,
    rx_next_desc: u16,
    rx_chains: HashMap<u16, Vec<(u64, u32)>>,
    rx_seen: u16,
    tx_next_desc: u16,
    tx_next_addr: u64,
}

impl Guest {
    fn new() -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_memory()));
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(CID, &uds).unwrap()));
        let mut manager = Manager::new().unwrap();
        manager.add_subscriber(dev.clone());
        let rxq = MockSplitQueue::create(mem, GuestAddress(0x10_000), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x20_000), QSIZE);
        let evq = MockSplitQueue::create(mem, GuestAddress(0x30_000), QSIZE);
        let notify: Vec<Arc<EventFd>> = (0..3)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        let queues = [&rxq, &txq, &evq]
            .iter()
            .zip(&notify)
            .map(|(vq, n)| ActivatedQueue {
                queue: vq.create_queue::<Queue>().unwrap(),
                notify: n.clone(),
            })
            .collect();
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.lock()
            .unwrap()
            .activate(mem.clone(), queues, irq.clone())
            .unwrap();
        let mut g = Self {
            mem,
            manager,
            dev,
            rxq,
            txq,
            evq,
            notify,
            irq,
            _dir: dir,
            uds,
            rx_next_desc: 0,
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

    fn conns(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }

    /// Posts `n` rx buffers of 4 KiB; `split` puts the header in its own descriptor, as
    /// Linux 6.1 does.
    fn post_rx(&mut self, n: usize, split: bool) {
        let outstanding = self.rxq.avail().idx().load().wrapping_sub(self.rx_seen);
        assert!(
            usize::from(outstanding) + n <= 100,
            "test posts too many rx buffers"
        );
        for _ in 0..n {
            if self.rx_next_desc + 2 > QSIZE {
                self.rx_next_desc = 0;
            }
            let first = self.rx_next_desc;
            let base = RX_BUFS + u64::from(first) * 0x1000;
            let chain: Vec<(u64, u32)> = if split {
                vec![
                    (base, HDR_LEN as u32),
                    (base + 0x1000, 4096 - HDR_LEN as u32),
                ]
            } else {
                vec![(base, 4096)]
            };
            let descs: Vec<_> = chain
                .iter()
                .map(|&(a, l)| (a, l, VRING_DESC_F_WRITE as u16))
                .collect();
            push_chain(&self.rxq, first, &descs);
            self.rx_chains.insert(first, chain);
            self.rx_next_desc += 2;
        }
        self.notify[RX_QUEUE].write(1).unwrap();
        self.run();
    }

    /// Tops the rx buffers the device has not used yet up to `n`.
    fn ensure_rx(&mut self, n: u16) {
        let outstanding = self.rxq.avail().idx().load().wrapping_sub(self.rx_seen);
        if outstanding < n {
            self.post_rx(usize::from(n - outstanding), false);
        }
    }

    /// Packets the device put in the rx queue since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
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
            let chain = &self.rx_chains[&(elem.id() as u16)];
            let mut bytes = Vec::new();
            for &(addr, len) in chain {
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                bytes.extend_from_slice(&b);
            }
            let used = elem.len() as usize;
            assert!(used >= HDR_LEN, "used length {used} below a header");
            let hdr = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(used, HDR_LEN + hdr.len as usize);
            out.push((hdr, bytes[HDR_LEN..used].to_vec()));
        }
        out
    }

    fn tx_alloc(&mut self, len: usize) -> u64 {
        if self.tx_next_addr + len as u64 > TX_AREA_END {
            self.tx_next_addr = TX_AREA;
        }
        let a = self.tx_next_addr;
        self.tx_next_addr += (len as u64 + 15) & !15;
        a
    }

    /// Queues one chain whose descriptors hold `parts`, kicks and runs the loop.
    fn send_raw(&mut self, parts: &[&[u8]]) {
        let mut descs = Vec::new();
        for p in parts {
            let a = self.tx_alloc(p.len());
            self.mem.write_slice(p, GuestAddress(a)).unwrap();
            descs.push((a, p.len() as u32, 0));
        }
        if self.tx_next_desc + parts.len() as u16 > QSIZE {
            self.tx_next_desc = 0;
        }
        let first = self.tx_next_desc;
        push_chain(&self.txq, first, &descs);
        self.tx_next_desc += parts.len() as u16;
        self.notify[TX_QUEUE].write(1).unwrap();
        self.run();
    }

    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let h = hdr.to_bytes();
        if payload.is_empty() {
            self.send_raw(&[&h]);
        } else {
            self.send_raw(&[&h, payload]);
        }
    }

    /// Host connects through the `CONNECT` handshake; returns the host stream and the host
    /// port the guest sees. The guest answers with `buf_alloc`.
    fn host_connect(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.run();
        self.post_rx(1, false);
        let got = self.recv();
        assert_eq!(got.len(), 1, "{got:?}");
        let req = got[0].0;
        assert_eq!(req.op, Op::Request as u16);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, CID, port)
        );
        assert_eq!(req.type_, TYPE_STREAM);
        assert!(req.src_port >= 1 << 30);
        let resp = Header {
            buf_alloc,
            ..pkt(Op::Response, port, req.src_port)
        };
        self.send(resp, &[]);
        let line = read_now(&mut s).unwrap();
        assert_eq!(line, format!("OK {}\n", req.src_port).into_bytes());
        (s, req.src_port)
    }
}

#[test]
fn identity_config_and_creation_errors() {
    let dir = TempDir::new();
    let path = dir.0.join("id.sock");
    let dev = Vsock::new(0x1234_5678, &path).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.avail_features(), 1 << 32);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
    let mut middle = [0xffu8; 4];
    dev.read_config(2, &mut middle);
    assert_eq!(middle, [0x34, 0x12, 0, 0]);
    let mut beyond = [0x5au8; 4];
    dev.read_config(8, &mut beyond);
    assert_eq!(beyond, [0x5a; 4]);

    assert!(matches!(
        Vsock::new(2, &dir.0.join("a")),
        Err(VsockError::ReservedCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), &dir.0.join("b")),
        Err(VsockError::ReservedCid(_))
    ));
    assert!(matches!(
        Vsock::new(3, &path),
        Err(VsockError::Backend(BackendError::Listen { .. }))
    ));
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut g = Guest::new();
    let metrics = g.dev.lock().unwrap().metrics();
    let (mut host, local) = g.host_connect(52, GUEST_BUF);
    assert_eq!(g.conns(), 1);
    let after_handshake = metrics.snapshot();
    assert!(after_handshake.rx_packets >= 1 && after_handshake.tx_packets >= 1);
    assert_eq!((after_handshake.rx_bytes, after_handshake.tx_bytes), (0, 0));

    host.write_all(b"hello guest").unwrap();
    g.run();
    g.post_rx(2, true);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    let (h, data) = &got[0];
    assert_eq!((h.op, h.src_port, h.dst_port), (Op::Rw as u16, local, 52));
    assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(data, b"hello guest");
    assert!(
        g.irq.event().read().is_ok(),
        "rx packets raise the interrupt"
    );

    g.send(pkt(Op::Rw, 52, local), b"hello host");
    assert_eq!(read_now(&mut host).unwrap(), b"hello host");
    let counts = metrics.snapshot();
    assert_eq!(
        (counts.rx_bytes, counts.tx_bytes),
        (b"hello guest".len() as u64, b"hello host".len() as u64)
    );
    assert_eq!(counts.tx_packets, after_handshake.tx_packets + 1);
    assert!(counts.rx_packets > after_handshake.rx_packets);
}

#[test]
fn large_transfers_arrive_intact_in_both_directions() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(1000, GUEST_BUF);
    const TOTAL: usize = 600 * 1024;

    // Host → guest, the guest returning credit as it consumes.
    let sent = pattern(1, TOTAL);
    let mut written = 0;
    let mut received = Vec::new();
    host.set_nonblocking(true).unwrap();
    for _ in 0..2000 {
        if received.len() == TOTAL {
            break;
        }
        if written < TOTAL {
            match host.write(&sent[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        g.run();
        g.post_rx(32, false);
        for (h, data) in g.recv() {
            assert_eq!(h.op, Op::Rw as u16, "{h:?}");
            received.extend_from_slice(&data);
        }
        let credit = Header {
            fwd_cnt: received.len() as u32,
            ..pkt(Op::CreditUpdate, 1000, local)
        };
        g.send(credit, &[]);
    }
    assert!(received == sent, "host → guest stream corrupted");

    // Guest → host in 16 KiB packets; the device volunteers credit as the host reads.
    let sent = pattern(2, TOTAL);
    let mut got = Vec::new();
    let mut max_fwd_cnt = 0;
    for chunk in sent.chunks(16 * 1024) {
        g.send(pkt(Op::Rw, 1000, local), chunk);
        got.extend(read_now(&mut host).unwrap());
        g.post_rx(1, false);
        for (h, _) in g.recv() {
            assert_eq!(h.op, Op::CreditUpdate as u16);
            max_fwd_cnt = max_fwd_cnt.max(h.fwd_cnt);
        }
    }
    assert!(got == sent, "guest → host stream corrupted");
    assert!(
        max_fwd_cnt >= CONN_BUF_SIZE,
        "credit updates: {max_fwd_cnt}"
    );
}

#[test]
fn guest_connects_to_a_listening_port() {
    let mut g = Guest::new();
    let mut path = g.uds.clone().into_os_string();
    path.push("_5000");
    let listener = UnixListener::bind(&path).unwrap();

    g.send(pkt(Op::Request, 777, 5000), &[]);
    g.post_rx(1, false);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    let h = got[0].0;
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.dst_cid),
        (Op::Response as u16, 5000, 777, CID)
    );
    let (mut host, _) = listener.accept().unwrap();

    g.send(pkt(Op::Rw, 777, 5000), b"ping");
    assert_eq!(read_now(&mut host).unwrap(), b"ping");
    host.write_all(b"pong").unwrap();
    g.run();
    g.post_rx(1, false);
    let got = g.recv();
    assert_eq!(got[0].1, b"pong");
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (5000, 777));
}

#[test]
fn guest_connect_to_a_missing_port_is_reset() {
    let mut g = Guest::new();
    g.send(pkt(Op::Request, 777, 5001), &[]);
    g.post_rx(1, false);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    let h = got[0].0;
    assert_eq!((h.op, h.src_port, h.dst_port), (Op::Rst as u16, 5001, 777));
    assert_eq!(g.conns(), 0);
}

#[test]
fn host_data_stops_at_guest_credit_and_resumes_with_it() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(9, 4096);
    let data = pattern(3, 10_000);
    host.write_all(&data).unwrap();
    g.run();
    g.post_rx(8, false);
    let got = g.recv();
    let rw: Vec<u8> = got
        .iter()
        .filter(|(h, _)| h.op == Op::Rw as u16)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(rw, data[..4096]);
    assert_eq!(got.last().unwrap().0.op, Op::CreditRequest as u16);

    // More buffers, no credit: nothing moves, and nothing spins.
    g.post_rx(4, false);
    assert!(g.recv().is_empty());

    let update = |fwd_cnt| Header {
        fwd_cnt,
        buf_alloc: 4096,
        ..pkt(Op::CreditUpdate, 9, local)
    };
    g.send(update(4096), &[]);
    let got = g.recv();
    let rw: Vec<u8> = got.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(rw, data[4096..8192]);

    g.send(update(8192), &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, data[8192..]);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(9, GUEST_BUF);
    let chunk = vec![0xabu8; MAX_PAYLOAD];
    // The host never reads: its socket buffer fills, then our CONN_BUF_SIZE, then RST.
    let mut rst = false;
    for _ in 0..64 {
        g.send(pkt(Op::Rw, 9, local), &chunk);
        g.post_rx(1, false);
        let got = g.recv();
        if got.iter().any(|(h, _)| h.op == Op::Rst as u16) {
            rst = true;
            break;
        }
    }
    assert!(rst, "a guest ignoring credit must be reset");
    assert_eq!(g.conns(), 0);
    // The host sees its socket closed after the data that was delivered.
    host.set_nonblocking(false).unwrap();
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert!(all.iter().all(|&b| b == 0xab));
}

#[test]
fn shutdown_and_reset_from_the_guest() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(7, GUEST_BUF);

    // Guest stops sending: the host reads EOF but can still write.
    g.send(pkt(Op::Rw, 7, local), b"last words");
    g.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..pkt(Op::Shutdown, 7, local)
        },
        &[],
    );
    assert_eq!(read_now(&mut host).unwrap(), b"last words");
    assert_eq!(read_now(&mut host), None, "host sees EOF");
    host.write_all(b"still here").unwrap();
    g.run();
    g.post_rx(1, false);
    assert_eq!(g.recv()[0].1, b"still here");

    // Full shutdown: the device resets and closes the host socket.
    g.send(
        Header {
            flags: SHUTDOWN_SEND | SHUTDOWN_RCV,
            ..pkt(Op::Shutdown, 7, local)
        },
        &[],
    );
    g.post_rx(1, false);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::Rst as u16);
    assert_eq!(g.conns(), 0);
    assert!(host.write_all(&[0u8; 1024]).is_err(), "host socket closed");

    // A guest RST closes the host socket silently.
    let (mut host, local) = g.host_connect(8, GUEST_BUF);
    g.send(pkt(Op::Rst, 8, local), &[]);
    g.post_rx(1, false);
    assert!(g.recv().is_empty());
    assert_eq!(read_now(&mut host), None);
    assert_eq!(g.conns(), 0);
}

#[test]
fn host_close_reaches_the_guest_after_the_data() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(7, GUEST_BUF);
    host.write_all(b"bye").unwrap();
    drop(host);
    g.run();
    g.post_rx(4, false);
    let got = g.recv();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].1, b"bye");
    assert_eq!(got[1].0.op, Op::Shutdown as u16);
    assert_eq!(got[1].0.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    assert_eq!(g.conns(), 1);
    g.send(pkt(Op::Rst, 7, local), &[]);
    assert_eq!(g.conns(), 0);
}

#[test]
fn malformed_packets_are_answered_with_rst() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(7, GUEST_BUF);

    let bad = [
        Header {
            op: 99,
            ..pkt(Op::Rw, 100, 200)
        },
        Header {
            type_: 2,
            ..pkt(Op::Request, 101, 200)
        },
        Header {
            dst_cid: 5,
            ..pkt(Op::Request, 102, 200)
        },
        Header {
            src_cid: 4,
            ..pkt(Op::Request, 103, 200)
        },
        pkt(Op::Rw, 104, 200),
        pkt(Op::CreditRequest, 105, 200),
    ];
    for h in bad {
        g.send(h, &[]);
    }
    // The header promises 100 bytes, the descriptor holds 10.
    let mut long = pkt(Op::Rw, 106, 200);
    long.len = 100;
    g.send_raw(&[&long.to_bytes(), &[0u8; 10]]);
    // Too short for a header: nothing to answer.
    g.send_raw(&[&[0u8; 20]]);
    // An RST for nothing gets no answer either.
    g.send(pkt(Op::Rst, 107, 200), &[]);

    g.post_rx(16, false);
    let got = g.recv();
    let answered: Vec<_> = got
        .iter()
        .map(|(h, _)| (h.op, h.src_port, h.dst_port))
        .collect();
    let expected: Vec<_> = (100..=106).map(|p| (Op::Rst as u16, 200, p)).collect();
    assert_eq!(answered, expected);
    // All tx chains were returned.
    assert_eq!(g.txq.used().idx().load(), g.txq.avail().idx().load());

    // The established connection was not disturbed...
    g.send(pkt(Op::Rw, 7, local), b"ok");
    assert_eq!(read_now(&mut host).unwrap(), b"ok");
    // ...until a bad packet names it: then it is reset.
    g.send(
        Header {
            type_: 2,
            ..pkt(Op::Rw, 7, local)
        },
        &[],
    );
    g.post_rx(1, false);
    let got = g.recv();
    assert_eq!(got[0].0.op, Op::Rst as u16);
    assert_eq!(g.conns(), 0);
    assert_eq!(read_now(&mut host), None);
}

#[test]
fn a_second_request_on_an_open_connection_resets_it() {
    let mut g = Guest::new();
    let (_host, local) = g.host_connect(7, GUEST_BUF);
    g.send(pkt(Op::Request, 7, local), &[]);
    g.post_rx(1, false);
    assert_eq!(g.recv()[0].0.op, Op::Rst as u16);
    assert_eq!(g.conns(), 0);
}

#[test]
fn many_connections_stay_apart() {
    let mut g = Guest::new();
    let mut hosts: Vec<(UnixStream, u32)> =
        (0..24).map(|_| g.host_connect(80, GUEST_BUF)).collect();
    let ports: std::collections::HashSet<u32> = hosts.iter().map(|h| h.1).collect();
    assert_eq!(ports.len(), 24);
    assert_eq!(g.conns(), 24);

    for (i, (s, _)) in hosts.iter_mut().enumerate() {
        s.write_all(&pattern(i as u32, 1000)).unwrap();
    }
    g.run();
    g.post_rx(30, false);
    let got = g.recv();
    assert_eq!(got.len(), 24);
    for (h, data) in got {
        let i = hosts.iter().position(|(_, p)| *p == h.src_port).unwrap();
        assert_eq!(data, pattern(i as u32, 1000));
        // Echo it back reversed.
        let mut back = data.clone();
        back.reverse();
        g.send(pkt(Op::Rw, 80, h.src_port), &back);
    }
    for (i, (s, _)) in hosts.iter_mut().enumerate() {
        let mut want = pattern(i as u32, 1000);
        want.reverse();
        assert_eq!(read_now(s).unwrap(), want);
    }
}

#[test]
fn bad_handshakes_are_closed_and_reset_closes_everything() {
    let mut g = Guest::new();
    let mut bad = UnixStream::connect(&g.uds).unwrap();
    bad.write_all(b"HELLO 5\n").unwrap();
    g.run();
    assert_eq!(read_now(&mut bad), None);

    let (mut host, _) = g.host_connect(7, GUEST_BUF);
    let mut pending = UnixStream::connect(&g.uds).unwrap();
    pending.write_all(b"CONNECT 1").unwrap();
    g.run();
    g.dev.lock().unwrap().reset();
    g.run();
    assert_eq!(g.conns(), 0);
    assert_eq!(read_now(&mut host), None);
    assert_eq!(read_now(&mut pending), None);
}

#[test]
fn host_data_sent_right_after_connect_waits_for_the_guest() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 33\nearly bytes").unwrap();
    g.run();
    g.post_rx(4, false);
    let got = g.recv();
    assert_eq!(
        got.len(),
        1,
        "only the request before the guest answers: {got:?}"
    );
    let local = got[0].0.src_port;
    g.send(pkt(Op::Response, 33, local), &[]);
    assert_eq!(
        read_now(&mut s).unwrap(),
        format!("OK {local}\n").as_bytes()
    );
    g.post_rx(1, false);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"early bytes");
}

#[test]
fn guest_refusing_a_host_connection_closes_the_host_socket() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 34\n").unwrap();
    g.run();
    g.post_rx(1, false);
    let local = g.recv()[0].0.src_port;
    g.send(pkt(Op::Rst, 34, local), &[]);
    assert_eq!(read_now(&mut s), None, "no OK line, just EOF");
    assert_eq!(g.conns(), 0);
}

#[test]
fn unanswered_host_connections_time_out() {
    let mut g = Guest::new();
    g.dev.lock().unwrap().set_request_timeout(
        std::time::Duration::from_millis(20),
        std::time::Duration::from_millis(5),
    );
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 35\n").unwrap();
    g.run();
    g.post_rx(2, false);
    let req = g.recv()[0].0;
    assert_eq!(req.op, Op::Request as u16);
    // Waits for the timer's events (blocking epoll waits, no sleeps).
    for _ in 0..1000 {
        if g.conns() == 0 {
            break;
        }
        g.manager.run_with_timeout(50).unwrap();
    }
    assert_eq!(g.conns(), 0, "the request never timed out");
    g.run();
    assert_eq!(read_now(&mut s), None);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
        (Op::Rst as u16, req.src_port, 35)
    );
    // The timer disarms once nothing waits: the loop goes quiet.
    for _ in 0..10 {
        g.manager.run_with_timeout(10).unwrap();
    }
    assert_eq!(g.manager.run_with_timeout(20).unwrap(), 0);
}

#[test]
fn a_guest_within_credit_feeds_a_slow_host_without_loss_or_reset() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(11, GUEST_BUF);
    const TOTAL: usize = 1536 * 1024;
    let sent = pattern(4, TOTAL);
    let mut got = Vec::new();
    let (mut off, mut peer_alloc, mut peer_fwd) = (0usize, CONN_BUF_SIZE, 0u32);
    host.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 10 * 1024];
    for _ in 0..5000 {
        if got.len() == TOTAL {
            break;
        }
        // The guest sends what its credit allows, as a driver would.
        let credit = peer_alloc as usize - (off as u32).wrapping_sub(peer_fwd) as usize;
        let n = credit.min(16 * 1024).min(TOTAL - off);
        if n > 0 {
            g.send(pkt(Op::Rw, 11, local), &sent[off..off + n]);
            off += n;
        }
        // The host reads a little each round, so the device's buffer never quite drains.
        match host.read(&mut buf) {
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        g.notify[TX_QUEUE].write(1).unwrap();
        g.run();
        g.ensure_rx(4);
        for (h, _) in g.recv() {
            assert_eq!(h.op, Op::CreditUpdate as u16, "{h:?}");
            peer_alloc = h.buf_alloc;
            peer_fwd = h.fwd_cnt;
        }
        // Host socket writability is what moves the device's buffer on.
        if n == 0 {
            g.manager.run_with_timeout(10).unwrap();
        }
    }
    assert_eq!(
        got.len(),
        TOTAL,
        "stalled: credit updates did not keep the guest going"
    );
    assert!(got == sent);
    assert_eq!(g.conns(), 1);
}

#[test]
fn host_half_close_then_full_close() {
    let mut g = Guest::new();
    let (host, local) = g.host_connect(12, GUEST_BUF);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    g.run();
    g.post_rx(2, false);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.flags),
        (Op::Shutdown as u16, SHUTDOWN_SEND)
    );
    // The other direction still works.
    g.send(pkt(Op::Rw, 12, local), b"reply");
    let mut host = host;
    assert_eq!(read_now(&mut host).unwrap(), b"reply");
    drop(host);
    g.run();
    g.post_rx(1, false);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.flags),
        (Op::Shutdown as u16, SHUTDOWN_SEND | SHUTDOWN_RCV)
    );
    g.send(pkt(Op::Rst, 12, local), &[]);
    assert_eq!(g.conns(), 0);
}

#[test]
fn dropping_the_device_removes_its_socket_path() {
    let dir = TempDir::new();
    let path = dir.0.join("d.sock");
    let dev = Vsock::new(3, &path).unwrap();
    assert!(path.exists());
    drop(dev);
    assert!(!path.exists());
    Vsock::new(3, &path).unwrap();
}

#[test]
fn a_guest_that_never_takes_packets_cannot_grow_the_backlog() {
    let mut g = Guest::new();
    let (_host, local) = g.host_connect(13, GUEST_BUF);
    // No rx buffers from here on.
    for _ in 0..300 {
        g.send(pkt(Op::CreditRequest, 13, local), &[]);
    }
    assert_eq!(g.dev.lock().unwrap().backend.rx_backlog(), 1);
    for port in 0..1100 {
        g.send(pkt(Op::Rw, 20_000 + port, 80), b"x");
    }
    let backlog = g.dev.lock().unwrap().backend.rx_backlog();
    assert_eq!(backlog, super::unix_backend::MAX_CONTROL_PACKETS + 1);
    // Packets still flow once the guest provides buffers, oldest first.
    g.post_rx(2, false);
    let got = g.recv();
    assert_eq!((got[0].0.op, got[0].0.dst_port), (Op::Rst as u16, 20_000));
}

/// The path Linux takes: probe through the virtio-mmio transport (three queues, CID from config
/// space), queue kicks through the transport's notify EventFds, then a host connection.
#[test]
fn works_behind_the_mmio_transport() {
    use crate::virtio::MmioTransport;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_bindings::virtio_mmio::*;
    use vm_device::bus::MmioAddress;
    use vm_device::MutDeviceMmio;

    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_memory()));
    let dir = TempDir::new();
    let uds = dir.0.join("t.sock");
    let dev = Arc::new(Mutex::new(Vsock::new(42, &uds).unwrap()));
    let mut manager = Manager::new().unwrap();
    manager.add_subscriber(dev.clone());
    let mut t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    let read = |t: &mut MmioTransport, reg: u32| {
        let mut d = [0u8; 4];
        t.mmio_read(MmioAddress(0), u64::from(reg), &mut d);
        u32::from_le_bytes(d)
    };
    let write = |t: &mut MmioTransport, reg: u32, v: u32| {
        t.mmio_write(MmioAddress(0), u64::from(reg), &v.to_le_bytes());
    };

    assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_ID), 19);
    write(&mut t, VIRTIO_MMIO_STATUS, 0);
    write(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    write(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let high = read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
    assert_eq!(high, 1, "VERSION_1 only");
    write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, high);
    write(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    let cid_low = read(&mut t, VIRTIO_MMIO_CONFIG);
    let cid_high = read(&mut t, VIRTIO_MMIO_CONFIG + 4);
    assert_eq!((cid_low, cid_high), (42, 0));

    let vqs: Vec<_> = (0..3u64)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(0x10_000 * (i + 1)), QSIZE))
        .collect();
    for (i, vq) in vqs.iter().enumerate() {
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, i as u32);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr().0),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr().0),
            (VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr().0),
        ] {
            write(&mut t, low, addr as u32);
            write(&mut t, low + 4, (addr >> 32) as u32);
        }
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    write(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert!(dev.lock().unwrap().is_activated());
    let settle = |m: &mut Manager| {
        for _ in 0..64 {
            if m.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("spinning");
    };
    settle(&mut manager);

    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    settle(&mut manager);
    push_chain(
        &vqs[RX_QUEUE],
        0,
        &[(RX_BUFS, 4096, VRING_DESC_F_WRITE as u16)],
    );
    // The kick arrives through the transport's notify EventFd, as KVM's ioeventfd delivers it.
    t.queue_notify_events()[RX_QUEUE].1.write(1).unwrap();
    settle(&mut manager);
    assert_eq!(vqs[RX_QUEUE].used().idx().load(), 1);
    let mut raw = [0u8; HDR_LEN];
    mem.read_slice(&mut raw, GuestAddress(RX_BUFS)).unwrap();
    let req = Header::from_bytes(&raw);
    assert_eq!(
        (req.op, req.dst_cid, req.dst_port),
        (Op::Request as u16, 42, 1024)
    );
    assert_eq!(
        read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );

    // A driver reset closes the host side.
    write(&mut t, VIRTIO_MMIO_STATUS, 0);
    settle(&mut manager);
    assert!(!dev.lock().unwrap().is_activated());
    assert_eq!(read_now(&mut host), None);
}

#[test]
fn tx_packets_in_one_or_many_descriptors_are_accepted() {
    let mut g = Guest::new();
    let (mut host, local) = g.host_connect(14, GUEST_BUF);
    // Header and payload in one buffer (Linux 6.2 and later).
    let mut h = pkt(Op::Rw, 14, local);
    h.len = 5;
    let mut one = h.to_bytes().to_vec();
    one.extend_from_slice(b"first");
    g.send_raw(&[&one]);
    // Header split, payload over three buffers.
    h.len = 11;
    let b = h.to_bytes();
    g.send_raw(&[&b[..10], &b[10..], b"sec", b"ond-", b"part"]);
    assert_eq!(read_now(&mut host).unwrap(), b"firstsecond-part");
    assert_eq!(g.conns(), 1);
}

#[test]
fn transport_reset_drops_connections_and_tells_the_driver() {
    let mut g = Guest::new();
    let (mut host, _) = g.host_connect(15, GUEST_BUF);
    // No event buffer yet: the event waits for one.
    g.dev.lock().unwrap().transport_reset();
    g.run();
    assert_eq!(g.conns(), 0);
    assert_eq!(read_now(&mut host), None);
    assert_eq!(g.evq.used().idx().load(), 0);

    g.mem
        .write_slice(&[0xffu8; 8], GuestAddress(0x40_000))
        .unwrap();
    push_chain(&g.evq, 0, &[(0x40_000, 8, VRING_DESC_F_WRITE as u16)]);
    g.notify[EVENT_QUEUE].write(1).unwrap();
    g.run();
    assert_eq!(g.evq.used().idx().load(), 1);
    let elem = g.evq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((elem.id(), elem.len()), (0, 4));
    let mut ev = [0u8; 8];
    g.mem.read_slice(&mut ev, GuestAddress(0x40_000)).unwrap();
    assert_eq!(ev, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);

    // Only once: a second buffer stays unused.
    push_chain(&g.evq, 1, &[(0x41_000, 8, VRING_DESC_F_WRITE as u16)]);
    g.notify[EVENT_QUEUE].write(1).unwrap();
    g.run();
    assert_eq!(g.evq.used().idx().load(), 1);

    // New connections work afterwards.
    let (_host, _) = g.host_connect(16, GUEST_BUF);
    assert_eq!(g.conns(), 1);
}

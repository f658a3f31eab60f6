//! virtio-vsock driven by a hostile guest: arbitrary descriptor chains, avail ring entries and
//! guest memory contents on the tx, rx and event queues (packets with any header fields, short
//! and looping chains, buffers outside RAM), interleaved with host peers that connect through the
//! Unix socket, send, and hang up. The device must never panic, touch memory outside guest RAM,
//! or spin.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use agentvm_fuzz::hostile_guest::{
    guest_memory, queue_size, run_until_idle, Addr, Buffer, Driver, Len, Manager, QueueOp,
};
use arbitrary::Arbitrary;
use devices::virtio::vsock::{Header, Vsock, HDR_LEN, HOST_CID, QUEUE_SIZE, TX_QUEUE};
use devices::virtio::VirtioDevice;
use event_manager::SubscriberOps;
use libfuzzer_sys::fuzz_target;

const GUEST_CID: u64 = 3;
/// A host service the guest may connect to: `<uds>_<LISTEN_PORT>` is listening.
const LISTEN_PORT: u32 = 1234;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Queue sizes the driver picks (rx, tx, event).
    sizes: [u8; 3],
    ops: Vec<Op>,
}

/// Header fields, mostly the values a working guest uses, sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Field<T> {
    Usual,
    Raw(T),
}

impl<T> Field<T> {
    fn or(self, usual: T) -> T {
        match self {
            Field::Usual => usual,
            Field::Raw(value) => value,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Packet {
    src_cid: Field<u64>,
    dst_cid: Field<u64>,
    src_port: u32,
    dst_port: Field<u32>,
    len: Field<u32>,
    type_: Field<u16>,
    op: u8,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    payload: Vec<u8>,
    /// Header and payload in one buffer, or split into two.
    split: bool,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Queue {
        queue: u8,
        op: QueueOp,
    },
    Write {
        addr: Addr,
        bytes: Vec<u8>,
    },
    /// A tx packet with a well-formed header layout (and any field values).
    TxPacket {
        first: u16,
        addr: Addr,
        packet: Packet,
    },
    Kick(u8),
    Run,
    /// A host process connects to the device's socket and asks for a guest port.
    HostConnect {
        port: Field<u32>,
    },
    HostSend {
        conn: u8,
        bytes: Vec<u8>,
    },
    HostClose {
        conn: u8,
    },
    /// The host service accepts a guest-initiated connection and answers.
    ServiceAccept {
        reply: Vec<u8>,
    },
    TransportReset,
}

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("agentvm-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tx_packet(driver: &Driver, first: u16, addr: Addr, p: &Packet) {
    let op = match p.op % 9 {
        0 => u16::from(p.op),
        wire => u16::from(wire),
    };
    let header = Header {
        src_cid: p.src_cid.or(GUEST_CID),
        dst_cid: p.dst_cid.or(HOST_CID),
        src_port: p.src_port,
        dst_port: p.dst_port.or(LISTEN_PORT),
        len: p.len.or(p.payload.len() as u32),
        type_: p.type_.or(1),
        op,
        flags: p.flags,
        buf_alloc: p.buf_alloc,
        fwd_cnt: p.fwd_cnt,
    };
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(&p.payload);
    if !p.split {
        driver.readable_chain(TX_QUEUE as u8, first, addr, &bytes);
        return;
    }
    let base = addr.resolve();
    driver.write(Addr::Raw(base), &bytes);
    driver.apply(
        TX_QUEUE as u8,
        &QueueOp::Chain {
            first,
            buffers: vec![
                Buffer {
                    addr: Addr::Raw(base),
                    len: Len::Raw(HDR_LEN as u32),
                    flags: 0,
                },
                Buffer {
                    addr: Addr::Raw(base.wrapping_add(HDR_LEN as u64)),
                    len: Len::Raw(p.payload.len() as u32),
                    flags: 0,
                },
            ],
        },
    );
}

/// Reads whatever a nonblocking socket holds now (the host side keeps draining so the device's
/// sockets never fill up and the run stays short).
fn drain(stream: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..64 {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

fuzz_target!(|input: Input| {
    let scratch = Scratch::new();
    let uds = scratch.0.join("v.sock");
    let service_path = PathBuf::from(format!("{}_{LISTEN_PORT}", uds.display()));
    let service = UnixListener::bind(&service_path).expect("service socket");
    service.set_nonblocking(true).expect("nonblocking");

    let mem = guest_memory();
    let sizes: Vec<u16> = input
        .sizes
        .iter()
        .map(|&s| queue_size(s, QUEUE_SIZE))
        .collect();
    let driver = Driver::new(&mem, &sizes);
    let device = Arc::new(Mutex::new(
        Vsock::new(GUEST_CID, &uds).expect("vsock device"),
    ));
    let mut manager = Manager::new().expect("event manager");
    manager.add_subscriber(device.clone());
    device
        .lock()
        .unwrap()
        .activate(
            mem.clone(),
            driver.activated_queues(),
            driver.interrupt.clone(),
        )
        .expect("activation");
    run_until_idle(&mut manager);

    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut accepted: Vec<UnixStream> = Vec::new();
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::Queue { queue, op } => driver.apply(queue, &op),
            Op::Write { addr, bytes } => driver.write(addr, &bytes),
            Op::TxPacket {
                first,
                addr,
                packet,
            } => tx_packet(&driver, first, addr, &packet),
            Op::Kick(queue) => driver.kick(queue),
            Op::Run => run_until_idle(&mut manager),
            Op::HostConnect { port } => {
                if hosts.len() < 8 {
                    if let Ok(mut stream) = UnixStream::connect(&uds) {
                        let _ = stream.set_nonblocking(true);
                        let _ = write!(stream, "CONNECT {}\n", port.or(1024));
                        hosts.push(stream);
                    }
                }
            }
            Op::HostSend { conn, bytes } => {
                let count = hosts.len().max(1);
                if let Some(stream) = hosts.get_mut(usize::from(conn) % count) {
                    let _ = stream.write(&bytes);
                }
            }
            Op::HostClose { conn } => {
                if !hosts.is_empty() {
                    hosts.swap_remove(usize::from(conn) % hosts.len());
                }
            }
            Op::ServiceAccept { reply } => {
                if let Ok((mut stream, _)) = service.accept() {
                    let _ = stream.set_nonblocking(true);
                    let _ = stream.write(&reply);
                    accepted.push(stream);
                }
            }
            Op::TransportReset => device.lock().unwrap().transport_reset(),
        }
        for stream in hosts.iter_mut().chain(accepted.iter_mut()) {
            drain(stream);
        }
    }
    run_until_idle(&mut manager);
    drop(hosts);
    drop(accepted);
    run_until_idle(&mut manager);
});

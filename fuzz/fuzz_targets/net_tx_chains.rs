//! virtio-net driven by a hostile guest: arbitrary descriptor chains, avail ring entries and
//! guest memory contents on the tx and rx queues (bad virtio-net headers, short chains, loops,
//! buffers outside RAM, frames of any length), any acked feature set and MTU, interleaved with
//! frames from the egress filter's end of the frame socket. The device must never panic, spin,
//! or put on the wire a message that breaks the frame fd contract (ETH_HLEN..=MAX_FRAME_LEN).
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use agentvm_fuzz::hostile_guest::{
    guest_memory, queue_size, run_until_idle, Addr, Buffer, Driver, Len, Manager, QueueOp,
};
use arbitrary::Arbitrary;
use devices::virtio::net::{
    frame_channel, Net, ETH_HLEN, MAX_FRAME_LEN, MIN_MTU, NET_HDR_LEN, QUEUE_SIZE, TX_QUEUE,
};
use devices::virtio::VirtioDevice;
use event_manager::SubscriberOps;
use libfuzzer_sys::fuzz_target;

const MAC: [u8; 6] = [0x02, 0x61, 0x67, 0x00, 0x00, 0x0f];

#[derive(Arbitrary, Debug)]
struct Input {
    /// Queue sizes the driver picks (rx, tx).
    sizes: [u8; 2],
    /// Features the driver acks (the device keeps the ones it offers).
    features: u64,
    mtu: u16,
    ops: Vec<Op>,
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
    /// A tx frame behind a virtio-net header (any header bytes), in one buffer or split after
    /// the header.
    TxFrame {
        first: u16,
        addr: Addr,
        header: [u8; NET_HDR_LEN],
        frame: Vec<u8>,
        split: bool,
    },
    Kick(u8),
    Run,
    /// The egress filter sends a frame to the guest.
    PeerSend(Vec<u8>),
    /// The egress filter goes away.
    PeerClose,
}

fn tx_frame(driver: &Driver, first: u16, addr: Addr, header: &[u8], frame: &[u8], split: bool) {
    let base = addr.resolve();
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(frame);
    driver.write(Addr::Raw(base), &bytes);
    let buffers = if split {
        vec![
            Buffer {
                addr: Addr::Raw(base),
                len: Len::Raw(NET_HDR_LEN as u32),
                flags: 0,
            },
            Buffer {
                addr: Addr::Raw(base.wrapping_add(NET_HDR_LEN as u64)),
                len: Len::Raw(frame.len() as u32),
                flags: 0,
            },
        ]
    } else {
        vec![Buffer {
            addr: Addr::Raw(base),
            len: Len::Raw(bytes.len() as u32),
            flags: 0,
        }]
    };
    driver.apply(TX_QUEUE as u8, &QueueOp::Chain { first, buffers });
}

/// Reads every frame the device put on the wire and checks the frame fd contract.
fn drain(peer: &mut Option<UnixStream>) {
    let Some(file) = peer else {
        return;
    };
    let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return,
            Ok(len) => assert!(
                (ETH_HLEN..=MAX_FRAME_LEN).contains(&len),
                "the device sent a {len}-byte frame (must be {ETH_HLEN}..={MAX_FRAME_LEN})"
            ),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => panic!("reading the frame socket: {e}"),
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = guest_memory();
    let sizes: Vec<u16> = input
        .sizes
        .iter()
        .map(|&s| queue_size(s, QUEUE_SIZE))
        .collect();
    let driver = Driver::new(&mem, &sizes);
    let (device_end, peer_end) = frame_channel().expect("socketpair");
    // A UnixStream only for its read/write/set_nonblocking on the SOCK_SEQPACKET end: each read
    // and write is still one whole message.
    let peer_end = UnixStream::from(peer_end);
    peer_end.set_nonblocking(true).expect("nonblocking peer");
    let mut peer = Some(peer_end);
    let device = Arc::new(Mutex::new(
        Net::new(MAC, input.mtu.max(MIN_MTU), device_end).expect("net device"),
    ));
    let mut manager = Manager::new().expect("event manager");
    manager.add_subscriber(device.clone());
    {
        let mut net = device.lock().unwrap();
        net.set_acked_features(input.features);
        net.activate(
            mem.clone(),
            driver.activated_queues(),
            driver.interrupt.clone(),
        )
        .expect("activation");
    }
    run_until_idle(&mut manager);

    for op in input.ops.into_iter().take(256) {
        match op {
            Op::Queue { queue, op } => driver.apply(queue, &op),
            Op::Write { addr, bytes } => driver.write(addr, &bytes),
            Op::TxFrame {
                first,
                addr,
                header,
                frame,
                split,
            } => tx_frame(&driver, first, addr, &header, &frame, split),
            Op::Kick(queue) => driver.kick(queue),
            Op::Run => run_until_idle(&mut manager),
            Op::PeerSend(frame) => {
                // The filter never sends an empty message (it would read as a hang-up).
                if let Some(file) = peer.as_mut().filter(|_| !frame.is_empty()) {
                    // A full socket refuses the frame, as it would the filter's.
                    let _ = file.write(&frame);
                }
            }
            Op::PeerClose => peer = None,
        }
        drain(&mut peer);
    }
    run_until_idle(&mut manager);
    drain(&mut peer);
});

//! Phase 3 for net: a burst of frames the egress filter must judge and deny (TCP SYNs to
//! loopback, link-local metadata, the gateway's SSH port, private ranges and the host addresses
//! the test passes in `probe.targets=`; UDP to ports other than DNS) and garbage the device must
//! drop and count (runts, oversized chains, wrong-direction and empty chains, random bytes).

use super::frames::{self, Dest, MAX_BUILT};
use super::virtq::*;
use super::{Target, XorShift};
use crate::hw::{ram_fill, ram_write};
use crate::serial::marker_line;

const RX: u32 = 0;
const TX: u32 = 1;
/// struct virtio_net_hdr_v1, all zero on tx (no offloads).
const NET_HDR_LEN: u32 = 12;
const RX_BUFFER: u32 = 2048;
const SYN_ROUNDS: u16 = 4;
const GARBAGE_EACH: u16 = 8;
const MAX_TARGETS: usize = 16;

/// Destinations every run attacks: loopback, metadata services (AWS/GCP/Azure at
/// 169.254.169.254, Alibaba at 100.100.100.200), the gateway's SSH port, the DNS address on TCP,
/// private ranges, the unspecified and broadcast addresses.
const FIXED: [Dest; 11] = [
    Dest {
        ip: [127, 0, 0, 1],
        port: 22,
    },
    Dest {
        ip: [127, 0, 0, 1],
        port: 80,
    },
    Dest {
        ip: [169, 254, 169, 254],
        port: 80,
    },
    Dest {
        ip: [100, 100, 100, 200],
        port: 80,
    },
    Dest {
        ip: [10, 0, 2, 2],
        port: 22,
    },
    Dest {
        ip: [10, 0, 2, 3],
        port: 80,
    },
    Dest {
        ip: [192, 168, 0, 1],
        port: 80,
    },
    Dest {
        ip: [172, 16, 0, 1],
        port: 443,
    },
    Dest {
        ip: [10, 0, 0, 1],
        port: 22,
    },
    Dest {
        ip: [0, 0, 0, 0],
        port: 80,
    },
    Dest {
        ip: [255, 255, 255, 255],
        port: 80,
    },
];

const UDP: [Dest; 3] = [
    Dest {
        ip: [169, 254, 169, 254],
        port: 53,
    },
    Dest {
        ip: [127, 0, 0, 1],
        port: 53,
    },
    Dest {
        ip: [10, 0, 2, 2],
        port: 123,
    },
];

struct Flood<'a> {
    t: &'a Target,
    tx: Ring,
    rx: Ring,
    /// Frames queued since the last notification.
    batch: u16,
    tx_used: u32,
}

pub fn flood(t: &Target, cmdline: &[u8]) {
    let dev = &t.dev;
    if !dev.negotiate() {
        marker_line("hostile flood done dev=net error=features-refused");
        return;
    }
    let mut f = Flood {
        t,
        rx: Ring::new(t.ring_base(RX), dev.queue_max(RX)),
        tx: Ring::new(t.ring_base(TX), dev.queue_max(TX)),
        batch: 0,
        tx_used: 0,
    };
    dev.setup_queue(RX, &f.rx);
    dev.setup_queue(TX, &f.tx);
    dev.driver_ok();
    for i in 0..f.rx.size {
        f.rx.set_desc(i, f.rx_buf(i), RX_BUFFER, DESC_F_WRITE, 0);
        f.rx.publish(i);
    }
    dev.notify(RX);

    let mut targets = [Dest {
        ip: [0; 4],
        port: 0,
    }; MAX_TARGETS];
    let extra = cmdline_targets(cmdline, &mut targets);
    let mut frame = [0u8; MAX_BUILT];
    let mut syn = 0u32;
    for round in 0..SYN_ROUNDS {
        for (i, &to) in FIXED.iter().chain(&targets[..extra]).enumerate() {
            let len = frames::tcp_syn(&mut frame, 40_000 + round * 100 + i as u16, to);
            f.send(&frame[..len]);
            syn += 1;
        }
    }
    let mut udp = 0u32;
    for (i, &to) in UDP.iter().enumerate() {
        let len = frames::udp(&mut frame, 41_000 + i as u16, to);
        f.send(&frame[..len]);
        udp += 1;
    }
    let garbage = f.garbage();
    f.flush();
    // Answers (RSTs, ICMP) from the filter's stack, if any arrived by now.
    let rx_frames = f.rx.used_idx();
    marker_line(format_args!(
        "hostile flood done dev=net syn={syn} udp={udp} garbage={garbage} targets={} \
         tx_used={} rx_frames={rx_frames} needs_reset={}",
        FIXED.len() + extra,
        f.tx_used,
        if dev.needs_reset() { "yes" } else { "no" },
    ));
    dev.reset();
}

/// `probe.targets=a.b.c.d:port,...` (the last such argument wins).
fn cmdline_targets(cmdline: &[u8], out: &mut [Dest; MAX_TARGETS]) -> usize {
    let Some(list) = cmdline
        .split(|&b| b == b' ')
        .filter_map(|arg| arg.strip_prefix(b"probe.targets="))
        .next_back()
    else {
        return 0;
    };
    let mut n = 0;
    for dest in list.split(|&b| b == b',').filter_map(frames::parse_dest) {
        if n == MAX_TARGETS {
            break;
        }
        out[n] = dest;
        n += 1;
    }
    n
}

impl Flood<'_> {
    fn rx_buf(&self, i: u16) -> u64 {
        self.t.data() + 0x10_0000 + u64::from(i) * u64::from(RX_BUFFER)
    }

    /// The tx slot's buffer: room for the header and a full-sized frame (the oversized chain
    /// points past it on purpose).
    fn tx_buf(&self, slot: u16) -> u64 {
        self.t.data() + u64::from(slot) * 0x800
    }

    /// Queues one chain of a single descriptor; notifies when the ring is full.
    fn queue_desc(&mut self, fill: impl FnOnce(u64), len: u32, flags: u16) {
        let slot = self.tx.next_avail % self.tx.size;
        let addr = self.tx_buf(slot);
        fill(addr);
        self.tx.set_desc(slot, addr, len, flags, 0);
        self.tx.publish(slot);
        self.batch += 1;
        if self.batch == self.tx.size {
            self.flush();
        }
    }

    fn send(&mut self, frame: &[u8]) {
        let len = NET_HDR_LEN + frame.len() as u32;
        self.queue_desc(
            |addr| {
                ram_fill(addr, NET_HDR_LEN as usize, 0);
                ram_write(addr + u64::from(NET_HDR_LEN), frame);
            },
            len,
            0,
        );
    }

    fn flush(&mut self) {
        if self.batch == 0 {
            return;
        }
        let start = self.tx.used_idx();
        self.t.dev.notify(TX);
        let end = wait_used(&self.t.dev, &self.tx, self.tx.next_avail);
        self.tx_used += u32::from(end.wrapping_sub(start));
        self.batch = 0;
    }

    /// Runts, random bytes, an oversized chain, device-writable and empty chains; returns how
    /// many chains it queued.
    fn garbage(&mut self) -> u32 {
        let mut rng = XorShift::new(0x0005_eed0_f9a7_ba9e);
        let mut sent = 0;
        for _ in 0..GARBAGE_EACH {
            // Shorter than the virtio-net header plus an Ethernet header.
            self.queue_desc(|addr| ram_fill(addr, 20, 0xaa), 20, 0);
            // A full-length frame of random bytes.
            let mut random = [0u8; 1500];
            for b in random.iter_mut() {
                *b = rng.next() as u8;
            }
            self.send(&random);
            // Longer than any frame the device carries (the bytes are whatever RAM holds).
            self.queue_desc(|_| {}, 0x2_0000, 0);
            // Device-writable on the tx queue.
            self.queue_desc(|_| {}, 64, DESC_F_WRITE);
            // Zero bytes.
            self.queue_desc(|_| {}, 0, 0);
            sent += 5;
        }
        sent
    }
}

//! Phase 3 for vsock: a flood of well-formed connection requests (OP_REQUEST) to host ports
//! nobody listens on, then of packets with bad headers. The device must answer what deserves an
//! answer with OP_RST, within bounded memory, and keep serving.

use super::virtq::*;
use super::Target;
use crate::hw::{ram_read, ram_write};
use crate::serial::marker_line;

const HDR_LEN: usize = 44;
const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RST: u16 = 3;
const OP_RW: u16 = 5;
const RX: u32 = 0;
const TX: u32 = 1;
const EVENT: u32 = 2;
/// Request rounds of one full tx ring each.
const REQUEST_ROUNDS: u32 = 4;
/// Rounds of one full tx ring of bad packets.
const BAD_ROUNDS: u32 = 2;
/// No host listener has these ports (the host side listens on `<uds>_<port>` paths the test
/// never creates).
const FIRST_DEAD_PORT: u32 = 50_000;
const RX_BUFFER: u32 = 256;

#[derive(Clone, Copy)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
}

impl Header {
    fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[36..40].copy_from_slice(&(64u32 << 10).to_le_bytes()); // buf_alloc
        b
    }
}

struct Flood<'a> {
    t: &'a Target,
    tx: Ring,
    rx: Ring,
    rx_seen: u16,
    rx_rst: u32,
    rx_other: u32,
    tx_used: u32,
}

pub fn flood(t: &Target) {
    let dev = &t.dev;
    if !dev.negotiate() {
        marker_line("hostile flood done dev=vsock error=features-refused");
        return;
    }
    let guest_cid = dev.config_u64(0);
    let mut f = Flood {
        t,
        tx: Ring::new(t.ring_base(TX), dev.queue_max(TX)),
        rx: Ring::new(t.ring_base(RX), dev.queue_max(RX)),
        rx_seen: 0,
        rx_rst: 0,
        rx_other: 0,
        tx_used: 0,
    };
    let event = Ring::new(t.ring_base(EVENT), dev.queue_max(EVENT).min(8));
    dev.setup_queue(RX, &f.rx);
    dev.setup_queue(TX, &f.tx);
    dev.setup_queue(EVENT, &event);
    dev.driver_ok();
    for i in 0..f.rx.size {
        f.rx.set_desc(i, f.rx_buf(i), RX_BUFFER, DESC_F_WRITE, 0);
        f.rx.publish(i);
    }
    dev.notify(RX);

    let request = Header {
        src_cid: guest_cid,
        dst_cid: HOST_CID,
        src_port: 0,
        dst_port: 0,
        len: 0,
        type_: TYPE_STREAM,
        op: OP_REQUEST,
    };
    let mut requests = 0u32;
    for round in 0..REQUEST_ROUNDS {
        f.round(|i| {
            let n = round * 1000 + u32::from(i);
            let hdr = Header {
                src_port: 40_000 + n,
                dst_port: FIRST_DEAD_PORT + n,
                ..request
            };
            (hdr.bytes(), HDR_LEN as u32)
        });
        requests += u32::from(f.tx.size);
    }
    let mut bad = 0u32;
    for _ in 0..BAD_ROUNDS {
        f.round(|i| bad_packet(i, request));
        bad += u32::from(f.tx.size);
    }
    let needs_reset = dev.needs_reset();
    f.collect_rx();
    marker_line(format_args!(
        "hostile flood done dev=vsock guest_cid={guest_cid} requests={requests} bad={bad} \
         tx_used={} rx_rst={} rx_other={} needs_reset={}",
        f.tx_used,
        f.rx_rst,
        f.rx_other,
        if needs_reset { "yes" } else { "no" },
    ));
    dev.reset();
}

/// Bad packet number `i` of a round: eight kinds in turn.
fn bad_packet(i: u16, good: Header) -> ([u8; HDR_LEN], u32) {
    let port = 60_000 + u32::from(i);
    let base = Header {
        src_port: port,
        dst_port: port,
        ..good
    };
    let (hdr, chain_len) = match i % 8 {
        // Announces payload the 44-byte chain does not hold.
        0 => (
            Header {
                op: OP_RW,
                len: 4096,
                ..base
            },
            HDR_LEN as u32,
        ),
        1 => (Header { op: 99, ..base }, HDR_LEN as u32),
        2 => (Header { type_: 7, ..base }, HDR_LEN as u32),
        // Spoofs the host's CID as its source.
        3 => (
            Header {
                src_cid: HOST_CID,
                ..base
            },
            HDR_LEN as u32,
        ),
        4 => (
            Header {
                src_cid: u64::MAX,
                ..base
            },
            HDR_LEN as u32,
        ),
        // Addressed to the guest itself.
        5 => (
            Header {
                dst_cid: good.src_cid,
                ..base
            },
            HDR_LEN as u32,
        ),
        // Beyond the largest payload the device takes.
        6 => (
            Header {
                op: OP_RW,
                len: 0x1000_0000,
                ..base
            },
            HDR_LEN as u32,
        ),
        // Shorter than a header.
        _ => (base, 20),
    };
    (hdr.bytes(), chain_len)
}

impl Flood<'_> {
    fn tx_buf(&self, i: u16) -> u64 {
        self.t.data() + u64::from(i) * 64
    }

    fn rx_buf(&self, i: u16) -> u64 {
        self.t.data() + 0x10_0000 + u64::from(i) * u64::from(RX_BUFFER)
    }

    /// Fills the whole tx ring with `packet(i)` (header bytes, chain length), publishes it,
    /// notifies, waits for the device to return it, then takes the rx packets.
    fn round(&mut self, packet: impl Fn(u16) -> ([u8; HDR_LEN], u32)) {
        let start = self.tx.used_idx();
        for i in 0..self.tx.size {
            let (bytes, len) = packet(i);
            ram_write(self.tx_buf(i), &bytes);
            self.tx.set_desc(i, self.tx_buf(i), len, 0, 0);
            self.tx.publish(i);
        }
        self.t.dev.notify(TX);
        let end = wait_used(&self.t.dev, &self.tx, self.tx.next_avail);
        self.tx_used += u32::from(end.wrapping_sub(start));
        self.collect_rx();
    }

    /// Counts the packets the device put in rx buffers and gives the buffers back.
    fn collect_rx(&mut self) {
        let used = self.rx.used_idx();
        let mut reposted = false;
        while self.rx_seen != used {
            let (id, _len) = self.rx.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let Ok(id) = u16::try_from(id) else { continue };
            if id >= self.rx.size {
                continue;
            }
            let mut hdr = [0u8; HDR_LEN];
            ram_read(self.rx_buf(id), &mut hdr);
            if u16::from_le_bytes([hdr[30], hdr[31]]) == OP_RST {
                self.rx_rst += 1;
            } else {
                self.rx_other += 1;
            }
            self.rx.publish(id);
            reposted = true;
        }
        if reposted {
            self.t.dev.notify(RX);
        }
    }
}

//! The `hostile` mode: the probe acts as the most malicious driver possible (it has no driver in
//! the way, full control of every virtio-mmio register and of guest RAM) against every
//! virtio-mmio device the VMM gave it, in three phases per device:
//!
//! 1. `registers` (registers.rs): garbage in every register, out-of-range selectors, bad queue
//!    sizes and addresses, status bits out of order, odd widths and offsets;
//! 2. `chains` (chains.rs): with the device set up properly, broken descriptor chains and
//!    available rings, one attack at a time, each followed by a notification;
//! 3. `flood` (flood_vsock.rs, flood_net.rs): many well-formed and malformed vsock packets,
//!    and a burst of Ethernet frames to addresses the egress filter must deny.
//!
//! Every phase prints `PROBE hostile <phase> done dev=<name> ...` with what it saw, and each
//! chain attack `PROBE hostile chain dev=<name> queue=<q> attack=<name> outcome=<o>` (outcome:
//! `used`, `needs-reset` or `quiet`, see virtq.rs). The caller prints `PROBE hostile end`.
//!
//! Devices come from the command line's `virtio_mmio.device=4K@0x<base>:<irq>` entries, or, if
//! there are none, from the slots at 0xd000_0000 that answer with the virtio magic.
//! `probe.targets=<ip>:<port>,...` adds TCP destinations for the net flood (the test passes the
//! host's own addresses and a port it listens on).

mod chains;
mod flood_net;
mod flood_vsock;
mod frames;
mod registers;
mod virtq;

use crate::serial::{check_line, marker_line};
use crate::zeropage::{ZeroPage, E820_RAM};
use virtq::{Dev, ID_NET, ID_VSOCK, REG_DEVICE_ID, REG_MAGIC, VIRTIO_MAGIC};

/// First virtio-mmio window and the window size (arch/src/layout.rs).
const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Slots scanned when the command line declares no device.
const SCAN_SLOTS: u64 = 8;
const MAX_DEVICES: usize = 8;
/// The rings and buffers of device `i` live at `AREA_START + i * AREA_SIZE`: above the probe's
/// image, stack and boot structures (all below 16 MiB).
const AREA_START: u64 = 32 << 20;
const AREA_SIZE: u64 = 4 << 20;
/// Within an area: queue `q`'s ring at `q * QUEUE_STRIDE`, data buffers from `DATA_OFFSET`.
pub const QUEUE_STRIDE: u64 = 0x4000;
pub const DATA_OFFSET: u64 = 1 << 20;

/// One device under attack and the RAM the probe uses for it.
#[derive(Clone, Copy)]
pub struct Target {
    pub dev: Dev,
    /// Start of this device's area (rings, then data from `DATA_OFFSET`).
    pub area: u64,
    /// End of the RAM below 4 GiB (the highest e820 RAM entry's end): "outside RAM" starts here.
    pub ram_end: u64,
}

impl Target {
    pub fn ring_base(&self, queue: u32) -> u64 {
        self.area + u64::from(queue) * QUEUE_STRIDE
    }

    pub fn data(&self) -> u64 {
        self.area + DATA_OFFSET
    }

    pub fn data_end(&self) -> u64 {
        self.area + AREA_SIZE
    }
}

pub fn hostile(zp: Option<ZeroPage>, cmdline: &[u8]) {
    let Some(ram_end) = zp.and_then(ram_end_below_4g) else {
        check_line("hostile", false, "no zero page or no RAM in its e820 map");
        return;
    };
    let mut devices = [Dev { base: 0, id: 0 }; MAX_DEVICES];
    let found = find_devices(cmdline, &mut devices);
    let devices = &devices[..found];
    let needed = AREA_START + found as u64 * AREA_SIZE;
    if found == 0 || needed > ram_end {
        check_line(
            "hostile",
            false,
            format_args!("devices={found} ram_end={ram_end:#x} needs_ram_end={needed:#x}"),
        );
        return;
    }
    marker_line(format_args!(
        "hostile begin devices={found} ram_end={ram_end:#x}"
    ));
    let targets = devices.iter().enumerate().map(|(i, &dev)| Target {
        dev,
        area: AREA_START + i as u64 * AREA_SIZE,
        ram_end,
    });
    for target in targets.clone() {
        registers::attack(&target);
    }
    for target in targets.clone() {
        chains::attack(&target);
    }
    for target in targets {
        match target.dev.id {
            ID_VSOCK => flood_vsock::flood(&target),
            ID_NET => flood_net::flood(&target, cmdline),
            _ => {}
        }
        // Leave every device reset: nothing the attacks set up stays live.
        target.dev.reset();
    }
}

fn ram_end_below_4g(zp: ZeroPage) -> Option<u64> {
    zp.e820()
        .entries()
        .iter()
        .filter(|e| e.kind == E820_RAM && e.addr < crate::hw::IDENTITY_MAP_END)
        .map(|e| e.addr.saturating_add(e.size))
        .max()
}

/// Fills `out` with the devices the command line declares, or else the slots that answer.
fn find_devices(cmdline: &[u8], out: &mut [Dev; MAX_DEVICES]) -> usize {
    let mut n = 0;
    let declared = cmdline
        .split(|&b| b == b' ')
        .filter_map(|arg| arg.strip_prefix(b"virtio_mmio.device=4K@0x"))
        .filter_map(|rest| parse_hex(rest.split(|&b| b == b':').next()?));
    for base in declared {
        if n == MAX_DEVICES {
            break;
        }
        if let Some(dev) = probe_slot(base) {
            out[n] = dev;
            n += 1;
        }
    }
    if n > 0 {
        return n;
    }
    for slot in 0..SCAN_SLOTS {
        if let Some(dev) = probe_slot(VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE) {
            out[n] = dev;
            n += 1;
        }
    }
    n
}

/// The device at `base`, if the window answers with the virtio magic and a device ID. Only
/// windows inside the virtio-mmio area are touched, whatever the command line says.
fn probe_slot(base: u64) -> Option<Dev> {
    let in_area = (VIRTIO_MMIO_BASE..VIRTIO_MMIO_BASE + SCAN_SLOTS * VIRTIO_MMIO_SIZE)
        .contains(&base)
        && base.is_multiple_of(VIRTIO_MMIO_SIZE);
    if !in_area {
        return None;
    }
    let dev = Dev { base, id: 0 };
    if dev.read(REG_MAGIC) != VIRTIO_MAGIC {
        return None;
    }
    let id = dev.read(REG_DEVICE_ID);
    (id != 0).then_some(Dev { base, id })
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = (d as char).to_digit(16)?;
        Some(acc << 4 | u64::from(v))
    })
}

/// A deterministic xorshift64 generator: a failing run replays exactly.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

//! Just enough of a virtio-mmio driver (virtio 1.2 sections 2.7 and 4.2.2) for the hostile mode
//! to bring a device up, lay out split virtqueues in guest RAM and write whatever it likes into
//! them. No interrupts: the probe polls the used rings and the Status register.

use crate::hw::{mmio_read32, mmio_write32, ram_read, ram_write};

pub const REG_MAGIC: u64 = 0x000;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
pub const REG_QUEUE_USED_LOW: u64 = 0x0a0;
pub const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
pub const REG_CONFIG: u64 = 0x100;

pub const STATUS_ACK: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
/// Size of one descriptor (and the alignment of descriptor tables).
pub const DESC_SIZE: u64 = 16;

pub const VIRTIO_MAGIC: u32 = 0x7472_6976;
pub const ID_NET: u32 = 1;
pub const ID_RNG: u32 = 4;
pub const ID_VSOCK: u32 = 19;
/// Bit 0 of feature word 1.
const FEATURE_VERSION_1_WORD1: u32 = 1;
/// No device of ours has more queues than this.
pub const MAX_QUEUES: u32 = 8;

/// One virtio-mmio device window.
#[derive(Clone, Copy)]
pub struct Dev {
    pub base: u64,
    pub id: u32,
}

impl Dev {
    pub fn name(&self) -> &'static str {
        match self.id {
            ID_NET => "net",
            ID_RNG => "rng",
            ID_VSOCK => "vsock",
            _ => "other",
        }
    }

    pub fn read(&self, offset: u64) -> u32 {
        mmio_read32(self.base + offset)
    }

    pub fn write(&self, offset: u64, value: u32) {
        mmio_write32(self.base + offset, value)
    }

    pub fn status(&self) -> u32 {
        self.read(REG_STATUS)
    }

    pub fn needs_reset(&self) -> bool {
        self.status() & STATUS_NEEDS_RESET != 0
    }

    pub fn reset(&self) {
        self.write(REG_STATUS, 0);
    }

    /// Queues the device has: QueueNumMax reads 0 past the last one.
    pub fn queue_count(&self) -> u32 {
        (0..MAX_QUEUES)
            .take_while(|&q| {
                self.write(REG_QUEUE_SEL, q);
                self.read(REG_QUEUE_NUM_MAX) != 0
            })
            .count() as u32
    }

    pub fn queue_max(&self, queue: u32) -> u16 {
        self.write(REG_QUEUE_SEL, queue);
        self.read(REG_QUEUE_NUM_MAX) as u16
    }

    /// Reset, ACKNOWLEDGE, DRIVER, accept VIRTIO_F_VERSION_1 only, FEATURES_OK. Whether the
    /// device kept FEATURES_OK.
    pub fn negotiate(&self) -> bool {
        self.reset();
        self.write(REG_STATUS, STATUS_ACK);
        self.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, FEATURE_VERSION_1_WORD1);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, 0);
        self.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        self.status() & STATUS_FEATURES_OK != 0
    }

    /// Programs queue `queue` with `ring`'s size and addresses and marks it ready.
    pub fn setup_queue(&self, queue: u32, ring: &Ring) {
        self.write(REG_QUEUE_SEL, queue);
        self.write(REG_QUEUE_NUM, u32::from(ring.size));
        self.write_addr(REG_QUEUE_DESC_LOW, ring.desc);
        self.write_addr(REG_QUEUE_AVAIL_LOW, ring.avail);
        self.write_addr(REG_QUEUE_USED_LOW, ring.used);
        self.write(REG_QUEUE_READY, 1);
    }

    /// Writes a 64-bit address to a LOW/HIGH register pair.
    pub fn write_addr(&self, low: u64, addr: u64) {
        self.write(low, addr as u32);
        self.write(low + 4, (addr >> 32) as u32);
    }

    pub fn driver_ok(&self) {
        self.write(
            REG_STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    pub fn notify(&self, queue: u32) {
        self.write(REG_QUEUE_NOTIFY, queue);
    }

    /// Reads the config space as 32-bit words (the device's own width rules are the attack
    /// phase's business).
    pub fn config_u64(&self, offset: u64) -> u64 {
        let low = u64::from(self.read(REG_CONFIG + offset));
        let high = u64::from(self.read(REG_CONFIG + offset + 4));
        low | (high << 32)
    }
}

/// A split virtqueue laid out at `base`: descriptors, then the available ring at +4 KiB, the
/// used ring at +8 KiB (room for the largest queue our devices offer, 256).
#[derive(Clone, Copy)]
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    /// The driver's next available index.
    pub next_avail: u16,
}

/// Bytes one ring takes in the layout above.
pub const RING_BYTES: u64 = 0x3000;

impl Ring {
    /// A zeroed ring of `size` entries at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        crate::hw::ram_fill(base, RING_BYTES as usize, 0);
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            next_avail: 0,
        }
    }

    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(
            self.desc + u64::from(index) * DESC_SIZE,
            addr,
            len,
            flags,
            next,
        );
    }

    /// Puts `head` in the next available slot and publishes it (avail idx + 1).
    pub fn publish(&mut self, head: u16) {
        self.put_avail_entry(head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail);
    }

    /// Writes `head` into the available slot `next_avail` would use, without publishing it.
    pub fn put_avail_entry(&self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        ram_write(self.avail + 4 + 2 * slot, &head.to_le_bytes());
    }

    /// Writes the available ring's idx field as is.
    pub fn set_avail_idx(&self, idx: u16) {
        ram_write(self.avail + 2, &idx.to_le_bytes());
    }

    pub fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        ram_read(self.used + 2, &mut b);
        u16::from_le_bytes(b)
    }

    /// The used element at ring position `pos`: (descriptor id, length written).
    pub fn used_elem(&self, pos: u16) -> (u32, u32) {
        let mut b = [0u8; 8];
        ram_read(self.used + 4 + 8 * u64::from(pos % self.size), &mut b);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }
}

/// Writes one descriptor at `at` (a descriptor table slot or an indirect table entry).
pub fn write_desc(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    ram_write(at, &d);
}

/// What the device did with what the probe last published.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It returned buffers (the used idx moved).
    Used,
    /// It set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// Nothing visible within the wait.
    Quiet,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Used => "used",
            Outcome::NeedsReset => "needs-reset",
            Outcome::Quiet => "quiet",
        }
    }
}

/// Spin iterations between two Status reads while waiting (each read is an MMIO exit).
const STATUS_POLL_EVERY: u32 = 1 << 12;
/// Status reads before a wait gives up: with the spins between them, some tens of
/// milliseconds, ample for the VMM's event loop to handle one notification.
const STATUS_POLLS: u32 = 400;

/// Waits until `ring`'s used idx differs from `before` or the device needs a reset. A device
/// that returned buffers and then gave up shows as `NeedsReset`.
pub fn settle(dev: &Dev, ring: &Ring, before: u16) -> Outcome {
    for _ in 0..STATUS_POLLS {
        for _ in 0..STATUS_POLL_EVERY {
            if ring.used_idx() != before {
                return if dev.needs_reset() {
                    Outcome::NeedsReset
                } else {
                    Outcome::Used
                };
            }
            core::hint::spin_loop();
        }
        if dev.needs_reset() {
            return Outcome::NeedsReset;
        }
    }
    Outcome::Quiet
}

/// Waits until `ring`'s used idx reaches `target` (or the device needs a reset, or time is up);
/// returns the used idx seen last.
pub fn wait_used(dev: &Dev, ring: &Ring, target: u16) -> u16 {
    for _ in 0..STATUS_POLLS * 4 {
        for _ in 0..STATUS_POLL_EVERY {
            if ring.used_idx() == target {
                return target;
            }
            core::hint::spin_loop();
        }
        if dev.needs_reset() {
            break;
        }
    }
    ring.used_idx()
}

//! Phase 1: garbage in the register file of one device. Each bad queue configuration must end
//! in DEVICE_NEEDS_RESET (or be refused outright), out-of-order status writes must not bring
//! the device up, and whatever the probe writes, the identity registers must stay as they were.

use super::virtq::*;
use super::{Target, XorShift};
use crate::hw::{mmio_read_sized, mmio_write_sized, ram_fill};
use crate::serial::marker_line;

/// Random register accesses at the end of the phase (each one an MMIO exit).
const RANDOM_ACCESSES: u32 = 3000;

/// Queue configurations the device must refuse.
#[derive(Clone, Copy)]
enum BadQueue {
    SizeZero,
    SizeAboveMax,
    SizeNotPowerOfTwo,
    RingsOutsideRam,
    RingsInMmioHole,
    RingsStraddleRamEnd,
    DescUnaligned,
    AvailUnaligned,
    UsedUnaligned,
}

const BAD_QUEUES: [BadQueue; 9] = [
    BadQueue::SizeZero,
    BadQueue::SizeAboveMax,
    BadQueue::SizeNotPowerOfTwo,
    BadQueue::RingsOutsideRam,
    BadQueue::RingsInMmioHole,
    BadQueue::RingsStraddleRamEnd,
    BadQueue::DescUnaligned,
    BadQueue::AvailUnaligned,
    BadQueue::UsedUnaligned,
];

pub fn attack(t: &Target) {
    let dev = &t.dev;
    let identity_before = identity(dev);
    let queues = dev.queue_count();
    odd_accesses(dev);
    let selector_ok = out_of_range_selector(dev, queues);
    let order_ignored = status_out_of_order(t, queues);
    let refused = BAD_QUEUES
        .iter()
        .filter(|&&bad| bad_queue_refused(t, queues, bad))
        .count();
    let overlapping = overlapping_rings(t, queues);
    random_traffic(t);
    dev.reset();
    let identity_kept = identity(dev) == identity_before;
    marker_line(format_args!(
        "hostile registers done dev={} queues={queues} bad_queue_configs={} refused={refused} \
         overlapping_rings={} out_of_order_status_ignored={} bad_selector_ignored={} \
         identity_kept={} status_after_reset={:#x}",
        dev.name(),
        BAD_QUEUES.len(),
        overlapping.name(),
        yes(order_ignored),
        yes(selector_ok),
        yes(identity_kept),
        dev.status(),
    ));
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn identity(dev: &Dev) -> [u32; 4] {
    [0x000, 0x004, 0x008, 0x00c].map(|r| dev.read(r))
}

/// Reads and writes of 1, 2 and 8 bytes, misaligned 4-byte ones, reads across the whole window
/// (config space included) and an access straddling the window's end.
fn odd_accesses(dev: &Dev) {
    let b = dev.base;
    for offset in 0..0x100u64 {
        mmio_read_sized(b + offset, 1);
    }
    for offset in (0..0x100u64).step_by(6) {
        mmio_read_sized(b + offset, 2);
        mmio_read_sized(b + offset + 1, 4);
        mmio_read_sized(b + offset, 8);
    }
    for offset in [
        0x100u64, 0x101, 0x107, 0x10f, 0x1ff, 0x800, 0xff8, 0xffc, 0xffe, 0xfff,
    ] {
        for width in [1u8, 2, 4, 8] {
            if offset + u64::from(width) <= 0x1000 || width == 4 {
                mmio_read_sized(b + offset, width);
            }
        }
    }
    let garbage = 0xdead_beef_cafe_f00du64;
    for (offset, width) in [
        (REG_STATUS, 1u8),
        (REG_STATUS, 2),
        (REG_STATUS + 1, 4),
        (REG_QUEUE_SEL, 8),
        (REG_QUEUE_DESC_LOW, 8),
        (REG_MAGIC, 4),
        (REG_DEVICE_ID, 4),
        (REG_QUEUE_NUM_MAX, 4),
        (0x0fc, 4),
        (0x0ff, 1),
    ] {
        mmio_write_sized(b + offset, width, garbage);
    }
    // Config space writes of every width, with and without DRIVER set.
    for round in 0..2 {
        if round == 1 {
            dev.write(REG_STATUS, STATUS_ACK);
            dev.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
        }
        for (offset, width) in [
            (0x100u64, 1u8),
            (0x101, 2),
            (0x104, 4),
            (0x108, 8),
            (0xff8, 8),
        ] {
            mmio_write_sized(b + offset, width, garbage);
        }
    }
    dev.reset();
}

/// Queue registers written with QueueSel past the last queue. Whether the device still reads
/// QueueNumMax 0 there and its real queues stayed untouched.
fn out_of_range_selector(dev: &Dev, queues: u32) -> bool {
    dev.negotiate();
    let mut ok = true;
    for sel in [queues, queues + 1, 0x8000, u32::MAX] {
        dev.write(REG_QUEUE_SEL, sel);
        dev.write(REG_QUEUE_NUM, 2);
        dev.write_addr(REG_QUEUE_DESC_LOW, 0x1000);
        dev.write(REG_QUEUE_READY, 1);
        dev.notify(sel);
        ok &= dev.read(REG_QUEUE_NUM_MAX) == 0 && dev.read(REG_QUEUE_READY) == 0;
    }
    for q in 0..queues {
        dev.write(REG_QUEUE_SEL, q);
        ok &= dev.read(REG_QUEUE_READY) == 0;
    }
    ok &= dev.status() & STATUS_NEEDS_RESET == 0;
    dev.reset();
    ok
}

/// DRIVER_OK before FEATURES_OK, FEATURES_OK before DRIVER, FEATURES_OK with features the
/// device never offered and without VERSION_1, bits cleared without a reset, DRIVER_OK with no
/// queue ready. Whether none of it brought the device up (DRIVER_OK never stuck without
/// NEEDS_RESET).
fn status_out_of_order(t: &Target, queues: u32) -> bool {
    let dev = &t.dev;
    let live =
        |dev: &Dev| dev.status() & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET) == STATUS_DRIVER_OK;
    let mut ignored = true;
    dev.reset();
    dev.write(REG_STATUS, STATUS_DRIVER_OK);
    ignored &= !live(dev);
    dev.write(REG_STATUS, STATUS_FEATURES_OK);
    dev.write(
        REG_STATUS,
        STATUS_ACK | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    ignored &= !live(dev);
    // Every feature bit of words 0-3 "accepted", then FEATURES_OK: the device keeps only what
    // it offers.
    dev.reset();
    dev.write(REG_STATUS, STATUS_ACK);
    dev.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
    for word in 0..4 {
        dev.write(REG_DRIVER_FEATURES_SEL, word);
        dev.write(REG_DRIVER_FEATURES, u32::MAX);
    }
    dev.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    // No queue is ready: DRIVER_OK must not activate anything.
    dev.driver_ok();
    ignored &= !live(dev);
    // Without VERSION_1 the device must refuse FEATURES_OK.
    dev.reset();
    dev.write(REG_STATUS, STATUS_ACK);
    dev.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
    dev.write(REG_DRIVER_FEATURES_SEL, 0);
    dev.write(REG_DRIVER_FEATURES, u32::MAX);
    dev.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    ignored &= dev.status() & STATUS_FEATURES_OK == 0;
    setup_all(t, queues);
    dev.driver_ok();
    ignored &= !live(dev);
    // Clearing bits without a reset, then FAILED, then more writes.
    dev.negotiate();
    dev.write(REG_STATUS, STATUS_ACK);
    dev.write(REG_STATUS, 0x80);
    dev.write(REG_STATUS, u32::MAX);
    setup_all(t, queues);
    dev.driver_ok();
    ignored &= !live(dev);
    dev.reset();
    ignored
}

/// Proper rings for every queue (sized 8, or the maximum if smaller).
fn setup_all(t: &Target, queues: u32) {
    for q in 0..queues {
        let size = t.dev.queue_max(q).min(8);
        let ring = Ring::new(t.ring_base(q), size);
        t.dev.setup_queue(q, &ring);
    }
}

/// Sets queue 0 up with one bad value (the others properly), then DRIVER_OK. Whether the device
/// showed NEEDS_RESET and did not come up.
fn bad_queue_refused(t: &Target, queues: u32, bad: BadQueue) -> bool {
    let dev = &t.dev;
    if !dev.negotiate() {
        return false;
    }
    setup_all(t, queues);
    let max = dev.queue_max(0);
    let good = Ring::new(t.ring_base(0), max.min(8));
    dev.write(REG_QUEUE_SEL, 0);
    match bad {
        BadQueue::SizeZero => dev.write(REG_QUEUE_NUM, 0),
        BadQueue::SizeAboveMax => dev.write(REG_QUEUE_NUM, u32::from(max) * 2),
        BadQueue::SizeNotPowerOfTwo => dev.write(REG_QUEUE_NUM, 3),
        BadQueue::RingsOutsideRam => {
            set_rings(dev, 1 << 40, (1 << 40) + 0x1000, (1 << 40) + 0x2000)
        }
        BadQueue::RingsInMmioHole => set_rings(dev, dev.base, dev.base + 0x100, dev.base + 0x200),
        BadQueue::RingsStraddleRamEnd => {
            let e = t.ram_end;
            set_rings(dev, e - 0x40, e - 0x20, e - 0x10)
        }
        BadQueue::DescUnaligned => set_rings(dev, good.desc + 8, good.avail, good.used),
        BadQueue::AvailUnaligned => set_rings(dev, good.desc, good.avail + 1, good.used),
        BadQueue::UsedUnaligned => set_rings(dev, good.desc, good.avail, good.used + 2),
    }
    dev.driver_ok();
    dev.notify(0);
    let status = dev.status();
    let refused = status & STATUS_NEEDS_RESET != 0;
    dev.reset();
    refused
}

fn set_rings(dev: &Dev, desc: u64, avail: u64, used: u64) {
    dev.write_addr(REG_QUEUE_DESC_LOW, desc);
    dev.write_addr(REG_QUEUE_AVAIL_LOW, avail);
    dev.write_addr(REG_QUEUE_USED_LOW, used);
}

/// Descriptor table, available and used ring of queue 0 at one address (the spec does not
/// forbid it, so the device may accept it), then a notification with an available entry that
/// the device's own used-ring writes overwrite.
fn overlapping_rings(t: &Target, queues: u32) -> Outcome {
    let dev = &t.dev;
    if !dev.negotiate() {
        return Outcome::Quiet;
    }
    setup_all(t, queues);
    let ring = Ring::new(t.ring_base(0), dev.queue_max(0).min(8));
    dev.write(REG_QUEUE_SEL, 0);
    set_rings(dev, ring.desc, ring.desc, ring.desc);
    dev.driver_ok();
    // avail idx (offset 2) = 1, ring[0] (offset 4) = head 0; descriptor 0 overlaps both.
    crate::hw::ram_write(ring.desc + 2, &1u16.to_le_bytes());
    dev.notify(0);
    let outcome = settle(dev, &ring, 1);
    dev.reset();
    outcome
}

/// Random accesses of random widths anywhere in the first 0x200 bytes. Queue addresses are
/// kept inside this device's area (zeroed first): a device activated by chance then reads and
/// writes only there, not the probe's own memory.
fn random_traffic(t: &Target) {
    ram_fill(t.area, (t.data_end() - t.area) as usize, 0);
    let dev = &t.dev;
    let mut rng = XorShift::new(t.dev.base ^ 0x9e37_79b9_7f4a_7c15);
    for _ in 0..RANDOM_ACCESSES {
        let offset = rng.next() % 0x200;
        let width = [1u8, 2, 4, 4, 4, 8][(rng.next() % 6) as usize];
        let mut value = match rng.next() % 3 {
            0 => rng.next() % 16,
            1 => rng.next() % 256,
            _ => rng.next(),
        };
        if (REG_QUEUE_DESC_LOW..REG_QUEUE_USED_HIGH + 4).contains(&(offset & !3)) {
            value = if offset & 4 == 0 {
                t.area + (value & 0x3_fff0)
            } else {
                0
            };
        }
        if rng.next().is_multiple_of(2) {
            mmio_write_sized(dev.base + offset, width, value);
        } else {
            mmio_read_sized(dev.base + offset, width);
        }
    }
}

//! Phase 2: broken descriptor chains and available rings, one attack at a time on every queue
//! of a freshly set-up device, each followed by a notification. The device must skip, drop or
//! refuse each (used ring or DEVICE_NEEDS_RESET); the probe prints what it did.

use super::virtq::*;
use super::Target;
use crate::hw::ram_fill;
use crate::serial::marker_line;

/// Queue size used for the attacks: small, so a chain "longer than the queue" is short.
const QUEUE_SIZE: u16 = 16;
/// Outside guest RAM, far from anything.
const FAR_OUTSIDE_RAM: u64 = 1 << 40;

#[derive(Clone, Copy)]
enum Attack {
    OutsideRam,
    InMmioHole,
    StraddlesRamEnd,
    ZeroLength,
    MaxLength,
    NextLoop,
    LongerThanQueue,
    IndirectNested,
    IndirectOutsideRam,
    IndirectBadSize,
    IndirectEmpty,
    IndirectTooBig,
    WrongDirection,
    HeadPastQueue,
    HeadMax,
    AvailJump,
}

const ATTACKS: [Attack; 16] = [
    Attack::OutsideRam,
    Attack::InMmioHole,
    Attack::StraddlesRamEnd,
    Attack::ZeroLength,
    Attack::MaxLength,
    Attack::NextLoop,
    Attack::LongerThanQueue,
    Attack::IndirectNested,
    Attack::IndirectOutsideRam,
    Attack::IndirectBadSize,
    Attack::IndirectEmpty,
    Attack::IndirectTooBig,
    Attack::WrongDirection,
    Attack::HeadPastQueue,
    Attack::HeadMax,
    Attack::AvailJump,
];

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::OutsideRam => "outside-ram",
            Attack::InMmioHole => "in-mmio-hole",
            Attack::StraddlesRamEnd => "straddles-ram-end",
            Attack::ZeroLength => "zero-length",
            Attack::MaxLength => "max-length",
            Attack::NextLoop => "next-loop",
            Attack::LongerThanQueue => "longer-than-queue",
            Attack::IndirectNested => "indirect-nested",
            Attack::IndirectOutsideRam => "indirect-outside-ram",
            Attack::IndirectBadSize => "indirect-bad-size",
            Attack::IndirectEmpty => "indirect-empty",
            Attack::IndirectTooBig => "indirect-too-big",
            Attack::WrongDirection => "wrong-direction",
            Attack::HeadPastQueue => "head-past-queue",
            Attack::HeadMax => "head-max",
            Attack::AvailJump => "avail-jump",
        }
    }
}

/// Whether the device writes into this queue's buffers (rx, event and entropy queues) rather
/// than reading them (the tx queues of net and vsock, queue 1).
fn device_writes(dev: &Dev, queue: u32) -> bool {
    !(queue == 1 && matches!(dev.id, ID_NET | ID_VSOCK))
}

pub fn attack(t: &Target) {
    let dev = &t.dev;
    let queues = dev.queue_count();
    let mut counts = [0u32; 3];
    for queue in 0..queues {
        for attack in ATTACKS {
            let outcome = run(t, queues, queue, attack);
            counts[outcome as usize] += 1;
            marker_line(format_args!(
                "hostile chain dev={} queue={queue} attack={} outcome={}",
                dev.name(),
                attack.name(),
                outcome.name()
            ));
        }
    }
    dev.reset();
    marker_line(format_args!(
        "hostile chains done dev={} attacks={} used={} needs_reset={} quiet={}",
        dev.name(),
        queues as usize * ATTACKS.len(),
        counts[Outcome::Used as usize],
        counts[Outcome::NeedsReset as usize],
        counts[Outcome::Quiet as usize],
    ));
}

/// Brings the device up with fresh rings, publishes one attack on `queue`, notifies and waits.
fn run(t: &Target, queues: u32, queue: u32, attack: Attack) -> Outcome {
    let dev = &t.dev;
    ram_fill(t.data(), 0x2_0000, 0);
    if !dev.negotiate() {
        return Outcome::NeedsReset;
    }
    let mut target_ring = None;
    for q in 0..queues {
        let ring = Ring::new(t.ring_base(q), dev.queue_max(q).min(QUEUE_SIZE));
        dev.setup_queue(q, &ring);
        if q == queue {
            target_ring = Some(ring);
        }
    }
    let Some(mut ring) = target_ring else {
        return Outcome::Quiet;
    };
    dev.driver_ok();
    if dev.needs_reset() {
        return Outcome::NeedsReset;
    }
    let before = ring.used_idx();
    publish(t, &mut ring, queue, attack);
    dev.notify(queue);
    let outcome = settle(dev, &ring, before);
    dev.reset();
    outcome
}

fn publish(t: &Target, ring: &mut Ring, queue: u32, attack: Attack) {
    let writes = device_writes(&t.dev, queue);
    let dir = if writes { DESC_F_WRITE } else { 0 };
    let buf = t.data();
    let table = t.data() + 0x1_0000;
    let n = ring.size;
    match attack {
        Attack::OutsideRam => ring.set_desc(0, FAR_OUTSIDE_RAM, 64, dir, 0),
        Attack::InMmioHole => ring.set_desc(0, t.dev.base, 0x100, dir, 0),
        Attack::StraddlesRamEnd => ring.set_desc(0, t.ram_end - 16, 64, dir, 0),
        Attack::ZeroLength => ring.set_desc(0, buf, 0, dir, 0),
        Attack::MaxLength => ring.set_desc(0, buf, u32::MAX, dir, 0),
        Attack::NextLoop => {
            ring.set_desc(0, buf, 64, dir | DESC_F_NEXT, 1);
            ring.set_desc(1, buf + 64, 64, dir | DESC_F_NEXT, 0);
        }
        Attack::LongerThanQueue => {
            for i in 0..n {
                let next = (i + 1) % n;
                ring.set_desc(i, buf + u64::from(i) * 64, 64, dir | DESC_F_NEXT, next);
            }
        }
        Attack::IndirectNested => {
            ring.set_desc(0, table, 32, DESC_F_INDIRECT, 0);
            write_desc(table, table + 0x100, 32, DESC_F_INDIRECT, 0);
            write_desc(table + 0x100, buf, 64, dir, 0);
        }
        Attack::IndirectOutsideRam => ring.set_desc(0, FAR_OUTSIDE_RAM, 0x100, DESC_F_INDIRECT, 0),
        Attack::IndirectBadSize => {
            ring.set_desc(0, table, 17, DESC_F_INDIRECT, 0);
            write_desc(table, buf, 64, dir, 0);
        }
        Attack::IndirectEmpty => ring.set_desc(0, table, 0, DESC_F_INDIRECT, 0),
        Attack::IndirectTooBig => {
            // 0xffff_fff0 / 16 entries: more than a u16 can index; its end lies outside RAM.
            ring.set_desc(0, table, 0xffff_fff0, DESC_F_INDIRECT, 0)
        }
        Attack::WrongDirection => {
            let wrong = if writes { 0 } else { DESC_F_WRITE };
            ring.set_desc(0, buf, 64, wrong, 0);
        }
        Attack::HeadPastQueue => {
            ring.set_desc(0, buf, 64, dir, 0);
            ring.publish(n);
            return;
        }
        Attack::HeadMax => {
            ring.publish(u16::MAX);
            return;
        }
        Attack::AvailJump => {
            ring.set_desc(0, buf, 64, dir, 0);
            ring.put_avail_entry(0);
            ring.set_avail_idx(ring.next_avail.wrapping_add(u16::MAX));
            return;
        }
    }
    ring.publish(0);
}

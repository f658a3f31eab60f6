//! Publishing several used buffers at once.
//!
//! A frame merged over N rx buffers must appear in the used ring all together: Linux's
//! receive path (NAPI, which may poll the ring while the device is still writing) reads
//! `num_buffers` from the first buffer and then takes N-1 more used entries at once, dropping
//! the frame ("buffers out of N missing") if the used index has not reached them yet.
//! virtio-queue's `add_used` publishes one entry per index update, so the entries are written
//! here first and the index moves once.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::GuestMemoryMmap;

/// `struct virtq_used`: `le16 flags; le16 idx;` then the ring of 8-byte elements.
const USED_IDX_OFFSET: u64 = 2;
const USED_RING_OFFSET: u64 = 4;
const USED_ELEM_LEN: u64 = 8;

/// Puts `entries` (head index, bytes written) in the used ring and then advances its index by
/// their count in one store.
pub(super) fn add_used_all(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    entries: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    if queue.event_idx_enabled() {
        // With event indices virtio-queue keeps a private count of entries added since the
        // last notification; only its own add_used keeps that right. The device does not
        // offer VIRTIO_RING_F_EVENT_IDX, so this path is for completeness only.
        for &(head, len) in entries {
            queue.add_used(mem, head, len)?;
        }
        return Ok(());
    }
    let size = queue.size();
    let used_ring = GuestAddress(queue.used_ring());
    let mut next_used = Wrapping(queue.next_used());
    for &(head, len) in entries {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = u64::from(next_used.0 % size);
        let addr = used_ring
            .checked_add(USED_RING_OFFSET + slot * USED_ELEM_LEN)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; USED_ELEM_LEN as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
        next_used += Wrapping(1);
    }
    let idx_addr = used_ring
        .checked_add(USED_IDX_OFFSET)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    // Release: the elements above are visible before the index that exposes them.
    mem.store(next_used.0.to_le(), idx_addr, Ordering::Release)
        .map_err(virtio_queue::Error::GuestMemory)?;
    queue.set_next_used(next_used.0);
    Ok(())
}

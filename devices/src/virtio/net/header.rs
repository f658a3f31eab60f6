//! `struct virtio_net_hdr_v1` (virtio 1.2 section 5.1.6): the 12 bytes in front of every frame
//! on both queues. VERSION_1 makes `num_buffers` always present, merged rx buffers or not.
//! The device offers no offloads, so on tx the header carries nothing it needs (it is
//! stripped) and on rx every field but `num_buffers` is zero: no checksum is claimed valid, the
//! guest checks and computes its own.

/// Bytes of the header on both queues.
pub(super) const NET_HDR_LEN: usize = 12;

/// Byte offset of `le16 num_buffers`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// The header of a received frame spread over `num_buffers` rx buffers (1 without
/// VIRTIO_NET_F_MRG_RXBUF).
pub(super) fn rx_header(num_buffers: u16) -> [u8; NET_HDR_LEN] {
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[NUM_BUFFERS_OFFSET..].copy_from_slice(&num_buffers.to_le_bytes());
    hdr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_num_buffers_is_set() {
        let hdr = rx_header(0x0302);
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3]);
    }
}

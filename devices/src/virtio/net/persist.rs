//! The net device's own part of a snapshot. The transport's state (mmio_persist.rs) already
//! carries the queues and the acked features; what is left is what the device was built with,
//! so that the restored guest finds the same MAC and MTU it configured its interface for.

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use super::device::{Net, NetError};
use crate::virtio::VirtioDevice;

/// What a snapshot records of a [`Net`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub mtu: u16,
    /// Also restored by the transport; kept so the state describes the device on its own.
    pub acked_features: u64,
}

impl Net {
    /// The device's state for a snapshot.
    pub fn save_state(&self) -> NetState {
        NetState {
            mac: self.mac(),
            mtu: self.mtu(),
            acked_features: self.acked_features(),
        }
    }

    /// A device as `state` describes it, wired to a new frame fd (the old one belonged to the
    /// VMM that took the snapshot). The state is untrusted: a bad MAC or MTU is an error, and
    /// features the device does not offer are dropped. Put it behind a transport restored with
    /// `MmioTransport::restore_state`, which re-activates it.
    pub fn restore(state: &NetState, frames: OwnedFd) -> Result<Self, NetError> {
        let mut net = Self::new(state.mac, state.mtu, frames)?;
        net.set_acked_features(state.acked_features);
        Ok(net)
    }
}

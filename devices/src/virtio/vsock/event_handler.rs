//! The vsock device's event-loop side: which fd means what, and the work every event ends with
//! (fill rx buffers, update host socket interest).

use std::os::unix::io::RawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::warn;

use super::device::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use super::unix_backend::{FD_TOKEN_BASE, LISTENER_TOKEN, TIMER_TOKEN};
use crate::virtio::ACTIVATE_TOKEN;

/// Epoll token of the reset wake-up EventFd.
const WAKE_TOKEN: u32 = 9;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
        if let Err(e) = ops.add(Events::with_data(
            &self.wake,
            WAKE_TOKEN,
            event_manager::EventSet::IN,
        )) {
            warn!("virtio-vsock: cannot watch the wake eventfd: {e}");
        }
        self.backend.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        const RX: u32 = RX_QUEUE as u32;
        const TX: u32 = TX_QUEUE as u32;
        const EVQ: u32 = EVENT_QUEUE as u32;
        match events.data() {
            ACTIVATE_TOKEN => self.events.handle_activate(ops),
            WAKE_TOKEN => {
                // EAGAIN: already consumed; the sync below is what matters.
                let _ = self.wake.read();
            }
            RX => {
                if self.events.drain_queue(RX) {
                    // New rx buffers: connections stalled on them can go on.
                    self.backend.requeue_all();
                }
            }
            TX => {
                if self.events.drain_queue(TX) {
                    self.process_tx();
                }
            }
            EVQ => {
                if self.events.drain_queue(EVQ) {
                    self.send_pending_event();
                }
            }
            LISTENER_TOKEN => self.backend.accept(),
            TIMER_TOKEN => self.backend.on_timer(),
            token if token >= FD_TOKEN_BASE => {
                if let Ok(fd) = RawFd::try_from(token - FD_TOKEN_BASE) {
                    self.backend.on_host_event(fd, events.event_set());
                }
            }
            token => warn!("virtio-vsock: event for unknown token {token}"),
        }
        self.process_rx();
        self.backend.sync(ops);
    }
}

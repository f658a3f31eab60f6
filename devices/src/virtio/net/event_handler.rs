//! The net device's event-loop side: which fd means what, and the work every event ends with
//! (bringing the frame fd's epoll interest in line with what the device can do now).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{error, warn};

use super::device::{Net, RX_QUEUE, TX_QUEUE};
use crate::virtio::ACTIVATE_TOKEN;

/// Epoll token of the frame fd (queue tokens are the queue indices).
const FRAMES_TOKEN: u32 = 2;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        const RX: u32 = RX_QUEUE as u32;
        const TX: u32 = TX_QUEUE as u32;
        match events.data() {
            ACTIVATE_TOKEN => {
                self.events.handle_activate(ops);
                // The driver may have queued frames before the queue fds were watched.
                self.process_tx();
                self.process_rx();
            }
            RX => {
                if self.events.drain_queue(RX) {
                    self.on_rx_buffers();
                    self.process_rx();
                }
            }
            TX => {
                if self.events.drain_queue(TX) {
                    self.process_tx();
                }
            }
            FRAMES_TOKEN => {
                let set = events.event_set();
                if set.contains(EventSet::OUT) {
                    self.flush_tx();
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.process_rx();
                }
                if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    // What was still readable was just taken; epoll would report the hang-up
                    // for ever, so the fd is given up.
                    self.on_peer_hangup();
                }
            }
            token => warn!("virtio-net: event for unknown token {token}"),
        }
        self.sync_interest(ops);
    }
}

impl Net {
    /// Registers, updates or removes the frame fd's epoll interest to match
    /// [`Net::wanted_interest`].
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let wanted = self.wanted_interest();
        if wanted == self.registered {
            return;
        }
        let result = match (self.registered, wanted) {
            (None, Some(set)) => ops.add(Events::with_data(&self.frames, FRAMES_TOKEN, set)),
            (Some(_), Some(set)) => ops.modify(Events::with_data(&self.frames, FRAMES_TOKEN, set)),
            (Some(_), None) => ops.remove(Events::empty(&self.frames)),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => self.registered = wanted,
            Err(e) => {
                error!("virtio-net: cannot update the frame fd's epoll interest: {e:?}");
                // Without a working registration the fd is useless; stop trying every event.
                self.on_peer_hangup();
            }
        }
    }
}

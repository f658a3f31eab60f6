//! Describing live device state for a stalled guest (agentvm's SIGUSR1 state dump): where each
//! ring stands on both sides, so a lost notification or a lost interrupt shows as numbers that
//! disagree.

use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};

use crate::GuestMemoryMmap;

/// One queue on one line: the device's positions beside the indices in guest memory.
/// `avail` ahead of `next_avail` means buffers the device has not taken; `used` ahead of what
/// the driver consumed (not visible here) means an interrupt the guest has not handled.
pub fn describe_queue(name: &str, queue: &Queue, mem: &GuestMemoryMmap) -> String {
    use std::sync::atomic::Ordering::Acquire;
    let avail = queue
        .avail_idx(mem, Acquire)
        .map(|i| i.0.to_string())
        .unwrap_or_else(|e| format!("unreadable ({e})"));
    let used = queue
        .used_idx(mem, Acquire)
        .map(|i| i.0.to_string())
        .unwrap_or_else(|e| format!("unreadable ({e})"));
    format!(
        "{name}: size {} ready {} next_avail {} avail.idx {avail} next_used {} used.idx {used}{}",
        queue.size(),
        queue.ready(),
        queue.next_avail(),
        queue.next_used(),
        if queue.event_idx_enabled() {
            " event_idx"
        } else {
            ""
        }
    )
}

/// Locks `mutex` if it comes free within `wait`: a diagnosis must not hang on the lock a
/// stalled thread may be holding. A poisoned lock is still read (its state is what is wanted).
pub fn try_lock_for<T: ?Sized>(mutex: &Mutex<T>, wait: Duration) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + wait;
    loop {
        match mutex.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_gives_up_after_the_wait() {
        let m = Mutex::new(5);
        let held = m.lock().unwrap();
        let start = Instant::now();
        assert!(try_lock_for(&m, Duration::from_millis(30)).is_none());
        assert!(start.elapsed() >= Duration::from_millis(30));
        drop(held);
        assert_eq!(*try_lock_for(&m, Duration::from_millis(30)).unwrap(), 5);
    }
}

//! Pausing vCPUs: a paused vCPU thread stays out of KVM_RUN, parked on a condition variable, so the
//! guest makes no progress until it is resumed (or the VM is torn down).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What tells a vCPU thread to stop or to park, shared by the VMM and every vCPU of one VM (with
/// the exit counters every vCPU adds to).
#[derive(Clone, Default)]
pub struct RunSwitches {
    pub stop: Arc<AtomicBool>,
    pub gate: Arc<VcpuGate>,
    pub exits: crate::vstate::exit_counts::ExitCounts,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    /// vCPU threads currently parked in [`VcpuGate::park_while_paused`].
    parked: usize,
    /// Bumped by [`VcpuGate::post_request`]: parked vCPUs wake and serve their request channel
    /// (a counter, not a flag, so a post between a vCPU's check and its wait is not lost).
    requests: u64,
}

/// Shared by the VMM and every vCPU thread of one VM.
#[derive(Default)]
pub struct VcpuGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl VcpuGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // A poisoned lock only means a vCPU thread panicked while holding it; the two fields stay
        // meaningful, so keep going rather than spread the panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks vCPUs to park before their next KVM_RUN; the caller kicks them out of the current one.
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Wakes parked vCPUs so they see a stop request (set `stop` first).
    pub fn wake_all(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// Wakes parked vCPUs to serve the requests just queued for them (see `park_while_paused`).
    pub fn post_request(&self) {
        self.lock().requests += 1;
        self.changed.notify_all();
    }

    /// Called by a vCPU thread before each KVM_RUN: blocks while the VM is paused and not stopping.
    /// While parked it runs `serve` (without the gate's lock) whenever a request is posted: work
    /// that needs the vCPU's own fd outside KVM_RUN, such as saving its state for a snapshot.
    pub fn park_while_paused(&self, stop: &AtomicBool, mut serve: impl FnMut()) {
        let mut state = self.lock();
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        let mut served = state.requests;
        while state.paused && !stop.load(Ordering::Acquire) {
            if state.requests != served {
                served = state.requests;
                drop(state);
                serve();
                state = self.lock();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn parks_until_resumed_and_stop_releases() {
        let gate = Arc::new(VcpuGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.park_while_paused(&stop, || panic!("served while running")); // not paused
        gate.pause();
        let (g, s) = (gate.clone(), stop.clone());
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        let vcpu = std::thread::spawn(move || {
            g.park_while_paused(&s, || {
                count.fetch_add(1, Ordering::SeqCst);
            })
        });
        wait_for("the vCPU to park", || gate.parked() == 1);
        assert!(!vcpu.is_finished());
        gate.post_request();
        wait_for("the request to be served", || {
            served.load(Ordering::SeqCst) == 1
        });
        gate.post_request();
        wait_for("the second request to be served", || {
            served.load(Ordering::SeqCst) == 2
        });
        assert_eq!(gate.parked(), 1, "serving a request does not unpark");
        gate.resume();
        vcpu.join().unwrap();
        assert_eq!(gate.parked(), 0);

        gate.pause();
        let (g, s) = (gate.clone(), stop.clone());
        let vcpu = std::thread::spawn(move || g.park_while_paused(&s, || {}));
        wait_for("the vCPU to park", || gate.parked() == 1);
        stop.store(true, Ordering::Release);
        gate.wake_all();
        vcpu.join().unwrap();
    }
}

//! The CPU-time and wall-clock limits of one run: two POSIX timers that send the vCPU kick signal
//! to the thread in KVM_RUN, which then returns EINTR. The timers repeat every [`RETRY`] after
//! expiring, so a signal that lands while the thread is outside KVM_RUN (handling an exit) is
//! followed by another; the run loop also checks both clocks on every interruption.

use std::io;
use std::time::{Duration, Instant};

const RETRY: Duration = Duration::from_millis(5);

/// What ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Cpu,
    Wall,
}

pub struct RunLimits {
    cpu_limit: Duration,
    wall_limit: Duration,
    cpu_start: Duration,
    wall_start: Instant,
    timers: Vec<libc::timer_t>,
}

impl RunLimits {
    /// Arms both timers for the calling thread (the one about to enter KVM_RUN).
    pub fn start(cpu_limit: Duration, wall_limit: Duration) -> io::Result<RunLimits> {
        crate::vstate::vcpu::install_kick_handler();
        let mut limits = RunLimits {
            cpu_limit,
            wall_limit,
            cpu_start: thread_cpu_time(),
            wall_start: Instant::now(),
            timers: Vec::with_capacity(2),
        };
        limits.arm(libc::CLOCK_THREAD_CPUTIME_ID, cpu_limit)?;
        limits.arm(libc::CLOCK_MONOTONIC, wall_limit)?;
        Ok(limits)
    }

    fn arm(&mut self, clock: libc::clockid_t, after: Duration) -> io::Result<()> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // SAFETY: an all-zero sigevent is a valid starting value; the fields set below are the
        // ones SIGEV_THREAD_ID reads.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = crate::vstate::vcpu::kick_signal();
        event.sigev_notify_thread_id = tid;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid clock id, a sigevent and an out pointer that live across the call.
        if unsafe { libc::timer_create(clock, &mut event, &mut timer) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.timers.push(timer);
        let spec = libc::itimerspec {
            it_interval: timespec(RETRY),
            // A zero it_value would disarm the timer instead of firing at once.
            it_value: timespec(after.max(Duration::from_nanos(1))),
        };
        // SAFETY: timer was just created by timer_create; spec lives across the call.
        if unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Which limit, if any, has been reached.
    pub fn exceeded(&self) -> Option<Exceeded> {
        if thread_cpu_time().saturating_sub(self.cpu_start) >= self.cpu_limit {
            Some(Exceeded::Cpu)
        } else if self.wall_start.elapsed() >= self.wall_limit {
            Some(Exceeded::Wall)
        } else {
            None
        }
    }

    pub fn cpu_limit(&self) -> Duration {
        self.cpu_limit
    }

    pub fn wall_limit(&self) -> Duration {
        self.wall_limit
    }

    /// When the wall-clock limit is reached: the bound of any wait inside a host call.
    pub fn wall_deadline(&self) -> Instant {
        self.wall_start + self.wall_limit
    }
}

impl Drop for RunLimits {
    fn drop(&mut self) {
        for t in self.timers.drain(..) {
            // SAFETY: each timer was created by timer_create and is deleted once.
            unsafe { libc::timer_delete(t) };
        }
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// CPU time the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_reaches_its_cpu_limit_and_is_signalled() {
        let limits = RunLimits::start(Duration::from_millis(30), Duration::from_secs(10)).unwrap();
        let start = Instant::now();
        while limits.exceeded().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "limit never reached"
            );
            std::hint::spin_loop();
        }
        assert_eq!(limits.exceeded(), Some(Exceeded::Cpu));
        assert!(thread_cpu_time() - limits.cpu_start >= Duration::from_millis(30));
    }

    #[test]
    fn a_sleeping_thread_reaches_its_wall_limit_not_its_cpu_limit() {
        let limits = RunLimits::start(Duration::from_secs(10), Duration::from_millis(20)).unwrap();
        // The timer's signal interrupts the sleep (EINTR), which std's sleep resumes.
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(limits.exceeded(), Some(Exceeded::Wall));
    }
}

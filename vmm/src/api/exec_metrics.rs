//! What `/sandbox/exec` counts: calls by outcome, a latency histogram, and when the first result
//! came back (a boot milestone). Job threads add to it; `GET /metrics` reads it. Relaxed atomics:
//! a reader may see a count a moment before the matching histogram bucket, never a torn value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::process_stats::monotonic_ns;

/// How an exec ended, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecOutcome {
    ExitedZero,
    ExitedNonZero,
    /// Killed by a signal it was not given by its timeout.
    Signalled,
    /// The agent killed it when `timeout_ms` passed.
    TimedOut,
    /// It did not start, or the agent connection broke before its exit status arrived.
    Error,
    /// Ended with neither an exit status nor an error: the HTTP client went away first (the
    /// process group was killed), or the job never ran (every job thread was busy: 503).
    Abandoned,
}

impl ExecOutcome {
    pub const ALL: [ExecOutcome; 6] = [
        ExecOutcome::ExitedZero,
        ExecOutcome::ExitedNonZero,
        ExecOutcome::Signalled,
        ExecOutcome::TimedOut,
        ExecOutcome::Error,
        ExecOutcome::Abandoned,
    ];

    /// The Prometheus label value (and the audit log's `outcome`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExecOutcome::ExitedZero => "exited_zero",
            ExecOutcome::ExitedNonZero => "exited_nonzero",
            ExecOutcome::Signalled => "signalled",
            ExecOutcome::TimedOut => "timed_out",
            ExecOutcome::Error => "error",
            ExecOutcome::Abandoned => "abandoned",
        }
    }

    /// Whether the process's own end is known (an exit status came back).
    fn is_result(self) -> bool {
        !matches!(self, ExecOutcome::Error | ExecOutcome::Abandoned)
    }
}

/// Upper bounds (seconds) of the latency histogram's buckets; `+Inf` follows. From an exec round
/// trip of `true` (about a millisecond) to long builds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
];

#[derive(Default)]
struct Counters {
    outcomes: [AtomicU64; ExecOutcome::ALL.len()],
    /// Per bucket, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
    first_result_ns: OnceLock<u64>,
    /// Runs once, when the first result arrives (a uffd restore ends its working-set recording).
    on_first_result: Mutex<Option<FirstResultHook>>,
}

type FirstResultHook = Box<dyn FnOnce() + Send>;

/// Shared by the controller and every exec job. Cheap to clone.
#[derive(Clone, Default)]
pub struct ExecMetrics(Arc<Counters>);

/// The counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecCounts {
    pub outcomes: Vec<(ExecOutcome, u64)>,
    /// `(upper bound, cumulative count)`, ending with `(f64::INFINITY, count)`.
    pub latency_buckets: Vec<(f64, u64)>,
    pub latency_sum_seconds: f64,
    pub count: u64,
    /// CLOCK_MONOTONIC ns at which the first exec's exit status arrived.
    pub first_result_ns: Option<u64>,
}

impl ExecMetrics {
    /// One exec ended `outcome`, `latency` after its request arrived.
    pub fn record(&self, outcome: ExecOutcome, latency: Duration) {
        let c = &self.0;
        if outcome.is_result() && c.first_result_ns.set(monotonic_ns()).is_ok() {
            let hook = c
                .on_first_result
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(hook) = hook {
                hook();
            }
        }
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        c.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        c.sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        c.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls `hook` when the first exec result arrives (at once if it already has).
    pub fn when_first_result(&self, hook: impl FnOnce() + Send + 'static) {
        let mut slot = self
            .0
            .on_first_result
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.0.first_result_ns.get().is_some() {
            drop(slot);
            hook();
        } else {
            *slot = Some(Box::new(hook));
        }
    }

    pub fn snapshot(&self) -> ExecCounts {
        let c = &self.0;
        let mut cumulative = 0;
        let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let latency_buckets: Vec<(f64, u64)> = bounds
            .zip(&c.buckets)
            .map(|(le, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (le, cumulative)
            })
            .collect();
        ExecCounts {
            outcomes: ExecOutcome::ALL
                .iter()
                .map(|&o| (o, c.outcomes[o as usize].load(Ordering::Relaxed)))
                .collect(),
            latency_buckets,
            latency_sum_seconds: c.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: cumulative,
            first_result_ns: c.first_result_ns.get().copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_histogram_add_up() {
        let metrics = ExecMetrics::default();
        assert_eq!(metrics.snapshot().first_result_ns, None);
        metrics.record(ExecOutcome::Error, Duration::from_millis(3));
        assert_eq!(metrics.snapshot().first_result_ns, None);
        metrics.record(ExecOutcome::ExitedZero, Duration::from_micros(800));
        metrics.record(ExecOutcome::TimedOut, Duration::from_secs(1000));
        let counts = metrics.snapshot();
        assert!(counts.first_result_ns.is_some());
        assert_eq!(counts.count, 3);
        assert!(counts.outcomes.contains(&(ExecOutcome::ExitedZero, 1)));
        assert!(counts.outcomes.contains(&(ExecOutcome::Signalled, 0)));
        assert_eq!(counts.latency_buckets[0], (0.001, 1));
        assert_eq!(counts.latency_buckets[2], (0.005, 2));
        let last = counts.latency_buckets.len() - 1;
        assert_eq!(counts.latency_buckets[last - 1], (600.0, 2));
        assert_eq!(counts.latency_buckets[last], (f64::INFINITY, 3));
        assert!((counts.latency_sum_seconds - 1000.0038).abs() < 1e-9);
    }

    #[test]
    fn the_first_result_hook_runs_once_at_the_first_result() {
        use std::sync::atomic::AtomicUsize;
        let metrics = ExecMetrics::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        metrics.when_first_result(move || {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        metrics.record(ExecOutcome::Error, Duration::from_millis(1));
        assert_eq!(calls.load(Ordering::Relaxed), 0, "an error is not a result");
        metrics.record(ExecOutcome::ExitedZero, Duration::from_millis(1));
        metrics.record(ExecOutcome::ExitedZero, Duration::from_millis(1));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        // Registered after the first result: runs at once.
        let late = calls.clone();
        metrics.when_first_result(move || {
            late.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }
}

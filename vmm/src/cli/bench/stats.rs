//! Order statistics of a set of samples: what every figure of the benchmark reports.

use serde::{Deserialize, Serialize};

/// Median, p99, min and max of `n` samples, in the figure's unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    /// Nearest-rank 99th percentile: with fewer than 100 samples it is the maximum.
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for no samples, and for samples that are not all finite numbers.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        // Nearest rank: the smallest sample with at least 99 % of the samples at or below it.
        let rank = (0.99 * n as f64).ceil() as usize;
        Some(Summary {
            n,
            median,
            p99: sorted[rank.clamp(1, n) - 1],
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// Nanoseconds between two CLOCK_MONOTONIC readings, in milliseconds; `None` if `to` is earlier
/// (a broken report, never a negative duration).
pub fn span_ms(from_ns: u64, to_ns: u64) -> Option<f64> {
    to_ns.checked_sub(from_ns).map(|d| d as f64 / 1_000_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_counts() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            (s.n, s.median, s.min, s.max, s.p99),
            (3, 3.0, 1.0, 5.0, 5.0)
        );
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.p99, 4.0);
    }

    #[test]
    fn p99_is_nearest_rank() {
        let samples: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(s.p99, 198.0);
        assert_eq!(s.median, 100.5);
        let one = Summary::of(&[7.0]).unwrap();
        assert_eq!(
            (one.median, one.p99, one.min, one.max),
            (7.0, 7.0, 7.0, 7.0)
        );
    }

    #[test]
    fn empty_or_non_finite_has_no_summary() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn spans() {
        assert_eq!(span_ms(1_000_000, 3_500_000), Some(2.5));
        assert_eq!(span_ms(2, 1), None);
    }
}

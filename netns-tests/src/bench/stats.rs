//! The statistics the benchmark reports: percentiles of one run's samples, the spread of a
//! figure over runs (median, min, max), and ratios taken pair by pair (each Service run
//! against the direct run beside it, so drift over the benchmark cancels out).

use serde::{Deserialize, Serialize};

/// The `p`-th percentile (0–100) of `samples` by nearest rank, the definition wrk and
/// HdrHistogram use: the smallest sample with at least `p`% of the samples at or below it.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// One figure over several runs: every run's value (in run order), and their median and range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Spread {
    /// None for no samples, or when a sample is not a finite number.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        Some(Self {
            median: median(samples)?,
            min: samples.iter().copied().fold(f64::INFINITY, f64::min),
            max: samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            samples: samples.to_vec(),
        })
    }

    /// `max / min - 1`: how far apart the runs were (0.04 = the slowest 4% off the fastest).
    pub fn range_ratio(&self) -> f64 {
        if self.min > 0.0 {
            self.max / self.min - 1.0
        } else {
            0.0
        }
    }
}

/// `a[i] / b[i]` for each run `i` both have (a zero divisor skips the pair), as a spread.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> Option<Spread> {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, d)| **d != 0.0)
        .map(|(x, d)| x / d)
        .collect();
    Spread::of(&ratios)
}

/// The relative change from `old` to `new` (+0.10 = 10% higher), None when `old` is zero.
pub fn change(old: f64, new: f64) -> Option<f64> {
    (old != 0.0).then(|| new / old - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).rev().collect();
        assert_eq!(percentile(&samples, 50.0), Some(50.0));
        assert_eq!(percentile(&samples, 90.0), Some(90.0));
        assert_eq!(percentile(&samples, 99.0), Some(99.0));
        assert_eq!(percentile(&samples, 100.0), Some(100.0));
        assert_eq!(percentile(&samples, 0.0), Some(1.0));
        // Ten samples: p99 is the largest, p50 the fifth.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 50.0), Some(5.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&ten, 101.0), None);
    }

    #[test]
    fn medians_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn spread_keeps_every_sample_in_order() {
        let s = Spread::of(&[12.0, 10.0, 11.0]).expect("spread");
        assert_eq!((s.median, s.min, s.max), (11.0, 10.0, 12.0));
        assert_eq!(s.samples, vec![12.0, 10.0, 11.0]);
        assert!((s.range_ratio() - 0.2).abs() < 1e-9);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ratios_are_taken_pair_by_pair() {
        // Both sides drift upwards together; pairwise ratios stay 2 while the ratio of the
        // medians would be 2 only by chance.
        let service = [200.0, 400.0, 800.0];
        let direct = [100.0, 200.0, 400.0];
        let r = paired_ratio(&service, &direct).expect("ratio");
        assert_eq!((r.median, r.min, r.max), (2.0, 2.0, 2.0));
        // A zero divisor drops that pair rather than producing infinity.
        let r = paired_ratio(&[1.0, 2.0], &[0.0, 1.0]).expect("ratio");
        assert_eq!(r.samples, vec![2.0]);
        assert_eq!(paired_ratio(&[1.0], &[0.0]), None);
    }

    #[test]
    fn changes_are_relative() {
        assert_eq!(
            change(100.0, 110.0).map(|c| (c * 100.0).round()),
            Some(10.0)
        );
        assert_eq!(change(0.0, 1.0), None);
    }
}

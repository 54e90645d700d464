//! Medians and percentiles of measured samples.

use std::time::Duration;

/// Percentile `p` (0..=100) of the samples, nearest-rank; zero for no samples.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of the samples.
pub fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 50.0)
}

/// Median of rates, nearest-rank as [`median`] is for durations; zero for no samples.
pub fn median_f64(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0)
}

/// Milliseconds with three decimals, for tables.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Cumulative bucket counts `(upper bound in seconds, count)` of the Prometheus
/// histogram `name` in a `/metrics` text, in order.
pub fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// Quantile `q` (0..=1) of the samples recorded between two snapshots of one histogram,
/// interpolated linearly inside the bucket that holds it (as Prometheus's
/// `histogram_quantile`); `None` without samples.
pub fn histogram_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<Duration> {
    let diff: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, count)| {
            let old = before.iter().find(|(b, _)| *b == le).map_or(0, |(_, c)| *c);
            (le, count.saturating_sub(old))
        })
        .collect();
    let total = diff.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(le, count) in &diff {
        if count as f64 >= rank && count > below {
            if le.is_infinite() {
                return Some(Duration::from_secs_f64(lower));
            }
            let fraction = (rank - below as f64) / (count - below) as f64;
            return Some(Duration::from_secs_f64(lower + (le - lower) * fraction));
        }
        (lower, below) = (le, count);
    }
    Some(Duration::from_secs_f64(lower))
}

/// Microseconds, for latencies well under a millisecond.
pub fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_cover_only_the_samples_between_snapshots() {
        let before_text =
            "x_bucket{le=\"0.0001\"} 5\nx_bucket{le=\"0.0002\"} 5\nx_bucket{le=\"+Inf\"} 5\n";
        let after_text = "# HELP x y\nx_bucket{le=\"0.0001\"} 5\nx_bucket{le=\"0.0002\"} 15\nx_bucket{le=\"+Inf\"} 16\nx_sum 1\n";
        let before = histogram_buckets(before_text, "x");
        let after = histogram_buckets(after_text, "x");
        assert_eq!(after, vec![(0.0001, 5), (0.0002, 15), (f64::INFINITY, 16)]);
        // 11 new samples: 10 in (100, 200] µs, one above. The median is the 5.5th of the
        // ten in the second bucket: 100 + 100 × 5.5/10 µs.
        let p50 = histogram_quantile(&before, &after, 0.5).expect("samples");
        assert!(
            p50.abs_diff(Duration::from_micros(155)) < Duration::from_nanos(10),
            "{p50:?}"
        );
        // The 99th percentile is in +Inf: reported as the last finite bound.
        let p99 = histogram_quantile(&before, &after, 0.99).expect("samples");
        assert_eq!(p99, Duration::from_micros(200));
        assert_eq!(histogram_quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(median(&samples), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}

//! Prometheus text exposition (format 0.0.4): lock-free histograms for latencies on hot
//! paths (two atomic adds per sample), and the writer every `/metrics` family goes
//! through, so that names, `HELP`/`TYPE` lines and label escaping follow the format
//! in one place. What is measured lives with what it measures (the relay's
//! handshakes, the store's commits and counts); `relay/metrics.rs` puts it together.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the relay round-trip buckets, in microseconds: fine where the
/// relay's round trip lives (tens to hundreds of µs on a LAN), coarse out to the
/// seconds a busy broadcast can take.
pub const RTT_BOUNDS_US: &[u64] = &[
    25, 50, 75, 100, 125, 150, 175, 200, 250, 300, 400, 500, 750, 1_000, 1_500, 2_000, 3_000,
    5_000, 7_500, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Upper bounds of the database commit buckets, in microseconds (1 ms to 1 s): an
/// fsync on an SSD takes about a millisecond, on a network disk tens; past a second
/// every acknowledged write waits visibly.
pub const COMMIT_BOUNDS_US: &[u64] = &[
    1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
];

/// A latency histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds, in microseconds, ascending.
    bounds_us: &'static [u64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    /// The relay round-trip buckets ([`RTT_BOUNDS_US`]).
    fn default() -> Self {
        Histogram::new(RTT_BOUNDS_US)
    }
}

impl Histogram {
    /// A histogram with these bucket upper bounds (microseconds, ascending).
    pub fn new(bounds_us: &'static [u64]) -> Histogram {
        Histogram {
            bounds_us,
            counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one sample.
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = self.bounds_us.partition_point(|&bound| bound < us);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Appends the histogram in Prometheus text format, in seconds.
    pub fn render(&self, text: &mut String, name: &str, help: &str) {
        header(text, name, "histogram", help);
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            match self.bounds_us.get(i) {
                Some(bound) => {
                    let le = *bound as f64 / 1e6;
                    let _ = writeln!(text, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(text, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(text, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// A metric's kind, as its `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets to zero when the server restarts); the name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// Appends one metric family: its `HELP` and `TYPE` lines, then one sample per
/// labelled value, in the order given. A family with no samples still gets its
/// header, so that a scraper knows the name.
pub fn family<'a>(
    text: &mut String,
    name: &str,
    kind: Kind,
    help: &str,
    samples: impl IntoIterator<Item = (&'a [(&'a str, &'a str)], u64)>,
) {
    header(text, name, kind.as_str(), help);
    for (labels, value) in samples {
        sample(text, name, labels, value);
    }
}

/// Appends one family with a single unlabelled sample.
pub fn single(text: &mut String, name: &str, kind: Kind, help: &str, value: u64) {
    family(text, name, kind, help, [(&[][..], value)]);
}

/// Appends `herald_build_info{version="…"} 1`, the conventional way to expose the
/// running version (join on it, alert when two versions run at once).
pub fn build_info(text: &mut String) {
    family(
        text,
        "herald_build_info",
        Kind::Gauge,
        "Always 1; the labels say which herald-server build is running.",
        [(&[("version", env!("CARGO_PKG_VERSION"))][..], 1)],
    );
}

fn header(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(text, "# TYPE {name} {kind}");
}

fn sample(text: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    text.push_str(name);
    if !labels.is_empty() {
        text.push('{');
        for (i, (label, value)) in labels.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{label}=\"{}\"", escape_label(value));
        }
        text.push('}');
    }
    let _ = writeln!(text, " {value}");
}

/// `HELP` text escapes backslash and newline.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values escape backslash, double quote and newline. Values come from the
/// database (a state written by an older server, a medium), so they are escaped
/// rather than trusted.
fn escape_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(25));
        h.observe(Duration::from_micros(26));
        h.observe(Duration::from_micros(140));
        h.observe(Duration::from_secs(60));
        let mut text = String::new();
        h.render(&mut text, "x_seconds", "test");
        assert!(text.contains("# TYPE x_seconds histogram"), "{text}");
        assert!(
            text.contains("x_seconds_bucket{le=\"0.000025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{le=\"0.00005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{le=\"0.000125\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{le=\"0.00015\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_bucket{le=\"10\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("x_seconds_count 4\n"), "{text}");
        assert!(text.contains("x_seconds_sum 60.000191\n"), "{text}");
    }

    #[test]
    fn commit_buckets_are_milliseconds_to_a_second() {
        let h = Histogram::new(COMMIT_BOUNDS_US);
        h.observe(Duration::from_micros(900));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        let mut text = String::new();
        h.render(&mut text, "c_seconds", "test");
        assert!(
            text.contains("c_seconds_bucket{le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("c_seconds_bucket{le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("c_seconds_bucket{le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("c_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
    }

    #[test]
    fn families_follow_the_text_format() {
        let mut text = String::new();
        family(
            &mut text,
            "x_total",
            Kind::Counter,
            "Things.\nMore",
            [
                (&[("state", "a\"b\\c\nd")][..], 2),
                (&[("m", "sms"), ("result", "ok")][..], 3),
            ],
        );
        single(&mut text, "y", Kind::Gauge, "Y.", 7);
        assert_eq!(
            text,
            "# HELP x_total Things.\\nMore\n# TYPE x_total counter\n\
             x_total{state=\"a\\\"b\\\\c\\nd\"} 2\n\
             x_total{m=\"sms\",result=\"ok\"} 3\n\
             # HELP y Y.\n# TYPE y gauge\ny 7\n"
        );
    }

    #[test]
    fn build_info_names_the_version() {
        let mut text = String::new();
        build_info(&mut text);
        assert!(
            text.ends_with(&format!(
                "herald_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }
}

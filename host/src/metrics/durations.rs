//! Event durations: a histogram each worker thread adds to without a lock, encoded as
//! prometheus-client's `Histogram` is.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};

use super::shards::{SHARDS, shard};

/// The upper bounds of [`Durations`]' buckets, in seconds: 50 µs .. ~3.3 s in powers of 2
/// (per-event costs start in microseconds), then everything above. Made once: every
/// handler's histogram shares them.
static DURATION_BOUNDS: LazyLock<[f64; DURATION_BUCKETS]> = LazyLock::new(|| {
    let mut bounds = [f64::MAX; DURATION_BUCKETS];
    for (bound, value) in bounds
        .iter_mut()
        .zip(exponential_buckets(0.000_05, 2.0, 17))
    {
        *bound = value;
    }
    bounds
});

/// Buckets of a [`Durations`]: 17 bounded, the last unbounded.
const DURATION_BUCKETS: usize = 18;

/// A histogram of event durations, encoded as prometheus-client's `Histogram` is, without
/// its lock.
///
/// Why not `Histogram`: its `observe` takes a write lock around its sum, count and
/// buckets, and every event observes once. Two worker threads running one handler's events
/// took turns on that lock and passed its cache lines back and forth on every event (with
/// the observation left out, a warm event on two workers cost 0.2-0.5 µs less worker CPU;
/// on one worker ~0.1 µs less). Here each thread adds to a shard of its own (an atomic
/// bucket count and an atomic sum), and the shards are summed when scraped. A scrape
/// during observations may read a sum and a count a few events apart (as the `metrics`
/// crate's atomic buckets may); each figure is exact once they stop.
#[derive(Clone, Debug)]
pub struct Durations(Arc<[CachePadded<DurationShard>; SHARDS]>);

#[derive(Debug)]
struct DurationShard {
    /// Observations per bucket, each counted in the first bucket whose bound it is within
    /// (the encoder makes them cumulative). In the shard itself, not behind a pointer: a
    /// heap array of each shard would sit next to another's.
    buckets: [AtomicU64; DURATION_BUCKETS],
    /// Nanoseconds: no float to add atomically, and 584 years of event time before it
    /// wraps.
    sum_nanos: AtomicU64,
}

impl Default for Durations {
    fn default() -> Self {
        Self(Arc::new(std::array::from_fn(|_| {
            CachePadded::new(DurationShard {
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_nanos: AtomicU64::new(0),
            })
        })))
    }
}

impl Durations {
    pub fn observe(&self, elapsed: Duration) {
        let shard = &self.0[shard()];
        let seconds = elapsed.as_secs_f64();
        // The first bound at or above the value; the last bound is f64::MAX.
        let bucket = DURATION_BOUNDS.partition_point(|bound| *bound < seconds);
        if let Some(count) = shard.buckets.get(bucket) {
            count.fetch_add(1, Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        shard.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// The sum in seconds, the count and each bucket's own count, over every shard.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = DURATION_BOUNDS.iter().map(|b| (*b, 0)).collect();
        let mut sum_nanos = 0u64;
        for shard in self.0.iter() {
            for ((_, total), count) in buckets.iter_mut().zip(&shard.buckets) {
                *total += count.load(Relaxed);
            }
            sum_nanos = sum_nanos.wrapping_add(shard.sum_nanos.load(Relaxed));
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        (sum_nanos as f64 / 1e9, count, buckets)
    }
}

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::metrics::histogram::Histogram;

    use super::super::shards::encoded;
    use super::{DURATION_BOUNDS, Durations};

    #[test]
    fn durations_encode_as_prometheus_clients_histogram_does() {
        // Below the first bound, on a bound, between bounds, past the last finite one.
        let seen = [
            Duration::from_micros(30),
            Duration::from_micros(50),
            Duration::from_micros(51),
            Duration::from_millis(1),
            Duration::from_millis(1),
            Duration::from_secs(10),
        ];
        let ours = Durations::default();
        let theirs = Histogram::new(DURATION_BOUNDS.into_iter().filter(|b| *b < f64::MAX));
        for d in seen {
            ours.observe(d);
            theirs.observe(d.as_secs_f64());
        }
        let ours = encoded(|r| r.register("d", "durations", ours));
        let theirs = encoded(|r| r.register("d", "durations", theirs));
        // The sums are added differently (nanoseconds here, seconds there), so they may
        // differ in the last digit; every other line is the same text.
        let sum = |text: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with("d_sum ")).unwrap();
            line["d_sum ".len()..].parse().unwrap()
        };
        assert!(
            (sum(&ours) - sum(&theirs)).abs() < 1e-12,
            "{ours}\n{theirs}"
        );
        let without_sum = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with("d_sum "))
                .map(String::from)
                .collect()
        };
        assert_eq!(without_sum(&ours), without_sum(&theirs));
        assert!(ours.contains("d_count 6"), "{ours}");
        assert!(ours.contains("d_bucket{le=\"0.0001\"} 3"), "{ours}");
    }

    #[test]
    fn durations_count_every_observation_from_every_thread() {
        // More threads than shards, so some share one.
        let durations = Durations::default();
        std::thread::scope(|scope| {
            for i in 0..12u64 {
                let durations = &durations;
                scope.spawn(move || {
                    for _ in 0..5_000 {
                        durations.observe(Duration::from_micros(100 * (i % 3 + 1)));
                    }
                });
            }
        });
        let (sum, count, buckets) = durations.snapshot();
        assert_eq!(count, 60_000);
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 60_000);
        // 4 threads each at 100, 200 and 300 µs: 20 000 × 600 µs.
        assert!((sum - 12.0).abs() < 1e-9, "{sum}");
    }
}

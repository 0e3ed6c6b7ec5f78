//! Counters (lock-free atomics) and a log-linear latency histogram; a report as a table and JSON.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// A latency histogram with ~3 % relative precision over the whole u64 range, lock-free.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Histogram({} samples)", self.count())
    }
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = (v >> (e - SUB_BITS)) - SUB;
    ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

fn lower_bound(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let e = i / SUB - 1 + u64::from(SUB_BITS);
    (SUB + i % SUB) << (e - u64::from(SUB_BITS))
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, v: u64) {
        self.buckets[index(v)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Sum of the samples.
    pub fn sum(&self) -> u64 {
        self.sum.load(Relaxed)
    }

    /// Largest sample.
    pub fn max(&self) -> u64 {
        self.max.load(Relaxed)
    }

    /// The value at quantile `q` (0..=1), to the histogram's precision (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                // middle of the bucket, never above the true max
                let lo = lower_bound(i);
                let hi = lower_bound(i + 1);
                return (lo + (hi - lo) / 2).min(self.max());
            }
        }
        self.max()
    }

    /// (value, cumulative fraction) points of the CDF, one per non-empty bucket.
    pub fn cdf(&self) -> Vec<(u64, f64)> {
        let n = self.count().max(1) as f64;
        let mut seen = 0;
        let mut out = Vec::new();
        for (i, b) in self.buckets.iter().enumerate() {
            let c = b.load(Relaxed);
            if c > 0 {
                seen += c;
                out.push((lower_bound(i + 1).min(self.max()), seen as f64 / n));
            }
        }
        out
    }

    /// Counts per power-of-two microsecond bucket, `(upper bound in µs, count)`, empty buckets
    /// left out (values are recorded in nanoseconds): a compact histogram for reports.
    pub fn log2_us(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, b) in self.buckets.iter().enumerate() {
            let c = b.load(Relaxed);
            if c == 0 {
                continue;
            }
            // every value in bucket i is below lower_bound(i + 1)
            let upper_us = lower_bound(i + 1).div_ceil(1000).max(1).next_power_of_two();
            match out.last_mut() {
                Some((u, n)) if *u == upper_us => *n += c,
                _ => out.push((upper_us, c)),
            }
        }
        out
    }

    /// Summary in microseconds (values are recorded in nanoseconds).
    pub fn summary_us(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: self.count(),
            p50_us: us(self.quantile(0.5)),
            p90_us: us(self.quantile(0.9)),
            p99_us: us(self.quantile(0.99)),
            p999_us: us(self.quantile(0.999)),
            max_us: us(self.max()),
            mean_us: if self.count() == 0 {
                0.0
            } else {
                us(self.sum()) / self.count() as f64
            },
        }
    }
}

/// Percentiles of a latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// Live counters of a pager.
#[derive(Debug, Default)]
pub struct Stats {
    /// Per-fault latency (ns): from reading the fault event to the page being installed.
    pub fault_latency: Histogram,
    /// Sum over faults of the time a thread was blocked on them (ns).
    pub blocked_ns: AtomicU64,
    /// Fault events handled (including stale ones for pages already present).
    pub fault_events: AtomicU64,
    /// Page requests sent.
    pub requests: AtomicU64,
    /// Pages installed because a fault asked for them.
    pub fault_pages: AtomicU64,
    /// Pages installed from prefetch around faults.
    pub prefetch_pages: AtomicU64,
    /// Pages installed from the background stream.
    pub stream_pages: AtomicU64,
    /// Of all installed pages, those installed as zero pages (no payload).
    pub zero_pages: AtomicU64,
    /// Page bytes received for faults.
    pub fault_bytes: AtomicU64,
    /// Page bytes received as prefetch.
    pub prefetch_bytes: AtomicU64,
    /// Page bytes received by the stream.
    pub stream_bytes: AtomicU64,
    /// Pages that arrived but were already present (EEXIST).
    pub duplicate_pages: AtomicU64,
    /// Requests the source answered `InFlight` (their pages came with the stream).
    pub in_flight_replies: AtomicU64,
    /// Pre-copy: pages that came again and overwrote their older copy.
    pub precopy_rewrites: AtomicU64,
    /// Pre-copy: present pages dropped at its end because the source modified them since.
    pub precopy_dropped: AtomicU64,
    /// Pages received in `Precopy` frames (whatever became of them).
    pub precopy_received: AtomicU64,
    /// Successful reconnections to the source.
    pub reconnects: AtomicU64,
    /// Time spent without a source, from each loss to its reconnection or the give-up (ns).
    pub disconnected_ns: AtomicU64,
}

/// The final (or current) figures of a pager, printable as a table and serializable as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Pages in the region.
    pub total_pages: u64,
    /// Pages present.
    pub present_pages: u64,
    /// Time from start to every page present (ms), if complete.
    pub time_to_complete_ms: Option<f64>,
    /// Per-fault latency.
    pub fault_latency: LatencySummary,
    /// Per-fault latency histogram: `(upper bound in µs, faults)` per power-of-two bucket.
    pub fault_latency_log2_us: Vec<(u64, u64)>,
    /// Total time faulting threads were blocked (ms).
    pub blocked_ms: f64,
    /// Fault events handled.
    pub fault_events: u64,
    /// Requests sent.
    pub requests: u64,
    /// Pages by origin.
    pub fault_pages: u64,
    /// Pages by origin.
    pub prefetch_pages: u64,
    /// Pages by origin.
    pub stream_pages: u64,
    /// Zero pages (any origin).
    pub zero_pages: u64,
    /// Bytes by origin.
    pub fault_bytes: u64,
    /// Bytes by origin.
    pub prefetch_bytes: u64,
    /// Bytes by origin.
    pub stream_bytes: u64,
    /// Pages received twice.
    pub duplicate_pages: u64,
    /// Requests answered "on its way on the stream" instead of with the pages.
    pub in_flight_replies: u64,
    /// Pre-copy: pages that came again and overwrote their older copy.
    pub precopy_rewrites: u64,
    /// Pre-copy: present pages dropped at its end (modified after they were sent).
    pub precopy_dropped: u64,
    /// Reconnections.
    pub reconnects: u64,
    /// Time without a source (from each loss to its reconnection), ms: faults on missing
    /// pages wait this long at most; vCPUs that need no missing page run on.
    pub disconnected_ms: f64,
}

impl Stats {
    /// Snapshot into a report.
    pub fn report(
        &self,
        total_pages: u64,
        present_pages: u64,
        complete: Option<Duration>,
    ) -> Report {
        let l = |a: &AtomicU64| a.load(Relaxed);
        Report {
            total_pages,
            present_pages,
            time_to_complete_ms: complete.map(|d| d.as_secs_f64() * 1e3),
            fault_latency: self.fault_latency.summary_us(),
            fault_latency_log2_us: self.fault_latency.log2_us(),
            blocked_ms: l(&self.blocked_ns) as f64 / 1e6,
            fault_events: l(&self.fault_events),
            requests: l(&self.requests),
            fault_pages: l(&self.fault_pages),
            prefetch_pages: l(&self.prefetch_pages),
            stream_pages: l(&self.stream_pages),
            zero_pages: l(&self.zero_pages),
            fault_bytes: l(&self.fault_bytes),
            prefetch_bytes: l(&self.prefetch_bytes),
            stream_bytes: l(&self.stream_bytes),
            duplicate_pages: l(&self.duplicate_pages),
            in_flight_replies: l(&self.in_flight_replies),
            precopy_rewrites: l(&self.precopy_rewrites),
            precopy_dropped: l(&self.precopy_dropped),
            reconnects: l(&self.reconnects),
            disconnected_ms: l(&self.disconnected_ns) as f64 / 1e6,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let l = &self.fault_latency;
        writeln!(
            f,
            "  pages present        {} / {}",
            self.present_pages, self.total_pages
        )?;
        match self.time_to_complete_ms {
            Some(ms) => writeln!(f, "  time to complete     {ms:.1} ms")?,
            None => writeln!(f, "  time to complete     (not complete)")?,
        }
        writeln!(
            f,
            "  fault latency (us)   p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  ({} faults)",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.count
        )?;
        writeln!(
            f,
            "  blocked time         {:.1} ms over {} fault events, {} requests ({} answered in flight)",
            self.blocked_ms, self.fault_events, self.requests, self.in_flight_replies
        )?;
        writeln!(
            f,
            "  pages by origin      fault {}  prefetch {}  stream {}  (zero {}, duplicate {})",
            self.fault_pages,
            self.prefetch_pages,
            self.stream_pages,
            self.zero_pages,
            self.duplicate_pages
        )?;
        writeln!(
            f,
            "  MiB by origin        fault {:.1}  prefetch {:.1}  stream {:.1}",
            mib(self.fault_bytes),
            mib(self.prefetch_bytes),
            mib(self.stream_bytes)
        )?;
        write!(
            f,
            "  reconnects           {} ({:.1} ms without a source)",
            self.reconnects, self.disconnected_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_precision() {
        let h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.04, "{p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.04, "{p99}");
        assert_eq!(h.max(), 10_000_000);
        for i in 0..BUCKETS - 1 {
            assert!(lower_bound(i) < lower_bound(i + 1));
            assert_eq!(index(lower_bound(i)), i);
        }
    }
}

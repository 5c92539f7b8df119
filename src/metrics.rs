//! Counters behind `/metrics`, rendered as Prometheus text. Plain atomics:
//! nothing here allocates or locks on the request path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The outcome classes the request counter is split by.
pub const OUTCOMES: [&str; 10] = [
    "2xx", "3xx", "401", "403", "404", "413", "429", "4xx", "503", "5xx",
];

pub fn outcome_index(status: u16) -> usize {
    match status {
        200..=299 => 0,
        300..=399 => 1,
        401 => 2,
        403 => 3,
        404 => 4,
        413 => 5,
        429 => 6,
        503 => 8,
        500..=599 => 9,
        _ => 7,
    }
}

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

pub struct Metrics {
    /// Route labels; the last one stands for requests that matched no route.
    routes: Vec<String>,
    requests: Vec<[AtomicU64; OUTCOMES.len()]>,
    latency: Histogram,
    pub key_cache_hits: AtomicU64,
    pub key_cache_misses: AtomicU64,
    pub owner_cache_hits: AtomicU64,
    pub owner_cache_misses: AtomicU64,
    pub store_errors: AtomicU64,
    pub usage_flushes_ok: AtomicU64,
    pub usage_flushes_failed: AtomicU64,
    pub usage_writes: AtomicU64,
    pub usage_dropped: AtomicU64,
    pub usage_pending: AtomicU64,
    pub invalidations: AtomicU64,
    pub cache_flushes: AtomicU64,
    pub spoofed_headers: AtomicU64,
}

impl Metrics {
    pub fn new(route_labels: impl IntoIterator<Item = String>) -> Metrics {
        let mut routes: Vec<String> = route_labels.into_iter().collect();
        routes.push("unmatched".to_owned());
        Metrics {
            requests: routes.iter().map(|_| Default::default()).collect(),
            routes,
            latency: Histogram::default(),
            key_cache_hits: AtomicU64::new(0),
            key_cache_misses: AtomicU64::new(0),
            owner_cache_hits: AtomicU64::new(0),
            owner_cache_misses: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            usage_flushes_ok: AtomicU64::new(0),
            usage_flushes_failed: AtomicU64::new(0),
            usage_writes: AtomicU64::new(0),
            usage_dropped: AtomicU64::new(0),
            usage_pending: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            cache_flushes: AtomicU64::new(0),
            spoofed_headers: AtomicU64::new(0),
        }
    }

    /// Index used for requests that matched no route.
    pub fn unmatched(&self) -> usize {
        self.routes.len() - 1
    }

    pub fn observe(&self, route: usize, status: u16, elapsed: Duration) {
        let route = route.min(self.routes.len() - 1);
        self.requests[route][outcome_index(status)].fetch_add(1, Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency.buckets[i].fetch_add(1, Relaxed);
        }
        self.latency.count.fetch_add(1, Relaxed);
        self.latency.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    /// Requests counted for one route label and outcome (for tests and the bench).
    pub fn requests(&self, route: &str, outcome: &str) -> u64 {
        let (Some(r), Some(o)) = (
            self.routes.iter().position(|l| l == route),
            OUTCOMES.iter().position(|l| *l == outcome),
        ) else {
            return 0;
        };
        self.requests[r][o].load(Relaxed)
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP keygate_requests_total Requests by route and outcome.\n");
        out.push_str("# TYPE keygate_requests_total counter\n");
        for (route, counts) in self.routes.iter().zip(&self.requests) {
            for (outcome, n) in OUTCOMES.iter().zip(counts) {
                let _ = writeln!(
                    out,
                    "keygate_requests_total{{route=\"{}\",outcome=\"{outcome}\"}} {}",
                    escape(route),
                    n.load(Relaxed)
                );
            }
        }
        out.push_str("# HELP keygate_request_duration_seconds Time to the response head.\n");
        out.push_str("# TYPE keygate_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(&self.latency.buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(
                out,
                "keygate_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.latency.count.load(Relaxed);
        let _ = writeln!(
            out,
            "keygate_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "keygate_request_duration_seconds_sum {}",
            self.latency.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "keygate_request_duration_seconds_count {count}");
        let counters: [(&str, &str, &AtomicU64); 13] = [
            (
                "keygate_key_cache_hits_total",
                "Key lookups answered by the cache.",
                &self.key_cache_hits,
            ),
            (
                "keygate_key_cache_misses_total",
                "Key lookups that went to the store.",
                &self.key_cache_misses,
            ),
            (
                "keygate_owner_cache_hits_total",
                "Owner lookups answered by the cache.",
                &self.owner_cache_hits,
            ),
            (
                "keygate_owner_cache_misses_total",
                "Owner lookups that went to the store.",
                &self.owner_cache_misses,
            ),
            (
                "keygate_store_errors_total",
                "Store calls that failed.",
                &self.store_errors,
            ),
            (
                "keygate_last_used_flushes_total",
                "lastUsedAt batches written.",
                &self.usage_flushes_ok,
            ),
            (
                "keygate_last_used_flush_failures_total",
                "lastUsedAt batches that failed and will be retried.",
                &self.usage_flushes_failed,
            ),
            (
                "keygate_last_used_writes_total",
                "Keys whose lastUsedAt was written.",
                &self.usage_writes,
            ),
            (
                "keygate_last_used_dropped_total",
                "lastUsedAt updates dropped because the pending set was full.",
                &self.usage_dropped,
            ),
            (
                "keygate_invalidations_total",
                "Cache invalidations applied.",
                &self.invalidations,
            ),
            (
                "keygate_cache_flushes_total",
                "Whole-cache flushes (after an invalidation gap).",
                &self.cache_flushes,
            ),
            (
                "keygate_spoofed_headers_total",
                "Client-sent copies of injected headers removed.",
                &self.spoofed_headers,
            ),
            (
                "keygate_last_used_pending",
                "Keys with a lastUsedAt not yet written.",
                &self.usage_pending,
            ),
        ];
        for (name, help, value) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Relaxed)
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        for (status, outcome) in [
            (200, "2xx"),
            (401, "401"),
            (405, "4xx"),
            (502, "5xx"),
            (503, "503"),
        ] {
            assert_eq!(OUTCOMES[outcome_index(status)], outcome);
        }
    }

    #[test]
    fn render_counts_requests_and_latency() {
        let m = Metrics::new(["/w/{workflow}".to_owned()]);
        m.observe(0, 200, Duration::from_micros(300));
        m.observe(0, 401, Duration::from_millis(3));
        m.observe(m.unmatched(), 404, Duration::from_millis(3));
        assert_eq!(m.requests("/w/{workflow}", "2xx"), 1);
        let text = m.render();
        assert!(text.contains("keygate_requests_total{route=\"/w/{workflow}\",outcome=\"401\"} 1"));
        assert!(text.contains("keygate_requests_total{route=\"unmatched\",outcome=\"404\"} 1"));
        assert!(text.contains("keygate_request_duration_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("keygate_request_duration_seconds_count 3"));
    }
}

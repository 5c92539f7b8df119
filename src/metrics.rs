//! Counters behind `/metrics`, rendered as Prometheus text. Plain atomics:
//! nothing here allocates or locks on the request path.
//!
//! Requests are counted per route label in a fixed number of slots: a
//! reload may add routes (their labels take free slots) while requests on
//! the old routes are still being counted; labels are never removed.

use std::fmt::Write;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// One counter among [`Counters`], by name in `render`.
type Field = fn(&Counters) -> &AtomicU64;

/// Route labels the request counters have room for, `unmatched` included.
pub const ROUTE_SLOTS: usize = 64;

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

/// One thread's counters. Each data-plane worker writes its own shard, so
/// the request path never contends on a cache line; `/metrics` sums them.
#[repr(align(128))]
pub struct Counters {
    requests: Box<[[AtomicU64; OUTCOMES.len()]; ROUTE_SLOTS]>,
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
    pub dropped_headers: AtomicU64,
    pub expired_keys: AtomicU64,
    pub scope_refusals: AtomicU64,
    pub audit_failures: AtomicU64,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            requests: Box::new(std::array::from_fn(|_| Default::default())),
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
            dropped_headers: AtomicU64::new(0),
            expired_keys: AtomicU64::new(0),
            scope_refusals: AtomicU64::new(0),
            audit_failures: AtomicU64::new(0),
        }
    }
}

/// Client connections: counted at accept and close, not per request.
#[derive(Default)]
pub struct ConnectionCounts {
    pub open: AtomicU64,
    /// Refused at accept, over `limits.max_connections(_per_ip)`.
    pub refused: AtomicU64,
}

thread_local! {
    /// Which shard this thread writes; data-plane workers set their own.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes the calling thread write to shard `index` (wrapped to the shard count).
pub fn set_thread_shard(index: usize) {
    SHARD.with(|s| s.set(index));
}

pub struct Metrics {
    /// Route labels by slot; slot 0 stands for requests that matched no
    /// route.
    routes: RwLock<Vec<String>>,
    shards: Vec<Counters>,
    pub connections: ConnectionCounts,
    /// Egress calls by integration type and outcome: few, and off the
    /// data plane, so a lock is fine.
    egress: std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
}

const UNMATCHED: &str = "unmatched";

impl Metrics {
    pub fn new(route_labels: impl IntoIterator<Item = String>) -> Metrics {
        Metrics::with_shards(route_labels, 1)
    }

    /// `shards` is usually the number of data-plane workers plus one.
    pub fn with_shards(route_labels: impl IntoIterator<Item = String>, shards: usize) -> Metrics {
        let metrics = Metrics {
            routes: RwLock::new(vec![UNMATCHED.to_owned()]),
            shards: (0..shards.max(1)).map(|_| Counters::default()).collect(),
            connections: ConnectionCounts::default(),
            egress: std::sync::Mutex::default(),
        };
        for label in route_labels {
            // Config validation keeps the routes within the slots.
            let _ = metrics.register(&label);
        }
        metrics
    }

    /// The slot a route label is counted in, taking a free one for a new
    /// label.
    pub fn register(&self, label: &str) -> Result<usize, String> {
        let mut routes = self
            .routes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slot) = routes.iter().skip(1).position(|l| l == label) {
            return Ok(slot + 1);
        }
        if routes.len() >= ROUTE_SLOTS {
            return Err(format!(
                "metrics: no room for route {label:?}: at most {} distinct routes since start; restart to count new ones",
                ROUTE_SLOTS - 1
            ));
        }
        routes.push(label.to_owned());
        Ok(routes.len() - 1)
    }

    /// The calling thread's counters.
    pub fn local(&self) -> &Counters {
        &self.shards[SHARD.with(std::cell::Cell::get) % self.shards.len()]
    }

    /// The slot of requests that matched no route.
    pub fn unmatched(&self) -> usize {
        0
    }

    pub fn observe(&self, slot: usize, status: u16, elapsed: Duration) {
        let c = self.local();
        let slot = if slot < ROUTE_SLOTS { slot } else { 0 };
        c.requests[slot][outcome_index(status)].fetch_add(1, Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            c.latency.buckets[i].fetch_add(1, Relaxed);
        }
        c.latency.count.fetch_add(1, Relaxed);
        c.latency.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    fn sum(&self, f: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|c| f(c).load(Relaxed)).sum()
    }

    /// Requests counted for one route label and outcome (for tests and the bench).
    pub fn requests(&self, route: &str, outcome: &str) -> u64 {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (Some(r), Some(o)) = (
            routes.iter().position(|l| l == route),
            OUTCOMES.iter().position(|l| *l == outcome),
        ) else {
            return 0;
        };
        self.sum(|c| &c.requests[r][o])
    }

    /// Counts one egress call of integration type `kind`.
    pub fn egress(&self, kind: &str, outcome: &'static str) {
        let mut egress = self
            .egress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *egress.entry((kind.to_owned(), outcome)).or_default() += 1;
    }

    /// An audit entry the store did not take.
    pub fn audit_failed(&self) {
        self.local()
            .audit_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        {
            let egress = self
                .egress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !egress.is_empty() {
                out.push_str("# HELP keygate_egress_requests_total Egress calls by integration type and outcome.\n");
                out.push_str("# TYPE keygate_egress_requests_total counter\n");
                for ((kind, outcome), count) in egress.iter() {
                    let _ = writeln!(
                        out,
                        "keygate_egress_requests_total{{type=\"{}\",outcome=\"{outcome}\"}} {count}",
                        escape(kind)
                    );
                }
            }
        }
        out.push_str("# HELP keygate_requests_total Requests by route and outcome.\n");
        out.push_str("# TYPE keygate_requests_total counter\n");
        let routes = self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        // Configured routes first, `unmatched` last.
        let order = (1..routes.len()).chain([0]);
        for (r, route) in order.map(|r| (r, &routes[r])) {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "keygate_requests_total{{route=\"{}\",outcome=\"{outcome}\"}} {}",
                    escape(route),
                    self.sum(|c| &c.requests[r][o])
                );
            }
        }
        out.push_str("# HELP keygate_request_duration_seconds Time to the response head.\n");
        out.push_str("# TYPE keygate_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.sum(|c| &c.latency.buckets[i]);
            let _ = writeln!(
                out,
                "keygate_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.sum(|c| &c.latency.count);
        let _ = writeln!(
            out,
            "keygate_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "keygate_request_duration_seconds_sum {}",
            self.sum(|c| &c.latency.sum_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "keygate_request_duration_seconds_count {count}");
        let counters: [(&str, &str, Field); 17] = [
            (
                "keygate_key_cache_hits_total",
                "Key lookups answered by the cache.",
                |c| &c.key_cache_hits,
            ),
            (
                "keygate_key_cache_misses_total",
                "Key lookups that went to the store.",
                |c| &c.key_cache_misses,
            ),
            (
                "keygate_owner_cache_hits_total",
                "Owner lookups answered by the cache.",
                |c| &c.owner_cache_hits,
            ),
            (
                "keygate_owner_cache_misses_total",
                "Owner lookups that went to the store.",
                |c| &c.owner_cache_misses,
            ),
            (
                "keygate_store_errors_total",
                "Store calls that failed.",
                |c| &c.store_errors,
            ),
            (
                "keygate_last_used_flushes_total",
                "lastUsedAt batches written.",
                |c| &c.usage_flushes_ok,
            ),
            (
                "keygate_last_used_flush_failures_total",
                "lastUsedAt batches that failed and will be retried.",
                |c| &c.usage_flushes_failed,
            ),
            (
                "keygate_last_used_writes_total",
                "Keys whose lastUsedAt was written.",
                |c| &c.usage_writes,
            ),
            (
                "keygate_last_used_dropped_total",
                "lastUsedAt updates dropped because the pending set was full.",
                |c| &c.usage_dropped,
            ),
            (
                "keygate_invalidations_total",
                "Cache invalidations applied.",
                |c| &c.invalidations,
            ),
            (
                "keygate_cache_flushes_total",
                "Whole-cache flushes (after an invalidation gap).",
                |c| &c.cache_flushes,
            ),
            (
                "keygate_expired_key_refusals_total",
                "Requests refused because their key had expired (401).",
                |c| &c.expired_keys,
            ),
            (
                "keygate_scope_refusals_total",
                "Requests refused because their key is scoped to other workflows (403).",
                |c| &c.scope_refusals,
            ),
            (
                "keygate_audit_failures_total",
                "Admin actions whose audit entry could not be written.",
                |c| &c.audit_failures,
            ),
            (
                "keygate_spoofed_headers_total",
                "Client-sent copies of injected headers removed.",
                |c| &c.spoofed_headers,
            ),
            (
                "keygate_dropped_headers_total",
                "Client headers not forwarded: names with `_`, and names on headers.strip.",
                |c| &c.dropped_headers,
            ),
            (
                "keygate_last_used_pending",
                "Keys with a lastUsedAt not yet written.",
                |c| &c.usage_pending,
            ),
        ];
        for (name, help, field) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                self.sum(field)
            );
        }
        let _ = writeln!(
            out,
            "# HELP keygate_connections_open Client connections open.\n# TYPE keygate_connections_open gauge\nkeygate_connections_open {}",
            self.connections.open.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP keygate_connections_refused_total Client connections refused at accept (connection limits).\n# TYPE keygate_connections_refused_total counter\nkeygate_connections_refused_total {}",
            self.connections.refused.load(Relaxed)
        );
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
    fn shards_add_up() {
        let m = Metrics::with_shards(["/w".to_owned()], 3);
        let slot = m.register("/w").unwrap();
        std::thread::scope(|s| {
            for shard in 0..3 {
                let m = &m;
                s.spawn(move || {
                    set_thread_shard(shard);
                    m.observe(slot, 200, Duration::from_millis(1));
                    m.local().key_cache_hits.fetch_add(1, Relaxed);
                });
            }
        });
        assert_eq!(m.requests("/w", "2xx"), 3);
        assert!(m.render().contains("keygate_key_cache_hits_total 3"));
    }

    #[test]
    fn routes_added_later_take_free_slots_and_old_ones_keep_theirs() {
        let m = Metrics::new(["/a/{workflow}".to_owned()]);
        let a = m.register("/a/{workflow}").unwrap();
        let b = m.register("/b/{workflow}").unwrap();
        assert_ne!(a, b);
        assert_eq!(m.register("/a/{workflow}"), Ok(a));
        m.observe(b, 200, Duration::ZERO);
        assert_eq!(m.requests("/b/{workflow}", "2xx"), 1);
        for i in 0..ROUTE_SLOTS {
            let _ = m.register(&format!("/r{i}/{{workflow}}"));
        }
        assert!(m.register("/one-too-many/{workflow}").is_err());
        assert_eq!(m.register("/a/{workflow}"), Ok(a));
    }

    #[test]
    fn render_counts_requests_and_latency() {
        let m = Metrics::new(["/w/{workflow}".to_owned()]);
        let slot = m.register("/w/{workflow}").unwrap();
        m.observe(slot, 200, Duration::from_micros(300));
        m.observe(slot, 401, Duration::from_millis(3));
        m.observe(m.unmatched(), 404, Duration::from_millis(3));
        assert_eq!(m.requests("/w/{workflow}", "2xx"), 1);
        let text = m.render();
        assert!(text.contains("keygate_requests_total{route=\"/w/{workflow}\",outcome=\"401\"} 1"));
        assert!(text.contains("keygate_requests_total{route=\"unmatched\",outcome=\"404\"} 1"));
        assert!(text.contains("keygate_request_duration_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("keygate_request_duration_seconds_count 3"));
    }
}

//! Test harness: real upstreams ([`upstream`]), `redis-server` processes
//! ([`redis`]) and PostgreSQL servers ([`postgres`]) on free loopback ports, a gateway under test with
//! clients for it ([`gateway`]), and waiting with deadlines.
#![allow(dead_code, unused_imports)]

pub mod gateway;
pub mod https;
pub mod postgres;
pub mod redis;
pub mod upstream;

pub use gateway::*;
pub use https::*;
pub use postgres::*;
pub use redis::*;
pub use upstream::*;

use bytes::Bytes;
use std::time::{Duration, Instant};

/// Waits for a condition with a deadline instead of a fixed sleep.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `p` quantile (0 to 1) of sorted durations, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn json(bytes: &Bytes) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

//! Test harness: real upstreams ([`upstream`]) and `redis-server`
//! processes ([`redis`]) on free loopback ports, a gateway under test with
//! clients for it ([`gateway`]), and waiting with deadlines.
#![allow(dead_code, unused_imports)]

pub mod gateway;
pub mod redis;
pub mod upstream;

pub use gateway::*;
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

pub fn json(bytes: &Bytes) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

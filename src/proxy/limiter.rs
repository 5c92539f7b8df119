//! Failed-authentication limiter: a client (by IP) that fails authentication
//! `max_failures` times within `window` gets 429 until the window ends.
//! Memory stays bounded: expired windows are swept as the map grows.

use crate::config::RateLimitConfig;
use dashmap::DashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub struct Limiter {
    windows: DashMap<IpAddr, (Instant, u32)>,
    max_failures: u32,
    window: Duration,
}

/// Above this many tracked clients, expired windows are swept.
const SWEEP_AT: usize = 65_536;

impl Limiter {
    pub fn new(config: &RateLimitConfig) -> Limiter {
        Limiter {
            windows: DashMap::new(),
            max_failures: config.max_failures,
            window: config.window,
        }
    }

    /// `Some(retry_after)` if this client is over its limit.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.max_failures == 0 || self.windows.is_empty() {
            return None;
        }
        let entry = self.windows.get(&ip)?;
        let (start, count) = *entry;
        let elapsed = now.saturating_duration_since(start);
        (count >= self.max_failures && elapsed < self.window).then(|| self.window - elapsed)
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        if self.windows.len() >= SWEEP_AT {
            self.windows
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < self.window);
        }
        let mut entry = self.windows.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_until_the_window_ends() {
        let l = Limiter::new(&RateLimitConfig {
            max_failures: 3,
            window: Duration::from_secs(10),
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.blocked(ip, t0), None);
            l.failed(ip, t0);
        }
        assert_eq!(
            l.blocked(ip, t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(l.blocked(other, t0), None);
        assert_eq!(l.blocked(ip, t0 + Duration::from_secs(10)), None);
        l.failed(ip, t0 + Duration::from_secs(10));
        assert_eq!(l.blocked(ip, t0 + Duration::from_secs(10)), None);
    }

    #[test]
    fn zero_disables_the_limit() {
        let l = Limiter::new(&RateLimitConfig {
            max_failures: 0,
            window: Duration::from_secs(10),
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        l.failed(ip, Instant::now());
        assert_eq!(l.blocked(ip, Instant::now()), None);
    }
}

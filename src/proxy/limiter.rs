//! Failed-authentication limiter: a client (by IP) that fails authentication
//! `max_failures` times within `window` gets 429 until the window ends.
//! Memory stays bounded: expired windows are swept as the map grows.

use crate::config::RateLimitConfig;
use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct Limiter {
    windows: DashMap<IpAddr, (Instant, u32)>,
    /// Whether any client was ever tracked: lets the request path skip the
    /// map (whose `is_empty` would lock every shard) until a failure happens.
    tracking: AtomicBool,
    max_failures: u32,
    window: Duration,
}

/// Above this many tracked clients, expired windows are swept.
const SWEEP_AT: usize = 65_536;
/// Hard bound: while this many clients are inside their window, new ones
/// are not tracked (authentication itself is unaffected).
const MAX_TRACKED: usize = 262_144;

/// Whom a failure counts against: the address, or for IPv6 its /64, since
/// one host can use a whole /64.
pub(crate) fn client(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

impl Limiter {
    pub fn new(config: &RateLimitConfig) -> Limiter {
        Limiter {
            windows: DashMap::new(),
            tracking: AtomicBool::new(false),
            max_failures: config.max_failures,
            window: config.window,
        }
    }

    /// `Some(retry_after)` if this client is over its limit.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.max_failures == 0 || !self.tracking.load(Ordering::Relaxed) {
            return None;
        }
        let entry = self.windows.get(&client(ip))?;
        let (start, count) = *entry;
        let elapsed = now.saturating_duration_since(start);
        (count >= self.max_failures && elapsed < self.window).then(|| self.window - elapsed)
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        let ip = client(ip);
        if self.windows.len() >= SWEEP_AT && !self.windows.contains_key(&ip) {
            self.windows
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < self.window);
            if self.windows.len() >= MAX_TRACKED {
                return;
            }
        }
        self.tracking.store(true, Ordering::Relaxed);
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
            key_requests: 0,
            key_window: Duration::from_secs(1),
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
    fn ipv6_clients_count_by_their_64() {
        let l = Limiter::new(&RateLimitConfig {
            max_failures: 2,
            window: Duration::from_secs(10),
            key_requests: 0,
            key_window: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        l.failed("2001:db8::1".parse().unwrap(), t0);
        l.failed("2001:db8::2".parse().unwrap(), t0);
        assert!(l.blocked("2001:db8::ffff".parse().unwrap(), t0).is_some());
        assert!(l.blocked("2001:db8:0:1::1".parse().unwrap(), t0).is_none());
    }

    #[test]
    fn zero_disables_the_limit() {
        let l = Limiter::new(&RateLimitConfig {
            max_failures: 0,
            window: Duration::from_secs(10),
            key_requests: 0,
            key_window: Duration::from_secs(1),
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        l.failed(ip, Instant::now());
        assert_eq!(l.blocked(ip, Instant::now()), None);
    }
}

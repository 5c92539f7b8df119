//! The per-key rate (the key's own `N/DUR`, else `rate_limit.key_requests`
//! per `key_window`): fixed windows, counted per instance in the key's
//! cached [`Principal`] (one atomic, no lock).

use super::reject::Reject;
use crate::auth::Principal;
use crate::config::RateLimitConfig;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Low bits of the rate word that count requests; the window number takes
/// the rest.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

pub(crate) struct KeyRate {
    /// Requests per window; 0 means no limit.
    requests: u32,
    window_ms: u64,
}

impl KeyRate {
    pub(crate) fn new(config: &RateLimitConfig) -> KeyRate {
        KeyRate {
            requests: config.key_requests,
            window_ms: u64::try_from(config.key_window.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        }
    }

    /// Counts one request of the key at `now_ms` (Unix ms); 429 with the
    /// time until the window ends when it is over the limit.
    pub(crate) fn admit(&self, principal: &Principal, now_ms: i64) -> Result<(), Reject> {
        let (requests, window_ms) = match principal.own_rate() {
            Some(rate) => (rate.requests, rate.window_ms),
            None => (self.requests, self.window_ms),
        };
        if requests == 0 {
            return Ok(());
        }
        count(principal, now_ms, window_ms, requests).map_err(|ms| Reject::KeyRateExceeded {
            retry_after: Duration::from_millis(ms),
        })
    }
}

/// Counts one request against `limit` per `window_ms`; `Err` carries the
/// milliseconds until the window ends.
fn count(principal: &Principal, now_ms: i64, window_ms: u64, limit: u32) -> Result<(), u64> {
    let now = u64::try_from(now_ms).unwrap_or(0);
    let window = now / window_ms;
    let stamp = window & ((1 << (64 - COUNT_BITS)) - 1);
    let rate = &principal.rate;
    let mut current = rate.load(Ordering::Relaxed);
    loop {
        let counted = if current >> COUNT_BITS == stamp {
            current & COUNT_MASK
        } else {
            0
        };
        if counted >= u64::from(limit) {
            return Err(window_ms - now % window_ms);
        }
        let next = (stamp << COUNT_BITS) | (counted + 1).min(COUNT_MASK);
        match rate.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Ok(()),
            Err(seen) => current = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rate_counts_per_fixed_window() {
        let p = Principal::new("k", "u", "wfb_1234567");
        for _ in 0..3 {
            assert_eq!(count(&p, 10_000, 1000, 3), Ok(()));
        }
        assert_eq!(count(&p, 10_250, 1000, 3), Err(750));
        assert_eq!(count(&p, 11_000, 1000, 3), Ok(()));
    }
}

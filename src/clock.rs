//! Wall-clock time as Unix milliseconds, its RFC 3339 rendering for the
//! admin API (`2026-01-02T03:04:05.678Z`) and its HTTP `Date` rendering
//! (both by jiff), and a monotonic uptime for ages kept in atomics.
//!
//! The uptime reads tokio's clock, so tests that pause it
//! (`tokio::time::pause`, `start_paused`) control every TTL and idle age
//! measured with it; outside a paused runtime it is the OS monotonic clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whole milliseconds of a monotonic clock: for ages and deadlines kept in
/// atomics. Only differences between two readings mean anything.
pub fn uptime_ms() -> u64 {
    use tokio::time::Instant;
    // The origin lies an hour before the first reading, so a paused
    // runtime whose clock was frozen shortly before that reading still
    // counts forward from it; readings never go below it (saturating).
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let now = Instant::now();
    let origin = ORIGIN.get_or_init(|| {
        now.checked_sub(std::time::Duration::from_secs(3600))
            .unwrap_or(now)
    });
    u64::try_from(now.saturating_duration_since(*origin).as_millis()).unwrap_or(u64::MAX)
}

/// RFC 3339 in UTC with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(at) => at.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        // Outside jiff's range (years -9999 to 9999): no real instant.
        Err(_) => String::from("-"),
    }
}

/// IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn imf_fixdate(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .ok()
        .and_then(|at| {
            jiff::fmt::rfc2822::DateTimePrinter::new()
                .timestamp_to_rfc9110_string(&at)
                .ok()
        })
        .unwrap_or_default()
}

/// Hands `f` the current `Date` header value, rendered once a second per
/// thread.
pub fn http_date(f: impl FnOnce(&[u8])) {
    use std::cell::RefCell;
    thread_local! {
        static CACHED: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    let secs = now_ms().div_euclid(1000);
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, imf_fixdate(secs));
        }
        f(cached.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_323_045_678), "2026-01-02T03:04:05.678Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn formats_http_dates() {
        assert_eq!(imf_fixdate(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(imf_fixdate(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        let mut rendered = String::new();
        http_date(|d| rendered = String::from_utf8_lossy(d).into_owned());
        assert!(
            rendered.ends_with(" GMT") && rendered.len() == 29,
            "{rendered}"
        );
    }

    #[test]
    fn now_is_after_2020() {
        assert!(now_ms() > 1_577_836_800_000);
    }
}

//! What a key may be limited by beyond its owner (an expiry, workflow
//! scopes, a rate of its own) and the audit log's entries: the parts of a
//! record every store keeps the same way.

use crate::config::parse_duration;
use std::fmt;
use std::time::Duration;

/// A key's own rate: `requests` per `window_ms`, written `N/DUR`
/// (`100/1m`), counted per instance like `rate_limit.key_requests`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub requests: u32,
    pub window_ms: u64,
}

/// The message for a rate [`Rate::parse`] refuses.
pub const RATE_RULE: &str = "rate must be N/DURATION with N from 1 to 16777215 and a duration like 1s, 1m, 1h or 1d (e.g. 100/1m)";

impl Rate {
    /// `N/DUR`; `None` unless N is 1 to 2^24 − 1 (what the per-key counter
    /// holds) and DUR a whole number of milliseconds of at least one.
    pub fn parse(text: &str) -> Option<Rate> {
        let (n, per) = text.trim().split_once('/')?;
        let requests: u32 = n.trim().parse().ok()?;
        let window = parse_duration(per.trim())?;
        let window_ms = u64::try_from(window.as_millis()).ok()?;
        ((1..1 << 24).contains(&requests) && window_ms > 0).then_some(Rate {
            requests,
            window_ms,
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.requests, duration_text(self.window_ms))
    }
}

/// Milliseconds in the largest unit that divides them: `90s`, `15m`, `30d`.
pub fn duration_text(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    for (size, unit) in UNITS {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Rate::parse(&text).ok_or_else(|| serde::de::Error::custom(RATE_RULE))
    }
}

/// The longest duration taken: past it a time no longer reads as RFC 3339
/// (or fits a database timestamp).
const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A duration the admin API and the CLI take (`90s`, `15m`, `12h`, `30d`),
/// from a second to 100 years.
pub fn parse_lifetime(text: &str) -> Option<Duration> {
    parse_duration(text).filter(|d| (Duration::from_secs(1)..=MAX_LIFETIME).contains(d))
}

/// One entry of the audit log: an admin action, when, by whom, on what.
/// Never a key, a hash or a secret: ids and the key's prefix only.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub at: i64,
    /// `key.created`, `key.rolled`, `key.revoked`, `key.expired`,
    /// `owner.set`, `owner.removed`, `integration.added`,
    /// `integration.removed`, `integrations.rekeyed`, `run_token.minted`.
    pub action: String,
    /// The admin caller's address, or `keygate` for what keygate did itself.
    pub caller: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integration_id: Option<String>,
    /// What else the action was about (a rolled key's successor, a grace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Random, so two entries of one millisecond stay two.
    #[serde(default)]
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let r = Rate::parse("100/1m").unwrap();
        assert_eq!((r.requests, r.window_ms), (100, 60_000));
        assert_eq!(r.to_string(), "100/1m");
        assert_eq!(Rate::parse("5/90s").unwrap().to_string(), "5/90s");
        assert_eq!(Rate::parse("1/1d").unwrap().window_ms, 86_400_000);
        for bad in [
            "",
            "100",
            "0/1m",
            "-1/1m",
            "100/",
            "100/1x",
            "16777216/1s",
            "1/0s",
            "x/1m",
        ] {
            assert_eq!(Rate::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn lifetimes_are_at_least_a_second() {
        assert_eq!(
            parse_lifetime("30d"),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_lifetime("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_lifetime("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_lifetime("500ms"), None);
        assert_eq!(
            parse_lifetime("36500d"),
            Some(Duration::from_secs(36_500 * 86_400))
        );
        assert_eq!(parse_lifetime("36501d"), None);
        assert_eq!(parse_lifetime("999999999999d"), None);
        assert_eq!(parse_lifetime("soon"), None);
        assert_eq!(duration_text(7 * 86_400_000), "7d");
        assert_eq!(duration_text(1500), "1500ms");
    }
}

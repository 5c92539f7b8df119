//! What a request presents to authenticate with: its `Authorization`
//! fields, and the `Bearer` token in them (RFC 9110 §11.1, the scheme read
//! case-insensitively). The admin API reads its token the same way.

use super::reject::Reject;
use crate::key::{self, Presented};

/// The `Authorization` fields of a request.
pub(crate) enum Authorization<'a> {
    Missing,
    One(&'a [u8]),
    /// More than one: never guessed between.
    Several,
}

impl<'a> Authorization<'a> {
    pub(crate) fn of(mut values: impl Iterator<Item = &'a [u8]>) -> Authorization<'a> {
        match (values.next(), values.next()) {
            (None, _) => Authorization::Missing,
            (Some(one), None) => Authorization::One(one),
            (Some(_), Some(_)) => Authorization::Several,
        }
    }

    /// Checks 1 and 2 of DESIGN.md's table: a header, holding a `wfb_` key
    /// of the right shape. The key, or the refusal that says what is wrong.
    pub(crate) fn key(&self) -> Result<&'a str, Reject> {
        let value = match self {
            Authorization::Missing => return Err(Reject::MissingAuthorization),
            Authorization::Several => return Err(Reject::InvalidFormat),
            Authorization::One(value) => *value,
        };
        let token = bearer(value).ok_or(Reject::InvalidFormat)?;
        match key::classify(token) {
            Presented::Key(key) => Ok(key),
            Presented::IntegrationKey => Err(Reject::IntegrationKey),
            Presented::Malformed => Err(Reject::InvalidFormat),
        }
    }
}

/// The token of `Bearer <token>`, if the value is one.
pub(crate) fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim_matches(' ');
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer wfb_x", "bearer wfb_x", "BEARER  wfb_x"] {
            assert_eq!(bearer(v.as_bytes()), Some("wfb_x"), "{v}");
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_bad_format() {
        for v in ["Basic abc", "Bearer", "Bearer ", "wfb_x", "Token wfb_x"] {
            assert_eq!(bearer(v.as_bytes()), None, "{v}");
            let one = Authorization::One(v.as_bytes());
            assert_eq!(one.key(), Err(Reject::InvalidFormat), "{v}");
        }
        assert_eq!(bearer(b"Bearer \xff"), None);
    }

    #[test]
    fn each_kind_of_credential_is_told_apart() {
        let key = format!("Bearer wfb_{}", "k".repeat(38));
        assert_eq!(
            Authorization::One(key.as_bytes()).key().map(str::len),
            Ok(42)
        );
        assert_eq!(
            Authorization::Missing.key(),
            Err(Reject::MissingAuthorization)
        );
        assert_eq!(Authorization::Several.key(), Err(Reject::InvalidFormat));
        assert_eq!(
            Authorization::One(b"Bearer sk-live-1").key(),
            Err(Reject::IntegrationKey)
        );
    }
}

//! What the admin API answers with: JSON bodies, error bodies, and the
//! views of stored records (never a key or a hash).

use crate::clock;
use crate::store::{KeyRecord, StoreError};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

pub type AdminResponse = Response<Full<Bytes>>;

/// A key as listings show it: metadata only.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub key_prefix: &'a str,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub expires_at: Option<String>,
    pub workflows: Option<&'a [String]>,
    pub rate: Option<String>,
    /// In listings of every user's keys, whose each is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<&'a str>,
}

impl<'a> KeyView<'a> {
    /// With its user, for listings of every user's keys.
    pub fn with_user(r: &'a KeyRecord) -> KeyView<'a> {
        KeyView {
            user_id: Some(&r.user_id),
            ..KeyView::from(r)
        }
    }
}

impl<'a> From<&'a KeyRecord> for KeyView<'a> {
    fn from(r: &'a KeyRecord) -> KeyView<'a> {
        KeyView {
            id: &r.id,
            name: &r.name,
            key_prefix: &r.prefix,
            created_at: clock::rfc3339(r.created_at),
            last_used_at: r.last_used_at.map(clock::rfc3339),
            expires_at: r.expires_at.map(clock::rfc3339),
            workflows: r.workflows.as_deref(),
            rate: r.rate.map(|r| r.to_string()),
            user_id: None,
        }
    }
}

/// A key just created: the only answer that ever holds the key itself.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CreatedKey<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub key_prefix: &'a str,
    pub created_at: String,
    pub key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflows: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
}

impl<'a> CreatedKey<'a> {
    pub(super) fn of(r: &'a KeyRecord, key: &'a str) -> CreatedKey<'a> {
        CreatedKey {
            id: &r.id,
            name: &r.name,
            key_prefix: &r.prefix,
            created_at: clock::rfc3339(r.created_at),
            key,
            expires_at: r.expires_at.map(clock::rfc3339),
            workflows: r.workflows.as_deref(),
            rate: r.rate.map(|r| r.to_string()),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct CreateKey {
    pub user_id: String,
    pub name: Option<String>,
    /// `30d`, `12h`, `90s`.
    pub expires_in: Option<String>,
    pub workflows: Option<Vec<String>>,
    /// `N/DUR`.
    pub rate: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RollKey {
    /// How long the old key keeps working; none: not at all.
    pub grace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct SetOwner {
    pub user_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkflowView {
    pub workflow_id: String,
    pub user_id: String,
}

pub(super) fn json(status: StatusCode, value: &impl Serialize) -> AdminResponse {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> AdminResponse {
    json(status, &serde_json::json!({ "error": message.into() }))
}

pub(super) fn store_error(e: StoreError) -> AdminResponse {
    match e {
        StoreError::UnknownKey(id) => error(StatusCode::NOT_FOUND, format!("unknown key id: {id}")),
        StoreError::UnknownWorkflow(id) => {
            error(StatusCode::NOT_FOUND, format!("unknown workflow: {id}"))
        }
        StoreError::Conflict(what) => {
            error(StatusCode::CONFLICT, format!("already exists: {what}"))
        }
        StoreError::UnknownUser(what) => {
            error(StatusCode::NOT_FOUND, format!("unknown user: {what}"))
        }
        StoreError::Refused(why) => error(StatusCode::CONFLICT, why),
        StoreError::UnknownIntegration(id) => error(
            StatusCode::NOT_FOUND,
            format!("unknown integration id: {id}"),
        ),
        e @ (StoreError::Unavailable(_) | StoreError::Corrupt(_)) => {
            tracing::warn!(error = %e, "admin call failed on the store");
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// A path segment or query value, percent-decoded; `None` for a malformed
/// escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let escapes_whole = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_whole {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// The decoded value of `name` in a query string (`+` is a space there).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| percent_decode(&s.replace('+', " "));
        (decode(k)? == name).then(|| decode(v)).flatten()
    })
}

/// Everything but unreserved characters escaped, for a path segment or a
/// query value.
pub fn percent_encode(s: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, RESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_param("userId=a%20b&x=1", "userId").as_deref(),
            Some("a b")
        );
        assert_eq!(query_param("x=1", "userId"), None);
        assert_eq!(query_param("userId=%zz", "userId"), None);
        let odd = "user|1@example.com";
        assert_eq!(
            query_param(&format!("userId={}", percent_encode(odd)), "userId").as_deref(),
            Some(odd)
        );
    }
}

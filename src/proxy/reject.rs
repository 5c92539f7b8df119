//! Every answer the gateway gives on its own, in one place: status, message
//! and headers, as DESIGN.md's table lists them.

use super::h2::body::ProxyBody;
use super::upstream::{ForwardError, SourceError};
use crate::auth::AuthError;
use crate::http1::WireError;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use std::borrow::Cow;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    NoRoute,
    MethodNotAllowed {
        allow: String,
    },
    MissingAuthorization,
    InvalidFormat,
    /// A Skytells `sk-...` key presented on a webhook.
    IntegrationKey,
    InvalidKey,
    WorkflowNotFound,
    Forbidden,
    TooManyFailures {
        retry_after: Duration,
    },
    /// The key made more requests than `rate_limit.key_requests` allows.
    KeyRateExceeded {
        retry_after: Duration,
    },
    StoreUnavailable,
    /// The request broke HTTP/1.1 (its head, or its body's framing), or
    /// was cut short: 400, or 431 / 501 as the fault says.
    Malformed(WireError),
    PayloadTooLarge,
    BadGateway,
    GatewayTimeout,
    /// Something keygate itself cannot do (bad stored data); never a pass.
    Internal,
}

impl From<AuthError> for Reject {
    fn from(e: AuthError) -> Reject {
        match e {
            AuthError::InvalidKey => Reject::InvalidKey,
            AuthError::Unavailable => Reject::StoreUnavailable,
        }
    }
}

/// An upstream exchange that failed: the client's body (its fault, 4xx),
/// or the upstream (502 / 504).
impl From<&ForwardError> for Reject {
    fn from(e: &ForwardError) -> Reject {
        match e {
            ForwardError::Body(SourceError::TooLarge) => Reject::PayloadTooLarge,
            ForwardError::Body(SourceError::Aborted(e)) => Reject::Malformed(*e),
            ForwardError::ConnectTimeout => Reject::GatewayTimeout,
            ForwardError::Connect(_) | ForwardError::Exchange(_) | ForwardError::BadResponse(_) => {
                Reject::BadGateway
            }
        }
    }
}

impl Reject {
    /// A failed authentication (the 401s): answered with
    /// `WWW-Authenticate` and counted by the failed-auth limiter.
    pub fn is_failed_auth(&self) -> bool {
        matches!(
            self,
            Reject::MissingAuthorization
                | Reject::InvalidFormat
                | Reject::IntegrationKey
                | Reject::InvalidKey
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Reject::NoRoute | Reject::WorkflowNotFound => StatusCode::NOT_FOUND,
            Reject::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Reject::MissingAuthorization
            | Reject::InvalidFormat
            | Reject::IntegrationKey
            | Reject::InvalidKey => StatusCode::UNAUTHORIZED,
            Reject::Forbidden => StatusCode::FORBIDDEN,
            Reject::TooManyFailures { .. } | Reject::KeyRateExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Reject::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Reject::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::Malformed(e) => e.status(),
            Reject::BadGateway => StatusCode::BAD_GATEWAY,
            Reject::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: `{"error": ...}`, plus a `detail` for integration
    /// keys and malformed requests.
    pub fn body(&self) -> Cow<'static, str> {
        let fixed = match self {
            Reject::Malformed(e) => {
                return Cow::Owned(format!(
                    r#"{{"error":"Bad request","detail":"{}"}}"#,
                    e.message()
                ));
            }
            Reject::NoRoute => r#"{"error":"Not found"}"#,
            Reject::MethodNotAllowed { .. } => r#"{"error":"Method not allowed"}"#,
            Reject::MissingAuthorization => r#"{"error":"Missing Authorization header"}"#,
            Reject::InvalidFormat => r#"{"error":"Invalid API key format"}"#,
            Reject::IntegrationKey => {
                r#"{"error":"Invalid API key format","detail":"This looks like a Skytells API key (sk-...). Integration keys cannot authorize webhook calls; use a keygate API key (wfb_...)."}"#
            }
            Reject::InvalidKey => r#"{"error":"Invalid API key"}"#,
            Reject::WorkflowNotFound => r#"{"error":"Workflow not found"}"#,
            Reject::Forbidden => r#"{"error":"You do not have permission to run this workflow"}"#,
            Reject::TooManyFailures { .. } => {
                r#"{"error":"Too many failed authentication attempts"}"#
            }
            Reject::KeyRateExceeded { .. } => r#"{"error":"Rate limit exceeded for this API key"}"#,
            Reject::StoreUnavailable => r#"{"error":"Service temporarily unavailable"}"#,
            Reject::PayloadTooLarge => r#"{"error":"Request body too large"}"#,
            Reject::BadGateway => r#"{"error":"Upstream unavailable"}"#,
            Reject::GatewayTimeout => r#"{"error":"Upstream timed out"}"#,
            Reject::Internal => r#"{"error":"Internal error"}"#,
        };
        Cow::Borrowed(fixed)
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = match self.body() {
            Cow::Borrowed(fixed) => bytes::Bytes::from_static(fixed.as_bytes()),
            Cow::Owned(text) => bytes::Bytes::from(text),
        };
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = self.status();
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.is_failed_auth() {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        match &self {
            Reject::MethodNotAllowed { allow } => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    h.insert(header::ALLOW, v);
                }
            }
            Reject::TooManyFailures { retry_after } | Reject::KeyRateExceeded { retry_after } => {
                h.insert(header::RETRY_AFTER, retry_after_value(*retry_after));
            }
            Reject::StoreUnavailable => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

fn retry_after_value(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rejection_has_the_documented_status_and_message() {
        let table = [
            (
                Reject::MissingAuthorization,
                401,
                "Missing Authorization header",
            ),
            (Reject::InvalidFormat, 401, "Invalid API key format"),
            (Reject::IntegrationKey, 401, "Invalid API key format"),
            (Reject::InvalidKey, 401, "Invalid API key"),
            (Reject::WorkflowNotFound, 404, "Workflow not found"),
            (
                Reject::Forbidden,
                403,
                "You do not have permission to run this workflow",
            ),
            (
                Reject::TooManyFailures {
                    retry_after: Duration::from_millis(1500),
                },
                429,
                "Too many failed authentication attempts",
            ),
            (
                Reject::KeyRateExceeded {
                    retry_after: Duration::from_millis(200),
                },
                429,
                "Rate limit exceeded for this API key",
            ),
            (
                Reject::StoreUnavailable,
                503,
                "Service temporarily unavailable",
            ),
            (Reject::PayloadTooLarge, 413, "Request body too large"),
            (Reject::BadGateway, 502, "Upstream unavailable"),
            (Reject::GatewayTimeout, 504, "Upstream timed out"),
            (Reject::NoRoute, 404, "Not found"),
            (Reject::Internal, 500, "Internal error"),
            (
                Reject::Malformed(WireError::Malformed("no Host header")),
                400,
                "Bad request",
            ),
            (
                Reject::Malformed(WireError::HeadTooLarge),
                431,
                "Bad request",
            ),
            (
                Reject::Malformed(WireError::TrailersTooLarge),
                431,
                "Bad request",
            ),
            (
                Reject::Malformed(WireError::UnsupportedCoding),
                501,
                "Bad request",
            ),
        ];
        for (reject, status, message) in table {
            assert_eq!(reject.status().as_u16(), status, "{reject:?}");
            let json: serde_json::Value = serde_json::from_str(&reject.body()).unwrap();
            assert_eq!(json["error"], message, "{reject:?}");
            let response = reject.clone().into_response();
            assert_eq!(
                response.headers().contains_key(header::WWW_AUTHENTICATE),
                status == 401,
                "{reject:?}"
            );
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                status == 429 || status == 503,
                "{reject:?}"
            );
        }
    }

    #[test]
    fn failures_map_to_their_answers() {
        assert_eq!(Reject::from(AuthError::InvalidKey), Reject::InvalidKey);
        assert_eq!(
            Reject::from(AuthError::Unavailable),
            Reject::StoreUnavailable
        );
        let io = || std::io::Error::other("x");
        for (e, want) in [
            (ForwardError::Body(SourceError::TooLarge), 413),
            (
                ForwardError::Body(SourceError::Aborted(WireError::Truncated)),
                400,
            ),
            (
                ForwardError::Body(SourceError::Aborted(WireError::TrailersTooLarge)),
                431,
            ),
            (ForwardError::ConnectTimeout, 504),
            (ForwardError::Connect(io()), 502),
            (ForwardError::Exchange(io()), 502),
            (ForwardError::BadResponse(WireError::Truncated), 502),
        ] {
            assert_eq!(Reject::from(&e).status().as_u16(), want, "{e}");
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_value(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
    }
}

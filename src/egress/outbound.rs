//! The request that goes to a provider, and the answer that comes back:
//! the caller's request with its credentials, cookies, run token,
//! forwarding and hop-by-hop fields removed, the provider's headers filled
//! from the credential, and the destination always the provider's fixed
//! base URL.

use super::providers::OutBody;
use super::{EgressBody, EgressResponse};
use crate::config::{Part, Provider};
use crate::vault::Secret;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use zeroize::Zeroizing;

/// Fields that describe one connection (RFC 9110 §7.6.1), and the caller's
/// own credentials and forwarding trail.
const DROPPED: [&str; 15] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
    "authorization",
    "x-api-key",
    "cookie",
    "forwarded",
    "x-forwarded-for",
];

fn drop_fields(headers: &mut HeaderMap, also: &[&HeaderName]) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in DROPPED {
        headers.remove(name);
    }
    for name in named.iter().chain(also.iter().copied()) {
        headers.remove(name);
    }
    headers.remove("x-forwarded-host");
    headers.remove("x-forwarded-proto");
}

/// The provider call for `request`, whose path after the integration id is
/// `rest`.
pub(super) fn build(
    request: Request<Incoming>,
    provider: &Provider,
    rest: &str,
    secret: &Secret,
    run_header: &HeaderName,
) -> Result<Request<OutBody>, String> {
    let (mut parts, body) = request.into_parts();
    let base = &provider.base;
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let path = if rest.is_empty() && base.path.is_empty() {
        "/".to_owned()
    } else {
        format!("{}{rest}", base.path)
    };
    parts.uri = Uri::builder()
        .scheme("https")
        .authority(base.authority.as_str())
        .path_and_query(format!("{path}{query}"))
        .build()
        .map_err(|e| format!("cannot address the provider: {e}"))?;
    let injected: Vec<&HeaderName> = provider.inject.iter().map(|(name, _)| name).collect();
    let mut also = injected.clone();
    also.push(run_header);
    drop_fields(&mut parts.headers, &also);
    let fields = secret.fields()?;
    for (name, template) in &provider.inject {
        let mut value = Zeroizing::new(String::new());
        for part in &template.0 {
            match part {
                Part::Text(text) => value.push_str(text),
                Part::Field(field) => match fields.get(field) {
                    Some(v) => value.push_str(v),
                    None => {
                        return Err(format!(
                            "the credential lacks the field {field} that {name} uses"
                        ));
                    }
                },
            }
        }
        let mut header = HeaderValue::from_str(&value)
            .map_err(|_| format!("the credential's {name} is not a valid header value"))?;
        // Kept out of HPACK tables and Debug output.
        header.set_sensitive(true);
        parts.headers.append(name.clone(), header);
    }
    drop(fields);
    let host = if base.port == 443 {
        base.host.clone()
    } else {
        format!("{}:{}", base.host, base.port)
    };
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&host).map_err(|_| "the provider's host is not a valid Host")?,
    );
    // The provider speaks HTTP/2 or HTTP/1.1 as ALPN decides.
    parts.version = http::Version::HTTP_11;
    let body: OutBody = body.map_err(Into::into).boxed_unsync();
    Ok(Request::from_parts(parts, body))
}

/// The provider's answer, streamed back, less hop-by-hop fields.
pub(super) fn answer(response: Response<Incoming>) -> EgressResponse {
    let (mut parts, body) = response.into_parts();
    let named: Vec<HeaderName> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        parts.headers.remove(name);
    }
    for name in &named {
        parts.headers.remove(name);
    }
    Response::from_parts(parts, Either::Right(body) as EgressBody)
}

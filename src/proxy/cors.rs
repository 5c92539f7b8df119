//! CORS preflight (`OPTIONS` on a route), answered without auth.

use super::h2::body::ProxyBody;
use crate::config::CorsConfig;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

/// The preflight answer's headers, rendered once.
pub(crate) struct Cors {
    allow_origin: HeaderValue,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    max_age: HeaderValue,
}

impl Cors {
    pub(crate) fn new(config: &CorsConfig) -> Result<Cors, String> {
        let value = |v: &str| HeaderValue::from_str(v).map_err(|e| e.to_string());
        Ok(Cors {
            allow_origin: value(&config.allow_origin)?,
            allow_methods: value(&config.allow_methods)?,
            allow_headers: value(&config.allow_headers)?,
            max_age: HeaderValue::from(config.max_age.as_secs()),
        })
    }

    /// 204 with the `Access-Control-*` headers.
    pub(crate) fn preflight(&self) -> Response<ProxyBody> {
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let h = response.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin.clone(),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            self.allow_headers.clone(),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        response
    }
}

/// The `Allow` header of a 405: the route's methods, and `OPTIONS` when
/// preflights are answered.
pub(crate) fn allow(methods: &[Method], cors: bool) -> String {
    let mut allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
    if cors {
        allow.push("OPTIONS");
    }
    allow.join(", ")
}

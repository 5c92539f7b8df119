//! Routes: which requests are webhooks, and where they go. A route's path
//! pattern (one `{workflow}` segment) is parsed once, when the config is.

use super::raw::RawRoute;
use super::validate::{err, upstream};
use super::{ConfigError, Upstream};
use http::Method;

/// The template's webhook route.
pub const DEFAULT_ROUTE: &str = "/api/workflows/{workflow}/webhook";

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The pattern as configured: the route's label in logs and metrics.
    pub path: String,
    pub pattern: Pattern,
    pub methods: Vec<Method>,
    pub upstream: Upstream,
    pub forward_authorization: bool,
    /// Send the client's `Host` upstream instead of the upstream's authority.
    pub preserve_host: bool,
}

impl RouteConfig {
    /// The template's route, to `upstream`.
    pub fn default_to(upstream: &Upstream) -> RouteConfig {
        RouteConfig {
            path: DEFAULT_ROUTE.to_owned(),
            pattern: Pattern::parse(DEFAULT_ROUTE).expect("the default route parses"),
            methods: vec![Method::POST],
            upstream: upstream.clone(),
            forward_authorization: false,
            preserve_host: false,
        }
    }
}

/// `literal/{workflow}/literal`: the capture is one whole path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    before: String,
    after: String,
}

const CAPTURE: &str = "{workflow}";

impl Pattern {
    pub fn parse(pattern: &str) -> Result<Pattern, String> {
        if !pattern.starts_with('/') {
            return Err(format!("{pattern:?} must start with /"));
        }
        let Some((before, after)) = pattern.split_once(CAPTURE) else {
            return Err(format!("{pattern:?} must contain {CAPTURE}"));
        };
        if after.contains(CAPTURE) {
            return Err(format!("{pattern:?} may contain {CAPTURE} only once"));
        }
        if !before.ends_with('/') || !(after.is_empty() || after.starts_with('/')) {
            return Err(format!(
                "{CAPTURE} must be a whole path segment in {pattern:?}"
            ));
        }
        if before.contains(['{', '}', '?', '#']) || after.contains(['{', '}', '?', '#']) {
            return Err(format!(
                "{pattern:?} may hold no other placeholder or query"
            ));
        }
        Ok(Pattern {
            before: before.to_owned(),
            after: after.to_owned(),
        })
    }

    /// The workflow id if `path` (without query) fits the pattern. A dot
    /// segment (`.`, `..`, or either percent-encoded) is never an id: an
    /// engine that resolves dot segments would route it elsewhere.
    pub fn matches<'p>(&self, path: &'p str) -> Option<&'p str> {
        let rest = path.strip_prefix(self.before.as_str())?;
        let id = rest.strip_suffix(self.after.as_str())?;
        (!id.is_empty() && !id.contains('/') && !is_dot_segment(id)).then_some(id)
    }
}

/// `.` or `..`, with any of the dots written `%2e` or `%2E`.
pub fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return false,
        };
        dots += 1;
    }
    dots == 1 || dots == 2
}

pub(super) fn route(
    index: usize,
    raw: RawRoute,
    default: &Upstream,
) -> Result<RouteConfig, ConfigError> {
    let field = format!("routes[{index}]");
    let pattern =
        Pattern::parse(&raw.path).map_err(|e| ConfigError(format!("{field}.path: {e}")))?;
    let methods = match raw.methods {
        None => vec![Method::POST],
        Some(listed) if listed.is_empty() => {
            return err(format!("{field}.methods: list at least one method"));
        }
        Some(listed) => listed
            .iter()
            .map(|name| {
                Method::from_bytes(name.to_ascii_uppercase().as_bytes())
                    .map_err(|_| ConfigError(format!("{field}.methods: invalid method {name:?}")))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(RouteConfig {
        path: raw.path,
        pattern,
        methods,
        upstream: match raw.upstream {
            Some(url) => upstream(&format!("{field}.upstream"), &url)?,
            None => default.clone(),
        },
        forward_authorization: raw.forward_authorization.unwrap_or(false),
        preserve_host: raw.preserve_host.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pattern_captures_the_workflow() {
        let p = Pattern::parse("/api/workflows/{workflow}/webhook").unwrap();
        assert_eq!(p.matches("/api/workflows/wf_1/webhook"), Some("wf_1"));
        assert_eq!(p.matches("/api/workflows//webhook"), None);
        assert_eq!(p.matches("/api/workflows/a/b/webhook"), None);
        assert_eq!(p.matches("/api/workflows/a/webhook/x"), None);
        assert_eq!(p.matches("/api/workflow/a/webhook"), None);
    }

    #[test]
    fn dot_segments_are_never_workflow_ids() {
        let p = Pattern::parse("/api/workflows/{workflow}/webhook").unwrap();
        for dots in [".", "..", "%2e", "%2E", "%2e%2E", ".%2e", "%2e."] {
            assert_eq!(
                p.matches(&format!("/api/workflows/{dots}/webhook")),
                None,
                "{dots}"
            );
        }
        for id in ["...", ".a", "a.", "%2e%2e%2e", "%2f", "wf.1"] {
            assert_eq!(
                p.matches(&format!("/api/workflows/{id}/webhook")),
                Some(id),
                "{id}"
            );
        }
    }

    #[test]
    fn trailing_capture_is_allowed() {
        let p = Pattern::parse("/hooks/{workflow}").unwrap();
        assert_eq!(p.matches("/hooks/abc"), Some("abc"));
        assert_eq!(p.matches("/hooks/"), None);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "api/{workflow}",
            "/a/{workflow}x",
            "/a{workflow}/",
            "/a/b",
            "/{workflow}/{workflow}",
            "/{x}/{workflow}",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}

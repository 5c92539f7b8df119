//! Route matching: a path pattern with one `{workflow}` segment, compared
//! without allocating.

use crate::config::RouteConfig;
use http::Method;

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

pub struct Route {
    pub pattern: Pattern,
    pub config: RouteConfig,
    /// Label for metrics and logs: the configured path pattern.
    pub label: String,
}

pub enum Matched<'a, 'p> {
    Route {
        index: usize,
        route: &'a Route,
        workflow: &'p str,
    },
    /// The path fits a route but this method is not allowed on it.
    MethodNotAllowed {
        index: usize,
        route: &'a Route,
    },
    /// The path fits a route and the request is a CORS preflight.
    Preflight {
        index: usize,
    },
    NotFound,
}

pub struct Router {
    routes: Vec<Route>,
    cors: bool,
}

impl Router {
    pub fn new(configs: &[RouteConfig], cors: bool) -> Result<Router, String> {
        let routes = configs
            .iter()
            .map(|c| {
                Ok(Route {
                    pattern: Pattern::parse(&c.path)?,
                    label: c.path.clone(),
                    config: c.clone(),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Router { routes, cors })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn find<'a, 'p>(&'a self, method: &Method, path: &'p str) -> Matched<'a, 'p> {
        let mut path_match = None;
        for (index, route) in self.routes.iter().enumerate() {
            if let Some(workflow) = route.pattern.matches(path) {
                if route.config.methods.contains(method) {
                    return Matched::Route {
                        index,
                        route,
                        workflow,
                    };
                }
                path_match.get_or_insert((index, route));
            }
        }
        match path_match {
            Some((index, _)) if self.cors && method == Method::OPTIONS => {
                Matched::Preflight { index }
            }
            Some((index, route)) => Matched::MethodNotAllowed { index, route },
            None => Matched::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Upstream;

    fn route(path: &str, methods: &[Method]) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            methods: methods.to_vec(),
            upstream: Upstream {
                authority: "127.0.0.1:1".into(),
            },
            forward_authorization: false,
            preserve_host: false,
        }
    }

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

    #[test]
    fn method_mismatch_and_preflight_are_told_apart() {
        let router = Router::new(&[route("/w/{workflow}", &[Method::POST])], true).unwrap();
        assert!(matches!(
            router.find(&Method::POST, "/w/1"),
            Matched::Route { workflow: "1", .. }
        ));
        assert!(matches!(
            router.find(&Method::GET, "/w/1"),
            Matched::MethodNotAllowed { .. }
        ));
        assert!(matches!(
            router.find(&Method::OPTIONS, "/w/1"),
            Matched::Preflight { .. }
        ));
        assert!(matches!(
            router.find(&Method::POST, "/x/1"),
            Matched::NotFound
        ));
        let no_cors = Router::new(&[route("/w/{workflow}", &[Method::POST])], false).unwrap();
        assert!(matches!(
            no_cors.find(&Method::OPTIONS, "/w/1"),
            Matched::MethodNotAllowed { .. }
        ));
    }
}

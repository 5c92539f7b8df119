//! Route matching: a request's method and path against the configured
//! routes' patterns, without allocating.

use crate::config::RouteConfig;
use http::Method;

pub enum Matched<'a, 'p> {
    Route {
        index: usize,
        workflow: &'p str,
    },
    /// The path fits a route but this method is not allowed on it.
    MethodNotAllowed {
        index: usize,
        route: &'a RouteConfig,
    },
    /// The path fits a route and the request is a CORS preflight.
    Preflight {
        index: usize,
    },
    NotFound,
}

pub struct Router {
    routes: Vec<RouteConfig>,
    cors: bool,
}

impl Router {
    pub fn new(configs: &[RouteConfig], cors: bool) -> Router {
        Router {
            routes: configs.to_vec(),
            cors,
        }
    }

    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    pub fn find<'a, 'p>(&'a self, method: &Method, path: &'p str) -> Matched<'a, 'p> {
        let mut path_match = None;
        for (index, route) in self.routes.iter().enumerate() {
            if let Some(workflow) = route.pattern.matches(path) {
                if route.methods.contains(method) {
                    return Matched::Route { index, workflow };
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
    use crate::config::{Pattern, Upstream};

    fn route(path: &str, methods: &[Method]) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            pattern: Pattern::parse(path).unwrap(),
            methods: methods.to_vec(),
            upstream: Upstream {
                authority: "127.0.0.1:1".into(),
                tls: false,
            },
            forward_authorization: false,
            preserve_host: false,
        }
    }

    #[test]
    fn method_mismatch_and_preflight_are_told_apart() {
        let router = Router::new(&[route("/w/{workflow}", &[Method::POST])], true);
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
        let no_cors = Router::new(&[route("/w/{workflow}", &[Method::POST])], false);
        assert!(matches!(
            no_cors.find(&Method::OPTIONS, "/w/1"),
            Matched::MethodNotAllowed { .. }
        ));
    }
}

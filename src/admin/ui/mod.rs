//! The API Keys panel on the admin listener (`/ui/`): server-rendered
//! pages ([`pages`]) and one small script, all embedded in the binary.
//!
//! Sign-in takes the admin token once and opens a session: a random id in
//! an `HttpOnly`, `SameSite=Strict` cookie, kept here with its expiry
//! (`admin.ui_session_ttl`) and its CSRF token. Every change goes through
//! `/ui/api/...`, which is the admin API itself (the same handlers,
//! validation, messages and audit log) behind the session and a matching
//! `X-CSRF-Token` header instead of the bearer token. Every page is sent
//! with a strict Content-Security-Policy (scripts and styles from `/ui/`
//! only, nothing inline), `X-Frame-Options: DENY`, `Referrer-Policy:
//! no-referrer` and `Cache-Control: no-store`. A new key reaches the page
//! only as the answer to the script's call and lives in the dialog that
//! shows it; closing the dialog removes it and reloads the list.

mod pages;

use super::views::{AdminResponse, error};
use super::{Admin, MAX_BODY, read_body};
use crate::clock;
use crate::config::UiConfig;
use bytes::Bytes;
use dashmap::DashMap;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::time::Duration;

/// The session cookie, and the sign-in form's own (double-submit) cookie.
const SESSION: &str = "keygate_session";
const LOGIN: &str = "keygate_login";
/// Sessions held at once; the oldest go first beyond it.
const MAX_SESSIONS: usize = 1000;

const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Nothing but what the panel itself serves: no inline script or style, no
/// frames, no other origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(super) struct Panel {
    sessions: DashMap<String, Session>,
    ttl: Duration,
    pub(super) settings: UiConfig,
}

#[derive(Clone)]
struct Session {
    csrf: String,
    /// Uptime ms after which it is void.
    expires: u64,
}

impl Panel {
    pub(super) fn new(settings: UiConfig, ttl: Duration) -> Panel {
        Panel {
            sessions: DashMap::new(),
            ttl,
            settings,
        }
    }

    fn open(&self) -> Option<(String, Session)> {
        let now = clock::uptime_ms();
        self.sessions.retain(|_, s| s.expires > now);
        if self.sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|s| s.expires)
                .map(|s| s.key().clone())
        {
            self.sessions.remove(&oldest);
        }
        let session = Session {
            csrf: random()?,
            expires: now.saturating_add(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)),
        };
        let id = random()?;
        self.sessions.insert(id.clone(), session.clone());
        Some((id, session))
    }

    /// The live session `request`'s cookie names.
    fn session<B>(&self, request: &Request<B>) -> Option<(String, Session)> {
        let id = cookie(request, SESSION)?;
        let session = self.sessions.get(&id)?.clone();
        if session.expires <= clock::uptime_ms() {
            self.sessions.remove(&id);
            return None;
        }
        Some((id, session))
    }
}

/// 32 random bytes, base64url.
fn random() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(crate::key::base64url(&bytes))
}

fn same(a: &str, b: &str) -> bool {
    subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()).into()
}

/// One cookie's value.
fn cookie<B>(request: &Request<B>, name: &str) -> Option<String> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
}

/// The headers every panel answer carries.
fn guarded(mut response: AdminResponse) -> AdminResponse {
    let h = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
        ("cross-origin-opener-policy", "same-origin"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn page(status: StatusCode, html: String) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(html)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    guarded(r)
}

fn asset(body: &'static str, kind: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    guarded(r)
}

fn redirect(to: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    guarded(r)
}

fn set_cookie(response: &mut AdminResponse, value: String) {
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

/// `application/x-www-form-urlencoded` fields.
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    body.split(|b| *b == b'&')
        .filter_map(|pair| {
            let text = std::str::from_utf8(pair).ok()?;
            let (k, v) = text.split_once('=').unwrap_or((text, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8()
                    .ok()
                    .map(std::borrow::Cow::into_owned)
            };
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

impl Admin {
    /// Everything under `/ui`.
    pub(super) async fn ui(&self, request: Request<Incoming>, caller: SocketAddr) -> AdminResponse {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or("").to_owned();
        match (&method, path.as_str()) {
            (&Method::GET, "/ui/app.js") => return asset(SCRIPT, "text/javascript; charset=utf-8"),
            (&Method::GET, "/ui/app.css") => return asset(STYLE, "text/css; charset=utf-8"),
            (&Method::GET, "/ui/login") => return self.login_page(None),
            (&Method::POST, "/ui/login") => return self.sign_in(request, caller).await,
            _ => {}
        }
        let Some((id, session)) = self.panel.session(&request) else {
            return match path.starts_with("/ui/api/") {
                true => guarded(error(
                    StatusCode::UNAUTHORIZED,
                    "Sign in again: the session has ended",
                )),
                false => redirect("/ui/login"),
            };
        };
        if let Some(rest) = path.strip_prefix("/ui/api/") {
            // A change must carry the session's CSRF token.
            let token = request
                .headers()
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !same(token, &session.csrf) {
                return guarded(error(StatusCode::FORBIDDEN, "Missing or wrong CSRF token"));
            }
            let rest = rest.to_owned();
            return guarded(self.route(method, &rest, request, caller).await);
        }
        match (&method, path.as_str()) {
            (&Method::POST, "/ui/logout") => {
                let body = match read_body(request, MAX_BODY).await {
                    Ok(body) => body,
                    Err(r) => return guarded(r),
                };
                let fields = form_fields(&body);
                let token = fields
                    .iter()
                    .find(|(k, _)| k == "csrf")
                    .map(|(_, v)| v.as_str());
                if !token.is_some_and(|t| same(t, &session.csrf)) {
                    return guarded(error(StatusCode::FORBIDDEN, "Missing or wrong CSRF token"));
                }
                self.panel.sessions.remove(&id);
                tracing::info!(%caller, "panel sign-out");
                let mut r = redirect("/ui/login");
                set_cookie(
                    &mut r,
                    format!("{SESSION}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
                );
                r
            }
            (&Method::GET, "/ui" | "/ui/") => redirect("/ui/keys"),
            (&Method::GET, "/ui/keys") => self.keys_page(&session.csrf, &query).await,
            (&Method::GET, "/ui/workflows") => self.workflows_page(&session.csrf).await,
            (&Method::GET, "/ui/integrations") => {
                self.integrations_page(&session.csrf, &query).await
            }
            (_, "/ui/keys" | "/ui/workflows" | "/ui/integrations" | "/ui/logout") => {
                guarded(error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"))
            }
            _ => page(StatusCode::NOT_FOUND, pages::not_found()),
        }
    }

    /// The sign-in form, with its own CSRF token in a short-lived cookie.
    fn login_page(&self, message: Option<&str>) -> AdminResponse {
        let Some(nonce) = random() else {
            return guarded(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the OS random source failed",
            ));
        };
        let status = match message {
            Some(_) => StatusCode::UNAUTHORIZED,
            None => StatusCode::OK,
        };
        let mut r = page(status, pages::login(&nonce, message));
        set_cookie(
            &mut r,
            format!("{LOGIN}={nonce}; Path=/ui/login; HttpOnly; SameSite=Strict; Max-Age=600"),
        );
        r
    }

    async fn sign_in(&self, request: Request<Incoming>, caller: SocketAddr) -> AdminResponse {
        let nonce = cookie(&request, LOGIN);
        let body = match read_body(request, MAX_BODY).await {
            Ok(body) => body,
            Err(r) => return guarded(r),
        };
        let fields = form_fields(&body);
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let csrf_ok = match (nonce.as_deref(), field("csrf")) {
            (Some(a), Some(b)) => same(a, b),
            _ => false,
        };
        if !csrf_ok {
            return self.login_page(Some("The form expired; sign in again."));
        }
        if !field("token").is_some_and(|t| self.token.matches(t)) {
            tracing::warn!(%caller, "panel sign-in with a wrong admin token");
            return self.login_page(Some("Wrong admin token."));
        }
        let Some((id, _)) = self.panel.open() else {
            return guarded(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the OS random source failed",
            ));
        };
        tracing::info!(%caller, "panel sign-in");
        let mut r = redirect("/ui/keys");
        set_cookie(
            &mut r,
            format!(
                "{SESSION}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
                self.panel.ttl.as_secs()
            ),
        );
        set_cookie(
            &mut r,
            format!("{LOGIN}=; Path=/ui/login; HttpOnly; SameSite=Strict; Max-Age=0"),
        );
        r
    }

    async fn keys_page(&self, csrf: &str, query: &str) -> AdminResponse {
        let user = super::views::query_param(query, "user").filter(|u| !u.is_empty());
        let owned = match &user {
            Some(u) => match self.store.list_keys(u).await {
                Ok(keys) => keys,
                Err(e) => {
                    return page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        pages::failed(csrf, &e.to_string()),
                    );
                }
            },
            None => Vec::new(),
        };
        let keys: Vec<&crate::store::KeyRecord> = owned.iter().collect();
        // Only a help for typing: a store that cannot list every key now
        // still shows the page.
        let all = self.store.list_all_keys().await.unwrap_or_default();
        let mut users: Vec<&str> = all.iter().map(|k| k.user_id.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        page(
            StatusCode::OK,
            pages::keys(&pages::KeysPage {
                csrf,
                user: user.as_deref(),
                users: &users,
                keys: &keys,
                now: clock::now_ms(),
                stale_after_ms: i64::try_from(self.panel.settings.stale_after.as_millis())
                    .unwrap_or(i64::MAX),
                vault: self.credentials.is_some(),
            }),
        )
    }

    async fn workflows_page(&self, csrf: &str) -> AdminResponse {
        match self.store.list_workflows().await {
            Ok(list) => page(
                StatusCode::OK,
                pages::workflows(csrf, &list, self.credentials.is_some()),
            ),
            Err(e) => page(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::failed(csrf, &e.to_string()),
            ),
        }
    }

    async fn integrations_page(&self, csrf: &str, query: &str) -> AdminResponse {
        if self.credentials.is_none() {
            return page(StatusCode::NOT_FOUND, pages::no_vault(csrf));
        }
        let user = super::views::query_param(query, "user").filter(|u| !u.is_empty());
        let list = match &user {
            Some(u) => match self.store.list_integrations(u).await {
                Ok(list) => list,
                Err(e) => {
                    return page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        pages::failed(csrf, &e.to_string()),
                    );
                }
            },
            None => Vec::new(),
        };
        let kinds: Vec<&str> = self
            .credentials
            .as_ref()
            .map(|c| c.providers.keys().map(String::as_str).collect())
            .unwrap_or_default();
        page(
            StatusCode::OK,
            pages::integrations(csrf, user.as_deref(), &list, &kinds, clock::now_ms()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_decode_plus_and_percent() {
        assert_eq!(
            form_fields(b"token=a+b%2Fc&csrf=x&empty="),
            [
                ("token".to_owned(), "a b/c".to_owned()),
                ("csrf".to_owned(), "x".to_owned()),
                ("empty".to_owned(), String::new())
            ]
        );
    }

    #[test]
    fn cookies_are_found_by_name() {
        let r = Request::builder()
            .header("cookie", "a=1; keygate_session=abc; b=2")
            .body(())
            .unwrap();
        assert_eq!(cookie(&r, SESSION).as_deref(), Some("abc"));
        assert_eq!(cookie(&r, LOGIN), None);
    }
}

//! The webhook path end to end: a real upstream on 127.0.0.1:0, the gateway
//! on free ports, and (where the store matters) both stores, Redis being a
//! real `redis-server` started by the test.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{Full, StreamBody};
use std::time::Duration;

fn embedded(dir: &tempfile::TempDir) -> StoreKind {
    StoreKind::Embedded(dir.path().join("keygate.redb"))
}

/// A gateway on the embedded store where user `alice` has a key and owns
/// workflow `wf`; returns the gateway and the key.
async fn alice_owns_wf(dir: &tempfile::TempDir, upstream: &str, extra: &str) -> (Gw, String) {
    let gw = Gw::start(config(dir.path(), &embedded(dir), upstream, extra)).await;
    let (_, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    (gw, key)
}

/// Rows 1 to 5 of DESIGN.md's table, plus revocation, on one store.
async fn status_table(store: StoreKind, dir: &std::path::Path) {
    let upstream = Upstream::start().await;
    let gw = Gw::start(config(dir, &store, &upstream.url(), "")).await;
    let (key_id, key) = gw.create_key("alice").await;
    let (_, bob_key) = gw.create_key("bob").await;
    gw.set_owner("wf_alice", "alice").await;

    // 1. no Authorization header
    let (status, headers, body) = gw.webhook("wf_alice", None).await;
    assert_eq!(status, 401);
    assert_eq!(json(&body)["error"], "Missing Authorization header");
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(headers["content-type"], "application/json");

    // 2. wrong shape, wrong scheme, Skytells key
    for bad in ["Bearer wfb_short", "Basic dXNlcjpwYXNz", "Bearer", &key] {
        let (status, headers, body) = gw.webhook("wf_alice", Some(bad)).await;
        assert_eq!(status, 401, "{bad}");
        assert_eq!(json(&body)["error"], "Invalid API key format", "{bad}");
        assert_eq!(headers["www-authenticate"], "Bearer");
    }
    let (status, _, body) = gw
        .webhook("wf_alice", Some("Bearer sk-live-0123456789abcdef"))
        .await;
    assert_eq!(status, 401);
    let v = json(&body);
    assert_eq!(v["error"], "Invalid API key format");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("cannot authorize webhook"),
        "{v}"
    );

    // 3. well-formed but unknown
    let unknown = format!("wfb_{}", "A".repeat(38));
    let (status, headers, body) = gw.webhook("wf_alice", Some(&bearer(&unknown))).await;
    assert_eq!(status, 401);
    assert_eq!(json(&body)["error"], "Invalid API key");
    assert_eq!(headers["www-authenticate"], "Bearer");

    // 4. no owner registered
    let (status, _, body) = gw.webhook("wf_nobody", Some(&bearer(&key))).await;
    assert_eq!(status, 404);
    assert_eq!(json(&body)["error"], "Workflow not found");

    // 5. someone else's workflow
    let (status, _, body) = gw.webhook("wf_alice", Some(&bearer(&bob_key))).await;
    assert_eq!(status, 403);
    assert_eq!(
        json(&body)["error"],
        "You do not have permission to run this workflow"
    );

    // success, with the scheme in lower case
    let (status, headers, body) = gw.webhook("wf_alice", Some(&format!("bearer {key}"))).await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(headers["x-upstream"], "1");
    let seen = upstream.requests();
    assert_eq!(
        seen.len(),
        1,
        "only the permitted call reaches the upstream"
    );
    assert_eq!(seen[0].headers["x-user-id"], "alice");
    assert_eq!(seen[0].headers["x-api-key-id"], key_id.as_str());

    // revoke, then the very next request is refused
    assert_eq!(gw.revoke(&key_id).await, 200);
    let (status, _, body) = gw.webhook("wf_alice", Some(&bearer(&key))).await;
    assert_eq!(status, 401);
    assert_eq!(json(&body)["error"], "Invalid API key");

    // an owner change applies at once too
    gw.set_owner("wf_alice", "bob").await;
    let (status, _, _) = gw.webhook("wf_alice", Some(&bearer(&bob_key))).await;
    assert_eq!(status, 200);
    let (status, _) = gw
        .admin_call("DELETE", "/admin/v1/workflows/wf_alice", None)
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = gw.webhook("wf_alice", Some(&bearer(&bob_key))).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn status_table_holds_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    status_table(embedded(&dir), dir.path()).await;
}

#[tokio::test]
async fn status_table_holds_on_the_redis_store() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    status_table(StoreKind::Redis(redis.url()), dir.path()).await;
}

#[tokio::test]
async fn authentication_comes_before_the_workflow_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), "")).await;
    for auth in [
        None,
        Some("Bearer nope"),
        Some(&*bearer(&format!("wfb_{}", "B".repeat(38)))),
    ] {
        let (status, _, _) = gw.webhook("wf_does_not_exist", auth).await;
        assert_eq!(status, 401, "{auth:?}");
    }
    let m = gw.metrics().await;
    assert!(
        m.contains("keygate_owner_cache_misses_total 0"),
        "an owner lookup happened:\n{m}"
    );
}

#[tokio::test]
async fn repeated_failures_from_one_client_get_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "rate_limit:\n  max_failures: 3\n  window: 60s\n";
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    for _ in 0..3 {
        assert_eq!(gw.webhook("wf", Some("Bearer wfb_bad")).await.0, 401);
    }
    let (status, headers, body) = gw.webhook("wf", Some("Bearer wfb_bad")).await;
    assert_eq!(status, 429);
    assert_eq!(
        json(&body)["error"],
        "Too many failed authentication attempts"
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry));
    // While blocked, even a valid key waits: the limiter guards the key check.
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 429);
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn unreachable_store_without_a_cached_answer_is_503_never_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gw = Gw::start(config(
        dir.path(),
        &StoreKind::Redis(redis.url()),
        &upstream.url(),
        "",
    ))
    .await;
    let (_, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    redis.kill();
    let (status, headers, body) = gw.webhook("wf", Some(&bearer(&key))).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(json(&body)["error"], "Service temporarily unavailable");
    assert!(upstream.requests().is_empty());
    let (status, _) = gw.admin_call("GET", "/readyz", None).await;
    assert_eq!(status, 503);
    assert!(
        gw.metrics()
            .await
            .lines()
            .any(|l| l.starts_with("keygate_store_errors_total ") && !l.ends_with(" 0"))
    );
}

#[tokio::test]
async fn spoofed_identity_headers_are_replaced_and_authorization_is_not_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), "")).await;
    let (key_id, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    let req = Request::builder()
        .method("POST")
        .uri("/api/workflows/wf/webhook?run=1")
        .header("host", "gateway.test")
        .header("authorization", bearer(&key))
        .header("x-user-id", "admin")
        .header("X-Api-Key-Id", "key_forged")
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-request-id", "req-42")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (status, headers, _) = send_h1(gw.listen, req).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-request-id"], "req-42");
    let seen = &upstream.requests()[0];
    assert_eq!(seen.uri, "/api/workflows/wf/webhook?run=1");
    assert_eq!(
        seen.headers.get_all("x-user-id").iter().collect::<Vec<_>>(),
        ["alice"]
    );
    assert_eq!(
        seen.headers
            .get_all("x-api-key-id")
            .iter()
            .collect::<Vec<_>>(),
        [key_id.as_str()]
    );
    assert!(seen.headers.get("authorization").is_none());
    assert!(seen.headers.get("x-hop").is_none());
    assert_eq!(seen.headers["x-forwarded-for"], "198.51.100.1, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "gateway.test");
    assert_eq!(seen.headers["x-request-id"], "req-42");
    assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str());
    assert!(
        gw.metrics()
            .await
            .contains("keygate_spoofed_headers_total 2")
    );
}

#[tokio::test]
async fn configured_routes_fit_other_engines() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "routes:\n  - path: \"/hooks/{workflow}\"\n    methods: [PUT, POST]\n    forward_authorization: true\nheaders:\n  user_id: X-Owner\n  key_id: X-Key\n";
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), extra)).await;
    let (_, key) = gw.create_key("alice").await;
    gw.set_owner("wf9", "alice").await;
    let req = Request::builder()
        .header("host", "gateway.test")
        .method("PUT")
        .uri("/hooks/wf9")
        .header("authorization", bearer(&key))
        .header("x-owner", "mallory")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, _) = send_h1(gw.listen, req).await.unwrap();
    assert_eq!(status, 200);
    let seen = &upstream.requests()[0];
    assert_eq!(seen.headers["x-owner"], "alice");
    assert!(seen.headers.contains_key("x-key"));
    assert_eq!(seen.headers["authorization"], bearer(&key).as_str());
    // the default route is gone
    assert_eq!(gw.webhook("wf9", Some(&bearer(&key))).await.0, 404);
}

#[tokio::test]
async fn dot_segment_workflow_ids_are_404_before_any_store_call() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), "")).await;
    // A well-formed key the store has never seen: looking it up would be a
    // cache miss.
    let unknown = bearer(&format!("wfb_{}", "D".repeat(38)));
    for dots in [".", "..", "%2e", "%2E%2e", ".%2E"] {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/api/workflows/{dots}/webhook"))
            .header("host", "gw")
            .header("authorization", &unknown)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, body) = send_h1(gw.listen, req).await.unwrap();
        assert_eq!(
            (status, json(&body)["error"].as_str()),
            (404, Some("Not found")),
            "{dots}"
        );
    }
    let m = gw.metrics().await;
    assert!(m.contains("keygate_key_cache_misses_total 0"), "{m}");
    assert!(m.contains("keygate_owner_cache_misses_total 0"), "{m}");
    assert!(upstream.requests().is_empty());
    // Nor can one be registered.
    let (status, v) = gw
        .admin_call(
            "PUT",
            "/admin/v1/workflows/..",
            Some(serde_json::json!({"userId": "alice"})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn key_names_with_deceptive_characters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), "")).await;
    for name in [
        "prod\u{202E}txt",
        "a\u{200B}b",
        "line\u{2028}break",
        "tab\tname",
    ] {
        let (status, v) = gw
            .admin_call(
                "POST",
                "/admin/v1/keys",
                Some(serde_json::json!({"userId": "alice", "name": name})),
            )
            .await;
        assert_eq!(status, 400, "{name:?}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("text-direction"),
            "{v}"
        );
    }
    let (status, v) = gw
        .admin_call(
            "POST",
            "/admin/v1/keys",
            Some(serde_json::json!({"userId": "alice", "name": "Prod – EU 東京 🚀"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["name"], "Prod – EU 東京 🚀");
}

#[tokio::test]
async fn unmatched_paths_methods_and_preflight_need_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), "")).await;
    let get = |uri: &str, method: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "gw")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (status, _, body) = send_h1(gw.listen, get("/nope", "POST")).await.unwrap();
    assert_eq!(
        (status, json(&body)["error"].as_str()),
        (404, Some("Not found"))
    );
    let (status, headers, body) = send_h1(gw.listen, get("/api/workflows/wf/webhook", "GET"))
        .await
        .unwrap();
    assert_eq!(
        (status, json(&body)["error"].as_str()),
        (405, Some("Method not allowed"))
    );
    assert_eq!(headers["allow"], "POST, OPTIONS");
    let (status, headers, _) = send_h1(gw.listen, get("/api/workflows/wf/webhook", "OPTIONS"))
        .await
        .unwrap();
    assert_eq!(status, 204);
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(headers["access-control-allow-methods"], "POST, OPTIONS");
    assert_eq!(
        headers["access-control-allow-headers"],
        "Content-Type, Authorization"
    );
    let m = gw.metrics().await;
    assert!(m.contains("keygate_key_cache_misses_total 0"), "{m}");
    assert!(
        m.contains("keygate_requests_total{route=\"unmatched\",outcome=\"404\"} 1"),
        "{m}"
    );
    assert!(upstream.requests().is_empty());
}

fn chunks(total: usize, chunk: usize) -> StreamBody<futures_stream::Chunks> {
    StreamBody::new(futures_stream::Chunks { left: total, chunk })
}

/// A hand-rolled stream of body frames, so the body is sent chunked with no
/// Content-Length and the gateway cannot see its size up front.
mod futures_stream {
    use bytes::Bytes;
    use http_body::Frame;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Chunks {
        pub left: usize,
        pub chunk: usize,
    }

    impl futures_core::Stream for Chunks {
        type Item = Result<Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let n = self.chunk.min(self.left);
            self.left -= n;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
        }
    }
}

#[tokio::test]
async fn large_streamed_bodies_pass_under_a_raised_limit_and_get_413_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "limits:\n  max_body_bytes: 8388608\n";
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    let post = |body| {
        Request::builder()
            .header("host", "gateway.test")
            .method("POST")
            .uri("/api/workflows/wf/webhook")
            .header("authorization", bearer(&key))
            .body(body)
            .unwrap()
    };
    let size = 6 * 1024 * 1024;
    let (status, _, _) = send_h1(gw.listen, post(chunks(size, 64 * 1024)))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(upstream.requests()[0].body_len, size);

    // Over the limit with a declared length: refused up front.
    let big = Request::builder()
        .header("host", "gateway.test")
        .method("POST")
        .uri("/api/workflows/wf/webhook")
        .header("authorization", bearer(&key))
        .body(Full::new(Bytes::from(vec![b'x'; 9 * 1024 * 1024])))
        .unwrap();
    let (status, _, body) = send_h1(gw.listen, big).await.unwrap();
    assert_eq!(status, 413);
    assert_eq!(json(&body)["error"], "Request body too large");

    // Over the limit while streaming: cut off, 413.
    let result = send_h1(gw.listen, post(chunks(10 * 1024 * 1024, 64 * 1024))).await;
    match result {
        Ok((status, _, _)) => assert_eq!(status, 413),
        // The gateway may close the connection while the client still writes.
        Err(e) => assert!(!e.is_empty()),
    }
    // The upstream saw the 6 MiB body whole, and the over-limit one cut off
    // (an aborted body, recorded as usize::MAX), never complete.
    let seen: Vec<usize> = upstream.requests().iter().map(|s| s.body_len).collect();
    assert_eq!(seen.iter().filter(|n| **n == size).count(), 1, "{seen:?}");
    assert!(
        seen.iter().all(|n| *n == size || *n == usize::MAX),
        "{seen:?}"
    );
}

#[tokio::test]
async fn http2_clients_reach_an_http1_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let req = Request::builder()
        .method("POST")
        .uri(format!(
            "http://gw.example:{}/api/workflows/wf/webhook",
            gw.listen.port()
        ))
        .header("authorization", bearer(&key))
        .body(Full::new(Bytes::from_static(b"{\"h2\":true}")))
        .unwrap();
    let (status, _, body) = send_h2(gw.listen, req).await.unwrap();
    assert_eq!(status, 200, "{body:?}");
    let seen = &upstream.requests()[0];
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.uri, "/api/workflows/wf/webhook");
    assert_eq!(seen.headers["x-user-id"], "alice");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        format!("gw.example:{}", gw.listen.port()).as_str()
    );
    assert_eq!(seen.body_len, 11);
}

#[tokio::test]
async fn tls_serves_h2_and_http1_by_alpn() {
    use rustls_pki_types::CertificateDer;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let upstream = Upstream::start().await;
    let extra = "tls:\n  cert: cert.pem\n  key: key.pem\n";
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), extra).await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.cert.der().to_vec()))
        .unwrap();
    for (alpn, version) in [
        (&b"h2"[..], http::Version::HTTP_2),
        (&b"http/1.1"[..], http::Version::HTTP_11),
    ] {
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        client.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        let tls = connector
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let io = hyper_util::rt::TokioIo::new(tls);
        let req = Request::builder()
            .method("POST")
            .uri("https://localhost/api/workflows/wf/webhook")
            .header("authorization", bearer(&key))
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = if version == http::Version::HTTP_2 {
            let (mut s, c) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(c);
            s.send_request(req).await.unwrap()
        } else {
            let (mut s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(c);
            s.send_request(req).await.unwrap()
        };
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.headers["x-forwarded-proto"] == "https")
    );
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let dir = tempfile::tempdir().unwrap();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (gw, key) = alice_owns_wf(&dir, &closed, "").await;
    let (status, _, body) = gw.webhook("wf", Some(&bearer(&key))).await;
    assert_eq!(status, 502);
    assert_eq!(json(&body)["error"], "Upstream unavailable");

    let dir = tempfile::tempdir().unwrap();
    let slow = Upstream::start_with_delay(Duration::from_secs(5)).await;
    let extra = "limits:\n  upstream_response_timeout: 200ms\n";
    let (gw, key) = alice_owns_wf(&dir, &slow.url(), extra).await;
    let (status, _, body) = gw.webhook("wf", Some(&bearer(&key))).await;
    assert_eq!(status, 504);
    assert_eq!(json(&body)["error"], "Upstream timed out");
}

#[tokio::test]
async fn thousand_requests_make_a_handful_of_last_used_writes() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "usage:\n  flush_interval: 200ms\n";
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), extra)).await;
    let (key_id, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    let auth = bearer(&key);

    gw.webhook("wf", Some(&auth)).await;
    let first_seen = |v: &serde_json::Value| v[0]["lastUsedAt"].as_str().map(str::to_owned);
    assert!(
        eventually(Duration::from_secs(5), || async {
            first_seen(&gw.list_keys("alice").await).is_some()
        })
        .await,
        "lastUsedAt was never written"
    );
    let first = first_seen(&gw.list_keys("alice").await).unwrap();

    // Keep-alive connection, 1,000 authenticated requests.
    let stream = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..1000 {
        let req = Request::builder()
            .header("host", "gateway.test")
            .method("POST")
            .uri("/api/workflows/wf/webhook")
            .header("authorization", &auth)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            first_seen(&gw.list_keys("alice").await).is_some_and(|t| t > first)
        })
        .await,
        "lastUsedAt did not move forward"
    );
    let m = gw.metrics().await;
    let writes: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("keygate_last_used_writes_total "))
        .unwrap()
        .parse()
        .unwrap();
    // One write per key per 200 ms flush: the run takes a few seconds at most.
    assert!(writes >= 2, "{m}");
    assert!(writes <= 40, "{writes} writes for 1,001 requests");
    assert_eq!(gw.list_keys("alice").await[0]["id"], key_id.as_str());
}

#[tokio::test]
async fn graceful_shutdown_writes_the_pending_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.redb");
    let upstream = Upstream::start().await;
    let extra = "usage:\n  flush_interval: 1h\n";
    let mut gw = Gw::start(config(
        dir.path(),
        &StoreKind::Embedded(path.clone()),
        &upstream.url(),
        extra,
    ))
    .await;
    let (_, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    assert!(gw.list_keys("alice").await[0]["lastUsedAt"].is_null());
    assert_eq!(gw.shutdown().await, 0);
    let store = keygate::store::embedded::EmbeddedStore::open(&path).unwrap();
    use keygate::store::Store;
    let keys = store.list_keys("alice").await.unwrap();
    assert!(
        keys[0].last_used_at.is_some(),
        "pending lastUsedAt lost at shutdown"
    );
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Upstream::start_with_delay(Duration::from_millis(300)).await;
    let mut gw = Gw::start(config(dir.path(), &embedded(&dir), &slow.url(), "")).await;
    let (_, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    let listen = gw.listen;
    let auth = bearer(&key);
    let in_flight = tokio::spawn(async move {
        let req = Request::builder()
            .header("host", "gateway.test")
            .method("POST")
            .uri("/api/workflows/wf/webhook")
            .header("authorization", auth)
            .body(Full::new(Bytes::new()))
            .unwrap();
        send_h1(listen, req).await
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            !slow.requests().is_empty()
        })
        .await
    );
    gw.shutdown().await;
    let (status, _, _) = in_flight.await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn metrics_count_outcomes_per_route() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    gw.webhook("wf", Some(&bearer(&key))).await;
    gw.webhook("wf", Some(&bearer(&key))).await;
    gw.webhook("wf", None).await;
    let m = gw.metrics().await;
    let route = "/api/workflows/{workflow}/webhook";
    assert!(
        m.contains(&format!(
            "keygate_requests_total{{route=\"{route}\",outcome=\"2xx\"}} 2"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "keygate_requests_total{{route=\"{route}\",outcome=\"401\"}} 1"
        )),
        "{m}"
    );
    assert!(m.contains("keygate_key_cache_hits_total 1"), "{m}");
    assert!(m.contains("keygate_key_cache_misses_total 1"), "{m}");
    assert!(
        m.contains("keygate_request_duration_seconds_count 3"),
        "{m}"
    );
}

#[tokio::test]
async fn upstream_connections_are_bounded_and_requests_wait_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Upstream::start_with_delay(Duration::from_millis(100)).await;
    let extra = "limits:\n  upstream_max_per_worker: 1\n";
    let (gw, key) = alice_owns_wf(&dir, &slow.url(), extra).await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (listen, auth) = (gw.listen, bearer(&key));
            tokio::spawn(async move {
                let req = Request::builder()
                    .header("host", "gateway.test")
                    .method("POST")
                    .uri("/api/workflows/wf/webhook")
                    .header("authorization", auth)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                send_h1(listen, req).await.unwrap().0
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    assert_eq!(slow.requests().len(), 3);
    assert_eq!(slow.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn admin_paths_are_percent_decoded_and_bad_input_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), "")).await;
    let (id, _) = gw.create_key("alice").await;
    let encoded: String = id.bytes().map(|b| format!("%{b:02X}")).collect();
    let (status, v) = gw
        .admin_call("DELETE", &format!("/admin/v1/keys/{encoded}"), None)
        .await;
    assert_eq!((status, v["id"].as_str()), (200, Some(id.as_str())));
    let (status, v) = gw.admin_call("DELETE", "/admin/v1/keys/%zz", None).await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = gw
        .admin_call("GET", "/admin/v1/keys?userId=has%20space", None)
        .await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap().contains("visible ASCII"),
        "{v}"
    );
    let (status, v) = gw
        .admin_call(
            "POST",
            "/admin/v1/keys",
            Some(serde_json::json!({"user": "x"})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap().contains("invalid JSON body"),
        "{v}"
    );
    let req = Request::builder()
        .header("host", "gateway.test")
        .method("GET")
        .uri("/admin/v1/workflows")
        .header("authorization", "Bearer wrong-token")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, _) = send_h1(gw.admin, req).await.unwrap();
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "rate_limit:\n  key_requests: 2\n  key_window: 1h\n";
    let gw = Gw::start(config(dir.path(), &embedded(&dir), &upstream.url(), extra)).await;
    let (_, busy) = gw.create_key("alice").await;
    let (_, other) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    // Windows are fixed to the clock: the three requests must not straddle
    // the turn of an hour.
    let into_window = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 3600;
    if into_window >= 3590 {
        tokio::time::sleep(Duration::from_secs(3601 - into_window)).await;
    }
    assert_eq!(gw.webhook("wf", Some(&bearer(&busy))).await.0, 200);
    assert_eq!(gw.webhook("wf", Some(&bearer(&busy))).await.0, 200);
    let (status, headers, body) = gw.webhook("wf", Some(&bearer(&busy))).await;
    assert_eq!(status, 429);
    assert_eq!(json(&body)["error"], "Rate limit exceeded for this API key");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry));
    // The limit is the key's, not the user's or the client's.
    assert_eq!(gw.webhook("wf", Some(&bearer(&other))).await.0, 200);
    assert_eq!(upstream.requests().len(), 3);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn worker_threads_run_under_sched_batch_unless_told_otherwise() {
    // Policies of one gateway's worker threads (other tests' gateways may
    // share this process).
    fn policies(gw: &Gw) -> Vec<u32> {
        let threads = &gw.running.as_ref().unwrap().worker_threads;
        assert!(!threads.is_empty());
        threads
            .iter()
            .map(|tid| keygate::sched::policy_of(*tid).expect("worker is alive"))
            .collect()
    }
    const SCHED_BATCH: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, _) = alice_owns_wf(&dir, &upstream.url(), "").await;
    assert_eq!(policies(&gw), [SCHED_BATCH]);

    let other = tempfile::tempdir().unwrap();
    let normal = Gw::start(config(
        other.path(),
        &embedded(&other),
        &upstream.url(),
        "worker_policy: normal\n",
    ))
    .await;
    assert_eq!(policies(&normal), [0]);
    drop((gw, normal));
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn workers_keep_one_cpu_each_when_there_is_one_per_cpu() {
    fn cpus(gw: &Gw) -> Vec<Vec<usize>> {
        let threads = &gw.running.as_ref().unwrap().worker_threads;
        threads
            .iter()
            .map(|tid| keygate::sched::cpus_of(*tid).expect("worker is alive"))
            .collect()
    }
    let allowed = keygate::sched::allowed_cpus().unwrap();
    if allowed.len() < 2 {
        eprintln!("skipped: pinning needs two CPUs, this process may use {allowed:?}");
        return;
    }
    let upstream = Upstream::start().await;
    let start = |workers: usize, extra: &'static str| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), &embedded(&dir), &upstream.url(), extra);
        c.workers = workers;
        async move { (Gw::start(c).await, dir) }
    };

    let (one_each, _d1) = start(allowed.len(), "").await;
    let (told_not_to, _d2) = start(allowed.len(), "worker_cpu_affinity: none\n").await;
    let (more_than_cpus, _d3) = start(allowed.len() + 1, "").await;
    let pinned: Vec<Vec<usize>> = allowed.iter().map(|cpu| vec![*cpu]).collect();
    assert_eq!(cpus(&one_each), pinned);
    assert!(cpus(&told_not_to).iter().all(|c| *c == allowed));
    assert!(cpus(&more_than_cpus).iter().all(|c| *c == allowed));
    assert_eq!(cpus(&more_than_cpus).len(), allowed.len() + 1);
    // Pinned workers serve.
    assert_eq!(one_each.webhook("wf", None).await.0, 401);
}

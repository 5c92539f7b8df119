//! What a permitted call becomes upstream: the trusted identity, the
//! configured route, bodies streamed both ways, HTTP/2 and TLS clients, and
//! what an upstream that is down or slow comes to.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{Full, StreamBody};
use std::time::Duration;

#[tokio::test]
async fn spoofed_identity_headers_are_replaced_and_authorization_is_not_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), "")).await;
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
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), extra)).await;
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

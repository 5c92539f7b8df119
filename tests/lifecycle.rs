//! A gateway's life around its requests: the graceful stop (answers say
//! close, requests already received are answered, HTTP/2 gets GOAWAY),
//! connection limits at accept, and a reload put in force without a
//! restart (routes, limits, cache sizes, the certificate).

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATH: &str = "/api/workflows/wf/webhook";

fn post(key: &str, extra_fields: &str) -> String {
    format!(
        "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n{extra_fields}Content-Length: 2\r\n\r\n{{}}"
    )
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn responses(text: &str) -> Vec<&str> {
    text.split("HTTP/1.1 ").filter(|r| !r.is_empty()).collect()
}

fn gauge(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn an_answer_during_a_graceful_stop_says_connection_close() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Upstream::start_with_delay(Duration::from_millis(300)).await;
    let (mut gw, key) = alice_owns_wf(&dir, &slow.url(), "").await;
    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    stream.write_all(post(&key, "").as_bytes()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            !slow.requests().is_empty()
        })
        .await
    );
    let stopping = tokio::spawn(async move { gw.shutdown().await });
    let text = read_to_close(&mut stream).await;
    let all = responses(&text);
    assert_eq!(all.len(), 1, "{text}");
    assert!(all[0].starts_with("200 "), "{text}");
    // A pooled client must not send its next request on this connection.
    assert!(all[0].contains("connection: close\r\n"), "{text}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn requests_already_received_are_answered_during_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Upstream::start_with_delay(Duration::from_millis(300)).await;
    let (mut gw, key) = alice_owns_wf(&dir, &slow.url(), "").await;
    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    let two = post(&key, "X-Request-Id: r1\r\n") + &post(&key, "X-Request-Id: r2\r\n");
    stream.write_all(two.as_bytes()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            !slow.requests().is_empty()
        })
        .await
    );
    let stopping = tokio::spawn(async move { gw.shutdown().await });
    let text = read_to_close(&mut stream).await;
    let all = responses(&text);
    assert_eq!(
        all.len(),
        2,
        "the pipelined request went unanswered:\n{text}"
    );
    assert!(all.iter().all(|r| r.starts_with("200 ")), "{text}");
    assert!(all[0].contains("x-request-id: r1") && all[1].contains("x-request-id: r2"));
    // The last answer on the connection says close; the one before it
    // could not, with a request behind it to answer.
    assert!(!all[0].contains("connection: close"), "{text}");
    assert!(all[1].contains("connection: close"), "{text}");
    assert_eq!(slow.requests().len(), 2);
    stopping.await.unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_a_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (mut gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    stream.write_all(post(&key, "").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    gw.shutdown().await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0),
        0
    );
}

#[tokio::test]
async fn http2_connections_get_goaway_and_their_open_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Upstream::start_with_delay(Duration::from_millis(300)).await;
    let (mut gw, key) = alice_owns_wf(&dir, &slow.url(), "").await;
    let stream = TcpStream::connect(gw.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(PATH)
        .header("authorization", bearer(&key))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let in_flight = sender.send_request(req);
    let in_flight = tokio::spawn(in_flight);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !slow.requests().is_empty()
        })
        .await
    );
    let stopping = tokio::spawn(async move { gw.shutdown().await });
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    // GOAWAY: the connection ends once its stream is done.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the HTTP/2 connection stayed open after the stop")
        .unwrap()
        .unwrap();
    stopping.await.unwrap();
}

/// Opens a connection and waits until the gateway counts it.
async fn held_connection(gw: &Gw, open_before: u64) -> TcpStream {
    let stream = TcpStream::connect(gw.listen).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            gauge(&gw.metrics().await, "keygate_connections_open") == Some(open_before + 1)
        })
        .await
    );
    stream
}

/// Whether the gateway closed `stream` without answering.
async fn refused(mut stream: TcpStream) -> bool {
    let _ = stream.write_all(post("wfb_x", "").as_bytes()).await;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_at_accept() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "limits:\n  max_connections: 2\n").await;
    let first = held_connection(&gw, 0).await;
    let _second = held_connection(&gw, 1).await;
    let third = TcpStream::connect(gw.listen).await.unwrap();
    assert!(refused(third).await, "a third connection was served");
    let metrics = gw.metrics().await;
    assert_eq!(
        gauge(&metrics, "keygate_connections_refused_total"),
        Some(1)
    );
    // A place that frees up is taken again.
    drop(first);
    assert!(
        eventually(Duration::from_secs(5), || async {
            gauge(&gw.metrics().await, "keygate_connections_open") == Some(1)
        })
        .await
    );
    let mut fourth = TcpStream::connect(gw.listen).await.unwrap();
    fourth
        .write_all(post(&key, "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_to_close(&mut fourth).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn connections_per_address_are_limited_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "limits:\n  max_connections_per_ip: 1\n";
    let (gw, _) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    let _held = held_connection(&gw, 0).await;
    let second = TcpStream::connect(gw.listen).await.unwrap();
    assert!(
        refused(second).await,
        "a second connection from one address was served"
    );
}

/// A keep-alive HTTP/1.1 client connection for raw requests.
struct Client(TcpStream);

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client(TcpStream::connect(addr).await.unwrap())
    }

    /// Sends `request` and reads one answer (with a Content-Length body).
    async fn send(&mut self, request: &str) -> String {
        self.0.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    return text;
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.0.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed: {text}");
            out.extend_from_slice(&buf[..n]);
        }
    }
}

#[tokio::test]
async fn a_reload_puts_routes_and_limits_in_force_on_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let mut client = Client::connect(gw.listen).await;
    let hooks = format!(
        "POST /hooks/wf HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    assert!(client.send(&hooks).await.starts_with("HTTP/1.1 404"));
    let reloaded = gw
        .running()
        .reload(embedded_config(
            &dir,
            &upstream.url(),
            "routes:\n  - path: /api/workflows/{workflow}/webhook\n  - path: /hooks/{workflow}\nlimits:\n  max_body_bytes: 1\n",
        ))
        .unwrap();
    assert!(
        reloaded.needs_restart.is_empty(),
        "{:?}",
        reloaded.needs_restart
    );
    // The same connection: the next request takes the new config.
    assert!(
        client.send(&hooks).await.starts_with("HTTP/1.1 413"),
        "new limit"
    );
    let small = format!(
        "POST /hooks/wf HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Length: 1\r\n\r\nx"
    );
    assert!(
        client.send(&small).await.starts_with("HTTP/1.1 200"),
        "new route"
    );
    assert!(
        gw.metrics()
            .await
            .contains("keygate_requests_total{route=\"/hooks/{workflow}\",outcome=\"2xx\"} 1")
    );
}

#[tokio::test]
async fn a_reload_keeps_what_needs_a_restart_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let mut other = embedded_config(&dir, &upstream.url(), "shutdown_timeout: 5s\n");
    other.workers = 2;
    other.store = keygate::config::StoreConfig::Embedded {
        path: dir.path().join("elsewhere.redb"),
    };
    let reloaded = gw.running().reload(other).unwrap();
    let mut named = reloaded.needs_restart.clone();
    named.sort_unstable();
    assert_eq!(named, ["shutdown_timeout", "store", "workers"]);
    // Still on the store it started with: the key it holds still works.
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    assert!(matches!(
        gw.running().config().store,
        keygate::config::StoreConfig::Embedded { ref path } if path.ends_with("keygate.redb")
    ));
}

#[tokio::test]
async fn a_reload_resizes_the_caches_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    let misses = |m: &str| gauge(m, "keygate_key_cache_misses_total").unwrap();
    let before = misses(&gw.metrics().await);
    gw.running()
        .reload(embedded_config(
            &dir,
            &upstream.url(),
            "cache:\n  keys: { capacity: 10, ttl: 120s }\n",
        ))
        .unwrap();
    // The cached key survived the resize: no store read.
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    assert_eq!(misses(&gw.metrics().await), before);
}

fn certificate(dir: &std::path::Path) -> rustls_pki_types::CertificateDer<'static> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    rustls_pki_types::CertificateDer::from(cert.cert.der().to_vec())
}

/// Whether a TLS handshake that trusts only `trusted` succeeds.
async fn trusts(addr: SocketAddr, trusted: &rustls_pki_types::CertificateDer<'static>) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.is_ok()
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_connections_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let old = certificate(dir.path());
    let upstream = Upstream::start().await;
    let extra = "tls:\n  cert: cert.pem\n  key: key.pem\n";
    let (gw, _) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    assert!(trusts(gw.listen, &old).await);
    let renewed = certificate(dir.path());
    assert!(
        !trusts(gw.listen, &renewed).await,
        "renewed before the reload"
    );
    gw.running()
        .reload(embedded_config(&dir, &upstream.url(), extra))
        .unwrap();
    assert!(trusts(gw.listen, &renewed).await);
    assert!(!trusts(gw.listen, &old).await);
    // A broken certificate is refused, and the renewed one stays.
    std::fs::write(
        dir.path().join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = gw
        .running()
        .reload(embedded_config(&dir, &upstream.url(), extra))
        .unwrap_err();
    assert!(e.contains("cert.pem"), "{e}");
    assert!(trusts(gw.listen, &renewed).await);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Upstream::start_with_delay(Duration::from_millis(300)).await;
    let mut gw = Gw::start(config(
        dir.path(),
        &StoreKind::Embedded(dir.path().join("keygate.redb")),
        &slow.url(),
        "",
    ))
    .await;
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

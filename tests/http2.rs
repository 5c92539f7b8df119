//! The HTTP/2 side's bounds: an engine that stalls mid-body, a client that
//! keeps its flow-control window at 0, an idle connection answering PINGs;
//! and what HTTP/2 changes about the forwarded request and the answer.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpStream;

const PATH: &str = "/api/workflows/wf/webhook";

/// An HTTP/2 (prior knowledge) client connection, tuned by `tune`; the
/// connection task's handle resolves when the connection ends.
async fn h2_client(
    addr: SocketAddr,
    tune: impl FnOnce(&mut hyper::client::conn::http2::Builder<TokioExecutor>),
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    tune(&mut builder);
    let (sender, conn) = builder.handshake(TokioIo::new(stream)).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

fn webhook(key: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(PATH)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test]
async fn an_engine_that_stalls_mid_body_ends_the_stream_and_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    // A head, 4 of the 100 bytes it promises, and nothing more.
    let upstream =
        Scripted::start("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabcd", false).await;
    let extra = "limits:\n  upstream_response_timeout: 300ms\n";
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    let (mut sender, _conn) = h2_client(gw.listen, |_| {}).await;
    let response = sender.send_request(webhook(&key)).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => got.extend_from_slice(frame.data_ref().unwrap()),
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the stream stayed open past the upstream response timeout");
    assert!(
        ended,
        "a cut-short body must end in an error, not look whole"
    );
    assert_eq!(got, b"abcd");
    // keygate dropped the upstream connection instead of keeping it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            upstream.closed.load(Ordering::SeqCst) == 1
        })
        .await
    );
}

#[tokio::test]
async fn a_client_with_a_zero_window_gives_its_upstream_connection_back() {
    let dir = tempfile::tempdir().unwrap();
    let body_len = 1 << 20;
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n\r\n{}",
            "x".repeat(body_len)
        )
        .into_boxed_str(),
    );
    let upstream = Scripted::start(answer, false).await;
    let extra = "limits:\n  upstream_max_per_worker: 1\n  upstream_response_timeout: 10s\n  send_timeout: 300ms\n";
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    // A takes the only upstream connection and never opens its window.
    let (mut stalled, _conn) = h2_client(gw.listen, |b| {
        b.initial_stream_window_size(0);
    })
    .await;
    let response = stalled.send_request(webhook(&key)).await.unwrap();
    assert_eq!(response.status(), 200);
    let held = response.into_body();
    // B gets through once keygate has reset A's stream; without the bound
    // B would wait the 10 s upstream timeout for the connection A holds.
    let b = tokio::time::timeout(Duration::from_secs(5), async {
        let req = Request::builder()
            .method("POST")
            .uri(PATH)
            .header("host", "gw")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        send_h1(gw.listen, req).await.unwrap()
    })
    .await
    .expect("another client waited behind a stalled HTTP/2 stream");
    assert_eq!(b.0, 200);
    assert_eq!(b.2.len(), body_len);
    // A's stream was reset, not left open.
    let outcome = tokio::time::timeout(Duration::from_secs(5), held.collect()).await;
    assert!(matches!(outcome, Ok(Err(_))), "A's stream was not reset");
}

#[tokio::test]
async fn an_idle_connection_is_closed_however_it_answers_pings() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "limits:\n  h2_idle_timeout: 300ms\n";
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    let (mut sender, conn) = h2_client(gw.listen, |b| {
        b.timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_while_idle(true);
    })
    .await;
    let response = sender.send_request(webhook(&key)).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an idle HTTP/2 connection stayed open")
        .unwrap();
}

#[tokio::test]
async fn a_busy_connection_is_not_closed_as_idle() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start_with_delay(Duration::from_millis(800)).await;
    let extra = "limits:\n  h2_idle_timeout: 300ms\n";
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    let (mut sender, _conn) = h2_client(gw.listen, |_| {}).await;
    // One request open for longer than the idle timeout.
    let response = sender.send_request(webhook(&key)).await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn split_cookies_reach_the_engine_as_one_field() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let (mut sender, _conn) = h2_client(gw.listen, |_| {}).await;
    let mut req = webhook(&key);
    req.headers_mut().append("cookie", "a=1".parse().unwrap());
    req.headers_mut().append("cookie", "b=2".parse().unwrap());
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = &upstream.requests()[0];
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2"]);
}

#[tokio::test]
async fn http2_answers_carry_keygates_own_length() {
    for (answer, want) in [
        ("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", None),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
            Some("5"),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Scripted::start(answer, false).await;
        let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
        let (mut sender, _conn) = h2_client(gw.listen, |_| {}).await;
        let response = sender.send_request(webhook(&key)).await.unwrap();
        let lengths: Vec<_> = response
            .headers()
            .get_all("content-length")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        match want {
            None => assert!(lengths.is_empty(), "{answer:?}: {lengths:?}"),
            Some(n) => assert_eq!(lengths, [n], "{answer:?}"),
        }
    }
}

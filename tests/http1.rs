//! keygate's own HTTP/1.1 engine at the byte level: raw TCP clients against
//! the gateway, and both a real hyper upstream and scripted raw upstreams on
//! 127.0.0.1:0. Request smuggling shapes, pipelining, `100-continue`,
//! HTTP/1.0, chunked re-framing and the upstream pool's rules.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATH: &str = "/api/workflows/wf/webhook";

/// Writes `request` and reads until the gateway closes (or 5 s pass).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `want` has been seen (or 5 s pass).
async fn read_until(stream: &mut TcpStream, want: &str) -> String {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&out).contains(want) {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn post(key: &str, extra_fields: &str, body: &str) -> String {
    format!(
        "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n{extra_fields}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn smuggling_shapes_are_refused_before_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let auth = format!("Authorization: Bearer {key}\r\n");
    let cases = [
        (
            format!(
                "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
            ),
            400,
        ),
        (
            format!(
                "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
            ),
            501,
        ),
        (
            format!(
                "POST {PATH} HTTP/1.0\r\nHost: gw\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            format!("POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length : 4\r\n\r\nabcd"),
            400,
        ),
        (
            format!(
                "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "POST {PATH} HTTP/1.1\r\nHost: gw\r\nHost: other\r\n{auth}Content-Length: 0\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}X: {}\r\n\r\n",
                "a".repeat(70_000)
            ),
            431,
        ),
    ];
    for (request, want) in &cases {
        let response = exchange(gw.listen, request.as_bytes()).await;
        assert_eq!(status_of(&response), *want, "{request:.120}\n{response}");
        assert!(response.contains("connection: close"), "{response}");
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
}

#[tokio::test]
async fn malformed_chunked_bodies_never_complete_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    for body in [
        "5\nhello\r\n0\r\n\r\n",
        "5\r\nhelloEXTRA\r\n0\r\n\r\n",
        "zz\r\n",
    ] {
        let request = format!(
            "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let response = exchange(gw.listen, request.as_bytes()).await;
        assert_eq!(status_of(&response), 400, "{body:?}\n{response}");
    }
    // The upstream may have seen a head, never a whole body.
    assert_eq!(upstream.whole_bodies(), 0);

    // A well-formed chunked body arrives whole, re-framed.
    let request = format!(
        "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-Field: x\r\n\r\n"
    );
    let response = exchange(gw.listen, request.as_bytes()).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let last = upstream.requests().pop().unwrap();
    assert_eq!(last.body_len, 11);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let mut all = String::new();
    for (i, last) in [(1, false), (2, false), (3, true)] {
        let close = if last { "Connection: close\r\n" } else { "" };
        all.push_str(&post(
            &key,
            &format!("X-Request-Id: req-{i}\r\n{close}"),
            "{}",
        ));
    }
    let response = exchange(gw.listen, all.as_bytes()).await;
    let ids: Vec<&str> = response
        .lines()
        .filter_map(|l| l.strip_prefix("x-request-id: "))
        .collect();
    assert_eq!(ids, ["req-1", "req-2", "req-3"], "{response}");
    assert_eq!(response.matches("HTTP/1.1 200 OK").count(), 3);
    assert_eq!(upstream.requests().len(), 3);
    // One upstream connection carried all three.
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn expect_continue_is_answered_only_for_permitted_requests() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;

    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let interim = read_until(&mut stream, "\r\n\r\n").await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    let response = read_to_close(&mut stream).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let seen = upstream.requests();
    assert_eq!(seen[0].body_len, 5);
    assert!(!seen[0].headers.contains_key("expect"));

    // A refused request gets its answer at once, no 100, and the connection
    // closes (the client never sent the body).
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer wfb_{}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        "Q".repeat(38)
    );
    let response = exchange(gw.listen, head.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 401 "), "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn http10_and_chunked_upstream_answers_are_reframed() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Scripted::start(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n",
        false,
    )
    .await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;

    // HTTP/1.1: chunks again (the gateway's own), and keep-alive.
    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    stream
        .write_all(post(&key, "", "x").as_bytes())
        .await
        .unwrap();
    let response = read_until(&mut stream, "0\r\n\r\n").await;
    assert!(
        response.contains("transfer-encoding: chunked\r\n"),
        "{response}"
    );
    assert!(
        response.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{response}"
    );
    assert!(!response.contains("connection: close"));

    // HTTP/1.0: no chunks; the body ends when the connection does.
    let request = format!(
        "POST {PATH} HTTP/1.0\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Length: 1\r\n\r\nx"
    );
    let response = exchange(gw.listen, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(!response.contains("transfer-encoding"), "{response}");
    assert!(response.contains("connection: close\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nhello world"), "{response}");

    // The engine sees each request once, framed by Content-Length.
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.contains("content-length: 1\r\n")));
}

#[tokio::test]
async fn upstream_answers_keygate_cannot_frame_are_502() {
    for answer in [
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxxxx",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Scripted::start(answer, false).await;
        let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
        let response = exchange(
            gw.listen,
            post(&key, "Connection: close\r\n", "").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&response), 502, "{answer:?}\n{response}");
        assert!(response.contains(r#"{"error":"Upstream unavailable"}"#));
    }
}

#[tokio::test]
async fn a_head_trickled_in_is_cut_off_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, _) = alice_owns_wf(
        &dir,
        &upstream.url(),
        "limits:\n  header_read_timeout: 300ms\n",
    )
    .await;
    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nX-Pad: ")
        .await
        .unwrap();
    // One byte every 50 ms: each read comes well within the timeout, the
    // head never does. The gateway must close within the test's 5 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut closed = false;
    while tokio::time::Instant::now() < deadline {
        if stream.write_all(b"a").await.is_err() {
            closed = true;
            break;
        }
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(50), stream.read(&mut byte)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled head kept its connection for 5 s");
}

#[tokio::test]
async fn a_client_that_stops_reading_gives_its_upstream_connection_back() {
    let dir = tempfile::tempdir().unwrap();
    let body_len = 8 * 1024 * 1024;
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n\r\n{}",
            "x".repeat(body_len)
        )
        .into_boxed_str(),
    );
    let upstream = Scripted::start(answer, false).await;
    let extra = "limits:\n  upstream_max_per_worker: 1\n  upstream_response_timeout: 500ms\n  send_timeout: 500ms\n";
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    // A takes the only upstream connection and never reads its answer.
    let mut stalled = TcpStream::connect(gw.listen).await.unwrap();
    stalled
        .write_all(post(&key, "", "{}").as_bytes())
        .await
        .unwrap();
    // B gets through once the gateway has given up on A; without the send
    // timeout every try would wait for the connection A holds and get 504.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut statuses = Vec::new();
    while tokio::time::Instant::now() < deadline {
        let mut b = TcpStream::connect(gw.listen).await.unwrap();
        b.write_all(post(&key, "Connection: close\r\n", "{}").as_bytes())
            .await
            .unwrap();
        let response = read_to_close(&mut b).await;
        statuses.push(status_of(&response));
        if status_of(&response) == 200 {
            assert!(response.len() > body_len, "whole body");
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    drop(stalled);
}

#[tokio::test]
async fn idle_connections_the_upstream_closed_are_not_used() {
    let dir = tempfile::tempdir().unwrap();
    // Answers with a length, as if the connection could be kept, then
    // closes it.
    let upstream = Scripted::start("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true).await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    for call in 1..=3 {
        let response = exchange(
            gw.listen,
            post(&key, "Connection: close\r\n", "{}").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&response), 200, "{response}");
        // The upstream's close is on the gateway's socket before the next call.
        assert!(
            eventually(Duration::from_secs(5), || async {
                upstream.hung_up.load(Ordering::SeqCst) == call
            })
            .await
        );
    }
    assert_eq!(upstream.requests().len(), 3);
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_request_the_upstream_dropped_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    // Reads the request, then closes without an answer.
    let upstream = Scripted::start("", true).await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let response = exchange(
        gw.listen,
        post(&key, "Connection: close\r\n", "{}").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&response), 502, "{response}");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn http2_prior_knowledge_is_told_apart_from_http1() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    // An HTTP/1.1 request arriving a byte at a time is still HTTP/1.1.
    let request = post(&key, "Connection: close\r\n", "{}");
    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    for byte in request.as_bytes() {
        stream.write_all(&[*byte]).await.unwrap();
    }
    let response = read_to_close(&mut stream).await;
    assert_eq!(status_of(&response), 200, "{response}");
    // And h2 prior knowledge is served as HTTP/2 (the h2 client test in
    // webhook.rs covers the exchange itself): the server's SETTINGS frame.
    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut frame))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame[3], 0x4, "first frame is SETTINGS: {frame:?}");
}

#[tokio::test]
async fn a_client_that_pipelines_and_never_reads_is_dropped_after_the_send_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "limits:\n  send_timeout: 300ms\nrate_limit:\n  max_failures: 0\n";
    let (gw, _) = alice_owns_wf(&dir, &upstream.url(), extra).await;
    // 20,000 requests that each get keygate's own 401, written and never
    // read: the answers fill the socket buffers and keygate's writes stop.
    let request = format!("POST {PATH} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n");
    let all = request.repeat(20_000);
    let mut stream = TcpStream::connect(gw.listen).await.unwrap();
    let writer = tokio::spawn(async move {
        let _ = stream.write_all(all.as_bytes()).await;
        // Hold the connection open, never reading.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    });
    let open = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix("keygate_connections_open "))
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            open(gw.metrics().await) == Some(1)
        })
        .await
    );
    // Without a bound on the write the connection would be held for good.
    assert!(
        eventually(Duration::from_secs(10), || async {
            open(gw.metrics().await) == Some(0)
        })
        .await,
        "the gateway still holds a connection that reads nothing"
    );
    writer.abort();
}

#[tokio::test]
async fn http11_requests_without_exactly_one_valid_host_are_400() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let auth = format!("Authorization: Bearer {key}\r\n");
    for (host, detail) in [
        ("", "no Host header"),
        ("Host: gw\r\nHost: gw\r\n", "more than one Host header"),
        ("Host: gw, evil\r\n", "invalid Host header"),
        ("Host: gw evil\r\n", "invalid Host header"),
        ("Host: user@gw\r\n", "invalid Host header"),
    ] {
        let request = format!("POST {PATH} HTTP/1.1\r\n{host}{auth}Content-Length: 2\r\n\r\n{{}}");
        let response = exchange(gw.listen, request.as_bytes()).await;
        assert_eq!(status_of(&response), 400, "{host:?}\n{response}");
        assert!(response.contains(detail), "{response}");
        assert!(response.contains("connection: close"), "{response}");
    }
    assert!(upstream.requests().is_empty());
    // HTTP/1.0 may leave Host out.
    let request = format!("POST {PATH} HTTP/1.0\r\n{auth}Content-Length: 2\r\n\r\n{{}}");
    let response = exchange(gw.listen, request.as_bytes()).await;
    assert_eq!(status_of(&response), 200, "{response}");
}

#[tokio::test]
async fn chunk_extensions_and_trailers_count_toward_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    // 100 KB of extensions on 100 bytes of data.
    let extensions = format!("1;{}\r\nx\r\n", "e".repeat(1000)).repeat(100) + "0\r\n\r\n";
    let response = exchange(gw.listen, format!("{head}{extensions}").as_bytes()).await;
    assert_eq!(status_of(&response), 400, "{response}");
    assert!(
        response.contains("chunk extensions too large"),
        "{response}"
    );
    // One chunk line longer than a few KiB.
    let long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(10_000));
    let response = exchange(gw.listen, format!("{head}{long}").as_bytes()).await;
    assert_eq!(status_of(&response), 400, "{response}");
    assert!(response.contains("chunk line too long"), "{response}");
    // 100 KB of trailer fields.
    let trailers = format!(
        "1\r\nx\r\n0\r\n{}\r\n",
        format!("X-T: {}\r\n", "t".repeat(1000)).repeat(100)
    );
    let response = exchange(gw.listen, format!("{head}{trailers}").as_bytes()).await;
    assert_eq!(status_of(&response), 431, "{response}");
    // The engine never saw a whole body.
    assert_eq!(upstream.whole_bodies(), 0);
}

#[tokio::test]
async fn bodiless_answers_lose_their_length_and_doubled_lengths_are_made_one() {
    for (answer, want) in [
        ("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", None),
        (
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            None,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
            Some("content-length: 5\r\n"),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Scripted::start(answer, false).await;
        let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
        let response = exchange(
            gw.listen,
            post(&key, "Connection: close\r\n", "{}").as_bytes(),
        )
        .await;
        let head = response
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .to_ascii_lowercase();
        match want {
            None => assert!(!head.contains("content-length"), "{response}"),
            Some(field) => {
                assert_eq!(head.matches("content-length").count(), 1, "{response}");
                assert!(response.to_ascii_lowercase().contains(field), "{response}");
                assert!(response.ends_with("\r\n\r\nhello"), "{response}");
            }
        }
    }
}

#[tokio::test]
async fn headers_an_engine_could_trust_for_routing_never_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Scripted::start("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false).await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "").await;
    let fields = "x-middleware-subrequest: middleware:middleware:middleware\r\n\
                  X-Original-URL: /admin\r\n\
                  X-Rewrite-URL: /admin\r\n\
                  Transfer_Encoding: chunked\r\n\
                  Content_Length: 5\r\n\
                  X-Kept: 1\r\n\
                  Connection: close\r\n";
    let response = exchange(gw.listen, post(&key, fields, "{}").as_bytes()).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let seen = upstream.requests().pop().unwrap().to_ascii_lowercase();
    for gone in [
        "x-middleware-subrequest",
        "x-original-url",
        "x-rewrite-url",
        "transfer_encoding",
        "content_length",
    ] {
        assert!(!seen.contains(gone), "{gone} reached the engine:\n{seen}");
    }
    assert!(seen.contains("x-kept: 1"), "{seen}");
    assert!(
        gw.metrics()
            .await
            .contains("keygate_dropped_headers_total 5")
    );
}

#[tokio::test]
async fn the_strip_list_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Scripted::start("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false).await;
    let (gw, key) = alice_owns_wf(&dir, &upstream.url(), "headers:\n  strip: [x-debug]\n").await;
    let fields = "X-Debug: 1\r\nX-Original-URL: /kept\r\nConnection: close\r\n";
    let response = exchange(gw.listen, post(&key, fields, "{}").as_bytes()).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let seen = upstream.requests().pop().unwrap().to_ascii_lowercase();
    assert!(!seen.contains("x-debug"), "{seen}");
    assert!(seen.contains("x-original-url: /kept"), "{seen}");
}

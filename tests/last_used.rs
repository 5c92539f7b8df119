//! `lastUsedAt`: noted per call, written in batches, and written out at
//! a graceful stop.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use keygate::store::Store;
use std::time::Duration;

#[tokio::test]
async fn thousand_requests_make_a_handful_of_last_used_writes() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "usage:\n  flush_interval: 200ms\n";
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), extra)).await;
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
    let keys = store.list_keys("alice").await.unwrap();
    assert!(
        keys[0].last_used_at.is_some(),
        "pending lastUsedAt lost at shutdown"
    );
}

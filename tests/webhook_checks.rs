//! DESIGN.md's checks, row by row, on both stores: who may call which
//! webhook, and what everyone else is told.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use std::time::Duration;

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
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), "")).await;
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
async fn dot_segment_workflow_ids_are_404_before_any_store_call() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), "")).await;
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
async fn unmatched_paths_methods_and_preflight_need_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), "")).await;
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

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let extra = "rate_limit:\n  key_requests: 2\n  key_window: 1h\n";
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), extra)).await;
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

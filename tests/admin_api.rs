//! The admin API as clients call it: paths, bodies, tokens, and what it
//! refuses.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

#[tokio::test]
async fn admin_paths_are_percent_decoded_and_bad_input_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), "")).await;
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
async fn key_names_with_deceptive_characters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let gw = Gw::start(embedded_config(&dir, &upstream.url(), "")).await;
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

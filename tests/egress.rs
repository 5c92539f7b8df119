//! Integration credentials end to end: sealed in every store, a run token
//! on every permitted webhook call, and egress injecting the run owner's
//! secret on the way to a real HTTPS provider (127.0.0.1, a certificate
//! made here), never anyone else's, never the token or a key upstream.
//! Also `https://` webhook upstreams.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use keygate::config::{MasterKey, SecretKey, VaultConfig};
use keygate::vault::run_token::{RunClaims, RunTokens};
use std::time::Duration;

const SECRET: &str = "sk-live-0123456789abcdef";
const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const K2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// `vault:` with these master keys (id, hex) and `egress:` pointing the
/// built-in skytells type at `provider`.
fn vault_yaml(keys: &[(&str, &str)], provider: &HttpsServer, more_egress: &str) -> String {
    let keys: String = keys
        .iter()
        .map(|(id, key)| format!("    - {{id: {id}, key: \"{key}\"}}\n"))
        .collect();
    format!(
        "vault:\n  master_keys:\n{keys}egress:\n  listen: \"127.0.0.1:0\"\n{more_egress}  providers:\n    skytells: {{base_url: \"{}/v1\", ca_file: \"{}\"}}\n",
        provider.url(),
        provider.ca_file.display()
    )
}

/// A gateway on `store` where alice has a key and owns `wf`, with a vault.
async fn gateway(
    dir: &tempfile::TempDir,
    store: &StoreKind,
    upstream: &str,
    vault: &str,
) -> (Gw, String) {
    let gw = Gw::start(config(dir.path(), store, upstream, vault)).await;
    let (_, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    (gw, key)
}

async fn add(gw: &Gw, user: &str, secret: &str) -> String {
    let (status, body) = gw
        .admin_call(
            "POST",
            "/admin/v1/integrations",
            Some(serde_json::json!({"userId": user, "type": "skytells", "name": "prod", "secret": secret})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(!body.to_string().contains(secret), "{body}");
    body["id"].as_str().unwrap().to_owned()
}

async fn mint(gw: &Gw, user: &str) -> String {
    let (status, body) = gw
        .admin_call(
            "POST",
            "/admin/v1/run-tokens",
            Some(serde_json::json!({"userId": user})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

/// One egress request; the status and body.
async fn egress(
    gw: &Gw,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> (u16, String) {
    let addr = gw.running().egress_addr.expect("egress listens");
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header("host", "egress");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let (status, _, bytes) = send_h1(
        addr,
        req.body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap(),
    )
    .await
    .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn embedded_store(dir: &tempfile::TempDir) -> StoreKind {
    StoreKind::Embedded(dir.path().join("keygate.redb"))
}

#[tokio::test]
async fn a_permitted_call_carries_a_run_token_that_egress_swaps_for_the_owners_secret() {
    let dir = tempfile::tempdir().unwrap();
    let provider = HttpsServer::start().await;
    let upstream = Upstream::start().await;
    let (gw, key) = gateway(
        &dir,
        &embedded_store(&dir),
        &upstream.url(),
        &vault_yaml(&[("k1", K1)], &provider, ""),
    )
    .await;
    let id = add(&gw, "alice", SECRET).await;
    // The webhook call goes upstream with a run token; a client's own copy
    // of the header is replaced.
    let (status, _, _) = gw.webhook("wf", Some(&bearer(&key))).await;
    assert_eq!(status, 200);
    let req = Request::builder()
        .method("POST")
        .uri("/api/workflows/wf/webhook")
        .header("host", "gw")
        .header("authorization", bearer(&key))
        .header("x-keygate-run", "kgr_forged")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send_h1(gw.listen, req).await.unwrap().0, 200);
    let seen = upstream.requests();
    let tokens: Vec<&str> = seen
        .iter()
        .map(|s| s.headers["x-keygate-run"].to_str().unwrap())
        .collect();
    assert!(
        tokens
            .iter()
            .all(|t| t.starts_with("kgr_") && *t != "kgr_forged"),
        "{tokens:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.headers.get_all("x-keygate-run").iter().count() == 1)
    );
    let token = tokens[0].to_owned();

    // The token works from any of its three places; the provider gets the
    // secret, the path, query and body, and never the token.
    let places: [(&str, String); 3] = [
        ("x-keygate-run", token.clone()),
        ("authorization", format!("Bearer {token}")),
        ("x-api-key", token.clone()),
    ];
    for (header, value) in &places {
        let (status, body) = egress(
            &gw,
            "POST",
            &format!("/integrations/{id}/predictions?model=flux&n=2"),
            &[
                (header, value),
                ("cookie", "session=engine"),
                ("content-type", "application/json"),
            ],
            "{\"prompt\":\"a cat\"}",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "{\"ok\":true}");
    }
    let calls = provider.requests();
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert_eq!(call.method, "POST");
        assert_eq!(call.target, "/v1/predictions?model=flux&n=2");
        assert_eq!(call.body.as_ref(), b"{\"prompt\":\"a cat\"}");
        assert_eq!(call.headers["x-api-key"], SECRET);
        assert_eq!(
            call.headers["authorization"],
            format!("Bearer {SECRET}").as_str()
        );
        assert_eq!(call.headers.get_all("x-api-key").iter().count(), 1);
        assert_eq!(
            call.headers["host"],
            "127.0.0.1:".to_owned() + &provider.addr.port().to_string()
        );
        assert!(call.headers.get("cookie").is_none());
        assert!(call.headers.get("x-keygate-run").is_none());
        let all = format!("{:?}", call.headers);
        assert!(!all.contains("kgr_"), "{all}");
    }
    // HTTP/2 to the provider, by ALPN.
    assert_eq!(calls[0].version, http::Version::HTTP_2);
    let m = gw.metrics().await;
    assert!(
        m.contains("keygate_egress_requests_total{type=\"skytells\",outcome=\"2xx\"} 3"),
        "{m}"
    );
    // Last use is recorded.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, list) = gw
                .admin_call("GET", "/admin/v1/integrations?userId=alice", None)
                .await;
            !list[0]["lastUsedAt"].is_null()
        })
        .await
    );
}

#[tokio::test]
async fn egress_refuses_tokens_and_keys_that_are_not_the_owners() {
    let dir = tempfile::tempdir().unwrap();
    let provider = HttpsServer::start().await;
    let upstream = Upstream::start().await;
    let (mut gw, key) = gateway(
        &dir,
        &embedded_store(&dir),
        &upstream.url(),
        &vault_yaml(&[("k1", K1)], &provider, ""),
    )
    .await;
    let id = add(&gw, "alice", SECRET).await;
    let path = format!("/integrations/{id}/predictions");
    let check = async |headers: &[(&str, &str)], status: u16, message: &str| {
        let (got, body) = egress(&gw, "GET", &path, headers, "").await;
        assert_eq!(got, status, "{headers:?}: {body}");
        assert!(body.contains(message), "{headers:?}: {body}");
        assert!(!body.contains(SECRET));
    };
    let bobs = mint(&gw, "bob").await;
    check(&[("x-api-key", &bobs)], 404, "Integration not found").await;
    let alices = mint(&gw, "alice").await;
    let (status, _) = egress(
        &gw,
        "GET",
        "/integrations/int_none/x",
        &[("x-api-key", &alices)],
        "",
    )
    .await;
    assert_eq!(status, 404);
    check(&[], 401, "Invalid run token").await;
    let mut tampered = alices.clone().into_bytes();
    let at = tampered.len() - 3;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    check(
        &[("x-api-key", std::str::from_utf8(&tampered).unwrap())],
        401,
        "Invalid run token",
    )
    .await;
    // Expired: signed with the same vault key, in the past.
    let tokens = RunTokens::new(&VaultConfig {
        master_keys: vec![MasterKey {
            id: "k1".into(),
            key: SecretKey(zeroize::Zeroizing::new([0x11; 32])),
        }],
        run_token_key: None,
    });
    let expired = tokens.sign(&RunClaims {
        user_id: "alice".into(),
        key_id: String::new(),
        expires_at: 1,
    });
    check(&[("x-api-key", &expired)], 401, "Invalid run token").await;
    // A keygate key is not a provider credential.
    check(&[("authorization", &bearer(&key))], 401, "keygate API keys").await;
    check(
        &[("x-api-key", &key), ("x-keygate-run", &alices)],
        401,
        "keygate API keys",
    )
    .await;
    // A fresh token of the right user still works, so the refusals above
    // were about the token.
    check(&[("x-api-key", &alices)], 200, "ok").await;
    // Only calls that passed reached the provider, and none carried a key.
    assert_eq!(provider.requests().len(), 1);
    // The mint token mints and does nothing else.
    let minter = "mint-token-0123456789abcdef";
    gw.shutdown().await;
    let gw = Gw::start(config(
        dir.path(),
        &embedded_store(&dir),
        &upstream.url(),
        &vault_yaml(
            &[("k1", K1)],
            &provider,
            &format!("  mint_token: \"{minter}\"\n"),
        ),
    ))
    .await;
    let with_mint = |method: &'static str, path: &'static str, body: Option<serde_json::Value>| {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .header("authorization", format!("Bearer {minter}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        send_h1(gw.admin, req)
    };
    let (status, _, body) = with_mint(
        "POST",
        "/admin/v1/run-tokens",
        Some(serde_json::json!({"userId": "alice", "ttl": "5m"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body:?}");
    let (status, _, _) = with_mint("GET", "/admin/v1/keys?userId=alice", None)
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, _, _) = with_mint(
        "POST",
        "/admin/v1/integrations",
        Some(serde_json::json!({"userId": "alice", "type": "skytells", "secret": "sk-x"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    // Minting is audited: who for, and by which token; never the token.
    let (_, audit) = gw.admin_call("GET", "/admin/v1/audit", None).await;
    let minted = audit.as_array().unwrap().iter().any(|e| {
        e["action"] == "run_token.minted"
            && e["userId"] == "alice"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("mint_token") && d.contains("ttl 300s"))
    });
    assert!(
        minted,
        "no run_token.minted for alice by the mint token: {audit}"
    );
    assert!(
        !audit.to_string().contains("kgr_"),
        "a run token in the audit log"
    );
}

#[tokio::test]
async fn a_streamed_answer_reaches_the_caller_as_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let provider = HttpsServer::start().await;
    let upstream = Upstream::start().await;
    let (gw, _) = gateway(
        &dir,
        &embedded_store(&dir),
        &upstream.url(),
        &vault_yaml(&[("k1", K1)], &provider, ""),
    )
    .await;
    let id = add(&gw, "alice", SECRET).await;
    let token = mint(&gw, "alice").await;
    let stream = tokio::net::TcpStream::connect(gw.running().egress_addr.unwrap())
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("/integrations/{id}/stream"))
        .header("host", "egress")
        .header("x-api-key", &token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event arrives before the provider sends the second")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap().as_ref(), b"data: one\n\n");
    provider.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest.as_ref(), b"data: two\n\n");
}

#[tokio::test]
async fn integrations_on_every_store_keep_no_plaintext() {
    let provider = HttpsServer::start().await;
    let upstream = Upstream::start().await;
    let vault = vault_yaml(&[("k1", K1)], &provider, "");
    let redis = RedisServer::start();
    let db = PostgresServer::start();
    db.psql("INSERT INTO users (id) VALUES ('alice'), ('bob')");
    db.psql("INSERT INTO workflows (id, name, user_id, nodes, edges) VALUES ('wf', 'w', 'alice', '[]', '[]')");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let stores = [
        embedded_store(&dirs[0]),
        StoreKind::Redis(redis.url()),
        StoreKind::Postgres(db.url(), String::new()),
    ];
    for (store, dir) in stores.iter().zip(&dirs) {
        if let StoreKind::Postgres(..) = store {
            let c = config(dir.path(), store, &upstream.url(), &vault);
            keygate::cli::store_prepare(&c).await.unwrap();
        }
        let mut gw = Gw::start(config(dir.path(), store, &upstream.url(), &vault)).await;
        let a = add(&gw, "alice", SECRET).await;
        let b = add(&gw, "alice", "sk-second-secret").await;
        let (status, list) = gw
            .admin_call("GET", "/admin/v1/integrations?userId=alice", None)
            .await;
        assert_eq!(status, 200);
        let listed: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect();
        assert_eq!(listed.len(), 2, "{list}");
        assert!(listed.contains(&a.as_str()) && listed.contains(&b.as_str()));
        assert_eq!(list[0]["type"], "skytells");
        assert_eq!(list[0]["keyId"], "k1");
        assert!(!list.to_string().contains("sk-"), "{list}");
        let (status, _) = gw
            .admin_call("DELETE", &format!("/admin/v1/integrations/{b}"), None)
            .await;
        assert_eq!(status, 200);
        let (status, _) = gw
            .admin_call("DELETE", &format!("/admin/v1/integrations/{b}"), None)
            .await;
        assert_eq!(status, 404);
        gw.shutdown().await;
        let bytes: Vec<u8> = match store {
            StoreKind::Embedded(path) => std::fs::read(path).unwrap(),
            StoreKind::Redis(_) => redis.dump().into_bytes(),
            StoreKind::Postgres(..) => {
                db.psql("CHECKPOINT");
                db.data_bytes()
            }
            StoreKind::RedisCluster(_) | StoreKind::Yaml(_) => unreachable!(),
        };
        assert!(!bytes.is_empty());
        for secret in [SECRET.as_bytes(), b"sk-second-secret"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "plaintext in the {store:?} store"
            );
        }
    }
}

#[tokio::test]
async fn rekeying_lets_the_old_master_key_go() {
    let dir = tempfile::tempdir().unwrap();
    let provider = HttpsServer::start().await;
    let upstream = Upstream::start().await;
    let store = embedded_store(&dir);
    let start = async |keys: &[(&str, &str)]| {
        Gw::start(config(
            dir.path(),
            &store,
            &upstream.url(),
            &vault_yaml(keys, &provider, ""),
        ))
        .await
    };
    let mut gw = start(&[("k1", K1)]).await;
    gw.create_key("alice").await;
    let id = add(&gw, "alice", SECRET).await;
    gw.shutdown().await;
    let mut gw = start(&[("k2", K2), ("k1", K1)]).await;
    let (status, done) = gw
        .admin_call("POST", "/admin/v1/integrations/rekey", None)
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        (done["rekeyed"].as_u64(), done["keyId"].as_str()),
        (Some(1), Some("k2"))
    );
    let (_, again) = gw
        .admin_call("POST", "/admin/v1/integrations/rekey", None)
        .await;
    assert_eq!(
        (again["rekeyed"].as_u64(), again["alreadyCurrent"].as_u64()),
        (Some(0), Some(1))
    );
    gw.shutdown().await;
    let gw = start(&[("k2", K2)]).await;
    let token = mint(&gw, "alice").await;
    let (status, body) = egress(
        &gw,
        "GET",
        &format!("/integrations/{id}/models"),
        &[("x-api-key", &token)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(provider.requests()[0].headers["x-api-key"], SECRET);
}

#[tokio::test]
async fn a_wrong_or_missing_master_key_and_a_moved_ciphertext_are_named_not_leaked() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let provider = HttpsServer::start().await;
    let upstream = Upstream::start().await;
    let store = StoreKind::Redis(redis.url());
    let start = async |keys: &[(&str, &str)]| {
        Gw::start(config(
            dir.path(),
            &store,
            &upstream.url(),
            &vault_yaml(keys, &provider, ""),
        ))
        .await
    };
    let mut gw = start(&[("k1", K1)]).await;
    let a = add(&gw, "alice", SECRET).await;
    let b = add(&gw, "alice", "sk-other").await;
    // b's record with a's ciphertext (and nonce): copied, it must not open.
    let json_of = |id: &str| {
        redis
            .cli(&["HGET", &format!("keygate:integration:{id}"), "record"])
            .unwrap()
    };
    let (ja, jb): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&json_of(&a)).unwrap(),
        serde_json::from_str(&json_of(&b)).unwrap(),
    );
    let mut moved = jb.clone();
    moved["ciphertext"] = ja["ciphertext"].clone();
    moved["nonce"] = ja["nonce"].clone();
    redis.cli(&[
        "HSET",
        &format!("keygate:integration:{b}"),
        "record",
        &moved.to_string(),
    ]);
    let token = mint(&gw, "alice").await;
    let (status, body) = egress(
        &gw,
        "GET",
        &format!("/integrations/{b}/x"),
        &[("x-api-key", &token)],
        "",
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("does not decrypt") && body.contains(&b),
        "{body}"
    );
    assert!(!body.contains("sk-"), "{body}");
    gw.shutdown().await;
    // The same id with another key: named.
    let mut gw = start(&[("k1", K2)]).await;
    let token = mint(&gw, "alice").await;
    let (status, body) = egress(
        &gw,
        "GET",
        &format!("/integrations/{a}/x"),
        &[("x-api-key", &token)],
        "",
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert!(error_of(&body).contains("\"k1\""), "{body}");
    gw.shutdown().await;
    // A key no longer listed: named.
    let gw = start(&[("k9", K2)]).await;
    let token = mint(&gw, "alice").await;
    let (status, body) = egress(
        &gw,
        "GET",
        &format!("/integrations/{a}/x"),
        &[("x-api-key", &token)],
        "",
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        error_of(&body).contains("\"k1\"") && body.contains("does not list"),
        "{body}"
    );
    let (_, done) = gw
        .admin_call("POST", "/admin/v1/integrations/rekey", None)
        .await;
    let failed = done["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{done}");
    assert!(failed.iter().any(|f| f["id"] == a.as_str()));
    assert!(provider.requests().is_empty());
}

#[tokio::test]
async fn adding_refuses_keygate_keys_unknown_types_and_never_echoes_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let provider = HttpsServer::start().await;
    let upstream = Upstream::start().await;
    let (gw, key) = gateway(
        &dir,
        &embedded_store(&dir),
        &upstream.url(),
        &vault_yaml(&[("k1", K1)], &provider, ""),
    )
    .await;
    let post = async |body: serde_json::Value| {
        gw.admin_call("POST", "/admin/v1/integrations", Some(body))
            .await
    };
    let (status, body) =
        post(serde_json::json!({"userId": "alice", "type": "skytells", "secret": key})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("keygate API keys"),
        "{body}"
    );
    assert!(!body.to_string().contains(&key));
    let (status, body) =
        post(serde_json::json!({"userId": "alice", "type": "nonesuch", "secret": "sk-x"})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("skytells"),
        "{body}"
    );
    let (status, body) =
        post(serde_json::json!({"userId": "alice", "type": "skytells", "fields": "sk-leak-me"}))
            .await;
    assert_eq!(status, 400);
    assert!(!body.to_string().contains("sk-leak-me"), "{body}");
    let (status, body) = post(serde_json::json!({"userId": "alice", "type": "firecrawl", "secret": "fc-1", "field": "apiKey"})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("firecrawlApiKey"),
        "{body}"
    );
    // A Skytells key on the webhook is refused, saying why.
    let (status, _, body) = gw.webhook("wf", Some("Bearer sk-live-abc")).await;
    assert_eq!(status, 401);
    assert!(
        String::from_utf8_lossy(&body)
            .to_lowercase()
            .contains("skytells"),
        "{body:?}"
    );
}

#[tokio::test]
async fn an_https_upstream_is_verified_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = HttpsServer::start().await;
    let extra = format!("upstream_ca_file: \"{}\"\n", upstream.ca_file.display());
    let gw = Gw::start(config(
        dir.path(),
        &embedded_store(&dir),
        &upstream.url(),
        &extra,
    ))
    .await;
    let (_, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    for _ in 0..3 {
        let (status, _, body) = gw.webhook("wf", Some(&bearer(&key))).await;
        assert_eq!(status, 200, "{body:?}");
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].headers["x-user-id"], "alice");
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(
        seen[0].headers["host"],
        format!("127.0.0.1:{}", upstream.addr.port()).as_str()
    );
    // Without the CA the certificate is not trusted: 502, nothing sent.
    let dir2 = tempfile::tempdir().unwrap();
    let untrusted = Gw::start(config(
        dir2.path(),
        &embedded_store(&dir2),
        &upstream.url(),
        "",
    ))
    .await;
    let (_, key) = untrusted.create_key("alice").await;
    untrusted.set_owner("wf", "alice").await;
    assert_eq!(untrusted.webhook("wf", Some(&bearer(&key))).await.0, 502);
    assert_eq!(upstream.requests().len(), 3);
}

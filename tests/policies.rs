//! Key policies end to end, on the embedded store and on Redis with two
//! instances: expiry (an instance that cached the key refuses it after),
//! workflow scopes, a key's own rate, roll with a grace (refused on the
//! second instance when it ends), listing stale keys, and the audit log
//! (the sweep of expired keys included).

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn create(gw: &Gw, body: Value) -> (u16, Value) {
    gw.admin_call("POST", "/admin/v1/keys", Some(body)).await
}

async fn make(gw: &Gw, body: Value) -> (String, String) {
    let (status, v) = create(gw, body).await;
    assert_eq!(status, 201, "{v}");
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

async fn status(gw: &Gw, workflow: &str, key: &str) -> u16 {
    gw.webhook(workflow, Some(&bearer(key))).await.0
}

/// One gateway on the embedded store, or two on one Redis.
struct Setup {
    a: Gw,
    b: Option<Gw>,
    _upstream: Upstream,
    _dirs: Vec<tempfile::TempDir>,
    _redis: Option<RedisServer>,
}

async fn setup(redis: bool, extra: &str) -> Setup {
    let upstream = Upstream::start().await;
    let keys = match extra.contains("keys:") {
        true => "",
        false => "keys:\n  sweep_interval: 1s\n",
    };
    let extra = format!("rate_limit:\n  max_failures: 0\n{keys}{extra}");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b, server) = if redis {
        let server = RedisServer::start();
        let store = StoreKind::Redis(server.url());
        let a = Gw::start(config(da.path(), &store, &upstream.url(), &extra)).await;
        let b = Gw::start(config(db.path(), &store, &upstream.url(), &extra)).await;
        for gw in [&a, &b] {
            assert!(
                eventually(Duration::from_secs(5), || async {
                    gw.admin_call("GET", "/readyz", None).await.0 == 200
                })
                .await
            );
        }
        (a, Some(b), Some(server))
    } else {
        let store = StoreKind::Embedded(da.path().join("kg.redb"));
        let a = Gw::start(config(da.path(), &store, &upstream.url(), &extra)).await;
        (a, None, None)
    };
    a.set_owner("wf", "alice").await;
    a.set_owner("wf2", "alice").await;
    Setup {
        a,
        b,
        _upstream: upstream,
        _dirs: vec![da, db],
        _redis: server,
    }
}

async fn expiry(redis: bool) {
    let s = setup(redis, "").await;
    let (_, key) = make(&s.a, json!({"userId": "alice", "expiresIn": "2s"})).await;
    let listed = s.a.list_keys("alice").await;
    assert!(
        listed[0]["expiresAt"].as_str().unwrap().ends_with('Z'),
        "{listed}"
    );
    // Cached on every instance before it expires.
    let gws: Vec<&Gw> = std::iter::once(&s.a).chain(s.b.as_ref()).collect();
    for gw in &gws {
        assert_eq!(status(gw, "wf", &key).await, 200);
        assert_eq!(status(gw, "wf", &key).await, 200);
    }
    let created = Instant::now();
    for gw in &gws {
        assert!(
            eventually(Duration::from_secs(4), || async {
                status(gw, "wf", &key).await == 401
            })
            .await,
            "still accepted after its expiry"
        );
    }
    assert!(created.elapsed() < Duration::from_secs(4));
    // Refused like an unknown key: no hint that it existed.
    let (code, _, body) = s.a.webhook("wf", Some(&bearer(&key))).await;
    assert_eq!(code, 401);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"error": "Invalid API key"})
    );
    for gw in &gws {
        assert!(
            gw.metric("keygate_expired_key_refusals_total")
                .await
                .parse::<u64>()
                .unwrap()
                >= 1
        );
    }
    // Swept: gone from the store and audited once, by keygate.
    assert!(
        eventually(Duration::from_secs(5), || async {
            s.a.list_keys("alice").await.as_array().unwrap().is_empty()
        })
        .await,
        "the expired key was not swept"
    );
    // Audited once (on two instances, by the one whose revoke took it).
    let expired = || async {
        let (_, audit) = s.a.admin_call("GET", "/admin/v1/audit", None).await;
        audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "key.expired")
            .cloned()
            .collect::<Vec<Value>>()
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            !expired().await.is_empty()
        })
        .await,
        "no key.expired in the audit log"
    );
    // Every instance sweeps every second: wait for another round.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = expired().await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["caller"], "keygate");
    // Bad durations are a clear error.
    for bad in ["soon", "0s", "500ms", "-1d", ""] {
        let (code, v) = create(&s.a, json!({"userId": "alice", "expiresIn": bad})).await;
        assert_eq!(code, 400, "{bad}");
        assert!(v["error"].as_str().unwrap().contains("expiresIn"), "{v}");
    }
}

#[tokio::test]
async fn an_expired_key_is_refused_even_where_cached_embedded() {
    expiry(false).await;
}

#[tokio::test]
async fn an_expired_key_is_refused_even_where_cached_redis() {
    expiry(true).await;
}

async fn scopes_and_rate(redis: bool) {
    let s = setup(redis, "").await;
    let (_, scoped) = make(&s.a, json!({"userId": "alice", "workflows": ["wf"]})).await;
    let (_, open) = make(&s.a, json!({"userId": "alice"})).await;
    assert_eq!(status(&s.a, "wf", &scoped).await, 200);
    let (code, _, body) = s.a.webhook("wf2", Some(&bearer(&scoped))).await;
    assert_eq!(code, 403);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"error": "You do not have permission to run this workflow"})
    );
    assert_eq!(status(&s.a, "wf2", &open).await, 200);
    assert_eq!(s.a.metric("keygate_scope_refusals_total").await, "1");
    let listed = s.a.list_keys("alice").await;
    let views = listed.as_array().unwrap();
    assert!(
        views.iter().any(|k| k["workflows"] == json!(["wf"])),
        "{listed}"
    );
    assert!(views.iter().any(|k| k["workflows"].is_null()), "{listed}");
    // A key's own rate: 3 per minute here, whatever rate_limit says.
    let (_, limited) = make(&s.a, json!({"userId": "alice", "rate": "3/1m"})).await;
    for _ in 0..3 {
        assert_eq!(status(&s.a, "wf", &limited).await, 200);
    }
    let (code, headers, _) = s.a.webhook("wf", Some(&bearer(&limited))).await;
    assert_eq!(code, 429);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Others are not limited by it.
    for _ in 0..5 {
        assert_eq!(status(&s.a, "wf", &open).await, 200);
    }
    let listed = s.a.list_keys("alice").await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["rate"] == "3/1m"),
        "{listed}"
    );
    for (bad, field) in [
        (json!({"userId": "alice", "rate": "fast"}), "rate"),
        (json!({"userId": "alice", "rate": "0/1m"}), "rate"),
        (json!({"userId": "alice", "workflows": []}), "workflows"),
        (
            json!({"userId": "alice", "workflows": [".."]}),
            "workflow id",
        ),
    ] {
        let (code, v) = create(&s.a, bad.clone()).await;
        assert_eq!(code, 400, "{bad}");
        assert!(v["error"].as_str().unwrap().contains(field), "{v}");
    }
}

#[tokio::test]
async fn scoped_keys_and_a_keys_own_rate_embedded() {
    scopes_and_rate(false).await;
}

#[tokio::test]
async fn scoped_keys_and_a_keys_own_rate_redis() {
    scopes_and_rate(true).await;
}

async fn roll(redis: bool) {
    let s = setup(redis, "keys:\n  max_grace: 1h\n  sweep_interval: 1s\n").await;
    let (old_id, old) = make(
        &s.a,
        json!({"userId": "alice", "name": "ci", "workflows": ["wf"], "rate": "100/1s"}),
    )
    .await;
    let last = s.b.as_ref().unwrap_or(&s.a);
    assert_eq!(status(last, "wf", &old).await, 200);
    // A grace over keys.max_grace is refused.
    let (code, v) =
        s.a.admin_call(
            "POST",
            &format!("/admin/v1/keys/{old_id}/roll"),
            Some(json!({"grace": "2h"})),
        )
        .await;
    assert_eq!(code, 400);
    assert!(
        v["error"].as_str().unwrap().contains("keys.max_grace"),
        "{v}"
    );
    let (code, rolled) =
        s.a.admin_call(
            "POST",
            &format!("/admin/v1/keys/{old_id}/roll"),
            Some(json!({"grace": "2s"})),
        )
        .await;
    assert_eq!(code, 201, "{rolled}");
    let new = rolled["key"].as_str().unwrap().to_owned();
    assert_eq!(new.len(), 42);
    assert_eq!(rolled["name"], "ci");
    assert_eq!(rolled["workflows"], json!(["wf"]));
    assert_eq!(rolled["rate"], "100/1s");
    assert!(rolled["rolled"]["expiresAt"].is_string(), "{rolled}");
    // Both work during the grace, on the other instance too; then the old
    // one is refused there.
    assert_eq!(status(last, "wf", &new).await, 200);
    assert_eq!(status(last, "wf", &old).await, 200);
    assert_eq!(status(last, "wf2", &new).await, 403);
    assert!(
        eventually(Duration::from_secs(4), || async {
            status(last, "wf", &old).await == 401
        })
        .await,
        "the old key outlived its grace"
    );
    assert_eq!(status(last, "wf", &new).await, 200);
    // Grace 0 (the default): refused at once, everywhere.
    let new_id = rolled["id"].as_str().unwrap().to_owned();
    let (code, again) =
        s.a.admin_call("POST", &format!("/admin/v1/keys/{new_id}/roll"), None)
            .await;
    assert_eq!(code, 201, "{again}");
    assert!(again["rolled"]["expiresAt"].is_null());
    assert!(
        eventually(Duration::from_millis(500), || async {
            status(last, "wf", &new).await == 401
        })
        .await
    );
    assert_eq!(
        status(last, "wf", again["key"].as_str().unwrap()).await,
        200
    );
    let (code, _) =
        s.a.admin_call("POST", "/admin/v1/keys/key_none/roll", None)
            .await;
    assert_eq!(code, 404);
    let (_, audit) =
        s.a.admin_call("GET", "/admin/v1/audit?since=1h", None)
            .await;
    let rolls = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "key.rolled")
        .count();
    assert_eq!(rolls, 2, "{audit}");
}

#[tokio::test]
async fn a_rolled_key_works_for_its_grace_then_is_refused_embedded() {
    roll(false).await;
}

#[tokio::test]
async fn a_rolled_key_works_for_its_grace_then_is_refused_on_the_other_instance() {
    roll(true).await;
}

async fn review_and_audit(redis: bool) {
    let s = setup(redis, "").await;
    let (used_id, used) = make(&s.a, json!({"userId": "alice", "name": "used"})).await;
    let (idle_id, _) = make(&s.a, json!({"userId": "bob", "name": "idle"})).await;
    assert_eq!(status(&s.a, "wf", &used).await, 200);
    let (code, all) = s.a.admin_call("GET", "/admin/v1/keys?all=true", None).await;
    assert_eq!(code, 200);
    let ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&used_id.as_str()) && ids.contains(&idle_id.as_str()),
        "{all}"
    );
    let users: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["userId"].as_str().unwrap())
        .collect();
    assert!(users.contains(&"bob"), "{all}");
    // Stale: unused for 1s. The used key's lastUsedAt is written within a
    // flush; the idle key counts from its creation.
    assert!(
        eventually(Duration::from_secs(5), || async {
            s.a.list_keys("alice").await[0]["lastUsedAt"].is_string()
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status(&s.a, "wf", &used).await, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, stale) =
                s.a.admin_call("GET", "/admin/v1/keys?all=true&unusedFor=1s", None)
                    .await;
            let ids: Vec<String> = stale
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["id"].as_str().unwrap().to_owned())
                .collect();
            ids == [idle_id.clone()]
        })
        .await
    );
    let (code, v) =
        s.a.admin_call("GET", "/admin/v1/keys?all=true&unusedFor=x", None)
            .await;
    assert_eq!(code, 400, "{v}");
    // The audit log: each action with the caller's address and no secret.
    assert_eq!(s.a.revoke(&idle_id).await, 200);
    let (code, audit) = s.a.admin_call("GET", "/admin/v1/audit", None).await;
    assert_eq!(code, 200);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "owner.set",
            "owner.set",
            "key.created",
            "key.created",
            "key.revoked"
        ],
        "{audit}"
    );
    let revoked = &audit[4];
    assert_eq!(revoked["keyId"], idle_id.as_str());
    assert_eq!(revoked["keyPrefix"].as_str().unwrap().len(), 11);
    assert!(
        revoked["caller"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{revoked}"
    );
    assert!(revoked["at"].as_str().unwrap().ends_with('Z'));
    assert!(!audit.to_string().contains(&used), "a key in the audit log");
    let (_, recent) =
        s.a.admin_call("GET", "/admin/v1/audit?since=1h", None)
            .await;
    assert_eq!(recent.as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn stale_keys_are_listed_and_every_action_audited_embedded() {
    review_and_audit(false).await;
}

#[tokio::test]
async fn stale_keys_are_listed_and_every_action_audited_redis() {
    review_and_audit(true).await;
}

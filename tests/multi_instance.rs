//! Several gateway instances on one `redis-server` (started, killed and
//! restarted by the tests): revocation reaches every instance, and Redis
//! faults never turn into accepting what should be refused.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Two instances, each with its own cache, sharing `redis`.
async fn pair(
    redis: &RedisServer,
    extra: &str,
) -> (Gw, Gw, Upstream, tempfile::TempDir, tempfile::TempDir) {
    let upstream = Upstream::start().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = StoreKind::Redis(redis.url());
    let a = Gw::start(config(da.path(), &store, &upstream.url(), extra)).await;
    let b = Gw::start(config(db.path(), &store, &upstream.url(), extra)).await;
    for gw in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(5), || async {
                gw.admin_call("GET", "/readyz", None).await.0 == 200
            })
            .await,
            "instance never became ready"
        );
    }
    (a, b, upstream, da, db)
}

#[tokio::test]
async fn revocation_through_one_instance_reaches_the_other_at_once() {
    let redis = RedisServer::start();
    // Each revoke ends in a 401: keep the failure limiter out of the way.
    let (a, b, _upstream, _da, _db) = pair(&redis, "rate_limit:\n  max_failures: 0\n").await;
    a.set_owner("wf", "alice").await;
    let mut client = KeepAlive::connect(b.listen).await;
    let mut delays = Vec::with_capacity(100);
    for _ in 0..100 {
        let (id, key) = a.create_key("alice").await;
        // B now holds the key (and the owner) in its cache.
        assert_eq!(client.post("wf", &key).await, 200);
        assert_eq!(client.post("wf", &key).await, 200);
        assert_eq!(a.revoke(&id).await, 200);
        let revoked = Instant::now();
        loop {
            let status = client.post("wf", &key).await;
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                revoked.elapsed() < Duration::from_millis(200),
                "instance B still accepted a key 200 ms after it was revoked"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        delays.push(revoked.elapsed());
    }
    delays.sort();
    let (p50, p99) = (percentile(&delays, 0.50), percentile(&delays, 0.99));
    println!(
        "revocation delay to the other instance over 100 revokes: p50 {p50:?}, p99 {p99:?}, max {:?}",
        delays[99]
    );
    let m = b.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("keygate_invalidations_total ") && !l.ends_with(" 0")),
        "{m}"
    );
}

#[tokio::test]
async fn a_healthy_subscription_is_kept_and_caches_are_not_flushed() {
    let redis = RedisServer::start();
    let (a, _b, _upstream, _da, _db) = pair(&redis, "").await;
    // The subscriber checks its connection every 500 ms: several checks pass
    // here, and none may count as a lost subscription.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        &a.metric("keygate_cache_flushes_total").await,
        "1",
        "the subscription was dropped and re-made"
    );
    assert_eq!(a.admin_call("GET", "/readyz", None).await.0, 200);
}

#[tokio::test]
async fn a_flush_message_empties_every_instance_cache() {
    let redis = RedisServer::start();
    let (a, b, _upstream, _da, _db) = pair(&redis, "").await;
    let (_, key) = a.create_key("alice").await;
    a.set_owner("wf", "alice").await;
    assert_eq!(
        KeepAlive::connect(b.listen).await.post("wf", &key).await,
        200
    );
    // What an instance publishes after a write that may or may not have
    // reached Redis: every instance drops everything.
    redis
        .cli(&["PUBLISH", "keygate:invalidate", "flush"])
        .unwrap();
    for gw in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(2), || async {
                gw.metric("keygate_cache_flushes_total").await == "2"
            })
            .await
        );
    }
    // The key is still valid: it is read again from Redis.
    assert_eq!(
        KeepAlive::connect(b.listen).await.post("wf", &key).await,
        200
    );
}

#[tokio::test]
async fn owner_change_through_one_instance_reaches_the_other() {
    let redis = RedisServer::start();
    let (a, b, _upstream, _da, _db) = pair(&redis, "").await;
    let (_, alice) = a.create_key("alice").await;
    let (_, bob) = a.create_key("bob").await;
    a.set_owner("wf", "alice").await;
    let mut client = KeepAlive::connect(b.listen).await;
    assert_eq!(client.post("wf", &alice).await, 200);
    a.set_owner("wf", "bob").await;
    assert!(
        eventually(Duration::from_millis(200), || async {
            KeepAlive::connect(b.listen).await.post("wf", &alice).await == 403
        })
        .await
    );
    assert_eq!(client.post("wf", &bob).await, 200);
    let (status, _) = a.admin_call("DELETE", "/admin/v1/workflows/wf", None).await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_millis(200), || async {
            KeepAlive::connect(b.listen).await.post("wf", &bob).await == 404
        })
        .await
    );
}

#[tokio::test]
async fn redis_outage_serves_cached_keys_refuses_the_rest_and_recovers() {
    let mut redis = RedisServer::start();
    let (a, b, _upstream, _da, _db) = pair(&redis, "").await;
    let (_, cached) = a.create_key("alice").await;
    let (_, uncached) = a.create_key("alice").await;
    let unknown = format!("wfb_{}", "Z".repeat(38));
    a.set_owner("wf", "alice").await;
    let mut client = KeepAlive::connect(b.listen).await;
    assert_eq!(client.post("wf", &cached).await, 200);
    redis.save();

    // Requests keep flowing while Redis dies.
    let listen = b.listen;
    let key = cached.clone();
    let made = Arc::new(AtomicUsize::new(0));
    let flowing = tokio::spawn({
        let made = made.clone();
        async move {
            let mut client = KeepAlive::connect(listen).await;
            let mut statuses = Vec::new();
            for _ in 0..200 {
                statuses.push(client.post("wf", &key).await);
                made.fetch_add(1, Ordering::SeqCst);
                // Paced, so the calls span the outage.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            statuses
        }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            made.load(Ordering::SeqCst) >= 10
        })
        .await
    );
    redis.kill();
    let statuses = flowing.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "a cached key was refused during the outage: {statuses:?}"
    );

    let (status, headers, body) = b.webhook("wf", Some(&bearer(&uncached))).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(json(&body)["error"], "Service temporarily unavailable");
    for _ in 0..20 {
        let status = client.post("wf", &unknown).await;
        assert!(
            !(200..300).contains(&status),
            "an unknown key passed during the outage"
        );
        assert_eq!(status, 503);
    }
    assert_eq!(b.admin_call("GET", "/readyz", None).await.0, 503);
    assert!(
        b.metrics()
            .await
            .lines()
            .any(|l| l.starts_with("keygate_store_errors_total ") && !l.ends_with(" 0"))
    );

    redis.restart();
    let back = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || async {
            KeepAlive::connect(listen).await.post("wf", &uncached).await == 200
        })
        .await,
        "service did not return within 2 s of Redis"
    );
    println!("full service {:?} after Redis returned", back.elapsed());
    assert!(
        eventually(Duration::from_secs(2), || async {
            b.admin_call("GET", "/readyz", None).await.0 == 200
        })
        .await
    );
    assert_eq!(
        KeepAlive::connect(listen).await.post("wf", &unknown).await,
        401
    );
}

#[tokio::test]
async fn a_hung_redis_costs_an_uncached_request_one_timeout_not_two() {
    let redis = RedisServer::start();
    // The store's timeout is 500 ms (common::StoreKind::Redis).
    let timeout = Duration::from_millis(500);
    let (a, b, _upstream, _da, _db) = pair(&redis, "").await;
    let keys: Vec<String> = futures_keys(&a, 3).await;
    a.set_owner("wf", "alice").await;
    redis.pause();
    // Each request finds neither its key nor the owner cached, and the
    // first failed call leaves the connection to be re-established: every
    // store read must still share one deadline per request.
    for key in &keys {
        let asked = Instant::now();
        let (status, _, _) = b.webhook("wf", Some(&bearer(key))).await;
        let took = asked.elapsed();
        assert_eq!(status, 503);
        assert!(
            took < timeout * 2 - Duration::from_millis(100),
            "a request took {took:?} for a 503 with a {timeout:?} store timeout"
        );
    }
    redis.resume();
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.webhook("wf", Some(&bearer(&keys[0]))).await.0 == 200
        })
        .await
    );
}

async fn futures_keys(gw: &Gw, n: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for _ in 0..n {
        keys.push(gw.create_key("alice").await.1);
    }
    keys
}

#[tokio::test]
async fn caches_are_flushed_when_redis_returns_empty() {
    let mut redis = RedisServer::start();
    let (a, b, _upstream, _da, _db) = pair(&redis, "").await;
    let (_, key) = a.create_key("alice").await;
    a.set_owner("wf", "alice").await;
    assert_eq!(
        KeepAlive::connect(b.listen).await.post("wf", &key).await,
        200
    );
    redis.kill();
    assert_eq!(
        KeepAlive::connect(b.listen).await.post("wf", &key).await,
        200,
        "cached key refused during outage"
    );
    redis.restart_empty();
    // The 60 s cache TTL has not passed: only the resubscribe flush can
    // make B forget the key.
    assert!(
        eventually(Duration::from_secs(5), || async {
            KeepAlive::connect(b.listen).await.post("wf", &key).await == 401
        })
        .await,
        "a key cached before the gap was still accepted after Redis came back empty"
    );
    assert!(
        b.metrics()
            .await
            .lines()
            .any(|l| l.starts_with("keygate_cache_flushes_total ")
                && !l.ends_with(" 1")
                && !l.ends_with(" 0"))
    );
}

#[tokio::test]
async fn last_used_written_after_redis_returns_and_none_lost_on_graceful_stop() {
    let mut redis = RedisServer::start();
    let (a, mut b, _upstream, _da, _db) = pair(&redis, "usage:\n  flush_interval: 100ms\n").await;
    let (_, k1) = a.create_key("alice").await;
    a.set_owner("wf", "alice").await;
    let mut client = KeepAlive::connect(b.listen).await;
    assert_eq!(client.post("wf", &k1).await, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !a.list_keys("alice").await[0]["lastUsedAt"].is_null()
        })
        .await
    );
    let before = a.list_keys("alice").await[0]["lastUsedAt"]
        .as_str()
        .unwrap()
        .to_owned();
    redis.save();
    redis.kill();
    assert_eq!(client.post("wf", &k1).await, 200);
    // Several flushes fail while Redis is down; the update stays pending.
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.metrics().await.lines().any(|l| {
                l.starts_with("keygate_last_used_flush_failures_total ") && !l.ends_with(" 0")
            })
        })
        .await
    );
    redis.restart();
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.list_keys("alice").await[0]["lastUsedAt"]
                .as_str()
                .is_some_and(|t| t > before.as_str())
        })
        .await,
        "lastUsedAt noted during the outage was lost"
    );

    // Graceful stop: a long interval, so only the final flush can write it.
    let (c, _dc) = {
        let dc = tempfile::tempdir().unwrap();
        let store = StoreKind::Redis(redis.url());
        let c = Gw::start(config(
            dc.path(),
            &store,
            &format!("http://{}", _upstream.addr),
            "usage:\n  flush_interval: 1h\n",
        ))
        .await;
        (c, dc)
    };
    let (_, k2) = a.create_key("carol").await;
    a.set_owner("wf_c", "carol").await;
    assert_eq!(
        KeepAlive::connect(c.listen).await.post("wf_c", &k2).await,
        200
    );
    let mut c = c;
    assert!(a.list_keys("carol").await[0]["lastUsedAt"].is_null());
    assert_eq!(c.shutdown().await, 0);
    assert!(
        !a.list_keys("carol").await[0]["lastUsedAt"].is_null(),
        "pending lastUsedAt lost at graceful stop"
    );
    b.shutdown().await;
}

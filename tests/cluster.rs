//! keygate on a Redis Cluster of the test's own (and on Redis over TLS):
//! revocation across instances, a subscription lost and found again, a
//! lost master failing closed for its own slots only, a failover followed
//! without a restart.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Two gateways on one cluster, with alice owning `wf`.
async fn pair(
    cluster: &RedisCluster,
    extra: &str,
) -> (Gw, Gw, Upstream, tempfile::TempDir, tempfile::TempDir) {
    let upstream = Upstream::start().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = StoreKind::RedisCluster(cluster.seeds());
    let extra = format!("rate_limit:\n  max_failures: 0\n{extra}");
    let a = Gw::start(config(da.path(), &store, &upstream.url(), &extra)).await;
    let b = Gw::start(config(db.path(), &store, &upstream.url(), &extra)).await;
    for gw in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(10), || async {
                gw.admin_call("GET", "/readyz", None).await.0 == 200
            })
            .await,
            "not ready on the cluster"
        );
        // Both of its subscriptions up: losing one node is then no gap.
        assert!(
            eventually(Duration::from_secs(10), || async {
                gw.metric("keygate_invalidation_subscriptions").await == "2"
            })
            .await,
            "not subscribed twice"
        );
    }
    a.set_owner("wf", "alice").await;
    (a, b, upstream, da, db)
}

/// The ports of the cluster nodes holding a subscribed (pub/sub) client,
/// once for each.
fn subscribed_nodes(cluster: &RedisCluster) -> Vec<u16> {
    let mut ports = Vec::new();
    for node in cluster.nodes.iter().filter(|n| n.is_running()) {
        let list = node
            .cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
            .unwrap_or_default();
        for _ in list.lines().filter(|l| l.contains("sub=1")) {
            ports.push(node.port);
        }
    }
    ports
}

/// Waits (with a deadline) for `count` subscriptions over the cluster.
async fn subscribed(cluster: &RedisCluster, count: usize) -> bool {
    eventually(Duration::from_secs(5), || async {
        subscribed_nodes(cluster).len() == count
    })
    .await
}

#[tokio::test]
async fn revocation_on_a_cluster_reaches_the_other_instance_at_once() {
    let cluster = RedisCluster::start(3, 0);
    let (a, b, _upstream, _da, _db) = pair(&cluster, "").await;
    let mut client = KeepAlive::connect(b.listen).await;
    let mut delays = Vec::new();
    for _ in 0..100 {
        let (id, key) = a.create_key("alice").await;
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
                revoked.elapsed() < Duration::from_secs(1),
                "still accepted after 1 s"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        delays.push(revoked.elapsed());
    }
    delays.sort();
    let (p50, p99) = (percentile(&delays, 0.50), percentile(&delays, 0.99));
    println!(
        "revocation on a 3-master cluster, to the other instance, over 100 revokes: p50 {p50:?}, p99 {p99:?}, max {:?}",
        delays[99]
    );
    assert!(p99 <= Duration::from_millis(50), "p99 {p99:?}");
}

#[tokio::test]
async fn a_lost_subscription_is_found_again_and_the_caches_flushed() {
    let mut cluster = RedisCluster::start(3, 0);
    let (a, b, _upstream, _da, _db) = pair(&cluster, "").await;
    let flushes = || async {
        b.metric("keygate_cache_flushes_total")
            .await
            .parse::<u64>()
            .unwrap()
    };
    // Each instance holds two subscriptions, on two nodes.
    assert!(
        subscribed(&cluster, 4).await,
        "{:?}",
        subscribed_nodes(&cluster)
    );
    // Every subscription killed at once: a gap, so a flush.
    let before = flushes().await;
    for node in &cluster.nodes {
        node.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            flushes().await > before
        })
        .await,
        "no flush after CLIENT KILL TYPE pubsub"
    );
    assert!(subscribed(&cluster, 4).await, "not resubscribed");
    // Both of b's listeners back (each flushes, if at all, before it
    // subscribes again).
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.metric("keygate_invalidation_subscriptions").await == "2"
        })
        .await
    );
    assert_eq!(b.admin_call("GET", "/readyz", None).await.0, 200);
    // The pub/sub clients of one node killed: the other subscription heard
    // everything, so no flush, and the lost one comes back.
    let before = flushes().await;
    let one = subscribed_nodes(&cluster)[0];
    cluster.node(one).cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(subscribed(&cluster, 4).await, "not resubscribed");
    assert_eq!(
        flushes().await,
        before,
        "flushed though another subscription held"
    );
    // Revocation still crosses over.
    let (id, key) = a.create_key("alice").await;
    let mut client = KeepAlive::connect(b.listen).await;
    assert_eq!(client.post("wf", &key).await, 200);
    assert_eq!(a.revoke(&id).await, 200);
    assert!(
        eventually(Duration::from_secs(2), || async {
            KeepAlive::connect(b.listen).await.post("wf", &key).await == 401
        })
        .await
    );
    // One node holding subscriptions goes away altogether: the other
    // subscription heard everything, so no flush; the lost one moves to a
    // node still up.
    let owner_master = cluster.master_of("keygate:owner:wf");
    let holder = subscribed_nodes(&cluster)
        .into_iter()
        .find(|p| *p != owner_master)
        .expect("a subscription off the owner's master");
    // A key in a slot that stays up, cached on b.
    let (id, key) = loop {
        let (id, key) = a.create_key("alice").await;
        let hash = keygate::key::KeyHash::of(&key).to_hex();
        if cluster.master_of(&format!("keygate:key:{hash}")) != holder
            && cluster.master_of(&format!("keygate:id:{id}")) != holder
        {
            break (id, key);
        }
    };
    assert_eq!(client.post("wf", &key).await, 200);
    let before = flushes().await;
    cluster.node(holder).kill();
    assert!(
        subscribed(&cluster, 4).await,
        "{:?}",
        subscribed_nodes(&cluster)
    );
    assert!(!subscribed_nodes(&cluster).contains(&holder));
    assert_eq!(
        flushes().await,
        before,
        "flushed though another subscription held"
    );
    // And revocation crosses over still.
    assert_eq!(a.revoke(&id).await, 200);
    assert!(
        eventually(Duration::from_secs(2), || async {
            KeepAlive::connect(b.listen).await.post("wf", &key).await == 401
        })
        .await
    );
}

#[tokio::test]
async fn a_lost_master_fails_closed_for_its_own_slots_only() {
    let mut cluster = RedisCluster::start(3, 0);
    let (a, b, _upstream, _da, _db) = pair(&cluster, "").await;
    // The victim: a master that does not hold the workflow's owner.
    let owner_master = cluster.master_of("keygate:owner:wf");
    let victim = cluster
        .master_ports()
        .into_iter()
        .find(|p| *p != owner_master)
        .unwrap();
    let mut keys: Vec<(String, String, u16)> = Vec::new();
    while keys.iter().filter(|k| k.2 == victim).count() < 3
        || keys.iter().filter(|k| k.2 != victim).count() < 3
    {
        let (id, key) = a.create_key("alice").await;
        let hash = keygate::key::KeyHash::of(&key).to_hex();
        let master = cluster.master_of(&format!("keygate:key:{hash}"));
        keys.push((id, key, master));
    }
    let on_victim: Vec<&String> = keys
        .iter()
        .filter(|k| k.2 == victim)
        .map(|k| &k.1)
        .collect();
    let elsewhere: Vec<&String> = keys
        .iter()
        .filter(|k| k.2 != victim)
        .map(|k| &k.1)
        .collect();
    let mut client = KeepAlive::connect(b.listen).await;
    // One key on the victim cached before it goes; the owner cached too.
    assert_eq!(client.post("wf", on_victim[0]).await, 200);
    // Its data on disk, as a master with persistence keeps it.
    cluster.node(victim).save();
    cluster.node(victim).kill();
    let started = Instant::now();

    // Uncached keys in its slots: 503, never a pass.
    for key in &on_victim[1..] {
        assert_eq!(client.post("wf", key).await, 503);
    }
    // The cached one still serves; keys in other slots are unaffected.
    assert_eq!(client.post("wf", on_victim[0]).await, 200);
    for key in &elsewhere {
        assert_eq!(client.post("wf", key).await, 200);
    }
    let (status, body) = b.admin_call("GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{victim}")),
        "{body}"
    );
    println!(
        "uncached keys on the lost master refused in {:?}",
        started.elapsed()
    );
    // Back on its own, the master's keys work again.
    cluster.node(victim).restart();
    cluster.wait_until_ok();
    assert!(
        eventually(Duration::from_secs(15), || async {
            KeepAlive::connect(b.listen)
                .await
                .post("wf", on_victim[1])
                .await
                == 200
        })
        .await,
        "the master's keys did not come back"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.admin_call("GET", "/readyz", None).await.0 == 200
        })
        .await
    );
}

#[tokio::test]
async fn a_failover_is_followed_without_a_restart() {
    let mut cluster = RedisCluster::start(3, 1);
    let (a, b, _upstream, _da, _db) = pair(&cluster, "").await;
    let owner_master = cluster.master_of("keygate:owner:wf");
    let victim = cluster
        .master_ports()
        .into_iter()
        .find(|p| *p != owner_master)
        .unwrap();
    // Keys in the victim's slots, none cached on b yet.
    let mut fresh = Vec::new();
    while fresh.len() < 200 {
        let (_, key) = a.create_key("alice").await;
        let hash = keygate::key::KeyHash::of(&key).to_hex();
        if cluster.master_of(&format!("keygate:key:{hash}")) == victim {
            fresh.push(key);
        }
    }
    let mut client = KeepAlive::connect(b.listen).await;
    assert_eq!(client.post("wf", &fresh[0]).await, 200);
    cluster.node(victim).kill();
    let killed = Instant::now();
    let mut refused = Duration::ZERO;
    let mut served_again = None;
    for key in &fresh[1..] {
        let status = client.post("wf", key).await;
        match status {
            200 => {
                served_again = Some(killed.elapsed());
                break;
            }
            503 => refused = killed.elapsed(),
            other => panic!("a key in the moved slots answered {other}"),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no failover within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served_again = served_again.expect("a key in the moved slots served again");
    println!(
        "failover: keys in the lost master's slots refused (503) for {:.1} s, served again after {:.1} s",
        refused.as_secs_f64(),
        served_again.as_secs_f64()
    );
    assert!(cluster.master_ports().iter().all(|p| *p != victim));
}

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost.
fn ca_and_server() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Names of their own: OpenSSL (Redis's bus) takes a certificate whose
    // issuer is its own subject for self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keygate test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn rediss_checks_the_certificate_and_serves() {
    let (ca, cert, key) = ca_and_server();
    let redis = RedisServer::start_tls(&cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("redis-ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let upstream = Upstream::start().await;
    let store = StoreKind::Yaml(format!(
        "store:\n  redis:\n    url: \"{}\"\n    ca_file: \"{}\"\n    timeout: 500ms\n",
        redis.tls_url("localhost"),
        ca_file.display()
    ));
    let gw = Gw::start(config(dir.path(), &store, &upstream.url(), "")).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.admin_call("GET", "/readyz", None).await.0 == 200
        })
        .await,
        "{:?}",
        gw.admin_call("GET", "/readyz", None).await
    );
    let (_, wfb) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    assert_eq!(gw.webhook("wf", Some(&bearer(&wfb))).await.0, 200);
    // The key is in the TLS server (read back over its plain port).
    assert!(redis.dump().contains("keygate:owner:wf"));
    // Without the CA the certificate is not trusted: not ready, 503.
    let dir2 = tempfile::tempdir().unwrap();
    let untrusted = StoreKind::Yaml(format!(
        "store:\n  redis:\n    url: \"{}\"\n    timeout: 500ms\n",
        redis.tls_url("localhost")
    ));
    let gw2 = Gw::start(config(dir2.path(), &untrusted, &upstream.url(), "")).await;
    let (status, body) = gw2.admin_call("GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(gw2.webhook("wf", Some(&bearer(&wfb))).await.0, 503);
    // insecure: the certificate is not checked (never the default).
    let dir3 = tempfile::tempdir().unwrap();
    let insecure = StoreKind::Yaml(format!(
        "store:\n  redis:\n    url: \"{}\"\n    insecure: true\n    timeout: 500ms\n",
        redis.tls_url("localhost")
    ));
    let gw3 = Gw::start(config(dir3.path(), &insecure, &upstream.url(), "")).await;
    assert_eq!(gw3.webhook("wf", Some(&bearer(&wfb))).await.0, 200);
}

#[tokio::test]
async fn a_cluster_over_tls_serves_with_rediss_seeds() {
    let (ca, cert, key) = ca_and_server();
    let cluster = RedisCluster::start_tls(3, &ca, &cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("redis-ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let upstream = Upstream::start().await;
    let seeds: Vec<String> = cluster
        .tls_seeds("127.0.0.1")
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    let store = StoreKind::Yaml(format!(
        "store:\n  redis:\n    cluster: [{}]\n    ca_file: \"{}\"\n    timeout: 500ms\n",
        seeds.join(", "),
        ca_file.display()
    ));
    let gw = Gw::start(config(dir.path(), &store, &upstream.url(), "")).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            gw.admin_call("GET", "/readyz", None).await.0 == 200
        })
        .await,
        "{:?}",
        gw.admin_call("GET", "/readyz", None).await
    );
    gw.set_owner("wf", "alice").await;
    let mut masters = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (_, wfb) = gw.create_key("alice").await;
        assert_eq!(gw.webhook("wf", Some(&bearer(&wfb))).await.0, 200);
        let hash = keygate::key::KeyHash::of(&wfb).to_hex();
        masters.insert(cluster.master_of(&format!("keygate:key:{hash}")));
    }
    // Keys on more than one master: keygate followed the slot map over TLS.
    assert!(masters.len() > 1, "{masters:?}");
    // Without the CA: not ready, and a key not cached is refused with 503.
    let dir2 = tempfile::tempdir().unwrap();
    let untrusted = StoreKind::Yaml(format!(
        "store:\n  redis:\n    cluster: [{}]\n    timeout: 500ms\n",
        seeds.join(", ")
    ));
    let gw2 = Gw::start(config(dir2.path(), &untrusted, &upstream.url(), "")).await;
    assert_eq!(gw2.admin_call("GET", "/readyz", None).await.0, 503);
    let (_, wfb) = gw.create_key("alice").await;
    assert_eq!(gw2.webhook("wf", Some(&bearer(&wfb))).await.0, 503);
}

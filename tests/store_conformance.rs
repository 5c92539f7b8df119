//! One conformance suite, run against every store: the embedded redb file,
//! a real `redis-server` and a real PostgreSQL (with the engine's tables)
//! started by the test on free ports. Owners differ by design: the
//! embedded and Redis stores keep them, the postgres store reads the
//! engine's workflows table.

mod common;

use common::{PostgresServer, RedisCluster, RedisServer, eventually};
use keygate::config::{Config, PostgresConfig, RedisConfig, StoreConfig};
use keygate::key::{KeyHash, NewKey};
use keygate::store::embedded::EmbeddedStore;
use keygate::store::postgres::PostgresStore;
use keygate::store::redis::RedisStore;
use keygate::store::{AuditEntry, IntegrationRecord, KeyRecord, LastUsed, Rate, Store, StoreError};
use std::time::Duration;

fn record(id: &str, user: &str, created_at: i64) -> (KeyRecord, NewKey) {
    let key = NewKey::generate().unwrap();
    let r = KeyRecord {
        id: id.to_owned(),
        user_id: user.to_owned(),
        name: format!("name of {id}"),
        prefix: key.prefix(),
        hash: key.hash(),
        created_at,
        last_used_at: None,
        expires_at: None,
        workflows: None,
        rate: None,
    };
    (r, key)
}

/// The whole suite, for a store that keeps owners itself.
async fn conformance(store: &dyn Store) -> Vec<NewKey> {
    let mut secrets = keys_conform(store).await;
    secrets.extend(policies_conform(store).await);
    owners_kept_by_keygate(store).await;
    integrations_conform(store).await;
    store.ping().await.unwrap();
    secrets
}

/// Expiry, scopes and rates kept with a key; one by id; every user's;
/// an expiry only ever brought forward; the expired found for the sweep;
/// the audit log in time order, trimmed to its retention. Users `user_1`
/// and `user_2` (keys_conform's keys may be there too).
async fn policies_conform(store: &dyn Store) -> Vec<NewKey> {
    let (mut p, kp) = record("key_p", "user_1", 10_000);
    p.expires_at = Some(50_000);
    p.workflows = Some(vec!["wf_1".into(), "wf_2".into()]);
    p.rate = Some(Rate::parse("5/1m").unwrap());
    let (q, kq) = record("key_q", "user_2", 11_000);
    store.create_key(p.clone()).await.unwrap();
    store.create_key(q.clone()).await.unwrap();
    assert_eq!(store.find_by_hash(p.hash).await.unwrap(), Some(p.clone()));
    assert_eq!(store.get_key("key_p").await.unwrap(), Some(p.clone()));
    assert_eq!(store.get_key("key_none").await.unwrap(), None);
    let listed = store.list_keys("user_1").await.unwrap();
    assert!(listed.contains(&p), "{listed:?}");
    let all: Vec<String> = store
        .list_all_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    // Newest first, across users.
    let (at_p, at_q) = (
        all.iter().position(|id| id == "key_p").unwrap(),
        all.iter().position(|id| id == "key_q").unwrap(),
    );
    assert!(at_q < at_p, "{all:?}");
    // An expiry moves only forward in time's favour: sooner wins.
    let later = store.expire_key("key_p", 90_000).await.unwrap();
    assert_eq!(later.expires_at, Some(50_000));
    let sooner = store.expire_key("key_p", 20_000).await.unwrap();
    assert_eq!(sooner.expires_at, Some(20_000));
    assert_eq!(sooner.workflows, p.workflows);
    let q_expiring = store.expire_key("key_q", 30_000).await.unwrap();
    assert_eq!(q_expiring.expires_at, Some(30_000));
    assert!(matches!(
        store.expire_key("key_none", 1).await,
        Err(StoreError::UnknownKey(_))
    ));
    let due = |now| async move {
        let mut ids: Vec<String> = store
            .expired_keys(now)
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(due(19_999).await, Vec::<String>::new());
    assert_eq!(due(20_000).await, ["key_p"]);
    assert_eq!(due(40_000).await, ["key_p", "key_q"]);
    // Revoked: no longer due.
    store.revoke_key("key_p").await.unwrap();
    assert_eq!(due(40_000).await, ["key_q"]);
    store.revoke_key("key_q").await.unwrap();
    assert_eq!(due(40_000).await, Vec::<String>::new());

    // The audit log: in time order, from `since` on, trimmed on append.
    let entry = |at: i64, action: &str| AuditEntry {
        at,
        action: action.to_owned(),
        caller: "127.0.0.1:1".to_owned(),
        key_id: Some(format!("key_{at}")),
        key_prefix: Some("wfb_abcdefg".to_owned()),
        user_id: Some("user_1".to_owned()),
        id: format!("audit_{at}"),
        ..AuditEntry::default()
    };
    for (at, action) in [
        (1_000, "key.created"),
        (3_000, "key.revoked"),
        (2_000, "owner.set"),
    ] {
        store.append_audit(entry(at, action), 0).await.unwrap();
    }
    let actions = |list: Vec<AuditEntry>| list.into_iter().map(|e| e.action).collect::<Vec<_>>();
    assert_eq!(
        actions(store.list_audit(0).await.unwrap()),
        ["key.created", "owner.set", "key.revoked"]
    );
    assert_eq!(
        store.list_audit(2_000).await.unwrap()[0],
        entry(2_000, "owner.set")
    );
    // Two entries of one millisecond are two.
    let mut twin = entry(3_000, "key.rolled");
    twin.id = "audit_twin".into();
    store.append_audit(twin, 0).await.unwrap();
    assert_eq!(store.list_audit(3_000).await.unwrap().len(), 2);
    // Retention: appending with keep_since drops what is older.
    store
        .append_audit(entry(4_000, "key.expired"), 2_500)
        .await
        .unwrap();
    assert_eq!(
        actions(store.list_audit(0).await.unwrap()),
        ["key.revoked", "key.rolled", "key.expired"]
    );
    vec![kp, kq]
}

/// Keys: created, found, listed, last used, revoked; for users `user_1`
/// and `user_2`.
async fn keys_conform(store: &dyn Store) -> Vec<NewKey> {
    let mut secrets = Vec::new();

    // create + find by hash
    let (a, ka) = record("key_a", "user_1", 1_000);
    let (b, kb) = record("key_b", "user_1", 2_000);
    let (c, kc) = record("key_c", "user_2", 3_000);
    for r in [&a, &b, &c] {
        store.create_key(r.clone()).await.unwrap();
    }
    assert_eq!(store.find_by_hash(a.hash).await.unwrap(), Some(a.clone()));
    assert_eq!(
        store
            .find_by_hash(KeyHash::of("wfb_unknown"))
            .await
            .unwrap(),
        None
    );

    // a duplicate id is refused
    let (mut dup, _) = record("key_a", "user_1", 5);
    dup.name = "dup".into();
    assert!(matches!(
        store.create_key(dup).await,
        Err(StoreError::Conflict(_))
    ));

    // list newest first, per user
    let ids: Vec<String> = store
        .list_keys("user_1")
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, ["key_b", "key_a"]);
    assert_eq!(store.list_keys("user_2").await.unwrap().len(), 1);
    assert!(store.list_keys("nobody").await.unwrap().is_empty());

    // last used: batched, never backwards, revoked keys not revived
    store
        .record_last_used(vec![
            LastUsed {
                id: a.id.clone(),
                hash: a.hash,
                at: 5_000,
            },
            LastUsed {
                id: b.id.clone(),
                hash: b.hash,
                at: 6_000,
            },
        ])
        .await
        .unwrap();
    store
        .record_last_used(vec![LastUsed {
            id: a.id.clone(),
            hash: a.hash,
            at: 4_000,
        }])
        .await
        .unwrap();
    let found = store.find_by_hash(a.hash).await.unwrap().unwrap();
    assert_eq!(found.last_used_at, Some(5_000), "time moved backwards");
    let listed = store.list_keys("user_1").await.unwrap();
    assert_eq!(listed[0].last_used_at, Some(6_000));
    assert_eq!(listed[1].last_used_at, Some(5_000));

    // revoke
    let revoked = store.revoke_key("key_b").await.unwrap();
    assert_eq!(revoked.hash, b.hash);
    assert_eq!(store.find_by_hash(b.hash).await.unwrap(), None);
    assert!(
        matches!(store.revoke_key("key_b").await, Err(StoreError::UnknownKey(id)) if id == "key_b")
    );
    assert!(matches!(
        store.revoke_key("key_never").await,
        Err(StoreError::UnknownKey(_))
    ));
    store
        .record_last_used(vec![LastUsed {
            id: b.id.clone(),
            hash: b.hash,
            at: 9_000,
        }])
        .await
        .unwrap();
    assert_eq!(
        store.find_by_hash(b.hash).await.unwrap(),
        None,
        "revoked key came back"
    );
    let ids: Vec<String> = store
        .list_keys("user_1")
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, ["key_a"]);
    secrets.extend([ka, kb, kc]);
    secrets
}

fn integration(id: &str, user: &str, created_at: i64) -> IntegrationRecord {
    IntegrationRecord {
        id: id.to_owned(),
        user_id: user.to_owned(),
        kind: "skytells".to_owned(),
        name: format!("name of {id}"),
        created_at,
        last_used_at: None,
        key_id: "k1".to_owned(),
        nonce: vec![7; 12],
        ciphertext: format!("sealed {id}").into_bytes(),
    }
}

/// Integration records: the sealed secret kept as given, listed per user,
/// last use never backwards, re-sealed in place, removed for good.
async fn integrations_conform(store: &dyn Store) {
    let (a, b, c) = (
        integration("int_a", "user_1", 1_000),
        integration("int_b", "user_1", 2_000),
        integration("int_c", "user_2", 3_000),
    );
    for r in [&a, &b, &c] {
        store.create_integration(r.clone()).await.unwrap();
    }
    assert!(matches!(
        store
            .create_integration(integration("int_a", "user_2", 9))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.get_integration("int_a").await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(store.get_integration("int_none").await.unwrap(), None);
    let ids = |list: Vec<IntegrationRecord>| list.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_integrations("user_1").await.unwrap()),
        ["int_b", "int_a"]
    );
    assert!(store.list_integrations("nobody").await.unwrap().is_empty());
    let mut all = ids(store.all_integrations().await.unwrap());
    all.sort();
    assert_eq!(all, ["int_a", "int_b", "int_c"]);

    store.integration_used("int_a", 5_000).await.unwrap();
    store.integration_used("int_a", 4_000).await.unwrap();
    let used = store.get_integration("int_a").await.unwrap().unwrap();
    assert_eq!(used.last_used_at, Some(5_000), "time moved backwards");

    let resealed = IntegrationRecord {
        key_id: "k2".into(),
        nonce: vec![8; 12],
        ciphertext: b"sealed again".to_vec(),
        // Only the seal changes, whatever else is passed.
        name: "ignored".into(),
        ..a.clone()
    };
    store.reseal_integration(resealed).await.unwrap();
    let now = store.get_integration("int_a").await.unwrap().unwrap();
    assert_eq!(
        (
            now.key_id.as_str(),
            now.nonce.as_slice(),
            now.ciphertext.as_slice()
        ),
        ("k2", &[8u8; 12][..], &b"sealed again"[..])
    );
    assert_eq!(
        (now.name.as_str(), now.last_used_at),
        ("name of int_a", Some(5_000))
    );
    assert!(matches!(
        store
            .reseal_integration(integration("int_none", "user_1", 1))
            .await,
        Err(StoreError::UnknownIntegration(_))
    ));

    let removed = store.remove_integration("int_b").await.unwrap();
    assert_eq!(removed.user_id, "user_1");
    assert!(matches!(
        store.remove_integration("int_b").await,
        Err(StoreError::UnknownIntegration(_))
    ));
    store.integration_used("int_b", 9_000).await.unwrap();
    assert_eq!(
        store.get_integration("int_b").await.unwrap(),
        None,
        "a removed integration came back"
    );
    assert_eq!(
        ids(store.list_integrations("user_1").await.unwrap()),
        ["int_a"]
    );
}

/// Owners registered through keygate (the embedded and Redis stores).
async fn owners_kept_by_keygate(store: &dyn Store) {
    assert_eq!(store.get_owner("wf_1").await.unwrap(), None);
    store.set_owner("wf_1", "user_1").await.unwrap();
    store.set_owner("wf_2", "user_2").await.unwrap();
    assert_eq!(
        store.get_owner("wf_1").await.unwrap().as_deref(),
        Some("user_1")
    );
    store.set_owner("wf_1", "user_3").await.unwrap();
    assert_eq!(
        store.get_owner("wf_1").await.unwrap().as_deref(),
        Some("user_3")
    );
    let list = store.list_workflows().await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        (list[0].workflow_id.as_str(), list[0].owner.as_str()),
        ("wf_1", "user_3")
    );
    store.remove_owner("wf_1").await.unwrap();
    assert_eq!(store.get_owner("wf_1").await.unwrap(), None);
    assert!(matches!(
        store.remove_owner("wf_1").await,
        Err(StoreError::UnknownWorkflow(_))
    ));
}

#[tokio::test]
async fn embedded_store_conforms_and_never_holds_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/keygate.redb");
    let secrets = {
        let store = EmbeddedStore::open(&path).unwrap();
        conformance(&store).await
    };
    let bytes = std::fs::read(&path).unwrap();
    for key in &secrets {
        let needle = key.secret().as_bytes();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "full key found in the redb file"
        );
    }
    // The file survives reopening, and is locked while open.
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.list_keys("user_1").await.unwrap().len(), 1);
    assert!(EmbeddedStore::open(&path).is_err());
}

#[tokio::test]
async fn redis_store_conforms_and_never_holds_a_key() {
    let redis = RedisServer::start();
    let store =
        RedisStore::connect(&RedisConfig::single(redis.url(), Duration::from_secs(2))).unwrap();
    let secrets = conformance(&store).await;
    let dump = redis.dump();
    assert!(dump.contains("keygate:owner:wf_2"), "{dump}");
    for key in &secrets {
        assert!(!dump.contains(key.secret()), "full key found in Redis");
    }
}

#[tokio::test]
async fn redis_cluster_store_conforms_and_spreads_keys_over_every_master() {
    let cluster = RedisCluster::start(3, 0);
    let config = RedisConfig {
        nodes: keygate::config::RedisNodes::Cluster(cluster.seeds()),
        ..RedisConfig::single("", Duration::from_secs(2))
    };
    let store = RedisStore::connect(&config).unwrap();
    assert_eq!(store.kind(), "redis-cluster");
    let secrets = conformance(&store).await;
    for i in 0..60 {
        let (r, _) = record(&format!("key_spread_{i}"), &format!("user_{}", i % 7), i);
        store.create_key(r).await.unwrap();
    }
    for port in cluster.master_ports() {
        let keys: u64 = cluster
            .nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap()
            .cli(&["DBSIZE"])
            .unwrap()
            .parse()
            .unwrap();
        assert!(keys > 0, "master {port} holds no key");
    }
    let dump = cluster.dump();
    for key in &secrets {
        assert!(
            !dump.contains(key.secret()),
            "full key found in the cluster"
        );
    }
    store.ping().await.unwrap();
}

#[tokio::test]
async fn a_redis_store_in_the_old_layout_is_moved_over_and_read_meanwhile() {
    let redis = RedisServer::start();
    let (a, key_a) = record("key_a", "user_1", 1_000);
    let hex = a.hash.to_hex();
    // Written the way keygate wrote it before the per-key layout.
    redis.cli(&[
        "HSET",
        &format!("keygate:key:{hex}"),
        "id",
        "key_a",
        "userId",
        "user_1",
        "name",
        "n",
        "keyPrefix",
        &a.prefix,
        "createdAt",
        "1000",
    ]);
    redis.cli(&["SET", "keygate:id:key_a", &hex]);
    redis.cli(&["ZADD", "keygate:user:user_1", "1000", "key_a"]);
    redis.cli(&["ZADD", "keygate:lastused", "5000", &hex]);
    redis.cli(&[
        "HSET",
        "keygate:owners",
        "wf_old",
        "user_1",
        "wf_two",
        "user_2",
    ]);
    let store =
        RedisStore::connect(&RedisConfig::single(redis.url(), Duration::from_secs(2))).unwrap();
    // Before the move: owners are read from the old hash.
    assert_eq!(
        store.get_owner("wf_old").await.unwrap().as_deref(),
        Some("user_1")
    );
    assert_eq!(store.migrate().await.unwrap(), (1, 2));
    assert_eq!(
        store.get_owner("wf_old").await.unwrap().as_deref(),
        Some("user_1")
    );
    assert_eq!(store.list_workflows().await.unwrap().len(), 2);
    let found = store.find_by_hash(key_a.hash()).await.unwrap().unwrap();
    assert_eq!(found.last_used_at, Some(5_000));
    assert_eq!(
        redis.cli(&["EXISTS", "keygate:lastused"]).as_deref(),
        Some("0")
    );
    assert_eq!(
        redis.cli(&["EXISTS", "keygate:owners"]).as_deref(),
        Some("0")
    );
    // Again: nothing left to move, nothing changed.
    assert_eq!(store.migrate().await.unwrap(), (0, 0));
    assert_eq!(
        store.get_owner("wf_two").await.unwrap().as_deref(),
        Some("user_2")
    );
}

#[tokio::test]
async fn redis_store_reports_an_outage_as_unavailable() {
    let mut redis = RedisServer::start();
    let store = RedisStore::connect(&RedisConfig::single(
        redis.url(),
        Duration::from_millis(300),
    ))
    .unwrap();
    store.ping().await.unwrap();
    redis.kill();
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.find_by_hash(KeyHash::of("wfb_x")).await,
        Err(StoreError::Unavailable(_))
    ));
    redis.restart();
    assert!(
        eventually(Duration::from_secs(5), || async {
            store.ping().await.is_ok()
        })
        .await,
        "store did not reconnect"
    );
}

fn postgres_config(url: &str, timeout: &str) -> PostgresConfig {
    let yaml = format!("store:\n  postgres:\n    url: \"{url}\"\n    timeout: {timeout}\n");
    match Config::from_yaml(&yaml, std::path::Path::new("."))
        .unwrap()
        .store
    {
        StoreConfig::Postgres(config) => *config,
        other => panic!("{other:?}"),
    }
}

/// Owners from the engine's workflows table: present as soon as the engine
/// writes them, set by updating it, never removed by keygate.
async fn owners_from_the_engine(store: &dyn Store, db: &PostgresServer) {
    assert_eq!(store.get_owner("wf_1").await.unwrap(), None);
    assert!(matches!(
        store.set_owner("wf_1", "user_1").await,
        Err(StoreError::UnknownWorkflow(_))
    ));
    db.psql(
        "INSERT INTO workflows (id, name, user_id, nodes, edges) VALUES \
         ('wf_1', 'one', 'user_1', '[]', '[]'), ('wf_2', 'two', 'user_2', '[]', '[]')",
    );
    assert_eq!(
        store.get_owner("wf_1").await.unwrap().as_deref(),
        Some("user_1")
    );
    store.set_owner("wf_1", "user_2").await.unwrap();
    assert_eq!(
        db.psql("SELECT user_id FROM workflows WHERE id = 'wf_1'"),
        "user_2"
    );
    assert!(matches!(
        store.set_owner("wf_1", "nobody").await,
        Err(StoreError::UnknownUser(_))
    ));
    let list = store.list_workflows().await.unwrap();
    assert_eq!(
        list.iter()
            .map(|w| (w.workflow_id.as_str(), w.owner.as_str()))
            .collect::<Vec<_>>(),
        [("wf_1", "user_2"), ("wf_2", "user_2")]
    );
    let refused = store.remove_owner("wf_1").await;
    assert!(
        matches!(&refused, Err(StoreError::Refused(why)) if why.contains("engine")),
        "{refused:?}"
    );
    assert_eq!(
        store.get_owner("wf_1").await.unwrap().as_deref(),
        Some("user_2")
    );
}

#[tokio::test]
async fn postgres_store_conforms_and_never_holds_a_key() {
    let db = PostgresServer::start();
    db.psql("INSERT INTO users (id) VALUES ('user_1'), ('user_2')");
    let config = postgres_config(&db.url(), "2s");
    let mut client = keygate::store::postgres::open_driven(&config)
        .await
        .unwrap();
    keygate::store::postgres::prepare::prepare(&mut client, &config)
        .await
        .unwrap();
    let store = PostgresStore::connect(&config).unwrap();
    let mut secrets = keys_conform(&store).await;
    secrets.extend(policies_conform(&store).await);
    owners_from_the_engine(&store, &db).await;
    integrations_conform(&store).await;
    store.ping().await.unwrap();
    // A key for a user the engine does not have is refused, clearly.
    let (stranger, _) = record("key_x", "user_9", 7_000);
    let refused = store.create_key(stranger).await;
    assert!(
        matches!(&refused, Err(StoreError::UnknownUser(u)) if u.contains("user_9")),
        "{refused:?}"
    );
    // Rows as the engine reads them: hex hash, 11-character prefix, UTC.
    let row = db.psql("SELECT key_hash, key_prefix, created_at FROM api_keys WHERE id = 'key_a'");
    let fields: Vec<&str> = row.split('|').collect();
    assert_eq!(fields[0].len(), 64, "{row}");
    assert_eq!(fields[1].len(), 11, "{row}");
    assert_eq!(fields[2], "1970-01-01 00:00:01", "{row}");
    db.psql("CHECKPOINT");
    let bytes = db.data_bytes();
    for key in &secrets {
        let needle = key.secret().as_bytes();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "full key found in the database files"
        );
    }
}

#[tokio::test]
async fn postgres_store_reports_an_outage_as_unavailable() {
    let mut db = PostgresServer::start();
    let store = PostgresStore::connect(&postgres_config(&db.url(), "500ms")).unwrap();
    store.ping().await.unwrap();
    db.stop();
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.find_by_hash(KeyHash::of("wfb_x")).await,
        Err(StoreError::Unavailable(_))
    ));
    db.restart();
    assert!(
        eventually(Duration::from_secs(10), || async {
            store.ping().await.is_ok()
        })
        .await,
        "store did not reconnect"
    );
    assert_eq!(
        store.find_by_hash(KeyHash::of("wfb_x")).await.unwrap(),
        None
    );
}

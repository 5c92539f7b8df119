//! One conformance suite, run against both stores: the embedded redb file
//! and a real `redis-server` started by the test on a free port.

mod common;

use common::{RedisServer, eventually};
use keygate::config::RedisConfig;
use keygate::key::{KeyHash, NewKey};
use keygate::store::embedded::EmbeddedStore;
use keygate::store::redis::RedisStore;
use keygate::store::{KeyRecord, LastUsed, Store, StoreError};
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
    };
    (r, key)
}

async fn conformance(store: &dyn Store) -> Vec<NewKey> {
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

    // workflow owners
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

    store.ping().await.unwrap();
    secrets.extend([ka, kb, kc]);
    secrets
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
    let store = RedisStore::connect(&RedisConfig {
        url: redis.url(),
        prefix: "keygate:".into(),
        timeout: Duration::from_secs(2),
    })
    .unwrap();
    let secrets = conformance(&store).await;
    let dump = redis.dump();
    assert!(dump.contains("keygate:owners"), "{dump}");
    for key in &secrets {
        assert!(!dump.contains(key.secret()), "full key found in Redis");
    }
}

#[tokio::test]
async fn redis_store_reports_an_outage_as_unavailable() {
    let mut redis = RedisServer::start();
    let store = RedisStore::connect(&RedisConfig {
        url: redis.url(),
        prefix: "keygate:".into(),
        timeout: Duration::from_millis(300),
    })
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

//! The caches' concurrency rules, driven through a store whose reads wait
//! at a gate the test opens.

use super::fence::live;
use super::*;
use crate::config::CacheSize;
use crate::key::KeyHash;
use crate::store::KeyRecord;
use crate::store::{LastUsed, StoreFuture, WorkflowOwner};
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::sync::Semaphore;

/// A store whose key reads take their answer at once but return only
/// when the test opens the gate: a read "in flight" across a revoke.
struct GatedStore {
    keys: Mutex<Vec<KeyRecord>>,
    gate: Semaphore,
    reads: AtomicUsize,
    /// Key reads fail (after the gate) while set.
    down: std::sync::atomic::AtomicBool,
}

impl GatedStore {
    fn new(keys: Vec<KeyRecord>, permits: usize) -> Arc<GatedStore> {
        Arc::new(GatedStore {
            keys: Mutex::new(keys),
            gate: Semaphore::new(permits),
            reads: AtomicUsize::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl Store for GatedStore {
    fn kind(&self) -> &'static str {
        "gated"
    }
    fn create_key(&self, _: KeyRecord) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn find_by_hash(&self, hash: KeyHash) -> StoreFuture<'_, Option<KeyRecord>> {
        let answer = self
            .keys
            .lock()
            .unwrap()
            .iter()
            .find(|k| k.hash == hash)
            .cloned();
        self.reads.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            self.gate.acquire().await.unwrap().forget();
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(answer)
        })
    }
    fn list_keys<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Vec<KeyRecord>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, KeyRecord> {
        Box::pin(async move { Err(StoreError::UnknownKey(id.to_owned())) })
    }
    fn get_key<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Option<KeyRecord>> {
        Box::pin(async { Ok(None) })
    }
    fn list_all_keys(&self) -> StoreFuture<'_, Vec<KeyRecord>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn expire_key<'a>(&'a self, id: &'a str, _: i64) -> StoreFuture<'a, KeyRecord> {
        Box::pin(async move { Err(StoreError::UnknownKey(id.to_owned())) })
    }
    fn append_audit(&self, _: crate::store::AuditEntry, _: i64) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn list_audit(&self, _: i64) -> StoreFuture<'_, Vec<crate::store::AuditEntry>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn record_last_used(&self, _: Vec<LastUsed>) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn set_owner<'a>(&'a self, _: &'a str, _: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn remove_owner<'a>(&'a self, _: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn get_owner<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async { Ok(None) })
    }
    fn list_workflows(&self) -> StoreFuture<'_, Vec<WorkflowOwner>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn a_read_begun_before_a_revoke_never_answers_after_it() {
    let hash = KeyHash::of("wfb_race");
    let store = GatedStore::new(vec![record(hash)], 0);
    let auth = auth_over(store.clone(), Duration::from_secs(60));
    // A's read takes the old answer and waits at the gate.
    let a = tokio::spawn({
        let auth = auth.clone();
        async move { auth.authenticate(hash).await }
    });
    while store.reads.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // The key is revoked in the store and on this instance.
    store.keys.lock().unwrap().clear();
    auth.invalidate_key(hash);
    // B arrives after the revoke and joins A's read.
    let b = tokio::spawn({
        let auth = auth.clone();
        async move { auth.authenticate(hash).await }
    });
    tokio::task::yield_now().await;
    store.gate.add_permits(100);
    assert_eq!(b.await.unwrap().err(), Some(AuthError::InvalidKey));
    // A began before the revoke: either answer is acceptable for it.
    let _ = a.await.unwrap();
    assert_eq!(
        auth.authenticate(hash).await.err(),
        Some(AuthError::InvalidKey)
    );
}

#[tokio::test]
async fn front_copies_fall_with_the_entry_they_copy() {
    let hash = KeyHash::of("wfb_front");
    let store = GatedStore::new(vec![record(hash)], 1000);
    let auth = auth_over(store.clone(), Duration::from_secs(60));
    let reads = || store.reads.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(auth.authenticate(hash).await.unwrap().key_id(), "key_1");
    }
    assert_eq!(reads(), 1);
    assert!(auth.front_key(&hash).is_some());

    // A revoke voids the front copy on every thread at once: the fence
    // is shared, the copy is checked against it on each use.
    store.keys.lock().unwrap().clear();
    auth.invalidate_key(hash);
    assert!(auth.front_key(&hash).is_none());
    assert_eq!(
        auth.authenticate(hash).await.err(),
        Some(AuthError::InvalidKey)
    );
    assert_eq!(reads(), 2);

    // So does a whole-cache flush.
    store.keys.lock().unwrap().push(record(hash));
    auth.invalidate_all();
    assert!(auth.authenticate(hash).await.is_ok());
    assert_eq!(reads(), 3);
    auth.invalidate_all();
    assert!(auth.front_key(&hash).is_none());

    // Another `Auth` on this thread has fronts of its own.
    let other = auth_over(store.clone(), Duration::from_secs(60));
    assert!(other.front_key(&hash).is_none());
}

#[test]
fn cached_copies_never_outlive_the_ttl() {
    // Loaded in millisecond 10 (rounded down) with a 5 ms TTL: served
    // in milliseconds 10 to 14, not in 15, whatever the fraction was.
    assert!(live(10, 5, 10) && live(10, 5, 14));
    assert!(!live(10, 5, 15));
    assert!(!live(10, 0, 10));
    assert!(live(u64::MAX - 1, 5, u64::MAX - 1));
}

fn record(hash: KeyHash) -> KeyRecord {
    KeyRecord {
        id: "key_1".into(),
        user_id: "u".into(),
        name: String::new(),
        prefix: "wfb_test".into(),
        hash,
        created_at: 0,
        last_used_at: None,
        expires_at: None,
        workflows: None,
        rate: None,
    }
}

fn auth_over(store: Arc<GatedStore>, ttl: Duration) -> Arc<Auth> {
    let size = CacheSize { capacity: 100, ttl };
    let config = CacheConfig {
        keys: size,
        negative: size,
        owners: size,
        ttl_without_notify: Duration::from_secs(1),
    };
    Arc::new(Auth::new(store, &config, Arc::new(Metrics::new([]))))
}

#[tokio::test(start_paused = true)]
async fn a_cached_key_is_read_again_once_its_ttl_has_passed() {
    let hash = KeyHash::of("wfb_ttl");
    let store = GatedStore::new(vec![record(hash)], 1000);
    let auth = auth_over(store.clone(), Duration::from_millis(20));
    assert!(auth.authenticate(hash).await.is_ok());
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    // Past the TTL neither the front copy nor the cache entry answers,
    // whichever thread asks.
    tokio::time::advance(Duration::from_millis(19)).await;
    assert!(auth.front_key(&hash).is_some(), "still within the TTL");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(auth.front_key(&hash).is_none());
    assert!(auth.authenticate(hash).await.is_ok());
    assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    assert_eq!(auth.cached_keys(), 1);
}

#[tokio::test]
async fn requests_waiting_on_a_failed_read_share_its_failure() {
    let hash = KeyHash::of("wfb_down");
    let store = GatedStore::new(vec![record(hash)], 0);
    store.down.store(true, Ordering::SeqCst);
    let auth = auth_over(store.clone(), Duration::from_secs(60));
    let reads = || store.reads.load(Ordering::SeqCst);
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move { auth.authenticate(hash).await })
        })
        .collect();
    while reads() == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // The one read fails.
    store.gate.add_permits(1);
    while auth.keys.failures.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // A request that comes after the failure reads the store again,
    // and that read hangs; the five that waited on the failed read
    // must not wait on it too.
    store.down.store(false, Ordering::SeqCst);
    let later = tokio::spawn({
        let auth = auth.clone();
        async move { auth.authenticate(hash).await }
    });
    while reads() < 2 {
        tokio::task::yield_now().await;
    }
    for request in waiting {
        let answer = tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .expect("a waiter was left behind the later read");
        assert_eq!(answer.unwrap().err(), Some(AuthError::Unavailable));
    }
    assert_eq!(reads(), 2);
    assert_eq!(auth.cached_keys(), 0);
    store.gate.add_permits(1);
    assert!(later.await.unwrap().is_ok());
    assert_eq!(auth.cached_keys(), 1);
}

#[tokio::test]
async fn requests_waiting_on_a_read_that_finds_nothing_share_it() {
    let hash = KeyHash::of("wfb_nobody");
    let store = GatedStore::new(Vec::new(), 0);
    let auth = auth_over(store.clone(), Duration::from_secs(60));
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move { auth.authenticate(hash).await })
        })
        .collect();
    while store.reads.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    store.gate.add_permits(100);
    for request in waiting {
        assert_eq!(request.await.unwrap().err(), Some(AuthError::InvalidKey));
    }
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    // The hand-over leaves nothing in the key cache.
    assert_eq!(auth.keys.cache.len(), 0);
}

#[test]
fn principal_keeps_both_ids_and_the_prefix() {
    let p = Principal::new("key_abc", "user_1", "wfb_1234567");
    assert_eq!(
        (p.key_id(), p.user_id(), p.prefix()),
        ("key_abc", "user_1", "wfb_1234567")
    );
    let short = Principal::new("k", "", "wfb_");
    assert_eq!(
        (short.key_id(), short.user_id(), short.prefix()),
        ("k", "", "wfb_")
    );
    assert_eq!(Principal::new("k", "u", "wfb_é").prefix(), "");
}

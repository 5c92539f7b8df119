//! Criterion micro-benchmark of the verification path: parse the header
//! value, SHA-256 the key, and find it in the cache (a hit).

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::auth::Auth;
use keygate::config::{CacheConfig, CacheSize};
use keygate::key::{self, KeyHash, NewKey};
use keygate::metrics::Metrics;
use keygate::store::embedded::EmbeddedStore;
use keygate::store::{KeyRecord, Store};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

fn verification(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("kg.redb")).unwrap();
    let key = NewKey::generate().unwrap();
    rt.block_on(store.create_key(KeyRecord {
        id: "key_bench".into(),
        user_id: "user".into(),
        name: String::new(),
        prefix: key.prefix(),
        hash: key.hash(),
        created_at: 0,
        last_used_at: None,
        expires_at: None,
        workflows: None,
        rate: None,
    }))
    .unwrap();
    let size = CacheSize {
        capacity: 100_000,
        ttl: Duration::from_secs(3600),
    };
    let auth = Auth::new(
        Arc::new(store),
        &CacheConfig {
            keys: size,
            negative: size,
            owners: size,
            ttl_without_notify: std::time::Duration::from_secs(1),
        },
        Arc::new(Metrics::new([])),
    );
    let header = format!("Bearer {}", key.secret());
    rt.block_on(auth.authenticate(key.hash())).unwrap();

    c.bench_function("parse header and key shape", |b| {
        b.iter(|| {
            let token = black_box(header.as_str()).split_once(' ').unwrap().1;
            black_box(key::classify(token));
        });
    });
    c.bench_function("sha256 of a key", |b| {
        b.iter(|| black_box(KeyHash::of(black_box(key.secret()))));
    });
    c.bench_function("cache hit", |b| {
        b.iter(|| {
            rt.block_on(auth.authenticate(black_box(key.hash())))
                .unwrap()
        });
    });
    c.bench_function("parse + sha256 + cache hit", |b| {
        b.iter(|| {
            let token = black_box(header.as_str()).split_once(' ').unwrap().1;
            let key::Presented::Key(k) = key::classify(token) else {
                unreachable!()
            };
            rt.block_on(auth.authenticate(KeyHash::of(k))).unwrap()
        });
    });
}

criterion_group!(benches, verification);
criterion_main!(benches);

//! keygate in front of an existing engine, on the engine's own PostgreSQL
//! (started by the test, with the template's tables): keys and workflows
//! the engine writes work as they are, the engine's deletions and owner
//! changes take effect at once with the triggers (and within the TTL bound
//! without), and outages fail closed. TLS to the database, by sslmode.

mod common;

use common::*;
use keygate::config::{Config, PgTls, StoreConfig};
use sha2::Digest;
use std::time::{Duration, Instant};

/// A key as the engine issues one: `wfb_` and 32 base64url characters (24
/// random bytes), its lowercase hex SHA-256 and its first 11 characters.
struct EngineKey {
    key: String,
    hash: String,
    prefix: String,
}

fn engine_key() -> EngineKey {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).unwrap();
    let key = format!("wfb_{}", keygate::key::base64url(&bytes));
    assert_eq!(key.len(), 36);
    EngineKey {
        hash: hex::encode(sha2::Sha256::digest(key.as_bytes())),
        prefix: key[..11].to_owned(),
        key,
    }
}

/// Inserts `key` for `user` exactly as the engine does.
fn insert_engine_key(db: &PostgresServer, id: &str, user: &str, key: &EngineKey) {
    db.psql(&format!(
        "INSERT INTO api_keys (id, user_id, name, key_hash, key_prefix) VALUES ('{id}', '{user}', 'from the engine', '{}', '{}')",
        key.hash, key.prefix
    ));
}

fn insert_workflow(db: &PostgresServer, id: &str, user: &str) {
    db.psql(&format!(
        "INSERT INTO workflows (id, name, user_id, nodes, edges) VALUES ('{id}', 'a workflow', '{user}', '[]', '[]')"
    ));
}

/// The engine's database with users alice and bob and alice's workflow `wf`.
fn engine() -> PostgresServer {
    let db = PostgresServer::start();
    db.psql("INSERT INTO users (id, name) VALUES ('alice', 'Alice'), ('bob', 'Bob')");
    insert_workflow(&db, "wf", "alice");
    db
}

/// A gateway on `db`; `extra` is appended YAML. The failure limiter is off:
/// these tests expect 401s.
fn pg_config(dir: &tempfile::TempDir, db: &PostgresServer, upstream: &str, extra: &str) -> Config {
    let extra = format!("rate_limit:\n  max_failures: 0\n{extra}");
    config(
        dir.path(),
        &StoreKind::Postgres(db.url(), String::new()),
        upstream,
        &extra,
    )
}

/// `keygate store prepare` on this config.
async fn prepare(config: &Config) -> String {
    keygate::cli::store_prepare(config)
        .await
        .unwrap_or_else(|e| panic!("{}", e.0))
}

/// An engine's database, a gateway in front of it (listening: its first
/// subscription has flushed the caches) and the upstream it forwards to.
struct Front {
    db: PostgresServer,
    gw: Gw,
    upstream: Upstream,
    /// What `store prepare` printed; empty without the triggers.
    prepared: String,
    dir: tempfile::TempDir,
}

async fn front(triggers: bool, extra: &str) -> Front {
    let db = engine();
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let config = pg_config(&dir, &db, &upstream.url(), extra);
    let prepared = match triggers {
        true => prepare(&config).await,
        false => String::new(),
    };
    let gw = Gw::start(config).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.admin_call("GET", "/readyz", None).await.0 == 200
        })
        .await,
        "the gateway did not get ready"
    );
    Front {
        db,
        gw,
        upstream,
        prepared,
        dir,
    }
}

/// Polls `post` until it answers `status`; how long that took from `since`.
async fn until_status(
    client: &mut KeepAlive,
    workflow: &str,
    key: &str,
    status: u16,
    since: Instant,
    within: Duration,
) -> Duration {
    loop {
        let got = client.post(workflow, key).await;
        if got == status {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < within,
            "still {got}, not {status}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn keys_and_workflows_the_engine_wrote_work_as_they_are() {
    let f = front(true, "").await;
    let (db, gw, upstream) = (&f.db, &f.gw, &f.upstream);
    // A 36-character key the engine issued, inserted the engine's way.
    let key = engine_key();
    insert_engine_key(db, "k1", "alice", &key);
    let (status, _, _) = gw.webhook("wf", Some(&bearer(&key.key))).await;
    assert_eq!(status, 200);
    let seen = upstream.requests().pop().unwrap();
    assert_eq!(seen.headers["x-user-id"], "alice");
    assert_eq!(seen.headers["x-api-key-id"], "k1");
    // Another user's key: the workflow is alice's.
    let bobs = engine_key();
    insert_engine_key(db, "k2", "bob", &bobs);
    assert_eq!(gw.webhook("wf", Some(&bearer(&bobs.key))).await.0, 403);
    // A workflow the engine creates after start works with no keygate call,
    // even one a caller tried before it existed.
    let mut client = KeepAlive::connect(gw.listen).await;
    assert_eq!(client.post("wf_new", &key.key).await, 404);
    insert_workflow(db, "wf_new", "alice");
    let took = until_status(
        &mut client,
        "wf_new",
        &key.key,
        200,
        Instant::now(),
        Duration::from_secs(1),
    )
    .await;
    println!("a workflow inserted by SQL was served after {took:?}");
    // keygate's own listing shows the engine's key by prefix.
    let listed = gw.list_keys("alice").await;
    assert_eq!(listed[0]["id"], "k1");
    assert_eq!(listed[0]["keyPrefix"], key.prefix.as_str());
    assert_eq!(listed[0]["name"], "from the engine");
}

#[tokio::test]
async fn keys_keygate_creates_live_in_the_engines_table() {
    let f = front(false, "").await;
    let (db, gw) = (&f.db, &f.gw);
    let (id, key) = gw.create_key("alice").await;
    assert_eq!(key.len(), 42);
    assert_eq!(id.len(), 21, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()),
        "{id}"
    );
    let row = db.psql(&format!(
        "SELECT user_id, key_prefix, key_hash FROM api_keys WHERE id = '{id}'"
    ));
    let expected_hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    assert_eq!(row, format!("alice|{}|{expected_hash}", &key[..11]));
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    // A user the engine does not have.
    let (status, body) = gw
        .admin_call(
            "POST",
            "/admin/v1/keys",
            Some(serde_json::json!({"userId": "mallory"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("mallory"),
        "{body}"
    );
    // Owners: set in the engine's table, and said so; never removed here.
    let (status, body) = gw
        .admin_call(
            "PUT",
            "/admin/v1/workflows/wf",
            Some(serde_json::json!({"userId": "bob"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["note"].as_str().unwrap().contains("engine"), "{body}");
    assert_eq!(
        db.psql("SELECT user_id FROM workflows WHERE id = 'wf'"),
        "bob"
    );
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 403);
    let (status, body) = gw
        .admin_call("DELETE", "/admin/v1/workflows/wf", None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("engine"), "{body}");
    // Revoking deletes the row, as the engine's panel does.
    assert_eq!(gw.revoke(&id).await, 200);
    assert_eq!(
        db.psql(&format!("SELECT count(*) FROM api_keys WHERE id = '{id}'")),
        "0"
    );
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 401);
}

#[tokio::test]
async fn deletions_and_owner_changes_in_the_engine_take_effect_at_once() {
    let f = front(true, "").await;
    let (db, gw, upstream, prepared, dir) = (&f.db, &f.gw, &f.upstream, &f.prepared, &f.dir);
    assert!(
        prepared.contains("trigger keygate_notify on api_keys: created"),
        "{prepared}"
    );
    let sql = db.client().await;
    let mut client = KeepAlive::connect(gw.listen).await;
    let mut delays = Vec::new();
    for i in 0..100 {
        let key = engine_key();
        insert_engine_key(db, &format!("d{i}"), "alice", &key);
        // Cached: the next calls are answered from memory.
        assert_eq!(client.post("wf", &key.key).await, 200);
        assert_eq!(client.post("wf", &key.key).await, 200);
        sql.execute("DELETE FROM api_keys WHERE id = $1", &[&format!("d{i}")])
            .await
            .unwrap();
        let deleted = Instant::now();
        delays.push(
            until_status(
                &mut client,
                "wf",
                &key.key,
                401,
                deleted,
                Duration::from_secs(2),
            )
            .await,
        );
    }
    delays.sort();
    let (p50, p99) = (percentile(&delays, 0.50), percentile(&delays, 0.99));
    println!(
        "DELETE FROM api_keys to 401, over 100 deletions: p50 {p50:?}, p99 {p99:?}, max {:?}",
        delays[99]
    );
    assert!(p99 <= Duration::from_millis(100), "p99 {p99:?}");
    // An owner change in the engine: the old owner's key is refused at once.
    let key = engine_key();
    insert_engine_key(db, "owner_key", "alice", &key);
    assert_eq!(client.post("wf", &key.key).await, 200);
    sql.execute("UPDATE workflows SET user_id = 'bob' WHERE id = 'wf'", &[])
        .await
        .unwrap();
    let moved = Instant::now();
    let took = until_status(
        &mut client,
        "wf",
        &key.key,
        403,
        moved,
        Duration::from_millis(500),
    )
    .await;
    println!("UPDATE workflows SET user_id to 403: {took:?}");
    assert!(took <= Duration::from_millis(100), "{took:?}");
    // A second prepare changes nothing.
    let again = prepare(&pg_config(dir, db, &upstream.url(), "")).await;
    assert!(again.lines().all(|l| l.contains("unchanged")), "{again}");
}

#[tokio::test]
async fn without_the_triggers_a_deletion_is_honoured_within_the_ttl_bound() {
    let bound = Duration::from_millis(400);
    let f = front(
        false,
        "cache:\n  keys:\n    ttl: 60s\n    ttl_without_notify: 400ms\n",
    )
    .await;
    let (db, gw) = (&f.db, &f.gw);
    let mut client = KeepAlive::connect(gw.listen).await;
    for i in 0..5 {
        let key = engine_key();
        insert_engine_key(db, &format!("t{i}"), "alice", &key);
        assert_eq!(client.post("wf", &key.key).await, 200);
        let cached_at = Instant::now();
        db.psql(&format!("DELETE FROM api_keys WHERE id = 't{i}'"));
        // From when it was cached: no answer outlives the bound.
        let took = until_status(
            &mut client,
            "wf",
            &key.key,
            401,
            cached_at,
            Duration::from_secs(2),
        )
        .await;
        assert!(took <= bound + Duration::from_millis(150), "{took:?}");
    }
}

#[tokio::test]
async fn a_killed_listener_is_replaced_and_the_caches_flushed() {
    let f = front(true, "").await;
    let (db, gw) = (&f.db, &f.gw);
    assert_eq!(gw.metric("keygate_cache_flushes_total").await, "1");
    let killed = db.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'keygate listener'",
    );
    assert_eq!(killed, "1");
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.metric("keygate_cache_flushes_total").await == "2"
        })
        .await,
        "the listener did not come back and flush"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.admin_call("GET", "/readyz", None).await.0 == 200
        })
        .await
    );
    // And it listens again: a deletion is seen at once.
    let key = engine_key();
    insert_engine_key(db, "after", "alice", &key);
    let mut client = KeepAlive::connect(gw.listen).await;
    assert_eq!(client.post("wf", &key.key).await, 200);
    db.psql("DELETE FROM api_keys WHERE id = 'after'");
    until_status(
        &mut client,
        "wf",
        &key.key,
        401,
        Instant::now(),
        Duration::from_millis(500),
    )
    .await;
}

#[tokio::test]
async fn a_database_outage_never_lets_an_unknown_or_deleted_key_through_and_heals() {
    let mut f = front(true, "").await;
    let (cached, deleted, unknown) = (engine_key(), engine_key(), engine_key());
    insert_engine_key(&f.db, "cached", "alice", &cached);
    insert_engine_key(&f.db, "deleted", "alice", &deleted);
    let mut client = KeepAlive::connect(f.gw.listen).await;
    assert_eq!(client.post("wf", &cached.key).await, 200);
    assert_eq!(client.post("wf", &deleted.key).await, 200);
    f.db.psql("DELETE FROM api_keys WHERE id = 'deleted'");
    until_status(
        &mut client,
        "wf",
        &deleted.key,
        401,
        Instant::now(),
        Duration::from_secs(1),
    )
    .await;

    // Calls keep coming while the database stops and starts again.
    let listen = f.gw.listen;
    let keys = (deleted.key.clone(), unknown.key.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut client = KeepAlive::connect(listen).await;
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                seen.push(("deleted", client.post("wf", &keys.0).await));
                seen.push(("unknown", client.post("wf", &keys.1).await));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.db.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            f.gw.admin_call("GET", "/readyz", None).await.0 == 503
        })
        .await,
        "/readyz still ready with the database down"
    );
    // The cached key still serves; a key not cached cannot be checked.
    assert_eq!(client.post("wf", &cached.key).await, 200);
    let fresh = engine_key();
    assert_eq!(client.post("wf", &fresh.key).await, 503);
    f.db.restart();
    // Back on its own: ready, and a key written after the outage works.
    assert!(
        eventually(Duration::from_secs(10), || async {
            f.gw.admin_call("GET", "/readyz", None).await.0 == 200
        })
        .await,
        "/readyz did not recover"
    );
    insert_engine_key(&f.db, "fresh", "alice", &fresh);
    until_status(
        &mut client,
        "wf",
        &fresh.key,
        200,
        Instant::now(),
        Duration::from_secs(5),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = traffic.await.unwrap();
    assert!(seen.len() > 20, "{}", seen.len());
    let passed: Vec<_> = seen
        .iter()
        .filter(|(_, s)| (200..300).contains(s))
        .collect();
    assert!(passed.is_empty(), "let through: {passed:?}");
    assert!(seen.iter().all(|(_, s)| *s == 401 || *s == 503), "{seen:?}");
}

#[tokio::test]
async fn last_used_goes_to_the_engines_column_in_one_statement_per_flush() {
    let f = front(false, "usage:\n  flush_interval: 200ms\n").await;
    let (db, gw) = (&f.db, &f.gw);
    // Counts the statements (not rows) that write last_used_at.
    db.psql(
        "CREATE TABLE flushes (n int);
         CREATE FUNCTION count_flush() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO flushes VALUES (1); RETURN NULL; END $$;
         CREATE TRIGGER count_flush AFTER UPDATE OF last_used_at ON api_keys FOR EACH STATEMENT EXECUTE FUNCTION count_flush();",
    );
    let (a, b) = (engine_key(), engine_key());
    insert_engine_key(db, "a", "alice", &a);
    insert_engine_key(db, "b", "alice", &b);
    let started = Instant::now();
    let mut client = KeepAlive::connect(gw.listen).await;
    for _ in 0..500 {
        assert_eq!(client.post("wf", &a.key).await, 200);
        assert_eq!(client.post("wf", &b.key).await, 200);
    }
    let sent = started.elapsed();
    assert!(
        eventually(Duration::from_secs(5), || async {
            db.psql("SELECT count(*) FROM api_keys WHERE last_used_at IS NOT NULL") == "2"
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let statements: u32 = db.psql("SELECT count(*) FROM flushes").parse().unwrap();
    // At most one statement per interval (and one more for the last batch),
    // for 1,000 requests.
    let intervals = u32::try_from(sent.as_millis() / 200).unwrap() + 3;
    assert!(
        statements <= intervals,
        "{statements} statements in {sent:?}"
    );
    println!("1,000 requests over {sent:?}: {statements} last_used_at statements");
    // Times are UTC, as the engine keeps them, and never move back.
    let skew: f64 = db
        .psql("SELECT abs(extract(epoch FROM (now() AT TIME ZONE 'UTC') - last_used_at)) FROM api_keys WHERE id = 'a'")
        .parse()
        .unwrap();
    assert!(skew < 10.0, "last_used_at is {skew} s from UTC now");
    db.psql("UPDATE api_keys SET last_used_at = '2999-01-01' WHERE id = 'a'");
    assert_eq!(client.post("wf", &a.key).await, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        db.psql("SELECT last_used_at FROM api_keys WHERE id = 'a'"),
        "2999-01-01 00:00:00"
    );
}

#[tokio::test]
async fn a_mapping_that_does_not_fit_the_tables_is_refused_at_start() {
    let db = engine();
    let dir = tempfile::tempdir().unwrap();
    let mapped = format!(
        "store:\n  postgres:\n    url: \"{}\"\n    tables:\n      api_keys: {{key_hash: hash}}\n      workflows: {{table: flows}}\n",
        db.url()
    );
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nupstream: \"http://127.0.0.1:9\"\n{mapped}admin:\n  listen: \"127.0.0.1:0\"\n  token_file: \"{}\"\n",
        dir.path().join("admin.token").display()
    );
    let config = Config::from_yaml(&yaml, dir.path()).unwrap();
    let e = keygate::server::start(config).await.err().unwrap();
    assert!(e.contains("store.postgres.tables.api_keys.key_hash"), "{e}");
    assert!(e.contains("\"hash\""), "{e}");
    assert!(
        e.contains("store.postgres.tables.workflows: table \"flows\" does not exist"),
        "{e}"
    );
}

/// A CA, and a server certificate it signed for `localhost` only.
fn ca_and_server() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

async fn ping(url: &str, base: &std::path::Path) -> Result<(), String> {
    let yaml = format!("store:\n  postgres:\n    url: \"{url}\"\n    timeout: 2s\n");
    let config = Config::from_yaml(&yaml, base).map_err(|e| e.0)?;
    let StoreConfig::Postgres(pg) = config.store else {
        unreachable!()
    };
    let store = keygate::store::postgres::PostgresStore::connect(&pg).map_err(|e| e.to_string())?;
    keygate::store::Store::ping(&store)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn tls_to_the_database_follows_sslmode() {
    let (ca, cert, key) = ca_and_server();
    let db = PostgresServer::start_tls(&cert, &key);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
    let (other_ca, _, _) = ca_and_server();
    std::fs::write(dir.path().join("other.pem"), &other_ca).unwrap();
    let base = dir.path();
    // Encrypted, certificate unchecked (libpq's require).
    ping(&db.url_with("127.0.0.1", "sslmode=require"), base)
        .await
        .unwrap();
    // Chain and name checked.
    ping(
        &db.url_with("localhost", "sslmode=verify-full&sslrootcert=ca.pem"),
        base,
    )
    .await
    .unwrap();
    // verify-ca checks the chain only: an address the certificate does not name.
    ping(
        &db.url_with("127.0.0.1", "sslmode=verify-ca&sslrootcert=ca.pem"),
        base,
    )
    .await
    .unwrap();
    let wrong_name = ping(
        &db.url_with("127.0.0.1", "sslmode=verify-full&sslrootcert=ca.pem"),
        base,
    )
    .await
    .unwrap_err();
    assert!(wrong_name.contains("unavailable"), "{wrong_name}");
    let wrong_ca = ping(
        &db.url_with("localhost", "sslmode=verify-full&sslrootcert=other.pem"),
        base,
    )
    .await
    .unwrap_err();
    assert!(wrong_ca.contains("unavailable"), "{wrong_ca}");
    // require with a root: acts as verify-ca, as libpq does.
    assert!(
        ping(
            &db.url_with("localhost", "sslmode=require&sslrootcert=other.pem"),
            base
        )
        .await
        .is_err()
    );
    // Refused cleanly when it cannot be done.
    let missing = Config::from_yaml(
        &format!(
            "store:\n  postgres:\n    url: \"{}\"\n",
            db.url_with("localhost", "sslmode=verify-full")
        ),
        base,
    )
    .unwrap_err();
    assert!(missing.0.contains("sslrootcert"), "{}", missing.0);
    let plain = PostgresServer::start();
    let refused = ping(&plain.url_with("127.0.0.1", "sslmode=require"), base)
        .await
        .unwrap_err();
    assert!(refused.contains("unavailable"), "{refused}");
    ping(&plain.url_with("127.0.0.1", "sslmode=prefer"), base)
        .await
        .unwrap();
}

#[test]
fn sslmode_is_read_as_libpq_reads_it() {
    let mode = |query: &str| {
        let yaml = format!("store:\n  postgres:\n    url: \"postgres://u@h/db?{query}\"\n");
        match Config::from_yaml(&yaml, std::path::Path::new("/etc/keygate")) {
            Ok(c) => match c.store {
                StoreConfig::Postgres(pg) => Ok(pg.tls),
                _ => unreachable!(),
            },
            Err(e) => Err(e.0),
        }
    };
    assert_eq!(mode(""), Ok(PgTls::Prefer));
    assert_eq!(mode("sslmode=disable"), Ok(PgTls::Disable));
    assert_eq!(mode("sslmode=require"), Ok(PgTls::Require { roots: None }));
    assert_eq!(
        mode("sslmode=verify-full&sslrootcert=ca.pem"),
        Ok(PgTls::VerifyFull {
            roots: keygate::config::RootCerts::File("/etc/keygate/ca.pem".into())
        })
    );
    assert_eq!(
        mode("sslrootcert=system&sslmode=verify-ca"),
        Ok(PgTls::VerifyCa {
            roots: keygate::config::RootCerts::System
        })
    );
    assert!(mode("sslmode=allow-ish").unwrap_err().contains("sslmode"));
    assert!(
        mode("nonsense=1")
            .unwrap_err()
            .contains("store.postgres.url")
    );
}

#[tokio::test]
async fn key_policies_need_store_prepare_then_work_on_the_engines_keys() {
    // Without keygate's tables: a policy is refused saying what to run;
    // plain keys and the engine's own keep working.
    let f = front(false, "keys:\n  sweep_interval: 1s\n").await;
    let (status, body) =
        f.gw.admin_call(
            "POST",
            "/admin/v1/keys",
            Some(serde_json::json!({"userId": "alice", "expiresIn": "1h"})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("store prepare"),
        "{body}"
    );
    let (plain_id, plain) = f.gw.create_key("alice").await;
    assert_eq!(f.gw.webhook("wf", Some(&bearer(&plain))).await.0, 200);
    // A roll with a grace needs the tables too, and is refused before a
    // successor exists.
    let keys_before = f.gw.list_keys("alice").await.as_array().unwrap().len();
    let (status, body) =
        f.gw.admin_call(
            "POST",
            &format!("/admin/v1/keys/{plain_id}/roll"),
            Some(serde_json::json!({"grace": "1h"})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("store prepare"),
        "{body}"
    );
    assert_eq!(
        f.gw.list_keys("alice").await.as_array().unwrap().len(),
        keys_before
    );
    drop(f);

    let f = front(true, "keys:\n  sweep_interval: 1s\n").await;
    assert!(
        f.prepared.contains("keygate_key_policies: created"),
        "{}",
        f.prepared
    );
    assert!(
        f.prepared.contains("keygate_audit: created"),
        "{}",
        f.prepared
    );
    let gw = &f.gw;
    let create = |body: serde_json::Value| async move {
        let (status, v) = gw.admin_call("POST", "/admin/v1/keys", Some(body)).await;
        assert_eq!(status, 201, "{v}");
        v
    };
    // Expiry: refused after, even though cached; swept from the engine's
    // table and audited.
    let expiring = create(serde_json::json!({"userId": "alice", "expiresIn": "1s"})).await;
    let key = expiring["key"].as_str().unwrap().to_owned();
    let id = expiring["id"].as_str().unwrap().to_owned();
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    assert!(
        eventually(Duration::from_secs(3), || async {
            gw.webhook("wf", Some(&bearer(&key))).await.0 == 401
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            f.db.psql(&format!("SELECT count(*) FROM api_keys WHERE id = '{id}'")) == "0"
        })
        .await,
        "the expired key's row was not swept"
    );
    // Scopes and a rate, kept in keygate's table beside the engine's row.
    let scoped =
        create(serde_json::json!({"userId": "alice", "workflows": ["wf"], "rate": "2/1m"})).await;
    let key = scoped["key"].as_str().unwrap().to_owned();
    let id = scoped["id"].as_str().unwrap().to_owned();
    assert_eq!(
        f.db.psql(&format!(
            "SELECT workflows, rate FROM keygate_key_policies WHERE key_id = '{id}'"
        )),
        "{wf}|2/1m"
    );
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    assert_eq!(gw.webhook("wf", Some(&bearer(&key))).await.0, 429);
    // Roll with a grace: the old row gets an expiry, the new one the same
    // scopes and rate.
    let (status, rolled) = gw
        .admin_call(
            "POST",
            &format!("/admin/v1/keys/{id}/roll"),
            Some(serde_json::json!({"grace": "1s"})),
        )
        .await;
    assert_eq!(status, 201, "{rolled}");
    assert_eq!(rolled["workflows"], serde_json::json!(["wf"]));
    let new = rolled["key"].as_str().unwrap().to_owned();
    assert_eq!(gw.webhook("wf", Some(&bearer(&new))).await.0, 200);
    assert!(
        eventually(Duration::from_secs(3), || async {
            gw.webhook("wf", Some(&bearer(&key))).await.0 == 401
        })
        .await
    );
    // An engine key (no policy row) is listed among every user's.
    let engine = engine_key();
    insert_engine_key(&f.db, "engine_key_1", "alice", &engine);
    let (_, all) = gw.admin_call("GET", "/admin/v1/keys?all=true", None).await;
    assert!(all.to_string().contains("engine_key_1"), "{all}");
    let (status, audit) = gw.admin_call("GET", "/admin/v1/audit", None).await;
    assert_eq!(status, 200, "{audit}");
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in ["key.created", "key.expired", "key.rolled"] {
        assert!(actions.contains(&action), "{action}: {audit}");
    }
    // The sweep's entry says when the key expired (the revoke returned its
    // policy row).
    let expired = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "key.expired")
        .unwrap();
    assert!(
        expired["detail"].as_str().unwrap().starts_with("expired "),
        "{expired}"
    );
}

//! In front of an existing engine from the command line: `store prepare`
//! on the engine's database, `serve` on it with and without the triggers,
//! and the key and owner commands on the engine's tables.

use super::*;

fn engine_setup(db: &common::PostgresServer) -> Setup {
    db.psql("INSERT INTO users (id) VALUES ('u1'), ('u2')");
    db.psql("INSERT INTO workflows (id, name, user_id, nodes, edges) VALUES ('wf_1', 'one', 'u1', '[]', '[]')");
    let setup = Setup::new(format!(
        "store:\n  postgres:\n    url: \"{}\"\n    timeout: 1s\n",
        db.url()
    ));
    // Access logs on: they must hold no key either.
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        yaml.replace("log:\n  access: false\n", "log:\n  access: true\n"),
    )
    .unwrap();
    setup
}

#[test]
fn store_prepare_prints_each_change_and_changes_nothing_the_second_time() {
    let db = common::PostgresServer::start();
    let setup = engine_setup(&db);
    let first = setup.ok(&["store", "prepare"]);
    for expected in [
        "function keygate_notify_api_keys(): created",
        "trigger keygate_notify on api_keys: created",
        "trigger keygate_notify_truncate on api_keys: created",
        "function keygate_notify_workflows(): created",
        "trigger keygate_notify on workflows: created",
        "index on api_keys (key_hash): created (keygate_api_keys_key_hash)",
    ] {
        assert!(first.contains(expected), "{expected:?} not in:\n{first}");
    }
    let second = setup.ok(&["store", "prepare"]);
    assert_eq!(second.lines().count(), first.lines().count(), "{second}");
    assert!(
        second
            .lines()
            .all(|l| l.ends_with("unchanged") || l.contains("unchanged (")),
        "{second}"
    );
    // A trigger dropped by hand is made again, and only it.
    db.psql("DROP TRIGGER keygate_notify ON workflows");
    let third = setup.ok(&["store", "prepare"]);
    assert!(
        third.contains("trigger keygate_notify on workflows: created"),
        "{third}"
    );
    assert_eq!(third.matches("created").count(), 1, "{third}");
    assert_eq!(
        db.psql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'keygate_api_keys_key_hash'::regclass"),
        "t"
    );
}

#[test]
fn store_prepare_on_another_store_or_an_unreachable_database_says_so() {
    let embedded = Setup::embedded();
    let line = one_line_failure(&embedded.run(&["store", "prepare"]));
    assert!(
        line.contains("postgres store") && line.contains("embedded"),
        "{line}"
    );
    let (socket, port) = reserved_port();
    let down = Setup::new(format!(
        "store:\n  postgres:\n    url: \"postgres://keygate@127.0.0.1:{port}/postgres?sslmode=disable\"\n    timeout: 500ms\n"
    ));
    let line = one_line_failure(&down.run(&["store", "prepare"]));
    assert!(
        line.contains("cannot reach the engine's database"),
        "{line}"
    );
    assert!(line.contains("postgres"), "{line}");
    drop(socket);
}

#[test]
fn serving_an_engine_without_the_triggers_warns_and_keys_stay_out_of_logs_and_tables() {
    let db = common::PostgresServer::start();
    let mut setup = engine_setup(&db);
    let server = setup.serve();
    let log = server.wait_for_log("keygate store prepare");
    assert!(log.contains("ttl_without_notify"), "{log}");
    let key = setup.create_key("u1");
    assert_eq!(key.len(), 42);
    assert_eq!(call_webhook(setup.listen_port, &key), Some(502));
    // Owners are the engine's.
    let out = setup.ok(&["workflows", "set-owner", "wf_1", "u2"]);
    assert!(out.contains("engine's workflows table"), "{out}");
    let line = one_line_failure(&setup.run(&["workflows", "remove", "wf_1"]));
    assert!(line.contains("engine"), "{line}");
    let line = one_line_failure(&setup.run(&["keys", "create", "--user", "nobody"]));
    assert!(
        line.contains("unknown user") && line.contains("nobody"),
        "{line}"
    );
    let listed = list_json(&setup, "u1");
    assert_eq!(listed.len(), 1);
    server.wait_for_log("keygate::access");
    db.psql("CHECKPOINT");
    let needle = key.as_bytes();
    let bytes = db.data_bytes();
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle),
        "the full key is in the database files"
    );
    assert!(!server.log().contains(&key), "the full key is in the log");
    assert!(
        !db.log().contains(&key),
        "the full key is in postgres's log"
    );
}

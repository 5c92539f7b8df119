//! Parsing and checking configs, message by message.

use super::validate::{parse_duration, upstream};
use super::*;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(yaml, Path::new("/etc/keygate"))
}

#[test]
fn example_config_is_valid() {
    let text = include_str!("../../config.example.yaml");
    let c = parse(text).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert!(matches!(c.store, StoreConfig::Embedded { .. }));
    assert_eq!(c.routes[0].path, DEFAULT_ROUTE);
}

#[test]
fn empty_config_takes_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.upstream.authority, "127.0.0.1:3000");
    assert_eq!(c.cache.keys.ttl, Duration::from_secs(60));
    assert_eq!(c.cache.negative.ttl, Duration::from_secs(5));
    assert_eq!(c.limits.max_body_bytes, 1 << 20);
    assert_eq!(
        c.admin.token_file,
        Path::new("/etc/keygate/data/admin.token")
    );
    assert!(c.cors.is_some());
    assert_eq!(c.worker_policy, WorkerPolicy::Batch);
    assert_eq!(c.worker_cpu_affinity, WorkerAffinity::Auto);
    let off = parse("worker_cpu_affinity: none\n").unwrap();
    assert_eq!(off.worker_cpu_affinity, WorkerAffinity::Unpinned);
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let e = parse("listen: \"127.0.0.1:1\"\nadmin:\n  listen: \"127.0.0.1:2\"\n  tokne: x\n")
        .unwrap_err()
        .0;
    assert!(e.contains("tokne"), "{e}");
    assert!(e.contains("line 4"), "{e}");
}

#[test]
fn unknown_top_level_key_is_named() {
    let e = parse("listen: \"127.0.0.1:1\"\nupstreem: x\n")
        .unwrap_err()
        .0;
    assert!(e.contains("upstreem") && e.contains("line 2"), "{e}");
}

#[test]
fn secrets_come_from_the_environment() {
    let env = |name: &str| (name == "ADMIN_TOKEN").then(|| "0123456789abcdef-token".to_owned());
    let base = Path::new("/");
    let c = Config::from_yaml_with_env("admin:\n  token: ${ADMIN_TOKEN}\n", base, &env).unwrap();
    assert_eq!(c.admin.token.as_deref(), Some("0123456789abcdef-token"));
    let e = Config::from_yaml_with_env("admin:\n  token: ${UNSET_VARIABLE}\n", base, &env)
        .unwrap_err()
        .0;
    assert!(e.contains("UNSET_VARIABLE"), "{e}");
}

#[test]
fn bad_values_are_explained() {
    for (yaml, needle) in [
        ("listen: nowhere\n", "listen"),
        ("upstream: ftp://x\n", "upstream"),
        ("cache:\n  keys:\n    ttl: soon\n", "cache.keys.ttl"),
        (
            "store:\n  embedded: {}\n  redis: {url: \"redis://x:1\"}\n",
            "not several",
        ),
        (
            "store:\n  postgres: {url: \"mysql://x\"}\n",
            "store.postgres.url",
        ),
        (
            "store:\n  postgres: {url: \"postgres://h/db\"}\n",
            "store.postgres.url: no user",
        ),
        (
            "store:\n  postgres: {url: \"postgres://u@h/db\", pool_size: 0}\n",
            "store.postgres.pool_size",
        ),
        (
            "store:\n  postgres: {url: \"postgres://u@h/db\", channel: \"a-b\"}\n",
            "store.postgres.channel",
        ),
        (
            "store:\n  postgres:\n    url: \"postgres://u@h/db\"\n    tables: {api_keys: {key_hash: \"x; DROP\"}}\n",
            "store.postgres.tables.api_keys.key_hash",
        ),
        (
            "store:\n  postgres:\n    url: \"postgres://u@h/db\"\n    tables: {users: {table: \"a.b.c\"}}\n",
            "store.postgres.tables.users.table",
        ),
        (
            "store:\n  postgres:\n    url: \"postgres://u@h/db\"\n    tables: {keys: {}}\n",
            "keys",
        ),
        (
            "cache:\n  keys:\n    ttl_without_notify: 0s\n",
            "cache.keys.ttl_without_notify",
        ),
        (
            "egress:\n  listen: \"127.0.0.1:1\"\n",
            "needs vault.master_keys",
        ),
        ("vault:\n  master_keys: []\n", "vault.master_keys"),
        (
            "vault:\n  master_keys: [{id: k1, key: \"not-hex-secret\"}]\n",
            "vault.master_keys[0].key: expected 64 hex characters",
        ),
        (
            "vault:\n  master_keys: [{id: k1, key: \"${X}\"}, {id: k1, key: \"${X}\"}]\n",
            "listed twice",
        ),
        (
            "vault:\n  master_keys: [{id: k1, key: \"${X}\"}]\negress:\n  providers:\n    acme: {base_url: \"http://acme\"}\n",
            "egress.providers.acme.base_url: expected https://",
        ),
        (
            "vault:\n  master_keys: [{id: k1, key: \"${X}\"}]\negress:\n  providers:\n    acme: {base_url: \"https://acme\"}\n",
            "egress.providers.acme.inject: required",
        ),
        ("routes:\n  - path: /no/capture\n", "routes[0].path"),
        ("log:\n  format: xml\n", "log.format"),
        ("headers:\n  user_id: \"bad header\"\n", "headers.user_id"),
        ("worker_policy: fifo\n", "worker_policy"),
        ("worker_cpu_affinity: 0-1\n", "worker_cpu_affinity"),
        ("listen: [1, 2]\n", "line 1"),
        ("usage:\n  flush_interval: 0s\n", "usage.flush_interval"),
        (
            "store:\n  redis: {url: \"redis://x:1\", insecure: true}\n",
            "ca_file and insecure are for rediss://",
        ),
        (
            "store:\n  redis: {url: \"redis://x:1\", cluster: [\"redis://y:1\"]}\n",
            "not both",
        ),
        (
            "store:\n  redis: {cluster: [\"redis://y:1\", \"rediss://z:1\"]}\n",
            "all redis:// or all rediss://",
        ),
        (
            "store:\n  redis: {cluster: []}\n",
            "store.redis.cluster: list at least one",
        ),
    ] {
        let env = |_: &str| Some("ab".repeat(32));
        let e = Config::from_yaml_with_env(yaml, Path::new("/"), &env)
            .unwrap_err()
            .0;
        assert!(e.contains(needle), "{yaml:?} gave {e}");
        assert!(!e.contains("not-hex-secret"), "{e}");
    }
}

#[test]
fn debug_output_hides_secrets() {
    let env = |_: &str| Some("s3cret-admin-token-0123".to_owned());
    let c = Config::from_yaml_with_env(
        "store:\n  redis:\n    url: \"redis://:hunter2@db:6379\"\nadmin:\n  token: ${T}\n",
        Path::new("/"),
        &env,
    )
    .unwrap();
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret"),
        "{shown}"
    );
    let c =
        parse("store:\n  postgres:\n    url: \"postgres://u:hunter2@db/engine?sslmode=require\"\n")
            .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("engine"), "{shown}");
    let env = |_: &str| Some("ab".repeat(32));
    let c = Config::from_yaml_with_env(
        "vault:\n  master_keys: [{id: k1, key: \"${K}\"}]\negress:\n  mint_token: \"mint-secret-0123456789\"\n",
        Path::new("/"),
        &env,
    )
    .unwrap();
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("abab") && !shown.contains("mint-secret"),
        "{shown}"
    );
}

#[test]
fn a_postgres_store_defaults_to_the_templates_tables() {
    let c = parse("store:\n  postgres:\n    url: \"postgres://u@db/engine\"\n").unwrap();
    let StoreConfig::Postgres(pg) = c.store else {
        panic!("{:?}", c.store)
    };
    assert_eq!(pg.tables.api_keys.table, "api_keys");
    assert_eq!(pg.tables.api_keys.key_hash, "key_hash");
    assert_eq!(pg.tables.workflows.user_id, "user_id");
    assert_eq!(pg.tables.users.table, "users");
    assert_eq!(pg.channel, "keygate_invalidate");
    assert_eq!(pg.pool_size, 4);
    assert_eq!(pg.timeout, Duration::from_secs(2));
    assert_eq!(pg.connect.get_application_name(), Some("keygate"));
    assert_eq!(
        pg.connect.get_connect_timeout(),
        Some(&Duration::from_secs(2))
    );
    assert_eq!(
        pg.connect.get_options(),
        Some("-c statement_timeout=2000 -c TimeZone=UTC")
    );
    assert_eq!(c.cache.ttl_without_notify, Duration::from_secs(1));
    assert!(c.admin.token_file.ends_with("data/admin.token"));
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("5"), None);
    assert_eq!(parse_duration("s"), None);
}

#[test]
fn hardening_limits_have_defaults_and_are_checked() {
    let c = parse("").unwrap();
    assert_eq!(c.limits.send_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.max_header_bytes, 64 * 1024);
    assert_eq!(c.limits.max_connections, None);
    assert_eq!(c.limits.max_connections_per_ip, 0);
    assert_eq!(c.limits.h2_idle_timeout, Duration::from_secs(60));
    let names: Vec<&str> = c.headers.strip.iter().map(HeaderName::as_str).collect();
    assert_eq!(names, DEFAULT_STRIP);
    let none = parse("headers:\n  strip: []\n").unwrap();
    assert!(none.headers.strip.is_empty());
    for (yaml, needle) in [
        ("limits:\n  send_timeout: 0s\n", "limits.send_timeout"),
        (
            "limits:\n  max_header_bytes: 10\n",
            "limits.max_header_bytes",
        ),
        ("limits:\n  max_connections: 0\n", "limits.max_connections"),
        ("headers:\n  strip: [\"bad name\"]\n", "headers.strip"),
    ] {
        let env = |_: &str| Some("ab".repeat(32));
        let e = Config::from_yaml_with_env(yaml, Path::new("/"), &env)
            .unwrap_err()
            .0;
        assert!(e.contains(needle), "{yaml:?} gave {e}");
        assert!(!e.contains("not-hex-secret"), "{e}");
    }
}

#[test]
fn a_value_of_the_wrong_type_names_its_field() {
    for (yaml, field) in [
        ("workers: \"two\"\n", "workers"),
        ("limits:\n  max_body_bytes: lots\n", "limits.max_body_bytes"),
        (
            "routes:\n  - path: /x/{workflow}\n    methods: POST\n",
            "routes[0].methods",
        ),
    ] {
        let e = parse(yaml).unwrap_err().0;
        assert!(e.starts_with(&format!("{field}: ")), "{yaml:?} gave {e}");
        assert!(e.contains("line"), "{e}");
    }
}

#[test]
fn host_names_in_listen_resolve_or_ask_for_an_ip() {
    let c = parse("listen: \"localhost:8081\"\n").unwrap();
    assert!(c.listen.ip().is_loopback());
    assert_eq!(c.listen.port(), 8081);
    let e = parse("listen: \"no-such-host.invalid:8080\"\n")
        .unwrap_err()
        .0;
    assert!(e.contains("give an IP address"), "{e}");
    let e = parse("listen: \"localhost\"\n").unwrap_err().0;
    assert!(e.contains("expected an address"), "{e}");
}

#[test]
fn paths_read_as_an_operator_would_write_them() {
    let c = Config::from_yaml(
        "store:\n  embedded:\n    path: ./data/./kg.redb\n",
        Path::new("./conf/."),
    )
    .unwrap();
    let StoreConfig::Embedded { path } = &c.store else {
        panic!()
    };
    assert_eq!(path, Path::new("./conf/data/kg.redb"));
    assert!(!c.admin.token_file.display().to_string().contains("/./"));
}

#[test]
fn a_reload_tells_what_needs_a_restart_and_keeps_it() {
    let running = parse("").unwrap();
    let mut new =
        parse("listen: \"127.0.0.1:9999\"\nshutdown_timeout: 5s\nlimits:\n  max_body_bytes: 10\n")
            .unwrap();
    assert_eq!(running.needs_restart(&new), ["listen", "shutdown_timeout"]);
    new.keep_restart_only(&running);
    assert_eq!(new.listen, running.listen);
    assert_eq!(new.shutdown_timeout, running.shutdown_timeout);
    assert_eq!(new.limits.max_body_bytes, 10);
    assert!(running.needs_restart(&new).is_empty());
}

#[test]
fn routes_fit_the_metrics_slots() {
    let many: String = (0..crate::metrics::ROUTE_SLOTS)
        .map(|i| format!("  - path: /r{i}/{{workflow}}\n"))
        .collect();
    let e = parse(&format!("routes:\n{many}")).unwrap_err().0;
    assert!(e.contains("at most"), "{e}");
}

#[test]
fn upstream_without_port_gets_80() {
    assert_eq!(
        upstream("u", "http://engine").unwrap().authority,
        "engine:80"
    );
    assert_eq!(
        upstream("u", "http://[::1]:3000/").unwrap().authority,
        "[::1]:3000"
    );
}

#[test]
fn https_upstreams_default_to_443_and_send_the_bare_host() {
    let u = upstream("u", "https://engine.example").unwrap();
    assert_eq!((u.authority.as_str(), u.tls), ("engine.example:443", true));
    assert_eq!(
        (u.host(), u.host_header()),
        ("engine.example", "engine.example")
    );
    let u = upstream("u", "https://127.0.0.1:8443").unwrap();
    assert_eq!((u.host(), u.host_header()), ("127.0.0.1", "127.0.0.1:8443"));
    let u = upstream("u", "http://engine").unwrap();
    assert_eq!(u.host_header(), "engine:80");
    assert!(upstream("u", "ftp://x").unwrap_err().0.contains("https://"));
}

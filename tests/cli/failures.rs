//! Failures: non-zero, nothing on stdout, one line on stderr, never a
//! secret.

use super::*;
use std::path::Path;

#[test]
fn unreachable_admin_api_fails_with_one_line() {
    let setup = Setup::embedded_without_server();
    std::fs::create_dir_all(setup.token_file().parent().unwrap()).unwrap();
    std::fs::write(setup.token_file(), "a-token-for-a-server-that-is-not-there").unwrap();

    for args in [
        &["keys", "list", "--user", "u1"][..],
        &["keys", "create", "--user", "u1"],
        &["keys", "revoke", "key_x"],
        &["workflows", "remove", "wf_1"],
    ] {
        let line = one_line_failure(&setup.run(args));
        assert!(line.contains("cannot reach"), "{args:?}: {line}");
        assert!(line.contains("admin API"), "{args:?}: {line}");
        assert!(
            line.contains(&setup.admin_port.to_string()),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn missing_token_file_fails_pointing_at_keygate_serve() {
    let setup = Setup::embedded_without_server();
    assert!(!setup.token_file().exists());

    let line = one_line_failure(&setup.run(&["keys", "create", "--user", "u1"]));
    assert!(line.contains("token"), "{line}");
    assert!(line.contains("keygate serve"), "{line}");
    assert!(line.contains("admin.token"), "{line}");
}

#[test]
fn missing_config_file_fails_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexistent.yaml");
    for args in [&["keys", "list", "--user", "u1"][..], &["serve"]] {
        let line = one_line_failure(&keygate(&missing, args));
        assert!(
            line.contains(&missing.display().to_string()),
            "{args:?}: {line}"
        );
    }
    let line = one_line_failure(&keygate(
        Path::new("/nonexistent.yaml"),
        &["keys", "list", "--user", "u1"],
    ));
    assert!(line.contains("/nonexistent.yaml"), "{line}");
}

#[test]
fn unknown_config_key_fails_naming_the_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.yaml");
    std::fs::write(
        &config,
        "listen: \"127.0.0.1:8080\"\nupstream: \"http://127.0.0.1:3000\"\nadmn:\n  listen: \"127.0.0.1:9090\"\n",
    )
    .unwrap();
    for args in [&["keys", "list", "--user", "u1"][..], &["serve"]] {
        let line = one_line_failure(&keygate(&config, args));
        assert!(line.contains("admn"), "{args:?}: {line}");
        assert!(line.contains("line 3"), "{args:?}: {line}");
        assert!(
            line.contains(&config.display().to_string()),
            "{args:?}: {line}"
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "a bad config creates nothing"
    );
}

#[test]
fn store_outage_makes_create_fail_with_one_line_about_the_store() {
    let mut setup = Setup::redis_down();
    let _server = setup.serve();

    let line = one_line_failure(&setup.run(&["keys", "create", "--user", "u1"]));
    assert!(line.contains("store unavailable"), "{line}");

    // What the CLI turned into that line: a 503 from the admin API.
    let token = std::fs::read_to_string(setup.token_file()).unwrap();
    let body = r#"{"userId":"u1"}"#;
    let response = http(
        setup.admin_port,
        &format!(
            "POST /admin/v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            token.trim(),
            body.len()
        ),
    )
    .expect("the admin API answers");
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");

    let line = one_line_failure(&setup.run(&["keys", "list", "--user", "u1", "--json"]));
    assert!(line.contains("store unavailable"), "{line}");
}

#[test]
fn logs_show_a_key_by_its_prefix_only() {
    let mut setup = Setup::embedded();
    let yaml = std::fs::read_to_string(&setup.config).unwrap().replace(
        "log:\n  access: false\n",
        "log:\n  access: true\n  format: json\n",
    );
    std::fs::write(&setup.config, &yaml).unwrap();
    let listen: u16 = yaml
        .lines()
        .find_map(|l| l.strip_prefix("listen: \"127.0.0.1:"))
        .and_then(|p| p.trim_end_matches('"').parse().ok())
        .unwrap();
    let server = setup.serve();
    let key = setup.create_key("u1");
    setup.ok(&["workflows", "set-owner", "wf_logged", "u1"]);
    let request = format!(
        "POST /api/workflows/wf_logged/webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-User-Id: spoof\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    // Nothing listens on the upstream port: the call ends in a logged 502.
    let response = http(listen, &request).unwrap();
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    let token = std::fs::read_to_string(setup.token_file()).unwrap();
    let log = server.log();
    let access = log
        .lines()
        .find(|l| l.contains("keygate::access"))
        .unwrap_or_else(|| panic!("no access log line:\n{log}"));
    for field in [
        "\"method\":\"POST\"",
        "\"workflow\":\"wf_logged\"",
        "\"status\":502",
        "\"request_id\"",
        "\"latency_ms\"",
    ] {
        assert!(access.contains(field), "{field} missing from {access}");
    }
    assert!(
        access.contains(&key[..11]),
        "the prefix identifies the key: {access}"
    );
    assert!(!log.contains(&key), "a full key reached the log");
    assert!(
        !log.contains(&keygate::key::KeyHash::of(&key).to_hex()),
        "a key hash reached the log"
    );
    assert!(
        !log.contains(token.trim()),
        "the admin token reached the log"
    );
}

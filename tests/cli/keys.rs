//! The key and workflow commands against a running server, and what they
//! print.

use super::*;
use keygate::key::KeyHash;

#[test]
fn create_prints_a_42_char_key_shown_once() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();

    let stdout = setup.ok(&["keys", "create", "--user", "u1", "--name", "prod"]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got {stdout:?}");
    assert_eq!(stdout, format!("{}\n", lines[0]));
    let key = lines[0];
    assert_eq!(key.len(), 42, "{key:?}");
    assert!(key.starts_with("wfb_"), "{key:?}");
    assert!(keygate::key::is_wfb_key(key), "{key:?}");

    // Shown once: nothing afterwards prints it again.
    let listed = setup.ok(&["keys", "list", "--user", "u1"]);
    let listed_json = setup.ok(&["keys", "list", "--user", "u1", "--json"]);
    assert!(!listed.contains(key), "{listed}");
    assert!(!listed_json.contains(key), "{listed_json}");
    assert!(listed.contains(&key[..11]), "the table shows the prefix");
}

#[test]
fn create_json_prints_id_name_prefix_created_at_and_key() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();

    let stdout = setup.ok(&["keys", "create", "--user", "u1", "--json"]);
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    let created = parse_json(&stdout);
    let object = created.as_object().expect("an object");
    let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["createdAt", "id", "key", "keyPrefix", "name"]);

    let key = created["key"].as_str().unwrap();
    assert_eq!(key.len(), 42);
    assert!(key.starts_with("wfb_"));
    assert_eq!(created["keyPrefix"].as_str().unwrap(), &key[..11]);
    assert!(!created["id"].as_str().unwrap().is_empty());
    assert_eq!(created["name"], "");
    let created_at = created["createdAt"].as_str().unwrap();
    assert_eq!(created_at.len(), "2026-01-02T03:04:05.678Z".len());
    assert!(created_at.ends_with('Z'), "{created_at}");
}

#[test]
fn list_json_shows_metadata_only_newest_first() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();

    let first = created_json(&setup, "u1", "first");
    wait_for_clock_past(first["createdAt"].as_str().unwrap());
    let second = created_json(&setup, "u1", "second");
    created_json(&setup, "someone-else", "other");

    let stdout = setup.ok(&["keys", "list", "--user", "u1", "--json"]);
    let listed = list_json(&setup, "u1");
    assert_eq!(listed.len(), 2, "{stdout}");
    for item in &listed {
        let mut fields: Vec<&str> = item
            .as_object()
            .expect("objects")
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "createdAt",
                "expiresAt",
                "id",
                "keyPrefix",
                "lastUsedAt",
                "name",
                "rate",
                "workflows"
            ]
        );
        assert!(
            item["expiresAt"].is_null() && item["workflows"].is_null() && item["rate"].is_null()
        );
        assert!(item["lastUsedAt"].is_null(), "{item}");
    }

    // Newest first.
    assert_eq!(listed[0]["id"], second["id"]);
    assert_eq!(listed[1]["id"], first["id"]);
    for (item, created) in [(&listed[0], &second), (&listed[1], &first)] {
        let key = created["key"].as_str().unwrap();
        assert_eq!(item["keyPrefix"].as_str().unwrap(), &key[..11]);
        assert_eq!(item["name"], created["name"]);
        assert_eq!(item["createdAt"], created["createdAt"]);
        assert!(!stdout.contains(key), "full key listed: {stdout}");
        let hash = KeyHash::of(key).to_hex();
        assert!(!stdout.contains(&hash), "key hash listed: {stdout}");
        assert!(
            !stdout.to_ascii_lowercase().contains(&hash),
            "key hash listed: {stdout}"
        );
    }
}

#[test]
fn revoke_removes_the_key_and_a_second_revoke_fails_naming_the_id() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();

    let keep = created_json(&setup, "u1", "keep");
    let gone = created_json(&setup, "u1", "gone");
    let id = gone["id"].as_str().unwrap();

    let out = setup.run(&["keys", "revoke", id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listed = list_json(&setup, "u1");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], keep["id"]);

    let line = one_line_failure(&setup.run(&["keys", "revoke", id]));
    assert!(line.contains(id), "{line}");
}

#[test]
fn revoke_of_an_unknown_key_id_fails_with_one_line() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();

    let line = one_line_failure(&setup.run(&["keys", "revoke", "key_doesNotExist"]));
    assert!(line.contains("key_doesNotExist"), "{line}");
    assert!(line.contains("unknown"), "{line}");
}

#[test]
fn workflow_owner_is_set_and_removed_and_a_second_remove_fails() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();

    let out = setup.run(&["workflows", "set-owner", "wf_1", "u1"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = setup.run(&["workflows", "remove", "wf_1"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let line = one_line_failure(&setup.run(&["workflows", "remove", "wf_1"]));
    assert!(line.contains("wf_1"), "{line}");
}

#[test]
fn sigterm_stops_serve_with_status_0_and_the_store_file_holds_no_full_key() {
    let mut setup = Setup::embedded();
    let server = setup.serve();

    let plain = setup.ok(&["keys", "create", "--user", "u1", "--name", "prod"]);
    let plain = plain.trim_end().to_owned();
    let json = created_json(&setup, "u2", "ci");
    let keys = [plain, json["key"].as_str().unwrap().to_owned()];

    let log = server.log.clone();
    let status = server.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "serve exits 0 on SIGTERM; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );

    let bytes = std::fs::read(setup.store_file()).expect("the redb file exists");
    assert!(!bytes.is_empty());
    for key in &keys {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the store file holds a full key"
        );
    }
}

#[test]
fn policies_roll_review_and_audit_from_the_command_line() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();
    setup.ok(&["workflows", "set-owner", "wf", "u1"]);

    // Bad values are one clear line naming the flag, before any call.
    for (flag, value) in [("--expires-in", "soon"), ("--rate", "fast")] {
        let out = setup.run(&["keys", "create", "--user", "u1", flag, value]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or("");
        assert!(first.contains(flag) && first.contains(value), "{stderr}");
    }
    let created = parse_json(&setup.ok(&[
        "keys",
        "create",
        "--user",
        "u1",
        "--name",
        "ci",
        "--expires-in",
        "30d",
        "--workflow",
        "wf",
        "--workflow",
        "wf2",
        "--rate",
        "100/1m",
        "--json",
    ]));
    assert!(
        created["expiresAt"].as_str().unwrap().ends_with('Z'),
        "{created}"
    );
    assert_eq!(created["workflows"], serde_json::json!(["wf", "wf2"]));
    assert_eq!(created["rate"], "100/1m");
    let id = created["id"].as_str().unwrap().to_owned();

    let table = setup.ok(&["keys", "list", "--all"]);
    assert!(table.starts_with("USER"), "{table}");
    assert!(
        table.contains("u1") && table.contains("workflows wf,wf2"),
        "{table}"
    );
    let stale = list_of(&setup.ok(&["keys", "list", "--all", "--unused-for", "30d", "--json"]));
    assert!(stale.is_empty(), "a new key is not stale yet: {stale:?}");
    let out = setup.run(&["keys", "list"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--user") && stderr.contains("--all"),
        "{stderr}"
    );

    // Roll: the new key alone on stdout, the old one's end on stderr.
    let out = setup.run(&["keys", "roll", &id, "--grace", "1h"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim().len(), 42, "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("keeps working until"));
    let line = one_line_failure(&setup.run(&["keys", "roll", &id, "--grace", "30d"]));
    assert!(line.contains("keys.max_grace"), "{line}");
    let line = one_line_failure(&setup.run(&["keys", "roll", stdout.trim()]));
    assert!(line.contains("not a key id"), "{line}");

    let audit = setup.ok(&["audit", "--since", "1h"]);
    let lines: Vec<&str> = audit.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("owner.set") && l.contains("workflow wf")),
        "{audit}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("key.rolled") && l.contains(&id)),
        "{audit}"
    );
    assert!(
        lines.iter().all(|l| l.contains(" by 127.0.0.1:")),
        "{audit}"
    );
    assert!(!audit.contains(stdout.trim()), "a key in the audit log");
    let json = list_of(&setup.ok(&["audit", "--json"]));
    assert!(json.len() >= 4, "{json:?}");
}

fn list_of(text: &str) -> Vec<serde_json::Value> {
    parse_json(text).as_array().cloned().unwrap_or_default()
}

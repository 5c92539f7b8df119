//! The `keygate` command line as scripts see it: the real binary, a real
//! `keygate serve` child process on free ports, and the exact shape of what
//! each command prints (DESIGN.md, "CLI").

mod common;

use keygate::key::KeyHash;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a `serve` child may take to answer `/healthz` or to exit; the
/// machine may be busy compiling, so this is generous.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `keygate --config <config> <args...>` to completion.
fn keygate(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the keygate binary runs")
}

/// The stdout of a command that must succeed.
fn ok(config: &Path, args: &[&str]) -> String {
    let out = keygate(config, args);
    assert!(
        out.status.success(),
        "keygate {args:?} failed ({}): stdout={:?} stderr={:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// The one stderr line of a command that must fail the documented way:
/// non-zero exit, nothing on stdout, exactly one non-empty line on stderr.
fn one_line_failure(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a failure, got {}: stdout={stdout:?} stderr={stderr:?}",
        out.status
    );
    assert!(stdout.is_empty(), "nothing on stdout, got {stdout:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one stderr line, got {stderr:?}");
    assert!(
        !lines[0].trim().is_empty(),
        "a non-empty stderr line, got {stderr:?}"
    );
    lines[0].to_owned()
}

fn parse_json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim_end())
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout:?}"))
}

/// A port held by a socket that is bound but not listening: connecting to
/// it is refused, and no other test can take it while the socket lives.
fn reserved_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    (socket, port)
}

/// A config file in its own temporary folder, on ports picked for it.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    store_yaml: String,
    admin_port: u16,
    listen_port: u16,
    /// Ports that must stay silent for the whole test.
    reserved: Vec<socket2::Socket>,
}

impl Setup {
    /// Embedded store (`data/keygate.redb`) and token file inside the folder.
    fn embedded() -> Setup {
        Setup::new("store:\n  embedded:\n    path: \"data/keygate.redb\"\n".to_owned())
    }

    /// As [`Setup::embedded`], with `admin.listen` on a port where nothing
    /// listens (and nothing will).
    fn embedded_without_server() -> Setup {
        let mut setup = Setup::embedded();
        let (socket, port) = reserved_port();
        setup.reserved.push(socket);
        setup.write_config(Some(port));
        setup
    }

    /// A Redis store on a port with nothing listening.
    fn redis_down() -> Setup {
        let (socket, port) = reserved_port();
        let mut setup = Setup::new(format!(
            "store:\n  redis:\n    url: \"redis://127.0.0.1:{port}\"\n    timeout: 300ms\n"
        ));
        setup.reserved.push(socket);
        setup
    }

    fn new(store_yaml: String) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("keygate.yaml");
        let mut setup = Setup {
            dir,
            config,
            store_yaml,
            admin_port: 0,
            listen_port: 0,
            reserved: Vec::new(),
        };
        setup.write_config(None);
        setup
    }

    /// (Re)writes the config with fresh free ports (or the given admin port).
    fn write_config(&mut self, admin: Option<u16>) {
        let admin = admin.unwrap_or_else(common::free_port);
        let mut listen = common::free_port();
        while listen == admin {
            listen = common::free_port();
        }
        let upstream = common::free_port();
        let yaml = format!(
            "listen: \"127.0.0.1:{listen}\"\n\
             upstream: \"http://127.0.0.1:{upstream}\"\n\
             workers: 1\n\
             {}\
             admin:\n  listen: \"127.0.0.1:{admin}\"\n  token_file: \"data/admin.token\"\n\
             log:\n  access: false\n",
            self.store_yaml
        );
        std::fs::write(&self.config, yaml).unwrap();
        self.admin_port = admin;
        self.listen_port = listen;
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("data/admin.token")
    }

    fn store_file(&self) -> PathBuf {
        self.dir.path().join("data/keygate.redb")
    }

    fn run(&self, args: &[&str]) -> Output {
        keygate(&self.config, args)
    }

    fn ok(&self, args: &[&str]) -> String {
        ok(&self.config, args)
    }

    /// Starts `keygate serve` with this config and waits until `/healthz`
    /// answers. A port taken between picking and binding gets fresh ports.
    fn serve(&mut self) -> Server {
        self.serve_with(&[], "serve.log")
    }

    /// `keygate serve <extra...>`, logging to `log` in the setup's folder.
    fn serve_with(&mut self, extra: &[&str], log: &str) -> Server {
        let log = self.dir.path().join(log);
        for attempt in 0..3 {
            if attempt > 0 {
                self.write_config(None);
            }
            let child = Command::new(env!("CARGO_BIN_EXE_keygate"))
                .arg("--config")
                .arg(&self.config)
                .arg("serve")
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("keygate serve starts");
            let mut server = Server {
                child: Some(child),
                log: log.clone(),
            };
            let until = Instant::now() + DEADLINE;
            while Instant::now() < until {
                if healthz(self.admin_port) {
                    return server;
                }
                if server.exited() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !server.exited() {
                panic!(
                    "keygate serve did not answer /healthz within {DEADLINE:?}; log:\n{}",
                    server.log()
                );
            }
            if attempt == 2 {
                panic!("keygate serve exited at start; log:\n{}", server.log());
            }
        }
        unreachable!()
    }
}

/// A `keygate serve` child process; killed on drop if still running.
struct Server {
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().unwrap().is_some())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (such as `-HUP`) to the process.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(sent.success(), "kill {signal}");
    }

    /// Waits (with a deadline) until the log holds `text`.
    fn wait_for_log(&self, text: &str) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < until, "no {text:?} in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (with a deadline) for the process to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let until = Instant::now() + DEADLINE;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < until, "the process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM failed");
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "keygate serve did not exit within {DEADLINE:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One raw HTTP/1.1 exchange with the admin port; the whole response, or
/// nothing if the port does not answer.
fn http(port: u16, request: &str) -> Option<String> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    Some(String::from_utf8_lossy(&response).into_owned())
}

/// Whether `GET /healthz` on the admin port answers 200.
fn healthz(port: u16) -> bool {
    http(
        port,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// Waits (with a deadline) until the wall clock, as the server renders it,
/// is past `created_at`, so the next key's `createdAt` is strictly later.
fn wait_for_clock_past(created_at: &str) {
    let until = Instant::now() + Duration::from_secs(5);
    while keygate::clock::rfc3339(keygate::clock::now_ms()).as_str() <= created_at {
        assert!(Instant::now() < until, "the clock did not move");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn created_json(setup: &Setup, user: &str, name: &str) -> Value {
    parse_json(&setup.ok(&["keys", "create", "--user", user, "--name", name, "--json"]))
}

fn list_json(setup: &Setup, user: &str) -> Vec<Value> {
    match parse_json(&setup.ok(&["keys", "list", "--user", user, "--json"])) {
        Value::Array(items) => items,
        other => panic!("keys list --json prints an array, got {other}"),
    }
}

// ---- happy path against a running server ----------------------------------

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
            ["createdAt", "id", "keyPrefix", "lastUsedAt", "name"]
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

// ---- failures: non-zero, nothing on stdout, one line on stderr ------------

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
    let key = setup
        .ok(&["keys", "create", "--user", "u1"])
        .trim()
        .to_owned();
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

// ---- operating a running gateway -----------------------------------------

/// One webhook call on a fresh connection: the status, or `None` when the
/// connection was refused or reset.
fn call_webhook(port: u16, key: &str) -> Option<u16> {
    let request = format!(
        "POST /api/workflows/wf_1/webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let response = http(port, &request)?;
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
}

#[test]
fn a_second_serve_on_the_same_listen_address_fails_clearly() {
    let mut first = Setup::embedded();
    let _server = first.serve();
    // Another keygate, with its own store and admin port, same listen.
    let mut second = Setup::embedded();
    let yaml = std::fs::read_to_string(&second.config).unwrap();
    let theirs = format!("listen: \"127.0.0.1:{}\"", second.listen_port);
    let ours = format!("listen: \"127.0.0.1:{}\"", first.listen_port);
    std::fs::write(&second.config, yaml.replace(&theirs, &ours)).unwrap();
    second.listen_port = first.listen_port;
    let out = second.run(&["serve"]);
    let line = one_line_failure(&out);
    assert!(line.contains("in use"), "{line}");
    assert!(line.contains("--takeover"), "{line}");
    assert!(line.contains(&first.listen_port.to_string()), "{line}");
}

#[test]
fn check_validates_the_config_and_its_files() {
    let setup = Setup::embedded();
    let out = setup.ok(&["check"]);
    assert!(out.starts_with("config OK: "), "{out}");
    assert!(out.contains(&setup.config.display().to_string()), "{out}");

    let dir = setup.dir.path();
    std::fs::write(
        dir.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!("{yaml}tls:\n  cert: cert.pem\n  key: key.pem\n"),
    )
    .unwrap();
    let line = one_line_failure(&setup.run(&["check"]));
    assert!(
        line.contains("cert.pem") && line.contains("not a valid certificate"),
        "{line}"
    );

    std::fs::write(&setup.config, format!("{yaml}workers: \"two\"\n")).unwrap();
    let line = one_line_failure(&setup.run(&["check"]));
    assert!(line.contains("workers"), "the field is named: {line}");
}

#[test]
fn without_a_config_flag_the_built_in_defaults_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("built-in defaults"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:8080"), "{stdout}");
    let help = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("keygate.yaml") && help.contains("built-in defaults"),
        "{help}"
    );
}

#[test]
fn every_command_and_argument_has_a_description() {
    use clap::CommandFactory;
    fn walk(command: &clap::Command, path: &str) {
        for arg in command.get_arguments() {
            let name = arg.get_id().as_str();
            if name == "help" || name == "version" {
                continue;
            }
            assert!(arg.get_help().is_some(), "{path} {name} has no description");
        }
        for sub in command.get_subcommands() {
            let path = format!("{path} {}", sub.get_name());
            assert!(sub.get_about().is_some(), "{path} has no description");
            walk(sub, &path);
        }
    }
    walk(&keygate::cli::Cli::command(), "keygate");
}

#[test]
fn a_bad_user_names_the_flag_and_a_key_is_never_echoed() {
    let setup = Setup::embedded_without_server();
    let out = setup.run(&["keys", "create", "--user", "a b"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--user"), "{stderr}");
    assert!(stderr.contains("visible ASCII"), "{stderr}");

    let key = format!("wfb_{}", "S".repeat(38));
    let line = one_line_failure(&setup.run(&["keys", "revoke", &key]));
    assert!(line.contains("looks like a key, not a key id"), "{line}");
    assert!(line.contains("keys list"), "{line}");
    assert!(!line.contains(&key), "the key was echoed: {line}");
}

#[test]
fn the_admin_api_never_echoes_a_key_given_as_an_id() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();
    let key = setup
        .ok(&["keys", "create", "--user", "u1"])
        .trim()
        .to_owned();
    let token = std::fs::read_to_string(setup.token_file()).unwrap();
    let response = http(
        setup.admin_port,
        &format!(
            "DELETE /admin/v1/keys/{key} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            token.trim()
        ),
    )
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("looks like a key"), "{response}");
    assert!(!response.contains(&key), "{response}");
}

#[test]
fn serve_logs_without_colour_rounds_latency_and_fails_once() {
    let mut setup = Setup::embedded();
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        yaml.replace("log:\n  access: false\n", "log:\n  access: true\n"),
    )
    .unwrap();
    let server = setup.serve();
    let key = setup
        .ok(&["keys", "create", "--user", "u1"])
        .trim()
        .to_owned();
    setup.ok(&["workflows", "set-owner", "wf_1", "u1"]);
    assert_eq!(call_webhook(setup.listen_port, &key), Some(502));
    let log = server.wait_for_log("keygate::access");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI colour in a log that is not a terminal:\n{log}"
    );
    let latency = log
        .lines()
        .find(|l| l.contains("keygate::access"))
        .and_then(|l| l.split("latency_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .to_owned();
    let decimals = latency.split('.').nth(1).map_or(0, str::len);
    assert!(decimals <= 3, "latency_ms={latency}");
    drop(server);

    // A serve that cannot start says why once, and paths read as written.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    let listen = format!("listen: \"127.0.0.1:{}\"", setup.listen_port);
    std::fs::write(
        &setup.config,
        yaml.replace(&listen, &format!("listen: \"127.0.0.1:{port}\"")),
    )
    .unwrap();
    let relative = Path::new(".").join(setup.config.file_name().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(&relative)
        .arg("serve")
        .current_dir(setup.dir.path())
        .output()
        .unwrap();
    let line = one_line_failure(&out);
    assert!(line.contains("in use"), "{line}");
    assert!(!line.contains("/./"), "{line}");
}

#[test]
fn startup_warns_of_an_unreachable_store_and_an_open_metrics_endpoint() {
    let mut setup = Setup::redis_down();
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    let admin = format!("listen: \"127.0.0.1:{}\"\n  token_file", setup.admin_port);
    std::fs::write(
        &setup.config,
        yaml.replace(
            &admin,
            &format!("listen: \"0.0.0.0:{}\"\n  token_file", setup.admin_port),
        ),
    )
    .unwrap();
    let server = setup.serve();
    let log = server.wait_for_log("unreachable at start");
    assert!(log.contains("/metrics"), "{log}");
    assert!(log.contains("admin.token is not set"), "{log}");
}

#[test]
fn sighup_reloads_the_config_refuses_a_bad_one_and_names_what_needs_a_restart() {
    let mut setup = Setup::embedded();
    let server = setup.serve();
    let good = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!("{good}routes:\n  - path: /hooks/{{workflow}}\n"),
    )
    .unwrap();
    server.signal("-HUP");
    server.wait_for_log("config reloaded");

    std::fs::write(&setup.config, "listen: [not, an, address]\n").unwrap();
    server.signal("-HUP");
    let log = server.wait_for_log("reload refused");
    assert!(log.contains("listen"), "{log}");
    assert!(
        healthz(setup.admin_port),
        "a bad reload stopped the gateway"
    );

    let moved = good.replace(
        &format!("listen: \"127.0.0.1:{}\"", setup.listen_port),
        &format!("listen: \"127.0.0.1:{}\"", common::free_port()),
    );
    std::fs::write(&setup.config, moved).unwrap();
    server.signal("-HUP");
    let log = server.wait_for_log("take effect only after a restart");
    assert!(log.contains("needs_restart=listen"), "{log}");
    // Still listening where it started.
    let key = setup
        .ok(&["keys", "create", "--user", "u1"])
        .trim()
        .to_owned();
    assert!(call_webhook(setup.listen_port, &key).is_some());
}

#[test]
fn takeover_replaces_a_running_instance_without_refusing_a_connection() {
    let mut setup = Setup::embedded();
    let mut old = setup.serve();
    let key = setup
        .ok(&["keys", "create", "--user", "u1"])
        .trim()
        .to_owned();
    setup.ok(&["workflows", "set-owner", "wf_1", "u1"]);
    let port = setup.listen_port;
    // Calls on fresh connections all through the handover.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let (done, key) = (done.clone(), key.clone());
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                outcomes.push(call_webhook(port, &key));
            }
            outcomes
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let new = setup.serve_with(&["--takeover"], "takeover.log");
    new.wait_for_log("took_over=true");
    let status = old.wait_exit();
    assert_eq!(status.code(), Some(0), "old instance log:\n{}", old.log());
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcomes = caller.join().unwrap();
    assert!(outcomes.len() > 10, "{outcomes:?}");
    let migrates = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .is_ok_and(|v| v.trim() == "1");
    let lost = outcomes.iter().filter(|o| o.is_none()).count();
    if migrates {
        assert_eq!(lost, 0, "connections refused or reset during the takeover");
    } else {
        eprintln!(
            "net.ipv4.tcp_migrate_req is 0: {lost} of {} calls lost in the handover (not asserted)",
            outcomes.len()
        );
    }
    // Nothing upstream: every call that was served is a 502, none a 5xx of keygate's own.
    assert!(outcomes.iter().flatten().all(|s| *s == 502), "{outcomes:?}");
    // The new instance has the store and the admin API.
    let listed = list_json(&setup, "u1");
    assert_eq!(listed.len(), 1);
    assert_eq!(call_webhook(port, &key), Some(502));
    assert!(new.log().contains("keygate serving"));
}

#[test]
fn takeover_without_a_running_instance_fails_clearly() {
    let setup = Setup::embedded();
    std::fs::create_dir_all(setup.token_file().parent().unwrap()).unwrap();
    std::fs::write(setup.token_file(), "a-token-for-nobody-at-all").unwrap();
    let line = one_line_failure(&setup.run(&["serve", "--takeover"]));
    assert!(line.contains("no keygate answers"), "{line}");
}

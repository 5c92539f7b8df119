//! The `keygate` command line as scripts see it: the real binary, a real
//! `keygate serve` child process on free ports, and the exact shape of what
//! each command prints (DESIGN.md, "CLI"). [`keys`]: the key and workflow
//! commands; [`failures`]: how each failure reads; [`operations`]:
//! running a gateway (stop, reload, check, takeover, logs, help);
//! [`engine`]: in front of an engine's own database; [`integrations`]:
//! provider credentials.

#[path = "../common/mod.rs"]
mod common;
mod engine;
mod failures;
mod integrations;
mod keys;
mod operations;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a `serve` child may take to answer `/healthz` or to exit; the
/// machine may be busy compiling, so this is generous.
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `keygate --config <config> <args...>` to completion.
pub(crate) fn keygate(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the keygate binary runs")
}

/// The stdout of a command that must succeed.
pub(crate) fn ok(config: &Path, args: &[&str]) -> String {
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
pub(crate) fn one_line_failure(out: &Output) -> String {
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

pub(crate) fn parse_json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim_end())
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout:?}"))
}

/// A port held by a socket that is bound but not listening: connecting to
/// it is refused, and no other test can take it while the socket lives.
pub(crate) fn reserved_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    (socket, port)
}

/// A config file in its own temporary folder, on ports picked for it.
pub(crate) struct Setup {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
    pub(crate) store_yaml: String,
    pub(crate) admin_port: u16,
    pub(crate) listen_port: u16,
    /// Ports that must stay silent for the whole test.
    pub(crate) reserved: Vec<socket2::Socket>,
}

impl Setup {
    /// Embedded store (`data/keygate.redb`) and token file inside the folder.
    pub(crate) fn embedded() -> Setup {
        Setup::new("store:\n  embedded:\n    path: \"data/keygate.redb\"\n".to_owned())
    }

    /// As [`Setup::embedded`], with `admin.listen` on a port where nothing
    /// listens (and nothing will).
    pub(crate) fn embedded_without_server() -> Setup {
        let mut setup = Setup::embedded();
        let (socket, port) = reserved_port();
        setup.reserved.push(socket);
        setup.write_config(Some(port));
        setup
    }

    /// A Redis store on a port with nothing listening.
    pub(crate) fn redis_down() -> Setup {
        let (socket, port) = reserved_port();
        let mut setup = Setup::new(format!(
            "store:\n  redis:\n    url: \"redis://127.0.0.1:{port}\"\n    timeout: 300ms\n"
        ));
        setup.reserved.push(socket);
        setup
    }

    pub(crate) fn new(store_yaml: String) -> Setup {
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
    pub(crate) fn write_config(&mut self, admin: Option<u16>) {
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

    pub(crate) fn token_file(&self) -> PathBuf {
        self.dir.path().join("data/admin.token")
    }

    pub(crate) fn store_file(&self) -> PathBuf {
        self.dir.path().join("data/keygate.redb")
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        keygate(&self.config, args)
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        ok(&self.config, args)
    }

    /// `keys create --user <user>`: the new key, as printed.
    pub(crate) fn create_key(&self, user: &str) -> String {
        self.ok(&["keys", "create", "--user", user])
            .trim()
            .to_owned()
    }

    /// Starts `keygate serve` with this config and waits until `/healthz`
    /// answers. A port taken between picking and binding gets fresh ports.
    pub(crate) fn serve(&mut self) -> Server {
        self.serve_with(&[], "serve.log")
    }

    /// `keygate serve <extra...>`, logging to `log` in the setup's folder.
    pub(crate) fn serve_with(&mut self, extra: &[&str], log: &str) -> Server {
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
pub(crate) struct Server {
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
}

impl Server {
    pub(crate) fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().unwrap().is_some())
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (such as `-HUP`) to the process.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(sent.success(), "kill {signal}");
    }

    /// Waits (with a deadline) until the log holds `text`.
    pub(crate) fn wait_for_log(&self, text: &str) -> String {
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
    pub(crate) fn wait_exit(&mut self) -> ExitStatus {
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
    pub(crate) fn terminate(mut self) -> ExitStatus {
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
pub(crate) fn http(port: u16, request: &str) -> Option<String> {
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
pub(crate) fn healthz(port: u16) -> bool {
    http(
        port,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// Waits (with a deadline) until the wall clock, as the server renders it,
/// is past `created_at`, so the next key's `createdAt` is strictly later.
pub(crate) fn wait_for_clock_past(created_at: &str) {
    let until = Instant::now() + Duration::from_secs(5);
    while keygate::clock::rfc3339(keygate::clock::now_ms()).as_str() <= created_at {
        assert!(Instant::now() < until, "the clock did not move");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(crate) fn created_json(setup: &Setup, user: &str, name: &str) -> Value {
    parse_json(&setup.ok(&["keys", "create", "--user", user, "--name", name, "--json"]))
}

pub(crate) fn list_json(setup: &Setup, user: &str) -> Vec<Value> {
    match parse_json(&setup.ok(&["keys", "list", "--user", user, "--json"])) {
        Value::Array(items) => items,
        other => panic!("keys list --json prints an array, got {other}"),
    }
}

/// One webhook call on a fresh connection: the status, or `None` when the
/// connection was refused or reset.
pub(crate) fn call_webhook(port: u16, key: &str) -> Option<u16> {
    let request = format!(
        "POST /api/workflows/wf_1/webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let response = http(port, &request)?;
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
}

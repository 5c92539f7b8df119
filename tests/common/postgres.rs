//! A PostgreSQL server of a test's (or a bench's) own, from the Debian
//! `postgresql` package: `initdb` in a temporary folder and `postgres` on a
//! free port, run as the `postgres` user when the test runs as root
//! (initdb refuses root), stopped on drop. The engine's tables come from
//! `tests/fixtures/engine.sql`. Self-contained, so the benches include it.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workflow-builder template's tables.
pub const ENGINE_SCHEMA: &str = include_str!("../fixtures/engine.sql");

pub struct PostgresServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Who the server runs as: `postgres` under root, else ourselves.
    user: Option<(u32, u32)>,
    child: Option<Child>,
    tls: bool,
}

/// The newest PostgreSQL's programs (`/usr/lib/postgresql/<v>/bin`, as
/// Debian lays them out), else whatever `PATH` has.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| PathBuf::from(""))
}

/// The `postgres` user's uid and gid, when we are root and must drop to it.
fn server_user() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((
        id("-u").expect(
            "a `postgres` user (the postgresql package creates it; scripts/test installs it)",
        ),
        id("-g")?,
    ))
}

/// Whether Debian's `postgresql` package (or another initdb on `PATH`) is
/// there to start servers from.
pub fn installed() -> bool {
    let bin = bin_dir();
    if bin.as_os_str().is_empty() {
        Command::new("initdb").arg("--version").output().is_ok()
    } else {
        true
    }
}

impl PostgresServer {
    /// A server with the engine's tables.
    pub fn start() -> PostgresServer {
        Self::start_with(None)
    }

    /// A server that also speaks TLS with this certificate and key (PEM).
    pub fn start_tls(cert: &str, key: &str) -> PostgresServer {
        Self::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> PostgresServer {
        let bin = bin_dir();
        let user = server_user();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let initdb = as_user(Command::new(bin.join("initdb")), user)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "keygate",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .expect("initdb runs (the postgresql package; scripts/test installs it)");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        if let Some((cert, key)) = tls {
            let (cert_file, key_file) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_file, cert).unwrap();
            std::fs::write(&key_file, key).unwrap();
            std::fs::set_permissions(
                &key_file,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
            )
            .unwrap();
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&cert_file, Some(uid), Some(gid)).unwrap();
                std::os::unix::fs::chown(&key_file, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut server = PostgresServer {
            port: 0,
            dir,
            bin,
            user,
            child: None,
            tls: tls.is_some(),
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                server.psql(ENGINE_SCHEMA);
                return server;
            }
        }
        panic!("postgres did not start; log:\n{}", server.log());
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .unwrap();
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(self.dir.path().join("postgres.log"), Some(uid), Some(gid))
                .unwrap();
        }
        let mut command = as_user(Command::new(self.bin.join("postgres")), self.user);
        command
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ]);
        if self.tls {
            command.args(["-c", "ssl=on"]);
            command.arg("-c").arg(format!(
                "ssl_cert_file={}",
                self.dir.path().join("server.crt").display()
            ));
            command.arg("-c").arg(format!(
                "ssl_key_file={}",
                self.dir.path().join("server.key").display()
            ));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("postgres runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.ready() {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "keygate",
                "-q",
            ])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The URL keygate is configured with (no TLS).
    pub fn url(&self) -> String {
        format!(
            "postgres://keygate@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// The URL with other query parameters (`sslmode=...`).
    pub fn url_with(&self, host: &str, query: &str) -> String {
        format!("postgres://keygate@{host}:{}/postgres?{query}", self.port)
    }

    /// Runs SQL with `psql` (stops at the first error) and returns its
    /// output, one row a line, fields split by `|`.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.try_psql(sql);
        assert!(
            out.status.success(),
            "psql failed: {}\n{sql}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn try_psql(&self, sql: &str) -> Output {
        Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "keygate",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-X",
                "-q",
                "-A",
                "-t",
            ])
            .arg("-c")
            .arg(sql)
            .output()
            .expect("psql runs")
    }

    /// A client for SQL in async tests, where psql's start-up would count.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test postgres");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Stops the server (fast shutdown: sessions are closed).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "-INT");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "postgres did not restart on port {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Every file of the data folder, as bytes, for looking for a secret.
    pub fn data_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        collect(&self.data(), &mut all);
        all
    }
}

fn collect(dir: &Path, into: &mut Vec<u8>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, into);
        } else if let Ok(bytes) = std::fs::read(&path) {
            into.extend_from_slice(&bytes);
        }
    }
}

fn as_user(mut command: Command, user: Option<(u32, u32)>) -> Command {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command
}

fn signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

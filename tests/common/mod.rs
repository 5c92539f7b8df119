//! Test harness: real upstream HTTP servers and real `redis-server`
//! processes on free loopback ports, and a small HTTP client.
#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::config::Config;
use keygate::server::Running;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body_len: usize,
}

/// A real HTTP/1.1 server on 127.0.0.1:0 that records requests and answers
/// 200 with `{"ok":true}`. `delay` makes it slow.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted so far.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_with_delay(Duration::ZERO).await
    }

    pub async fn start_with_delay(delay: Duration) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let record = seen.clone();
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let record = record.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let record = record.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body_len = match body.collect().await {
                                Ok(b) => b.to_bytes().len(),
                                Err(_) => usize::MAX,
                            };
                            record.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                version: parts.version,
                                headers: parts.headers,
                                body_len,
                            });
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            r.headers_mut().insert("x-upstream", "1".parse().unwrap());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            seen,
            accepted,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream that answers every request with `response` as is, and
/// closes the connection after each answer when `close` is set (without
/// saying so). Records each request's bytes.
pub struct Scripted {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
    pub accepted: Arc<AtomicUsize>,
    /// Connections that ended from the gateway's side (it closed them).
    pub closed: Arc<AtomicUsize>,
}

impl Scripted {
    pub async fn start(response: &'static str, close: bool) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let accepted: Arc<AtomicUsize> = Arc::default();
        let closed: Arc<AtomicUsize> = Arc::default();
        let (record, count, ended) = (seen.clone(), accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (record, ended) = (record.clone(), ended.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(request) = read_request(&mut stream, &mut buf).await else {
                            ended.fetch_add(1, Ordering::SeqCst);
                            return;
                        };
                        record.lock().unwrap().push(request);
                        if response.is_empty() || close {
                            if !response.is_empty() {
                                let _ = stream.write_all(response.as_bytes()).await;
                            }
                            return;
                        }
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            seen,
            accepted,
            closed,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// One request with a Content-Length body (all keygate sends in these tests).
pub async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let request: Vec<u8> = buf.drain(..end + 4 + length).collect();
                return Some(String::from_utf8_lossy(&request).into_owned());
            }
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of the test's own, on a free port, stopped on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                child: None,
                dir: tempfile::tempdir().unwrap(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed? scripts/test installs it)");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
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

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn ping(&self) -> bool {
        self.cli(&["PING"]).is_some_and(|s| s.trim() == "PONG")
    }

    /// Runs one command with a fresh synchronous connection.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let value: redis::Value = cmd.query(&mut conn).ok()?;
        Some(match value {
            redis::Value::SimpleString(s) => s,
            redis::Value::Okay => "OK".to_owned(),
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::Int(i) => i.to_string(),
            other => format!("{other:?}"),
        })
    }

    /// Every key and value in the server, for "no secret stored" checks.
    pub fn dump(&self) -> String {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        let mut out = String::new();
        for k in keys {
            let kind: String = redis::cmd("TYPE").arg(&k).query(&mut conn).unwrap();
            let value: redis::Value = match kind.as_str() {
                "hash" => redis::cmd("HGETALL").arg(&k).query(&mut conn).unwrap(),
                "zset" => redis::cmd("ZRANGE")
                    .arg(&k)
                    .arg(0)
                    .arg(-1)
                    .query(&mut conn)
                    .unwrap(),
                "set" => redis::cmd("SMEMBERS").arg(&k).query(&mut conn).unwrap(),
                _ => redis::cmd("GET").arg(&k).query(&mut conn).unwrap(),
            };
            out.push_str(&format!("{k} => {value:?}\n"));
        }
        out
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is
    /// answered, as with a hung Redis.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill").args([which, &pid]).status().unwrap();
        assert!(sent.success(), "kill {which} {pid}");
    }

    /// Kills the server (SIGKILL) without saving.
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Writes the data to disk, so that [`RedisServer::restart`] reloads it.
    pub fn save(&self) {
        assert_eq!(self.cli(&["SAVE"]).as_deref(), Some("OK"));
    }

    /// Starts it again on the same port, empty.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        self.restart();
    }

    /// Starts it again on the same port, with what the last `save` wrote.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Which store a gateway under test uses.
#[derive(Clone, Debug)]
pub enum StoreKind {
    Embedded(PathBuf),
    Redis(String),
}

impl StoreKind {
    pub fn yaml(&self) -> String {
        match self {
            StoreKind::Embedded(p) => {
                format!("store:\n  embedded:\n    path: \"{}\"\n", p.display())
            }
            StoreKind::Redis(url) => {
                format!("store:\n  redis:\n    url: \"{url}\"\n    timeout: 500ms\n")
            }
        }
    }
}

/// Config for a gateway on free ports; `extra` is appended YAML.
pub fn config(dir: &Path, store: &StoreKind, upstream: &str, extra: &str) -> Config {
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nupstream: \"{upstream}\"\nworkers: 1\n{}admin:\n  listen: \"127.0.0.1:0\"\n  token_file: \"{}\"\nlog:\n  access: false\n{extra}",
        store.yaml(),
        dir.join("admin.token").display()
    );
    Config::from_yaml(&yaml, dir).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// A started gateway and a client for its admin API.
pub struct Gw {
    pub running: Option<Running>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
}

impl Gw {
    pub async fn start(config: Config) -> Gw {
        let token_file = config.admin.token_file.clone();
        let running = keygate::server::start(config)
            .await
            .expect("gateway starts");
        let token = std::fs::read_to_string(token_file).unwrap();
        Gw {
            listen: running.listen_addr,
            admin: running.admin_addr,
            running: Some(running),
            token,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn shutdown(&mut self) -> usize {
        self.running.take().unwrap().shutdown().await
    }

    pub async fn admin_call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .header("authorization", format!("Bearer {}", self.token));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let (status, _, bytes) = send_h1(self.admin, req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Creates a key through the admin API; returns (id, key).
    pub async fn create_key(&self, user: &str) -> (String, String) {
        let (status, v) = self
            .admin_call(
                "POST",
                "/admin/v1/keys",
                Some(serde_json::json!({"userId": user, "name": "test"})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_owned(),
            v["key"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn set_owner(&self, workflow: &str, user: &str) {
        let (status, v) = self
            .admin_call(
                "PUT",
                &format!("/admin/v1/workflows/{workflow}"),
                Some(serde_json::json!({"userId": user})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }

    pub async fn revoke(&self, id: &str) -> u16 {
        self.admin_call("DELETE", &format!("/admin/v1/keys/{id}"), None)
            .await
            .0
    }

    pub async fn list_keys(&self, user: &str) -> serde_json::Value {
        let (status, v) = self
            .admin_call("GET", &format!("/admin/v1/keys?userId={user}"), None)
            .await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// POSTs to a workflow's webhook with an optional Authorization value.
    pub async fn webhook(
        &self,
        workflow: &str,
        authorization: Option<&str>,
    ) -> (u16, http::HeaderMap, Bytes) {
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("/api/workflows/{workflow}/webhook"))
            .header("host", "gateway.test")
            .header("content-type", "application/json");
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        send_h1(
            self.listen,
            req.body(Full::new(Bytes::from_static(b"{\"x\":1}")))
                .unwrap(),
        )
        .await
        .unwrap()
    }

    pub async fn metrics(&self) -> String {
        let req = Request::builder()
            .uri("/metrics")
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (_, _, body) = send_h1(self.admin, req).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// One request on a fresh HTTP/1.1 connection.
pub async fn send_h1<B>(
    addr: SocketAddr,
    req: Request<B>,
) -> Result<(u16, http::HeaderMap, Bytes), String>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    read_response(response).await
}

/// One request over HTTP/2 with prior knowledge.
pub async fn send_h2(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    read_response(response).await
}

/// Status, headers and the whole body of a response.
async fn read_response(
    response: http::Response<Incoming>,
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, parts.headers, bytes))
}

/// Waits for a condition with a deadline instead of a fixed sleep.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn json(bytes: &Bytes) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

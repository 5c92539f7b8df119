//! A gateway under test on free ports, its admin API, and small HTTP/1.1
//! and HTTP/2 clients.

use super::redis::free_port;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::config::Config;
use keygate::server::Running;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::net::TcpStream;

/// Which store a gateway under test uses.
#[derive(Clone, Debug)]
pub enum StoreKind {
    Embedded(PathBuf),
    Redis(String),
    /// The URL, and YAML to add under `store.postgres` (indented 4).
    Postgres(String, String),
    /// A Redis Cluster's seed URLs.
    RedisCluster(Vec<String>),
    /// A whole `store:` section, as written.
    Yaml(String),
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
            StoreKind::RedisCluster(seeds) => {
                let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
                format!(
                    "store:\n  redis:\n    cluster: [{}]\n    timeout: 500ms\n",
                    seeds.join(", ")
                )
            }
            StoreKind::Yaml(yaml) => yaml.clone(),
            StoreKind::Postgres(url, more) => {
                format!("store:\n  postgres:\n    url: \"{url}\"\n    timeout: 1s\n{more}")
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

/// The embedded store, in `dir`.
pub fn embedded(dir: &tempfile::TempDir) -> StoreKind {
    StoreKind::Embedded(dir.path().join("keygate.redb"))
}

/// [`config`] on the embedded store in `dir`.
pub fn embedded_config(dir: &tempfile::TempDir, upstream: &str, extra: &str) -> Config {
    config(dir.path(), &embedded(dir), upstream, extra)
}

/// A gateway on the embedded store where user `alice` has a key and owns
/// workflow `wf`; returns the gateway and the key.
pub async fn alice_owns_wf(dir: &tempfile::TempDir, upstream: &str, extra: &str) -> (Gw, String) {
    let gw = Gw::start(embedded_config(dir, upstream, extra)).await;
    let (_, key) = gw.create_key("alice").await;
    gw.set_owner("wf", "alice").await;
    (gw, key)
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

    /// The value of one unlabelled metric.
    pub async fn metric(&self, name: &str) -> String {
        let prefix = format!("{name} ");
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("no metric {name}"))
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

/// One keep-alive HTTP/1.1 connection to a gateway, for calls in a loop.
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        KeepAlive { sender }
    }

    /// POSTs to `workflow`'s webhook with `key`; the status.
    pub async fn post(&mut self, workflow: &str, key: &str) -> u16 {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/api/workflows/{workflow}/webhook"))
            .header("host", "gw")
            .header("authorization", bearer(key))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(req).await.unwrap();
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        status
    }
}

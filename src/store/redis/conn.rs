//! Connections to Redis: one node through a `ConnectionManager`, or a
//! Redis Cluster through redis-rs's cluster client (which follows MOVED and
//! ASK and refreshes the slot map itself), each one per thread that uses
//! the store, so a connection's driver runs on the runtime of the thread
//! that waits on it. `rediss://` goes through rustls (ring), trusting the
//! system's roots and `ca_file`.

use crate::config::{RedisConfig, RedisNodes};
use dashmap::DashMap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value};
use std::thread::ThreadId;
use std::time::Duration;

pub(super) enum Backend {
    Single {
        client: redis::Client,
        config: ConnectionManagerConfig,
        conns: DashMap<ThreadId, ConnectionManager>,
    },
    Cluster {
        client: ClusterClient,
        timeout: Duration,
        conns: DashMap<ThreadId, ClusterConnection>,
    },
}

/// This thread's connection, whichever kind.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// rustls for `rediss://`: the process's provider is ring, as everywhere
/// in keygate (redis-rs asks rustls for the default one).
pub(super) fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The CA file's certificates, for redis-rs's TLS.
fn certificates(config: &RedisConfig) -> Result<redis::TlsCertificates, String> {
    let root_cert = match &config.ca_file {
        None => None,
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| format!("store.redis.ca_file {}: {e}", path.display()))?,
        ),
    };
    Ok(redis::TlsCertificates {
        client_tls: None,
        root_cert,
    })
}

/// The URL of a cluster node at `address` (`ip:port`), with the first
/// seed's scheme and credentials (a cluster's nodes share them).
pub(crate) fn address_url(config: &RedisConfig, address: &str) -> String {
    let seed = config
        .nodes
        .urls()
        .first()
        .map_or("redis://", String::as_str);
    let (scheme, rest) = seed.split_once("://").unwrap_or(("redis", seed));
    let userinfo = rest
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{address}")
}

/// A node's URL as redis-rs takes it: `#insecure` when asked not to check
/// the certificate.
pub(crate) fn node_url(config: &RedisConfig, url: &str) -> String {
    match config.insecure && url.starts_with("rediss://") {
        true => format!("{url}#insecure"),
        false => url.to_owned(),
    }
}

/// `TCP_NODELAY` on every connection to Redis (redis-rs leaves Nagle on):
/// a command written behind one still unacknowledged would otherwise wait
/// for the peer's delayed ACK, 40 ms on Linux.
fn tcp() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// A client for one node (the store's, or the invalidation listener's).
pub(crate) fn node_client(config: &RedisConfig, url: &str) -> Result<redis::Client, String> {
    install_ring();
    let info = node_url(config, url)
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("invalid redis url: {e}"))?
        .set_tcp_settings(tcp());
    let client = match url.starts_with("rediss://") {
        true => redis::Client::build_with_tls(info, certificates(config)?),
        false => redis::Client::open(info),
    };
    client.map_err(|e| format!("invalid redis url: {e}"))
}

impl Backend {
    /// Connects lazily: the gateway starts (and answers 503, not ready)
    /// while Redis is down, and each call tries again.
    pub(super) fn new(config: &RedisConfig) -> Result<Backend, String> {
        match &config.nodes {
            RedisNodes::Single(url) => Ok(Backend::Single {
                client: node_client(config, url)?,
                config: ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.timeout))
                    .set_response_timeout(Some(config.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500)),
                conns: DashMap::new(),
            }),
            RedisNodes::Cluster(seeds) => {
                install_ring();
                let seeds: Vec<String> = seeds.iter().map(|u| node_url(config, u)).collect();
                let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
                    .connection_timeout(config.timeout)
                    .response_timeout(config.timeout)
                    .tcp_settings(tcp())
                    .retries(1);
                if config.nodes.tls() {
                    builder = builder.certs(certificates(config)?);
                }
                Ok(Backend::Cluster {
                    client: builder.build().map_err(|e| format!("redis cluster: {e}"))?,
                    timeout: config.timeout,
                    conns: DashMap::new(),
                })
            }
        }
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Backend::Cluster { .. })
    }

    /// This thread's connection.
    pub(super) fn conn(&self) -> RedisResult<Conn> {
        let thread = std::thread::current().id();
        match self {
            Backend::Single {
                client,
                config,
                conns,
            } => {
                if let Some(conn) = conns.get(&thread) {
                    return Ok(Conn::Single(conn.clone()));
                }
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
                conns.insert(thread, conn.clone());
                Ok(Conn::Single(conn))
            }
            Backend::Cluster {
                client,
                timeout,
                conns,
            } => {
                if let Some(conn) = conns.get(&thread) {
                    return Ok(Conn::Cluster(conn.clone()));
                }
                let conn = client.get_pending_async_connection_with_config(
                    redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(*timeout)
                        .set_response_timeout(*timeout),
                );
                conns.insert(thread, conn.clone());
                Ok(Conn::Cluster(conn))
            }
        }
    }
}

/// Runs commands that may each hash to another slot: one pipeline on a
/// single node; on a cluster (where a pipeline must stay in one slot) all
/// at once, each on its own.
pub(super) async fn each<T: FromRedisValue>(
    conn: &mut Conn,
    cmds: Vec<Cmd>,
) -> RedisResult<Vec<T>> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    match conn {
        Conn::Single(_) => {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd);
            }
            pipe.query_async(conn).await
        }
        Conn::Cluster(cluster) => {
            let calls = cmds.into_iter().map(|cmd| {
                let mut conn = cluster.clone();
                async move { cmd.query_async::<T>(&mut conn).await }
            });
            futures_util::future::join_all(calls)
                .await
                .into_iter()
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_keep_the_seeds_scheme_and_credentials() {
        let mut config = RedisConfig::single("redis://127.0.0.1:1", Duration::from_secs(1));
        config.nodes = RedisNodes::Cluster(vec!["rediss://:s3cret@10.0.0.1:6379".into()]);
        assert_eq!(
            address_url(&config, "10.0.0.9:7000"),
            "rediss://:s3cret@10.0.0.9:7000"
        );
        config.nodes = RedisNodes::Cluster(vec!["redis://10.0.0.1:6379".into()]);
        assert_eq!(
            address_url(&config, "10.0.0.9:7000"),
            "redis://10.0.0.9:7000"
        );
    }
}

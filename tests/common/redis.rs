//! A `redis-server` of a test's (or a bench's) own, on a free port,
//! stopped on drop; one with TLS beside it; and a Redis Cluster of such
//! servers. Self-contained, so the benches include it too.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    /// With TLS: the port that speaks it (the plain `port` stays open for
    /// the test's own commands).
    pub tls_port: Option<u16>,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More `redis-server` arguments (cluster mode, TLS), given at each start.
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(|_, _| Vec::new(), false)
    }

    /// A server that also speaks TLS with this certificate and key (PEM),
    /// on [`RedisServer::tls_port`].
    pub fn start_tls(cert: &str, key: &str) -> RedisServer {
        Self::start_with(
            |dir, _| {
                let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
                std::fs::write(&cert_file, cert).unwrap();
                std::fs::write(&key_file, key).unwrap();
                vec![
                    "--tls-cert-file".into(),
                    cert_file.display().to_string(),
                    "--tls-key-file".into(),
                    key_file.display().to_string(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]
            },
            true,
        )
    }

    /// `extra(dir, port)` gives more arguments for a server in `dir` on
    /// `port`.
    fn start_with(extra: impl Fn(&std::path::Path, u16) -> Vec<String>, tls: bool) -> RedisServer {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let mut args = extra(dir.path(), port);
            let tls_port = tls.then(free_port);
            if let Some(tls_port) = tls_port {
                args.extend(["--tls-port".into(), tls_port.to_string()]);
            }
            let mut server = RedisServer {
                port,
                tls_port,
                child: None,
                dir,
                extra: args,
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
            .args(&self.extra)
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

    /// `rediss://` on the TLS port, for `host` (the certificate's name).
    pub fn tls_url(&self, host: &str) -> String {
        format!("rediss://{host}:{}", self.tls_port.expect("a TLS server"))
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

    pub fn is_running(&self) -> bool {
        self.child.is_some()
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

/// A Redis Cluster of servers of the test's own: `masters` masters with
/// `replicas` replicas each, every node on a free port with a free bus port,
/// `cluster-node-timeout` 1 s and `cluster-require-full-coverage no` (so a
/// lost master takes only its own slots), made with `redis-cli --cluster
/// create`. Stopped on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        Self::start_with(masters, replicas, None)
    }

    /// Masters only, each with a plain port and a TLS port (`tls_seeds`)
    /// and TLS on the cluster bus: `(ca, cert, key)` in PEM, the
    /// certificate good for 127.0.0.1. A TLS client is told the nodes' TLS
    /// ports, a plain one their plain ports.
    pub fn start_tls(masters: usize, ca: &str, cert: &str, key: &str) -> RedisCluster {
        Self::start_with(masters, 0, Some((ca, cert, key)))
    }

    fn start_with(
        masters: usize,
        replicas: usize,
        tls: Option<(&str, &str, &str)>,
    ) -> RedisCluster {
        let count = masters * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::start_with(
                    |dir, _| {
                        let mut args = match tls {
                            None => Vec::new(),
                            Some((ca, cert, key)) => {
                                let files = [("ca.pem", ca), ("tls.crt", cert), ("tls.key", key)];
                                for (name, pem) in files {
                                    std::fs::write(dir.join(name), pem).unwrap();
                                }
                                let path = |name: &str| dir.join(name).display().to_string();
                                vec![
                                    "--tls-ca-cert-file".into(),
                                    path("ca.pem"),
                                    "--tls-cert-file".into(),
                                    path("tls.crt"),
                                    "--tls-key-file".into(),
                                    path("tls.key"),
                                    "--tls-auth-clients".into(),
                                    "no".into(),
                                    "--tls-cluster".into(),
                                    "yes".into(),
                                ]
                            }
                        };
                        args.extend::<[String; 12]>([
                            "--cluster-enabled".into(),
                            "yes".into(),
                            "--cluster-port".into(),
                            free_port().to_string(),
                            "--cluster-config-file".into(),
                            dir.join("nodes.conf").display().to_string(),
                            "--cluster-node-timeout".into(),
                            "1000".into(),
                            "--cluster-require-full-coverage".into(),
                            "no".into(),
                            // A replica's first sync at once, not after
                            // the default 5 s wait for more replicas.
                            "--repl-diskless-sync-delay".into(),
                            "0".into(),
                        ]);
                        args
                    },
                    tls.is_some(),
                )
            })
            .collect();
        // Bounded: redis-cli waits for ever for nodes that cannot meet.
        let mut create = Command::new("timeout");
        create.args(["60", "redis-cli", "--cluster", "create"]);
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs (the redis-tools package; scripts/test installs redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok();
        cluster
    }

    /// Waits (with a deadline) until every running node says
    /// `cluster_state:ok` and knows every slot's master, and every replica
    /// has synced with its master (a replica that never did cannot take
    /// over).
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let cluster = n.cli(&["CLUSTER", "INFO"]).is_some_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_slots_assigned:16384")
                });
                let synced = n.cli(&["INFO", "replication"]).is_some_and(|i| {
                    !i.contains("role:slave") || i.contains("master_link_status:up")
                });
                cluster && synced
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Seed URLs (every node).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `rediss://` seed URLs (every node's TLS port), for `start_tls`.
    pub fn tls_seeds(&self, host: &str) -> Vec<String> {
        self.nodes.iter().map(|n| n.tls_url(host)).collect()
    }

    /// The ports of the nodes that are masters now, as a running node sees it.
    pub fn master_ports(&self) -> Vec<u16> {
        let nodes = self
            .running()
            .cli(&["CLUSTER", "NODES"])
            .unwrap_or_default();
        nodes
            .lines()
            .filter(|l| {
                let flags = l.split(' ').nth(2).unwrap_or("");
                flags.contains("master") && !flags.contains("fail")
            })
            .filter_map(|l| {
                l.split(' ')
                    .nth(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// The port of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let node = self.running();
        let slot: u16 = node
            .cli(&["CLUSTER", "KEYSLOT", key])
            .unwrap()
            .parse()
            .unwrap();
        let nodes = node.cli(&["CLUSTER", "NODES"]).unwrap();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => (a.parse::<u16>().unwrap()..=b.parse().unwrap()).contains(&slot),
                None => range.parse::<u16>().ok() == Some(slot),
            });
            if owns {
                return fields[1]
                    .split('@')
                    .next()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
            }
        }
        panic!("no master for slot {slot}");
    }

    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node on that port")
    }

    /// A node that is running.
    pub fn running(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.child.is_some() && n.ping())
            .expect("a running node")
    }

    /// Every key and value on every node.
    pub fn dump(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(RedisServer::dump)
            .collect()
    }
}

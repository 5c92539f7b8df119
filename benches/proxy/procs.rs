//! The processes a benchmark run starts: nginx (upstream and peer proxy)
//! and keygate itself, each on free loopback ports and stopped on drop
//! (redis-server comes from the tests' own starter).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process stopped on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss(&self) -> u64 {
        rss_of(&format!("/proc/{}/status", self.pid()))
    }
}

/// CPU time (user + system) of `pid` and its child processes (nginx's
/// workers), in clock ticks, from /proc.
pub fn cpu_ticks(pid: u32) -> u64 {
    let own = |pid: &str| -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0;
        };
        // After the `(comm)` field: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        num(11) + num(12)
    };
    let mut total = own(&pid.to_string());
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(child) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let parent = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(pid) {
                total += own(child);
            }
        }
    }
    total
}

pub fn rss_of(status_path: &str) -> u64 {
    std::fs::read_to_string(status_path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

impl Drop for Proc {
    /// SIGTERM first, so nginx's master takes its workers down with it
    /// (SIGKILL would leave them running); SIGKILL after 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not start listening on port {port}");
}

/// nginx with the given `http { ... }` body, in a prefix of its own.
pub fn nginx(dir: &Path, name: &'static str, workers: &str, http_body: &str, port: u16) -> Proc {
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = format!(
        "worker_processes {workers};\nerror_log {p}/logs/error.log warn;\npid {p}/nginx.pid;\nevents {{ worker_connections 4096; }}\nhttp {{\n access_log off;\n client_body_temp_path {p}/body;\n proxy_temp_path {p}/proxy;\n fastcgi_temp_path {p}/fastcgi;\n uwsgi_temp_path {p}/uwsgi;\n scgi_temp_path {p}/scgi;\n keepalive_requests 1000000;\n{http_body}\n}}\n",
        p = prefix.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts");
    wait_port(port, name);
    Proc { child }
}

/// `keygate store prepare` for a store section (the engine's triggers and
/// key-hash index), as an operator runs it before serving.
pub fn store_prepare(dir: &Path, store_yaml: &str) -> String {
    let config = dir.join("prepare.yaml");
    std::fs::write(&config, store_yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(&config)
        .args(["store", "prepare"])
        .output()
        .expect("keygate runs");
    assert!(
        out.status.success(),
        "store prepare failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A keygate instance started from its release binary.
pub struct Keygate {
    pub proc: Proc,
    pub port: u16,
    pub admin_port: u16,
    pub token: String,
}

pub fn keygate(
    dir: &Path,
    name: &'static str,
    upstream_port: u16,
    store_yaml: &str,
    extra: &str,
) -> Keygate {
    keygate_from(
        Path::new(env!("CARGO_BIN_EXE_keygate")),
        dir,
        name,
        upstream_port,
        store_yaml,
        extra,
    )
}

/// [`keygate`] from another build of it (`KEYGATE_BENCH_BASELINE`), to
/// compare two builds side by side in one run.
pub fn keygate_from(
    binary: &Path,
    dir: &Path,
    name: &'static str,
    upstream_port: u16,
    store_yaml: &str,
    extra: &str,
) -> Keygate {
    let home: PathBuf = dir.join(name);
    std::fs::create_dir_all(&home).unwrap();
    let (port, admin_port) = (super::free_port(), super::free_port());
    let config = format!(
        "listen: \"127.0.0.1:{port}\"\nupstream: \"http://127.0.0.1:{upstream_port}\"\n{store_yaml}admin:\n  listen: \"127.0.0.1:{admin_port}\"\n  token_file: \"admin.token\"\nlog:\n  access: false\n  level: warn\n{extra}"
    );
    let config_path = home.join("keygate.yaml");
    std::fs::write(&config_path, config).unwrap();
    let child = Command::new(binary)
        .arg("--config")
        .arg(&config_path)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(home.join("keygate.log")).unwrap())
        .spawn()
        .expect("keygate starts");
    wait_port(admin_port, name);
    wait_port(port, name);
    let token = std::fs::read_to_string(home.join("admin.token")).unwrap();
    Keygate {
        proc: Proc { child },
        port,
        admin_port,
        token,
    }
}

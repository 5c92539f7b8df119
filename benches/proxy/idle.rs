//! Memory per idle client connection: the RSS of a proxy's processes before
//! and after `n` connections are opened and held, and again after one
//! keep-alive request on each, keygate and nginx measured alike.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct IdleMemory {
    pub connections: usize,
    /// RSS growth per connection that has sent nothing.
    pub idle_bytes: f64,
    /// RSS growth per connection that has had one answer and waits.
    pub after_request_bytes: f64,
}

/// The RSS of `pid` and its children (nginx's workers), in bytes.
pub fn family_rss(pid: u32) -> u64 {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // Field 4 is the parent pid; field 2 may hold spaces.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if parent == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids.iter()
        .map(|p| super::procs::rss_of(&format!("/proc/{p}/status")))
        .sum()
}

/// Reads one answer with a `Content-Length` body.
fn read_answer(stream: &mut TcpStream) -> bool {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return head.starts_with("http/1.1 200");
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Opens `n` connections to `port`, measures, sends `request` on each,
/// measures again; `rss` reads the proxy's memory.
pub fn measure(port: u16, request: &str, n: usize, rss: impl Fn() -> u64) -> IdleMemory {
    let settle = || std::thread::sleep(Duration::from_millis(1000));
    settle();
    let before = rss();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        held.push(stream);
    }
    settle();
    let idle = rss();
    let mut answered = 0;
    for stream in &mut held {
        if stream.write_all(request.as_bytes()).is_ok() && read_answer(stream) {
            answered += 1;
        }
    }
    assert_eq!(answered, n, "every held connection gets its answer");
    settle();
    let after = rss();
    drop(held);
    let per = |rss: u64| rss.saturating_sub(before) as f64 / n as f64;
    IdleMemory {
        connections: n,
        idle_bytes: per(idle),
        after_request_bytes: per(after),
    }
}

/// Lets this process hold the connections it opens.
pub fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

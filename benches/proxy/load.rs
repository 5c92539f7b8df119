//! Load generators: wrk when installed (closed loop, many connections), and
//! a built-in hyper loop used when wrk is missing and for fixed-rate runs
//! (wrk cannot hold a rate), each request timed from just before it is sent.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const PATH: &str = "/api/workflows/wf_bench/webhook";
pub const BODY: &str = "{\"event\":\"bench\",\"payload\":{\"id\":42}}";

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    /// Responses outside 2xx (expected for the rejection variants).
    pub non_2xx: u64,
    pub errors: u64,
}

/// Which `Authorization` values a run sends, in turn.
#[derive(Clone)]
pub enum Auth {
    None,
    One(String),
    RoundRobin(Arc<Vec<String>>),
}

impl Auth {
    fn header(&self, n: usize) -> Option<&str> {
        match self {
            Auth::None => None,
            Auth::One(v) => Some(v),
            Auth::RoundRobin(all) => Some(&all[n % all.len()]),
        }
    }
}

fn lua_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// One closed-loop run with wrk: `connections` over 2 threads
/// (`KEYGATE_BENCH_WRK_THREADS` overrides, e.g. 1 to leave the proxy more
/// of the machine).
pub fn wrk(dir: &Path, port: u16, auth: &Auth, connections: u32, seconds: u32) -> Sample {
    let mut script = String::new();
    match auth {
        // One fixed request: wrk sends its prebuilt bytes with no Lua per
        // request, so the generator takes as little of the shared CPU as it
        // can and the proxies' own cost shows.
        Auth::None | Auth::One(_) => {
            script.push_str(&format!(
                "wrk.method = \"POST\"\nwrk.body = {}\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
                lua_quote(BODY)
            ));
            if let Auth::One(v) = auth {
                script.push_str(&format!(
                    "wrk.headers[\"Authorization\"] = {}\n",
                    lua_quote(v)
                ));
            }
        }
        // A new key each request needs a Lua function per request.
        Auth::RoundRobin(all) => {
            script.push_str(&format!(
                "local body = {}\nlocal keys = {{\n",
                lua_quote(BODY)
            ));
            for v in all.iter() {
                script.push_str(&format!("  {},\n", lua_quote(v)));
            }
            script.push_str("}\n");
            script.push_str(&format!(
                r#"local path = {path}
-- Each thread starts its own stretch of the keys, as far apart as the list
-- allows, so no key comes round again until the whole list has gone by.
local threads = 0
setup = function(thread)
  thread:set("first", threads)
  threads = threads + 1
end
local i = 0
init = function(args)
  i = (first * math.floor(#keys / 2)) % #keys
end
request = function()
  i = i % #keys + 1
  return wrk.format("POST", path, {{ ["Content-Type"] = "application/json", ["Authorization"] = keys[i] }}, body)
end
"#,
                path = lua_quote(PATH)
            ));
        }
    }
    script.push_str(
        r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("JSON %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99)))
end
"#,
    );
    let script_path = dir.join(format!("wrk-{port}.lua"));
    std::fs::write(&script_path, script).unwrap();
    let threads = std::env::var("KEYGATE_BENCH_WRK_THREADS").unwrap_or_else(|_| "2".into());
    let out = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
        ])
        .arg(&script_path)
        .arg(format!("http://127.0.0.1:{port}{PATH}"))
        .output()
        .expect("wrk runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("JSON "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no summary:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    Sample {
        rps: f[0] / (f[1] / 1e6),
        p50_us: f[4],
        p99_us: f[5],
        requests: f[0] as u64,
        non_2xx: f[3] as u64,
        errors: f[2] as u64,
    }
}

fn request(port: u16, auth: &Auth, n: usize) -> Request<Full<Bytes>> {
    let mut r = Request::builder()
        .method("POST")
        .uri(PATH)
        .header("host", format!("127.0.0.1:{port}"))
        .header("content-type", "application/json");
    if let Some(a) = auth.header(n) {
        r = r.header("authorization", a);
    }
    r.body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap()
}

async fn connect(port: u16) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends one request on a keep-alive connection (reconnecting when it is
/// gone): `(microseconds to the end of the response, whether 2xx)`.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    port: u16,
    request: Request<Full<Bytes>>,
) -> Option<(u32, bool)> {
    if sender.ready().await.is_err() {
        *sender = connect(port).await;
    }
    let t = Instant::now();
    match sender.send_request(request).await {
        Ok(r) => {
            let ok = r.status().is_success();
            let _ = r.into_body().collect().await;
            Some((t.elapsed().as_micros() as u32, ok))
        }
        Err(_) => {
            *sender = connect(port).await;
            None
        }
    }
}

type Worker = tokio::task::JoinHandle<(Vec<u32>, u64, u64)>;

/// Waits for every connection's `(latencies, non-2xx, errors)` and sums them.
async fn gather(tasks: Vec<Worker>, start: Instant) -> Sample {
    let (mut all, mut non_2xx, mut errors) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, n, e) = t.await.unwrap();
        all.extend(l);
        non_2xx += n;
        errors += e;
    }
    summarize(all, start.elapsed(), non_2xx, errors)
}

fn summarize(mut latencies: Vec<u32>, elapsed: Duration, non_2xx: u64, errors: u64) -> Sample {
    latencies.sort_unstable();
    let pct = |p: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            f64::from(latencies[((latencies.len() - 1) as f64 * p).round() as usize])
        }
    };
    Sample {
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        requests: latencies.len() as u64,
        non_2xx,
        errors,
    }
}

/// Closed loop with the built-in client (used when wrk is not installed).
pub async fn closed_loop(port: u16, auth: &Auth, connections: u32, seconds: u32) -> Sample {
    let start = Instant::now();
    let until = start + Duration::from_secs(u64::from(seconds));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let auth = auth.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(port).await;
            let (mut lat, mut non_2xx, mut errors) = (Vec::new(), 0u64, 0u64);
            let mut n = c as usize * 7919;
            while Instant::now() < until {
                n += 1;
                match send(&mut sender, port, request(port, &auth, n)).await {
                    Some((took, ok)) => {
                        lat.push(took);
                        non_2xx += u64::from(!ok);
                    }
                    None => errors += 1,
                }
            }
            (lat, non_2xx, errors)
        }));
    }
    gather(tasks, start).await
}

/// A fixed rate over a fixed set of keep-alive connections: request `n` is
/// due at `start + n / rate`; each connection takes the next due request,
/// waits for its time and sends it. Latency is from send to the end of the
/// response. Each connection first sends one request that is not counted,
/// and the clock starts once all have: the percentiles are of a steady
/// state, not of 64 connections being accepted and their first upstream
/// connections opened (1.6 % of a 4,000-request run, enough to be its p99).
pub async fn fixed_rate(port: u16, auth: &Auth, rate: u32, seconds: u32) -> Sample {
    use std::sync::atomic::{AtomicU64, Ordering};
    const CONNECTIONS: usize = 64;
    let total = u64::from(rate) * u64::from(seconds);
    // Warm-up, joined before anything is timed (a failed connection fails
    // the run here instead of leaving the others waiting).
    let warming: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let auth = auth.clone();
            tokio::spawn(async move {
                let mut sender = connect(port).await;
                // Keys past the measured ones, so a rotation longer than
                // the run (f's) gets no cache hits from the warm-up.
                let unmeasured = total as usize + c;
                let _ = send(&mut sender, port, request(port, &auth, unmeasured)).await;
                sender
            })
        })
        .collect();
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for w in warming {
        senders.push(w.await.expect("warm-up connection"));
    }
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let (next, auth) = (next.clone(), auth.clone());
            tokio::spawn(async move {
                let (mut lat, mut non_2xx, mut errors) = (Vec::new(), 0u64, 0u64);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    tokio::time::sleep_until(start + interval.mul_f64(n as f64)).await;
                    match send(&mut sender, port, request(port, &auth, n as usize)).await {
                        Some((took, ok)) => {
                            lat.push(took);
                            non_2xx += u64::from(!ok);
                        }
                        None => errors += 1,
                    }
                }
                (lat, non_2xx, errors)
            })
        })
        .collect();
    gather(tasks, start.into_std()).await
}

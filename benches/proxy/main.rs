//! `cargo bench --bench proxy`: keygate against a direct upstream and against
//! nginx as a plain reverse proxy, side by side in alternating rounds on one
//! machine, with one load generator. Prints a table and ratios and writes
//! `target/bench/proxy.json`. See README "Performance".

mod idle;
mod load;
/// The tests' own PostgreSQL starter, with the engine's tables.
#[path = "../../tests/common/postgres.rs"]
mod postgres_server;
mod procs;
/// The tests' own `redis-server` starter.
#[path = "../../tests/common/redis.rs"]
mod redis_server;
mod spike;

use keygate::key::{KeyHash, NewKey};
use load::{Auth, Sample};
use procs::{Keygate, have, keygate, keygate_from, nginx};
use redis_server::{RedisServer, free_port};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Rounds of each variant; `KEYGATE_BENCH_ROUNDS` overrides.
const ROUNDS: usize = 5;
const SECONDS: u32 = 3;
const CONNECTIONS: u32 = 64;
const ROUND_ROBIN_KEYS: usize = 10_000;
/// Keys the engine issued for the cold-key run on postgres, through a key
/// cache of [`COLD_CACHE`]: almost every request a miss.
const COLD_KEYS: usize = 10_000;
const COLD_CACHE: usize = 100;
const MEMORY_KEYS: usize = 1_000_000;
/// Idle client connections held for the memory-per-connection phase;
/// `KEYGATE_BENCH_IDLE` overrides.
const IDLE_CONNECTIONS: usize = 5_000;

struct Variant {
    id: &'static str,
    what: &'static str,
    port: u16,
    auth: Auth,
}

fn admin(
    kg: &Keygate,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        kg.token,
        body.len()
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", kg.admin_port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn create_key(kg: &Keygate, user: &str) -> String {
    let v = admin(kg, "POST", "/admin/v1/keys", Some(json!({"userId": user})));
    format!("Bearer {}", v["key"].as_str().expect("key created"))
}

fn metric(kg: &Keygate, name: &str) -> f64 {
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut s = std::net::TcpStream::connect(("127.0.0.1", kg.admin_port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Total commands Redis has run (INFO commandstats), less the INFO calls.
fn redis_calls(port: u16) -> u64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn summarize(samples: &[Sample]) -> Sample {
    let pick = |f: fn(&Sample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
    Sample {
        rps: pick(|s| s.rps),
        p50_us: pick(|s| s.p50_us),
        p99_us: pick(|s| s.p99_us),
        requests: samples.iter().map(|s| s.requests).sum(),
        non_2xx: samples.iter().map(|s| s.non_2xx).sum(),
        errors: samples.iter().map(|s| s.errors).sum(),
    }
}

fn main() {
    let started = Instant::now();
    idle::raise_fd_limit();
    // For iterating on one number: `KEYGATE_BENCH_ONLY=a,b,d` measures just
    // those variants' throughput and skips the fixed-rate and memory phases.
    let only: Option<Vec<String>> = std::env::var("KEYGATE_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let rounds: usize = std::env::var("KEYGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let use_wrk = have("wrk");
    let use_nginx = have("nginx");
    let use_redis = have("redis-server");
    let use_postgres = postgres_server::installed();
    println!(
        "load generator: {}; upstream: {}; redis: {}; postgres: {}",
        if use_wrk {
            "wrk"
        } else {
            "built-in hyper loop"
        },
        if use_nginx {
            "nginx return 200"
        } else {
            "built-in hyper server"
        },
        if use_redis {
            "yes"
        } else {
            "not installed: Redis variants skipped"
        },
        if use_postgres {
            "yes"
        } else {
            "not installed: postgres variants skipped"
        },
    );

    // The fixed upstream, the same for every variant.
    let upstream_port = free_port();
    let _upstream = if use_nginx {
        let body = format!(
            " server {{ listen 127.0.0.1:{upstream_port} reuseport backlog=4096; keepalive_timeout 120s; location / {{ return 200 '{{\"ok\":true}}'; }} }}"
        );
        Some(nginx(dir.path(), "upstream", "1", &body, upstream_port))
    } else {
        std::thread::spawn(move || builtin_upstream(upstream_port));
        procs::wait_port(upstream_port, "built-in upstream");
        None
    };

    let embedded = format!(
        "store:\n  embedded:\n    path: \"{}\"\n",
        dir.path().join("kg.redb").display()
    );
    // The rejection variants fail thousands of times from 127.0.0.1: keep the
    // failed-auth limiter from answering 429 to the next variant.
    let no_limit = "rate_limit:\n  max_failures: 0\n";
    let kg_embedded = keygate(
        dir.path(),
        "keygate-embedded",
        upstream_port,
        &embedded,
        no_limit,
    );
    let idle_rss = kg_embedded.proc.rss();
    let user = "bench_user";
    let key_b = create_key(&kg_embedded, user);
    admin(
        &kg_embedded,
        "PUT",
        "/admin/v1/workflows/wf_bench",
        Some(json!({"userId": user})),
    );

    let mut variants = vec![
        Variant {
            id: "a",
            what: "direct to the upstream",
            port: upstream_port,
            auth: Auth::One(key_b.clone()),
        },
        Variant {
            id: "b",
            what: "keygate, embedded store, one cached key",
            port: kg_embedded.port,
            auth: Auth::One(key_b.clone()),
        },
    ];
    // Another build of keygate beside this one, set up as b.
    let baseline = std::env::var_os("KEYGATE_BENCH_BASELINE").map(|binary| {
        let kg = keygate_from(
            Path::new(&binary),
            dir.path(),
            "keygate-baseline",
            upstream_port,
            &format!(
                "store:\n  embedded:\n    path: \"{}\"\n",
                dir.path().join("kg-baseline.redb").display()
            ),
            no_limit,
        );
        let key = create_key(&kg, user);
        admin(
            &kg,
            "PUT",
            "/admin/v1/workflows/wf_bench",
            Some(json!({"userId": user})),
        );
        variants.push(Variant {
            id: "b0",
            what: "keygate baseline build (KEYGATE_BENCH_BASELINE), as b",
            port: kg.port,
            auth: Auth::One(key),
        });
        kg
    });

    let redis_server = use_redis.then(RedisServer::start);
    let redis_port = redis_server.as_ref().map_or(0, |r| r.port);
    let redis_yaml = format!("store:\n  redis:\n    url: \"redis://127.0.0.1:{redis_port}\"\n");
    let mut redis_instances = Vec::new();
    if use_redis {
        let kg_redis = keygate(
            dir.path(),
            "keygate-redis",
            upstream_port,
            &redis_yaml,
            no_limit,
        );
        let key_c = create_key(&kg_redis, user);
        admin(
            &kg_redis,
            "PUT",
            "/admin/v1/workflows/wf_bench",
            Some(json!({"userId": user})),
        );
        variants.push(Variant {
            id: "c",
            what: "keygate, Redis store, one cached key",
            port: kg_redis.port,
            auth: Auth::One(key_c),
        });
        redis_instances.push(kg_redis);
    }

    let _nginx_proxy = use_nginx.then(|| {
        let port = free_port();
        let body = format!(
            " upstream engine {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}\n server {{ listen 127.0.0.1:{port} reuseport backlog=4096; keepalive_timeout 120s; location / {{ proxy_pass http://engine; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        );
        let p = nginx(dir.path(), "nginx-proxy", "auto", &body, port);
        variants.push(Variant { id: "d", what: "nginx proxy_pass, no auth (worker_processes auto, keepalive)", port, auth: Auth::None });
        p
    });

    // Issue [12]'s spike: the same minimal data plane on epoll (tokio) and
    // on io_uring, two threads each, in this process.
    {
        let secret = key_b.strip_prefix("Bearer ").unwrap_or(&key_b);
        let valid: [u8; 32] = KeyHash::of(secret).0;
        let (t, u, v) = (free_port(), free_port(), free_port());
        spike::epoll::serve(t, upstream_port, valid, 2);
        procs::wait_port(t, "spike on epoll");
        let uring = spike::uring::serve(u, upstream_port, valid, 2, false)
            && spike::uring::serve(v, upstream_port, valid, 2, true);
        if uring {
            procs::wait_port(u, "spike on io_uring");
            procs::wait_port(v, "spike on io_uring, linked");
        } else {
            println!("io_uring_setup refused here: spike variants u and v skipped");
        }
        variants.push(Variant {
            id: "t",
            what: "spike: minimal auth proxy on tokio/epoll (2 threads)",
            port: t,
            auth: Auth::One(key_b.clone()),
        });
        if uring {
            variants.push(Variant {
                id: "u",
                what: "spike: the same minimal auth proxy on io_uring (2 threads)",
                port: u,
                auth: Auth::One(key_b.clone()),
            });
            variants.push(Variant {
                id: "v",
                what: "spike: as u, each send linked to the next receive",
                port: v,
                auth: Auth::One(key_b.clone()),
            });
        }
    }

    let unknown = format!("Bearer wfb_{}", "Q".repeat(38));
    variants.push(Variant {
        id: "e1",
        what: "keygate rejecting a well-formed unknown key (negative cache)",
        port: kg_embedded.port,
        auth: Auth::One(unknown),
    });
    variants.push(Variant {
        id: "e2",
        what: "keygate rejecting a malformed key",
        port: kg_embedded.port,
        auth: Auth::One("Bearer not-a-key".into()),
    });

    // f: 10,000 keys in turn through a cache of 1,000: every request a miss.
    let mut round_robin = None;
    if use_redis {
        let kg_f = keygate(
            dir.path(),
            "keygate-redis-small-cache",
            upstream_port,
            &redis_yaml,
            &format!("{no_limit}cache:\n  keys: {{ capacity: 1000, ttl: 60s }}\n"),
        );
        let t = Instant::now();
        let keys: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..ROUND_ROBIN_KEYS / 8)
                            .map(|_| create_key(&kg_f, user))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        println!("created {} keys in {:.1?}", keys.len(), t.elapsed());
        let keys = std::sync::Arc::new(keys);
        variants.push(Variant {
            id: "f",
            what: "keygate, Redis store, 10,000 keys round robin, cache of 1,000",
            port: kg_f.port,
            auth: Auth::RoundRobin(keys.clone()),
        });
        round_robin = Some(keys);
        redis_instances.push(kg_f);
    }
    // h: a 3-master Redis Cluster; h1 one cached key (as c), h2 every
    // request a miss (as f).
    let cluster = use_redis.then(|| redis_server::RedisCluster::start(3, 0));
    let mut cluster_instances = Vec::new();
    if let (Some(cluster), Some(keys)) = (&cluster, &round_robin) {
        let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("\"{s}\"")).collect();
        let cluster_yaml = format!("store:\n  redis:\n    cluster: [{}]\n", seeds.join(", "));
        let kg_h1 = keygate(
            dir.path(),
            "keygate-cluster",
            upstream_port,
            &cluster_yaml,
            no_limit,
        );
        admin(
            &kg_h1,
            "PUT",
            "/admin/v1/workflows/wf_bench",
            Some(json!({"userId": user})),
        );
        variants.push(Variant {
            id: "h1",
            what: "keygate, 3-master Redis Cluster, one cached key",
            port: kg_h1.port,
            auth: Auth::One(create_key(&kg_h1, user)),
        });
        let kg_h2 = keygate(
            dir.path(),
            "keygate-cluster-small-cache",
            upstream_port,
            &cluster_yaml,
            &format!("{no_limit}cache:\n  keys: {{ capacity: 1000, ttl: 60s }}\n"),
        );
        let t = Instant::now();
        let cluster_keys: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..keys.len() / 8)
                            .map(|_| create_key(&kg_h2, user))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        println!(
            "created {} keys on the cluster in {:.1?}",
            cluster_keys.len(),
            t.elapsed()
        );
        variants.push(Variant {
            id: "h2",
            what: "keygate, 3-master Redis Cluster, 10,000 keys round robin, cache of 1,000",
            port: kg_h2.port,
            auth: Auth::RoundRobin(std::sync::Arc::new(cluster_keys)),
        });
        cluster_instances.push(kg_h1);
        cluster_instances.push(kg_h2);
    }
    // g: the engine's own database, its keys inserted as the engine does,
    // after `store prepare` (triggers and the key-hash index).
    let engine_db = use_postgres.then(postgres_server::PostgresServer::start);
    let mut postgres_instances = Vec::new();
    let mut cold = None;
    if let Some(db) = &engine_db {
        db.psql(&format!(
            "INSERT INTO users (id) VALUES ('{user}'); INSERT INTO workflows (id, name, user_id, nodes, edges) VALUES ('wf_bench', 'bench', '{user}', '[]', '[]')"
        ));
        let pg_yaml = format!("store:\n  postgres:\n    url: \"{}\"\n", db.url());
        print!("{}", procs::store_prepare(dir.path(), &pg_yaml));
        let kg_g = keygate(
            dir.path(),
            "keygate-postgres",
            upstream_port,
            &pg_yaml,
            no_limit,
        );
        variants.push(Variant {
            id: "g",
            what: "keygate, postgres store (the engine's tables), one cached key",
            port: kg_g.port,
            auth: Auth::One(create_key(&kg_g, user)),
        });
        let keys = rt.block_on(engine_keys(db, user, COLD_KEYS));
        let kg_cold = keygate(
            dir.path(),
            "keygate-postgres-cold",
            upstream_port,
            &pg_yaml,
            &format!("{no_limit}cache:\n  keys: {{ capacity: {COLD_CACHE}, ttl: 60s }}\n"),
        );
        cold = Some((kg_cold.port, std::sync::Arc::new(keys)));
        postgres_instances.push(kg_g);
        postgres_instances.push(kg_cold);
    }
    // Cache rejections count from here; e2 must make no store call.
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let mut redis_per_request: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut cpu_per_request: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut malformed_store_calls = 0.0;

    let idle_n: usize = std::env::var("KEYGATE_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(IDLE_CONNECTIONS);
    let request_with = |authorization: &str| {
        format!(
            "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {authorization}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            load::PATH,
            load::BODY.len(),
            load::BODY
        )
    };
    let idle_request = request_with(&key_b);
    let baseline_request = variants.iter().find_map(|v| match (&v.auth, v.id) {
        (Auth::One(key), "b0") => Some(request_with(key)),
        _ => None,
    });
    let nginx_port = variants.iter().find(|v| v.id == "d").map(|v| v.port);
    let measure_idle = || {
        let mut out = BTreeMap::new();
        let kg_pid = kg_embedded.proc.pid();
        out.insert(
            "b",
            idle::measure(kg_embedded.port, &idle_request, idle_n, || {
                idle::family_rss(kg_pid)
            }),
        );
        if let (Some(kg), Some(request)) = (&baseline, &baseline_request) {
            let pid = kg.proc.pid();
            out.insert(
                "b0",
                idle::measure(kg.port, request, idle_n, || idle::family_rss(pid)),
            );
        }
        if let (Some(nginx), Some(port)) = (&_nginx_proxy, nginx_port) {
            let pid = nginx.pid();
            out.insert(
                "d",
                idle::measure(port, &idle_request, idle_n, || idle::family_rss(pid)),
            );
        }
        for (id, m) in &out {
            println!(
                "idle connections {id}: {} held, {:.2} kB each idle, {:.2} kB each after one request",
                m.connections,
                m.idle_bytes / 1000.0,
                m.after_request_bytes / 1000.0
            );
        }
        out
    };
    if only
        .as_ref()
        .is_some_and(|o| o.len() == 1 && o[0] == "idle")
    {
        measure_idle();
        return;
    }
    if let Some(only) = &only {
        variants.retain(|v| only.iter().any(|o| o == v.id));
    }
    for round in 0..rounds {
        // Each round starts one variant later, so no variant always runs
        // right after the same one (after a, the machine is busiest).
        let n = variants.len();
        for v in (0..n).map(|i| &variants[(i + round) % n]) {
            let calls_before = use_redis.then(|| redis_calls(redis_port));
            let cpu_pid = match v.id {
                "b" => Some(kg_embedded.proc.pid()),
                "b0" => baseline.as_ref().map(|kg| kg.proc.pid()),
                "d" => _nginx_proxy.as_ref().map(procs::Proc::pid),
                "t" | "u" | "v" => Some(std::process::id()),
                _ => None,
            };
            let cpu_before = cpu_pid.map(procs::cpu_ticks);
            let misses_before =
                (v.id == "e2").then(|| metric(&kg_embedded, "keygate_key_cache_misses_total"));
            let s = if use_wrk {
                load::wrk(dir.path(), v.port, &v.auth, CONNECTIONS, SECONDS)
            } else {
                rt.block_on(load::closed_loop(v.port, &v.auth, CONNECTIONS, SECONDS))
            };
            if let (Some(pid), Some(before)) = (cpu_pid, cpu_before) {
                let ticks = procs::cpu_ticks(pid).saturating_sub(before);
                // Clock ticks are 10 ms on Linux (USER_HZ 100).
                cpu_per_request
                    .entry(v.id)
                    .or_default()
                    .push(ticks as f64 * 10_000.0 / s.requests.max(1) as f64);
            }
            if let Some(before) = misses_before {
                malformed_store_calls +=
                    metric(&kg_embedded, "keygate_key_cache_misses_total") - before;
            }
            if let (Some(before), "c" | "f") = (calls_before, v.id) {
                let calls = redis_calls(redis_port) - before;
                redis_per_request
                    .entry(v.id)
                    .or_default()
                    .push(calls as f64 / s.requests.max(1) as f64);
            }
            println!(
                "round {} {:>2}: {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs  non-2xx {:>7}  errors {}",
                round + 1,
                v.id,
                s.rps,
                s.p50_us,
                s.p99_us,
                s.non_2xx,
                s.errors
            );
            samples.entry(v.id).or_default().push(s);
        }
    }
    let cpu = |id: &str| cpu_per_request.get(id).map(|v| median(&mut v.clone()));
    let show = |id: &str| cpu(id).map_or("n/a".to_owned(), |c| format!("{c:.1} µs"));
    println!(
        "CPU per request (median of rounds): b {}  b0 {}  d {}  t {}  u {}  v {}   (the proxy's own processes; t, u and v include this process's idle threads)",
        show("b"),
        show("b0"),
        show("d"),
        show("t"),
        show("u"),
        show("v")
    );
    let loaded_rss = kg_embedded.proc.rss();
    let result: BTreeMap<&str, Sample> = samples.iter().map(|(k, v)| (*k, summarize(v))).collect();
    if only.is_some() {
        for v in &variants {
            let s = &result[v.id];
            println!(
                "{:<3} {:<62} {:>10.0} {:>9.0} {:>9.0}",
                v.id, v.what, s.rps, s.p50_us, s.p99_us
            );
        }
        let ratio = |x: &str, y: &str| result.get(x).zip(result.get(y)).map(|(a, b)| a.rps / b.rps);
        println!(
            "b/d = {:?}  b/a = {:?}  b/b0 = {:?}  u/t = {:?}  v/t = {:?}  u/d = {:?}",
            ratio("b", "d"),
            ratio("b", "a"),
            ratio("b", "b0"),
            ratio("u", "t"),
            ratio("v", "t"),
            ratio("u", "d")
        );
        return;
    }

    // Latency at half of keygate's peak, and f at 1,000 req/s: fixed rate,
    // built-in generator (wrk cannot hold a rate), alternating a and b.
    let half = (result["b"].rps / 2.0).round() as u32;
    let mut at_half: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for _ in 0..rounds {
        for v in variants.iter().filter(|v| v.id == "a" || v.id == "b") {
            let s = rt.block_on(load::fixed_rate(v.port, &v.auth, half, SECONDS));
            println!(
                "half load {:>2} at {half} req/s: p50 {:.0} µs  p99 {:.0} µs  errors {}",
                v.id, s.p50_us, s.p99_us, s.errors
            );
            at_half.entry(v.id).or_default().push(s);
        }
    }
    let at_half: BTreeMap<&str, Sample> = at_half.iter().map(|(k, v)| (*k, summarize(v))).collect();
    // f and h2 at 1,000 req/s: every request a store lookup.
    let at_1000 = |id: &str| {
        let v = variants.iter().find(|v| v.id == id)?;
        let runs: Vec<Sample> = (0..rounds)
            .map(|_| {
                let s = rt.block_on(load::fixed_rate(v.port, &v.auth, 1000, SECONDS));
                println!(
                    "{id} at 1000 req/s: p50 {:.0} µs  p99 {:.0} µs  non-2xx {}",
                    s.p50_us, s.p99_us, s.non_2xx
                );
                s
            })
            .collect();
        Some(summarize(&runs))
    };
    let f_at_1000 = at_1000("f");
    let h2_at_1000 = at_1000("h2");

    // g cold: every request a key the cache does not hold, at 1,000 req/s.
    let g_cold = cold.as_ref().map(|(port, keys)| {
        let kg_cold = &postgres_instances[1];
        let misses_before = metric(kg_cold, "keygate_key_cache_misses_total");
        let mut requests = 0;
        let runs: Vec<Sample> = (0..rounds)
            .map(|_| {
                let s = rt.block_on(load::fixed_rate(
                    *port,
                    &Auth::RoundRobin(keys.clone()),
                    1000,
                    SECONDS,
                ));
                requests += s.requests;
                println!(
                    "g cold at 1000 req/s: p50 {:.0} µs  p99 {:.0} µs  non-2xx {}",
                    s.p50_us, s.p99_us, s.non_2xx
                );
                s
            })
            .collect();
        let misses = metric(kg_cold, "keygate_key_cache_misses_total") - misses_before;
        (summarize(&runs), misses / requests.max(1) as f64)
    });

    let memory = use_redis.then(|| rt.block_on(cache_memory(redis_port)));
    let idle_memory = measure_idle();

    // Report.
    let ratio = |x: &str, y: &str| match (result.get(x), result.get(y)) {
        (Some(a), Some(b)) => Some(a.rps / b.rps),
        _ => None,
    };
    println!(
        "\n{:<3} {:<62} {:>10} {:>9} {:>9}",
        "", "variant (median of rounds)", "req/s", "p50 µs", "p99 µs"
    );
    for v in &variants {
        let s = &result[v.id];
        println!(
            "{:<3} {:<62} {:>10.0} {:>9.0} {:>9.0}",
            v.id, v.what, s.rps, s.p50_us, s.p99_us
        );
    }
    let fmt = |r: Option<f64>| r.map_or("n/a".to_owned(), |r| format!("{r:.2}"));
    let cmds = |id: &str| redis_per_request.get(id).map(|v| median(&mut v.clone()));
    println!("\nb/d = {}   (target ≥ 1.0)", fmt(ratio("b", "d")));
    println!("b/a = {}", fmt(ratio("b", "a")));
    if baseline.is_some() {
        println!(
            "b/b0 = {}   (this build over the baseline build)",
            fmt(ratio("b", "b0"))
        );
    }
    println!(
        "e1/b = {}  e2/b = {}   (target ≥ 1.5)",
        fmt(ratio("e1", "b")),
        fmt(ratio("e2", "b"))
    );
    println!("store calls during the malformed-key rounds: {malformed_store_calls}");
    println!(
        "Redis commands per request: c {:.5}  f {:.3}   (target c ≤ 0.01)",
        cmds("c").unwrap_or(f64::NAN),
        cmds("f").unwrap_or(f64::NAN)
    );
    let p99_gap_ms = (at_half["b"].p99_us - at_half["a"].p99_us) / 1000.0;
    println!(
        "at half of peak ({half} req/s): p99 a {:.0} µs, b {:.0} µs, gap {p99_gap_ms:.3} ms   (target ≤ 1 ms)",
        at_half["a"].p99_us, at_half["b"].p99_us
    );
    if let Some(f) = &f_at_1000 {
        println!(
            "f at 1,000 req/s: p99 {:.0} µs   (target ≤ 1000 µs)",
            f.p99_us
        );
    }
    if let Some(h2) = &h2_at_1000 {
        println!(
            "h2 at 1,000 req/s (Redis Cluster, every request a lookup): p50 {:.0} µs, p99 {:.0} µs",
            h2.p50_us, h2.p99_us
        );
    }
    println!(
        "g/b = {}   (postgres store, cached key, over embedded)",
        fmt(ratio("g", "b"))
    );
    println!(
        "u/t = {}  v/t = {}  t/b = {}  u/d = {}   (spike: io_uring over epoll for the same minimal proxy; epoll spike over keygate; io_uring spike over nginx)",
        fmt(ratio("u", "t")),
        fmt(ratio("v", "t")),
        fmt(ratio("t", "b")),
        fmt(ratio("u", "d"))
    );
    println!(
        "h1/b = {}  h1/c = {}  h2/f = {}   (Redis Cluster over embedded, over one Redis node)",
        fmt(ratio("h1", "b")),
        fmt(ratio("h1", "c")),
        fmt(ratio("h2", "f"))
    );
    if let Some((g, miss_ratio)) = &g_cold {
        println!(
            "g cold at 1,000 req/s: p50 {:.0} µs, p99 {:.0} µs, {:.1} % of requests a cache miss   (target p99 ≤ 2000 µs)",
            g.p50_us,
            g.p99_us,
            miss_ratio * 100.0
        );
    }
    println!(
        "keygate RSS: idle {:.1} MB, after load {:.1} MB   (target idle ≤ 30 MB)",
        idle_rss as f64 / 1e6,
        loaded_rss as f64 / 1e6
    );
    if let Some((keys, per_key)) = memory {
        println!(
            "cache memory: {per_key:.0} bytes per cached key with {keys} keys cached   (target ≤ 300)"
        );
    }
    if let Some(b) = idle_memory.get("b") {
        let d = idle_memory.get("d");
        println!(
            "per idle connection: keygate {:.2} kB ({:.2} after one request), nginx {}   (target ≤ 2 kB and ≤ nginx)",
            b.idle_bytes / 1000.0,
            b.after_request_bytes / 1000.0,
            d.map_or("n/a".to_owned(), |d| format!(
                "{:.2} kB ({:.2} after one request)",
                d.idle_bytes / 1000.0,
                d.after_request_bytes / 1000.0
            ))
        );
    }
    println!("bench took {:.0?}", started.elapsed());

    let report = json!({
        "machine": machine(),
        "load_generator": if use_wrk { "wrk -t2 -c64" } else { "built-in hyper loop, 64 connections" },
        "upstream": if use_nginx { "nginx return 200 (1 worker)" } else { "built-in hyper server" },
        "rounds": rounds,
        "seconds_per_round": SECONDS,
        "variants": variants.iter().map(|v| json!({"id": v.id, "what": v.what, "median": result[v.id], "rounds": samples[v.id]})).collect::<Vec<_>>(),
        "ratios": {"g_over_b": ratio("g", "b"), "b_over_d": ratio("b", "d"), "b_over_a": ratio("b", "a"), "e1_over_b": ratio("e1", "b"), "e2_over_b": ratio("e2", "b"), "b_over_b0": ratio("b", "b0"), "h1_over_b": ratio("h1", "b"), "h1_over_c": ratio("h1", "c"), "h2_over_f": ratio("h2", "f"), "u_over_t": ratio("u", "t"), "v_over_t": ratio("v", "t"), "cpu_us_per_request": {"b": cpu("b"), "b0": cpu("b0"), "d": cpu("d"), "t": cpu("t"), "u": cpu("u"), "v": cpu("v")}, "t_over_b": ratio("t", "b"), "u_over_d": ratio("u", "d")},
        "idle_connections": idle_memory,
        "malformed_key_store_calls": malformed_store_calls,
        "redis_commands_per_request": {"c": cmds("c"), "f": cmds("f")},
        "half_load": {"rate": half, "a": at_half["a"], "b": at_half["b"], "p99_gap_ms": p99_gap_ms},
        "f_at_1000_rps": f_at_1000,
        "h2_at_1000_rps": h2_at_1000,
        "g_cold_at_1000_rps": g_cold.as_ref().map(|(s, miss_ratio)| json!({"sample": s, "miss_ratio": miss_ratio})),
        "keygate_rss_bytes": {"idle": idle_rss, "after_load": loaded_rss},
        "cache_memory": memory.map(|(keys, per_key)| json!({"keys": keys, "bytes_per_key": per_key})),
        "duration_seconds": started.elapsed().as_secs_f64(),
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("proxy.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("wrote target/bench/proxy.json");
    drop(redis_instances);
    drop(postgres_instances);
    drop(baseline);
}

/// `n` keys inserted into the engine's `api_keys` as the engine issues them
/// (36 characters, hex SHA-256, 11-character prefix), in one statement;
/// returns their `Authorization` values.
async fn engine_keys(db: &postgres_server::PostgresServer, user: &str, n: usize) -> Vec<String> {
    use sha2::Digest;
    let mut keys = Vec::with_capacity(n);
    let (mut ids, mut hashes, mut prefixes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes).unwrap();
        let key = format!("wfb_{}", keygate::key::base64url(&bytes));
        ids.push(format!("cold{i}"));
        hashes.push(hex::encode(sha2::Sha256::digest(key.as_bytes())));
        prefixes.push(key[..11].to_owned());
        keys.push(format!("Bearer {key}"));
    }
    db.client()
        .await
        .execute(
            "INSERT INTO api_keys (id, user_id, key_hash, key_prefix) SELECT id, $4, h, p FROM unnest($1::text[], $2::text[], $3::text[]) AS t(id, h, p)",
            &[&ids, &hashes, &prefixes, &user],
        )
        .await
        .unwrap();
    keys
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    json!({
        "cores": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "cpu": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
    })
}

/// RSS growth per cached key: 1,000,000 keys written straight into Redis
/// (the documented schema), then verified once each through keygate's own
/// cache and store in this process.
async fn cache_memory(redis_port: u16) -> (u64, f64) {
    use keygate::auth::Auth as KeyCache;
    use keygate::config::{CacheConfig, CacheSize, RedisConfig};
    use keygate::store::redis::RedisStore;
    let prefix = "mem:";
    let client = redis::Client::open(format!("redis://127.0.0.1:{redis_port}")).unwrap();
    // Pipelines of 10,000 writes: more than the default response timeout
    // on a loaded machine.
    let patient =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&patient)
        .await
        .unwrap();
    let t = Instant::now();
    let mut hashes = Vec::with_capacity(MEMORY_KEYS);
    for chunk in 0..MEMORY_KEYS / 10_000 {
        let mut pipe = redis::pipe();
        for i in 0..10_000 {
            let key = NewKey::generate().unwrap();
            let hash = key.hash();
            let n = chunk * 10_000 + i;
            pipe.cmd("HSET")
                .arg(format!("{prefix}key:{}", hash.to_hex()))
                .arg(&[
                    ("id", format!("key_{n:016}")),
                    ("userId", format!("user_{:06}", n % 100_000)),
                    ("name", String::new()),
                    ("keyPrefix", key.prefix()),
                    ("createdAt", "1767225600000".to_owned()),
                ])
                .ignore();
            hashes.push(hash);
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
    println!(
        "wrote {MEMORY_KEYS} key records to Redis in {:.1?}",
        t.elapsed()
    );

    let store = RedisStore::connect(&RedisConfig {
        prefix: prefix.into(),
        ..RedisConfig::single(
            format!("redis://127.0.0.1:{redis_port}"),
            Duration::from_secs(5),
        )
    })
    .unwrap();
    let size = CacheSize {
        capacity: MEMORY_KEYS as u64 * 2,
        ttl: Duration::from_secs(3600),
    };
    let metrics = std::sync::Arc::new(keygate::metrics::Metrics::new([]));
    let cache = std::sync::Arc::new(KeyCache::new(
        std::sync::Arc::new(store),
        &CacheConfig {
            keys: size,
            negative: size,
            owners: size,
            ttl_without_notify: std::time::Duration::from_secs(1),
        },
        metrics,
    ));
    let hashes: std::sync::Arc<Vec<KeyHash>> = std::sync::Arc::new(hashes);
    let before = procs::rss_of("/proc/self/status");
    let t = Instant::now();
    let workers = 64;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (cache, hashes) = (cache.clone(), hashes.clone());
            tokio::spawn(async move {
                for i in (w..hashes.len()).step_by(workers) {
                    cache.authenticate(hashes[i]).await.expect("key found");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let cached = cache.cached_keys();
    let after = procs::rss_of("/proc/self/status");
    println!(
        "verified {} keys in {:.1?}; RSS {:.0} MB -> {:.0} MB",
        hashes.len(),
        t.elapsed(),
        before as f64 / 1e6,
        after as f64 / 1e6
    );
    (
        cached,
        (after.saturating_sub(before)) as f64 / cached.max(1) as f64,
    )
}

/// Minimal hyper upstream for machines without nginx.
fn builtin_upstream(port: u16) {
    use hyper::service::service_fn;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"{\"ok\":true}")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

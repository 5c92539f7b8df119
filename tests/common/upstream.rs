//! Upstreams on 127.0.0.1:0: a real hyper server that records what it
//! saw, and a scripted one that answers with fixed bytes.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    /// `usize::MAX` where the body did not arrive whole.
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

    /// How many requests arrived with their whole body.
    pub fn whole_bodies(&self) -> usize {
        self.requests()
            .iter()
            .filter(|s| s.body_len != usize::MAX)
            .count()
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
    /// Connections this upstream closed itself, after answering.
    pub hung_up: Arc<AtomicUsize>,
}

impl Scripted {
    pub async fn start(response: &'static str, close: bool) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let accepted: Arc<AtomicUsize> = Arc::default();
        let closed: Arc<AtomicUsize> = Arc::default();
        let hung_up: Arc<AtomicUsize> = Arc::default();
        let (record, count, ended) = (seen.clone(), accepted.clone(), closed.clone());
        let hangs = hung_up.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (record, ended, hangs) = (record.clone(), ended.clone(), hangs.clone());
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
                            drop(stream);
                            hangs.fetch_add(1, Ordering::SeqCst);
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
            hung_up,
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

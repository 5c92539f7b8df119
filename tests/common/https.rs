//! A real HTTPS server on 127.0.0.1:0 with a certificate made by the test
//! (a CA of its own, and a server certificate for 127.0.0.1 and localhost):
//! a provider for egress, or an `https://` upstream. It records what it is
//! sent; `/stream` answers in two parts, the second only once the test
//! releases it.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// What the server saw of one request.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

pub struct HttpsServer {
    pub addr: SocketAddr,
    /// The CA that signed its certificate, as a PEM file.
    pub ca_file: PathBuf,
    pub seen: Arc<Mutex<Vec<Received>>>,
    /// Lets `/stream` send its second part.
    pub release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl HttpsServer {
    pub async fn start() -> HttpsServer {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let release = Arc::new(Notify::new());
        let (record, gate) = (seen.clone(), release.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, record, gate) = (acceptor.clone(), record.clone(), gate.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (record, gate) = (record.clone(), gate.clone());
                        async move { Ok::<_, Infallible>(answer(req, &record, gate).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HttpsServer {
            addr,
            ca_file,
            seen,
            release,
            task,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }
}

type Answer = Response<http_body_util::Either<Full<Bytes>, StreamBody<tokio_stream_like::Chunks>>>;

async fn answer(
    req: Request<Incoming>,
    record: &Mutex<Vec<Received>>,
    gate: Arc<Notify>,
) -> Answer {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let streaming = target.ends_with("/stream");
    record.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        target,
        version: parts.version,
        headers: parts.headers,
        body,
    });
    if streaming {
        let chunks = tokio_stream_like::Chunks::new(gate);
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(http_body_util::Either::Right(StreamBody::new(chunks)))
            .unwrap();
    }
    Response::builder()
        .header("content-type", "application/json")
        .header("set-cookie", "provider=1")
        .body(http_body_util::Either::Left(Full::new(Bytes::from_static(
            b"{\"ok\":true}",
        ))))
        .unwrap()
}

/// Two server-sent events, the second after the gate opens.
mod tokio_stream_like {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Chunks {
        step: u8,
        wait: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    }

    impl Chunks {
        pub fn new(gate: Arc<Notify>) -> Chunks {
            Chunks {
                step: 0,
                wait: Box::pin(async move { gate.notified().await }),
            }
        }
    }

    impl futures_core::Stream for Chunks {
        type Item = Result<Frame<Bytes>, Infallible>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.step {
                0 => {
                    self.step = 1;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: one\n\n")))))
                }
                1 => {
                    std::task::ready!(self.wait.as_mut().poll(cx));
                    self.step = 2;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: two\n\n")))))
                }
                _ => Poll::Ready(None),
            }
        }
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! Calling a running gateway's admin API, found through the same config
//! file: `admin.listen`, and `admin.token` or the token file the server
//! wrote. The CLI uses it, and so does `serve --takeover`.

use super::read_token_file;
use crate::config::Config;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

pub struct AdminClient {
    pub addr: SocketAddr,
    token: String,
}

/// Why a call did not get a successful answer; each caller words it.
#[derive(Debug)]
pub enum CallError {
    /// `admin.token` is unset and the token file cannot be read.
    NoToken(std::io::Error),
    /// Nothing answered on the admin address.
    Unreachable(String),
    /// No answer within 30 s.
    Timeout,
    /// An answer that is not a success: its status and JSON body.
    Status(StatusCode, Value),
}

impl AdminClient {
    pub fn from_config(config: &Config) -> Result<AdminClient, CallError> {
        let mut addr = config.admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let token = match &config.admin.token {
            Some(t) => t.clone(),
            None => read_token_file(&config.admin.token_file).map_err(CallError::NoToken)?,
        };
        Ok(AdminClient { addr, token })
    }

    /// One request with the admin token; the JSON body of a 2xx answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CallError> {
        let unreachable = |e: &dyn std::fmt::Display| CallError::Unreachable(e.to_string());
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(self.addr),
        )
        .await
        .map_err(|_| unreachable(&"connect timed out"))?
        .map_err(|e| unreachable(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(connection);
        let body = body.map_or_else(Bytes::new, |v| Bytes::from(v.to_string()));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| unreachable(&e))?;
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
            .await
            .map_err(|_| CallError::Timeout)?
            .map_err(|e| unreachable(&e))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(CallError::Status(status, value));
        }
        Ok(value)
    }
}

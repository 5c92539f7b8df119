//! `serve --takeover`: a new keygate (a new binary, say) replaces the one
//! running with the same config without refusing a connection. It asks the
//! running one who it is through the admin API (with the admin token, so
//! it is this config's instance), joins its listening sockets on purpose
//! (`SO_REUSEPORT`), and sends it SIGTERM: the old one stops accepting,
//! takes what its backlog holds, finishes its requests and exits, while the
//! new one's sockets take the new connections. An embedded store's file and
//! the admin address pass over once the old one lets go of them.

use crate::config::Config;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// The instance being replaced.
#[derive(Debug)]
pub struct Previous {
    pid: u32,
}

/// How long the old instance may take to hand over its store and admin
/// address: its drain, and a margin.
pub fn handover_deadline(config: &Config) -> Duration {
    config.shutdown_timeout + Duration::from_secs(10)
}

/// The keygate that serves `config`'s admin address with `config`'s admin
/// token.
pub async fn find(config: &Config) -> Result<Previous, String> {
    let addr = config.admin.listen;
    let token = match &config.admin.token {
        Some(token) => token.clone(),
        None => crate::admin::read_token_file(&config.admin.token_file).map_err(|e| {
            format!(
                "takeover: cannot read the admin token {}: {e}",
                config.admin.token_file.display()
            )
        })?,
    };
    let none_running = |why: &dyn std::fmt::Display| {
        format!(
            "takeover: no keygate answers on the admin address {addr} ({why}); start without --takeover"
        )
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| none_running(&"connect timed out"))?
        .map_err(|e| none_running(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| none_running(&e))?;
    tokio::spawn(connection);
    let request = http::Request::get("/admin/v1/instance")
        .header(http::header::HOST, addr.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| none_running(&"no answer within 10 s"))?
        .map_err(|e| none_running(&e))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| none_running(&e))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "takeover: the keygate on {addr} answered {status}; is it running with this config and admin token?"
        ));
    }
    let pid = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["pid"].as_u64())
        .and_then(|pid| u32::try_from(pid).ok())
        .ok_or_else(|| format!("takeover: the process on {addr} did not say who it is"))?;
    if pid == std::process::id() {
        return Err("takeover: the admin address answers with this very process".into());
    }
    Ok(Previous { pid })
}

impl Previous {
    /// Asks the old instance to drain and stop (SIGTERM).
    pub fn terminate(&self) -> Result<(), String> {
        #[cfg(unix)]
        {
            use rustix::process::{Pid, Signal, kill_process};
            let pid = i32::try_from(self.pid)
                .ok()
                .and_then(Pid::from_raw)
                .ok_or_else(|| format!("takeover: bad pid {}", self.pid))?;
            kill_process(pid, Signal::TERM)
                .map_err(|e| format!("takeover: cannot signal process {}: {e}", self.pid))?;
            tracing::info!(
                pid = self.pid,
                "taking over: the running instance drains and stops"
            );
        }
        Ok(())
    }
}

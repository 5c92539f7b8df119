//! `serve --takeover`: a new keygate (a new binary, say) replaces the one
//! running with the same config without refusing a connection. It asks the
//! running one who it is through the admin API (with the admin token, so
//! it is this config's instance), joins its listening sockets on purpose
//! (`SO_REUSEPORT`), and sends it SIGTERM: the old one stops accepting,
//! takes what its backlog holds, finishes its requests and exits, while the
//! new one's sockets take the new connections. An embedded store's file and
//! the admin address pass over once the old one lets go of them.

use crate::admin::client::{AdminClient, CallError};
use crate::config::Config;
use http::Method;
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
    let client = AdminClient::from_config(config).map_err(|e| worded(e, config))?;
    let answer = client
        .call(Method::GET, "/admin/v1/instance", None)
        .await
        .map_err(|e| worded(e, config))?;
    let pid = answer["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .ok_or_else(|| format!("takeover: the process on {addr} did not say who it is"))?;
    if pid == std::process::id() {
        return Err("takeover: the admin address answers with this very process".into());
    }
    Ok(Previous { pid })
}

fn worded(e: CallError, config: &Config) -> String {
    let addr = config.admin.listen;
    match e {
        CallError::NoToken(e) => format!(
            "takeover: cannot read the admin token {}: {e}",
            config.admin.token_file.display()
        ),
        CallError::Unreachable(e) => format!(
            "takeover: no keygate answers on the admin address {addr} ({e}); start without --takeover"
        ),
        CallError::Timeout => format!("takeover: the keygate on {addr} did not answer within 30 s"),
        CallError::Status(status, _) => format!(
            "takeover: the keygate on {addr} answered {status}; is it running with this config and admin token?"
        ),
    }
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

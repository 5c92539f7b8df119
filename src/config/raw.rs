//! The raw YAML shape, as serde reads it: every section optional, unknown
//! keys refused. Errors name the key or field and its line.

use super::ConfigError;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    pub(super) listen: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) upstream_ca_file: Option<String>,
    pub(super) workers: Option<usize>,
    pub(super) worker_policy: Option<String>,
    pub(super) worker_cpu_affinity: Option<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) store: Option<RawStore>,
    pub(super) admin: Option<RawAdmin>,
    pub(super) routes: Option<Vec<RawRoute>>,
    pub(super) cors: Option<RawCors>,
    pub(super) headers: Option<RawHeaders>,
    pub(super) cache: Option<RawCache>,
    pub(super) limits: Option<RawLimits>,
    pub(super) usage: Option<RawUsage>,
    pub(super) rate_limit: Option<RawRateLimit>,
    pub(super) log: Option<RawLog>,
    pub(super) shutdown_timeout: Option<String>,
    pub(super) vault: Option<RawVault>,
    pub(super) egress: Option<RawEgress>,
    pub(super) keys: Option<RawKeys>,
    pub(super) audit: Option<RawAudit>,
    pub(super) ui: Option<RawUi>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUi {
    pub(super) stale_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeys {
    pub(super) max_grace: Option<String>,
    pub(super) sweep_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) retention: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVault {
    pub(super) master_keys: Vec<RawMasterKey>,
    pub(super) run_token_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMasterKey {
    pub(super) id: String,
    pub(super) key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    pub(super) listen: Option<String>,
    pub(super) run_token_ttl: Option<String>,
    pub(super) mint_token: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) response_timeout: Option<String>,
    pub(super) providers: Option<std::collections::BTreeMap<String, RawProvider>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) base_url: Option<String>,
    pub(super) inject: Option<std::collections::BTreeMap<String, String>>,
    pub(super) ca_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: String,
    pub(super) key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) embedded: Option<RawEmbedded>,
    pub(super) redis: Option<RawRedis>,
    pub(super) postgres: Option<RawPostgres>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEmbedded {
    pub(super) path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<String>,
    pub(super) cluster: Option<Vec<String>>,
    pub(super) prefix: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) insecure: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPostgres {
    pub(super) url: String,
    pub(super) timeout: Option<String>,
    pub(super) pool_size: Option<usize>,
    pub(super) channel: Option<String>,
    pub(super) tables: Option<RawTables>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTables {
    pub(super) api_keys: Option<RawKeysTable>,
    pub(super) workflows: Option<RawWorkflowsTable>,
    pub(super) users: Option<RawUsersTable>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeysTable {
    pub(super) table: Option<String>,
    pub(super) id: Option<String>,
    pub(super) user_id: Option<String>,
    pub(super) name: Option<String>,
    pub(super) key_hash: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) created_at: Option<String>,
    pub(super) last_used_at: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkflowsTable {
    pub(super) table: Option<String>,
    pub(super) id: Option<String>,
    pub(super) user_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUsersTable {
    pub(super) table: Option<String>,
    pub(super) id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
    pub(super) token_file: Option<String>,
    pub(super) ui_session_ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) path: String,
    pub(super) methods: Option<Vec<String>>,
    pub(super) upstream: Option<String>,
    pub(super) forward_authorization: Option<bool>,
    pub(super) preserve_host: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCors {
    pub(super) enabled: Option<bool>,
    pub(super) allow_origin: Option<String>,
    pub(super) allow_methods: Option<Vec<String>>,
    pub(super) allow_headers: Option<Vec<String>>,
    pub(super) max_age: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaders {
    pub(super) user_id: Option<String>,
    pub(super) key_id: Option<String>,
    pub(super) run_token: Option<String>,
    pub(super) strip: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) keys: Option<RawKeyCache>,
    pub(super) negative: Option<RawCacheSize>,
    pub(super) owners: Option<RawCacheSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCacheSize {
    pub(super) capacity: Option<u64>,
    pub(super) ttl: Option<String>,
}

/// `cache.keys`: a size, and the TTL bound that holds while the store
/// cannot notify keygate of the engine's own changes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeyCache {
    pub(super) capacity: Option<u64>,
    pub(super) ttl: Option<String>,
    pub(super) ttl_without_notify: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_body_bytes: Option<u64>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) send_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_ip: Option<usize>,
    pub(super) h2_idle_timeout: Option<String>,
    pub(super) upstream_connect_timeout: Option<String>,
    pub(super) upstream_response_timeout: Option<String>,
    pub(super) upstream_idle_per_worker: Option<usize>,
    pub(super) upstream_max_per_worker: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUsage {
    pub(super) flush_interval: Option<String>,
    pub(super) max_pending: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) max_failures: Option<u32>,
    pub(super) window: Option<String>,
    pub(super) key_requests: Option<u32>,
    pub(super) key_window: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
    pub(super) access: Option<bool>,
}

/// The raw shape of `text`. An error names the field it is about (a value
/// of the wrong type, say) as well as its line.
pub(super) fn parse(text: &str) -> Result<Raw, ConfigError> {
    let mut field = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            if path != "." && !path.is_empty() {
                field = Some(path);
            }
            e.into_inner()
        })
    })
    .map_err(|e| {
        let message = yaml_error(&e);
        ConfigError(match field {
            // An unknown key is named by the message itself.
            Some(field) if !message.contains(&format!("`{}`", leaf(&field))) => {
                format!("{field}: {message}")
            }
            _ => message,
        })
    })
}

/// The last part of a field path (`limits.send_timeout` → `send_timeout`).
fn leaf(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// serde-saphyr reports the key and its line; keep its first line only, so
/// the CLI can print a one-line error.
fn yaml_error(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid YAML").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    match e.location() {
        Some(loc) if !first.contains("line") => {
            format!("{first} (line {}, column {})", loc.line(), loc.column())
        }
        _ => first,
    }
}

//! The postgres store's section: the engine's database URL (its TLS modes
//! read as libpq reads them), the pool, the notification channel, and the
//! names of the engine's tables and columns, which default to the
//! workflow-builder template's.

use super::ConfigError;
use super::raw::{RawPostgres, RawTables};
use super::validate::{duration, err};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// What to connect to, as tokio-postgres takes it: the URL less the
    /// TLS parameters tokio-postgres does not read (see [`PgTls`]), plus
    /// keygate's defaults (`application_name`, the connect and statement
    /// timeouts).
    pub connect: tokio_postgres::Config,
    pub tls: PgTls,
    /// Connect timeout, statement timeout, and how long one store call may
    /// take in all: a stalled database turns into a 503, not a hang.
    pub timeout: Duration,
    /// Pooled connections per thread that uses the store (each data-plane
    /// worker and the control plane).
    pub pool_size: usize,
    /// The `LISTEN` / `pg_notify` channel for invalidations.
    pub channel: String,
    pub tables: EngineTables,
}

/// How the connection is encrypted, by the URL's `sslmode` (libpq's names
/// and meaning) and `sslrootcert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// `disable`: never.
    Disable,
    /// `prefer` (libpq's default): TLS when the server offers it, the
    /// certificate unchecked; plaintext otherwise.
    Prefer,
    /// `require`: TLS or no connection. The certificate is checked against
    /// `roots` when `sslrootcert` is given (libpq then acts as verify-ca),
    /// else not at all.
    Require { roots: Option<RootCerts> },
    /// `verify-ca`: TLS, the certificate chained to `roots`.
    VerifyCa { roots: RootCerts },
    /// `verify-full`: as verify-ca, and issued for the host connected to.
    VerifyFull { roots: RootCerts },
}

/// `sslrootcert`: a PEM file, or `system` for the platform's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    File(PathBuf),
    System,
}

/// The engine's tables and columns keygate reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTables {
    pub api_keys: KeysTable,
    pub workflows: WorkflowsTable,
    pub users: UsersTable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysTable {
    pub table: String,
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub key_hash: String,
    pub key_prefix: String,
    pub created_at: String,
    pub last_used_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowsTable {
    pub table: String,
    pub id: String,
    pub user_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersTable {
    pub table: String,
    pub id: String,
}

/// The URL stays out of `Debug` output: it may hold a password.
impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("hosts", &self.connect.get_hosts())
            .field("dbname", &self.connect.get_dbname())
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .field("channel", &self.channel)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

pub(super) fn postgres(
    raw: RawPostgres,
    url: &str,
    base: &Path,
) -> Result<PostgresConfig, ConfigError> {
    let timeout = duration("store.postgres.timeout", raw.timeout.as_deref(), "2s")?;
    if timeout.is_zero() {
        return err("store.postgres.timeout: must be more than 0");
    }
    let pool_size = raw.pool_size.unwrap_or(4);
    if !(1..=64).contains(&pool_size) {
        return err("store.postgres.pool_size: must be 1 to 64 (connections per thread)");
    }
    let channel = raw
        .channel
        .unwrap_or_else(|| "keygate_invalidate".to_owned());
    if !is_identifier(&channel) {
        return err(format!(
            "store.postgres.channel: {channel:?} is not a plain identifier (letters, digits, _; at most 63)"
        ));
    }
    let (connect, tls) = parse_url(url, timeout, base)?;
    Ok(PostgresConfig {
        connect,
        tls,
        timeout,
        pool_size,
        channel,
        tables: tables(raw.tables.unwrap_or_default())?,
    })
}

/// A database URL other than the store's (the template's, for `keygate
/// integrations import`), read the same way.
pub fn database_url(
    url: &str,
    base: &Path,
) -> Result<(tokio_postgres::Config, PgTls), ConfigError> {
    parse_url(url, Duration::from_secs(10), base)
}

/// The URL into tokio-postgres's config and the TLS mode. tokio-postgres
/// reads `sslmode` only up to `require` and not `sslrootcert`: those are
/// taken out here and carried out by keygate's own TLS connector.
fn parse_url(
    url: &str,
    timeout: Duration,
    base: &Path,
) -> Result<(tokio_postgres::Config, PgTls), ConfigError> {
    const FIELD: &str = "store.postgres.url";
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return err(format!(
            "{FIELD}: expected postgres://user:password@host:port/database"
        ));
    }
    let (address, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let (mut mode, mut root) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| ConfigError(format!("{FIELD}: {name} is not UTF-8")))?;
        match name {
            "sslmode" => mode = Some(decoded.into_owned()),
            "sslrootcert" => root = Some(decoded.into_owned()),
            _ => kept.push(pair),
        }
    }
    let roots = root.map(|r| match r.as_str() {
        "system" => RootCerts::System,
        path => RootCerts::File(base.join(path)),
    });
    let needs_roots = |mode: &str| {
        roots.clone().ok_or_else(|| {
            ConfigError(format!(
                "{FIELD}: sslmode={mode} needs sslrootcert=<CA file> (or sslrootcert=system)"
            ))
        })
    };
    let (tls, wire_mode) = match mode.as_deref().unwrap_or("prefer") {
        "disable" => (PgTls::Disable, "disable"),
        "prefer" => (PgTls::Prefer, "prefer"),
        "require" => (
            PgTls::Require {
                roots: roots.clone(),
            },
            "require",
        ),
        "verify-ca" => (
            PgTls::VerifyCa {
                roots: needs_roots("verify-ca")?,
            },
            "require",
        ),
        "verify-full" => (
            PgTls::VerifyFull {
                roots: needs_roots("verify-full")?,
            },
            "require",
        ),
        other => {
            return err(format!(
                "{FIELD}: sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ));
        }
    };
    kept.push(match wire_mode {
        "disable" => "sslmode=disable",
        "prefer" => "sslmode=prefer",
        _ => "sslmode=require",
    });
    let rebuilt = format!("{address}?{}", kept.join("&"));
    let mut connect = tokio_postgres::Config::from_str(&rebuilt)
        .map_err(|e| ConfigError(format!("{FIELD}: {e}")))?;
    if connect.get_user().is_none() {
        return err(format!(
            "{FIELD}: no user (postgres://USER:PASSWORD@host:port/database)"
        ));
    }
    if connect.get_hosts().is_empty() {
        return err(format!("{FIELD}: no host"));
    }
    if connect.get_application_name().is_none() {
        connect.application_name("keygate");
    }
    if connect.get_connect_timeout().is_none() {
        connect.connect_timeout(timeout);
    }
    // The server stops a statement that outlives the client's wait for it;
    // times are read and written as UTC, as the engine keeps them.
    let session = format!(
        "-c statement_timeout={} -c TimeZone=UTC",
        timeout.as_millis()
    );
    let options = match connect.get_options() {
        Some(given) => format!("{given} {session}"),
        None => session,
    };
    connect.options(&options);
    Ok((connect, tls))
}

fn tables(raw: RawTables) -> Result<EngineTables, ConfigError> {
    let keys = raw.api_keys.unwrap_or_default();
    let workflows = raw.workflows.unwrap_or_default();
    let users = raw.users.unwrap_or_default();
    let keys_field = "store.postgres.tables.api_keys";
    let workflows_field = "store.postgres.tables.workflows";
    let users_field = "store.postgres.tables.users";
    Ok(EngineTables {
        api_keys: KeysTable {
            table: table_name(keys_field, keys.table, "api_keys")?,
            id: column(keys_field, "id", keys.id)?,
            user_id: column(keys_field, "user_id", keys.user_id)?,
            name: column(keys_field, "name", keys.name)?,
            key_hash: column(keys_field, "key_hash", keys.key_hash)?,
            key_prefix: column(keys_field, "key_prefix", keys.key_prefix)?,
            created_at: column(keys_field, "created_at", keys.created_at)?,
            last_used_at: column(keys_field, "last_used_at", keys.last_used_at)?,
        },
        workflows: WorkflowsTable {
            table: table_name(workflows_field, workflows.table, "workflows")?,
            id: column(workflows_field, "id", workflows.id)?,
            user_id: column(workflows_field, "user_id", workflows.user_id)?,
        },
        users: UsersTable {
            table: table_name(users_field, users.table, "users")?,
            id: column(users_field, "id", users.id)?,
        },
    })
}

/// A table, optionally schema-qualified (`engine.api_keys`).
fn table_name(field: &str, given: Option<String>, default: &str) -> Result<String, ConfigError> {
    let name = given.unwrap_or_else(|| default.to_owned());
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| is_identifier(p)) {
        return err(format!(
            "{field}.table: {name:?} is not a table name (identifier, or schema.identifier)"
        ));
    }
    Ok(name)
}

fn column(field: &str, column: &str, given: Option<String>) -> Result<String, ConfigError> {
    let name = given.unwrap_or_else(|| column.to_owned());
    if !is_identifier(&name) {
        return err(format!(
            "{field}.{column}: {name:?} is not a column name (letters, digits, _; at most 63)"
        ));
    }
    Ok(name)
}

/// A name keygate can put in SQL quoted, without escaping: letters, digits
/// and `_`, not starting with a digit, at most 63 bytes (PostgreSQL's
/// limit). Case is kept (`"userId"`).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

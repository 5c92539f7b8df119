//! The `keygate` command line. `serve` runs the gateway, `check` checks a
//! config and `store prepare` sets up the engine's database; every other
//! command drives a running gateway's admin API, found through the same
//! config file (`admin.listen`, and `admin.token` or the token file the
//! server wrote).

mod integrations;

pub use integrations::IntegrationsCommand;

use crate::admin::client::{AdminClient, CallError};
use crate::admin::{percent_encode, read_token_file};
use crate::config::Config;
use clap::{Parser, Subcommand};
use http::{Method, StatusCode};
use serde_json::Value;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "keygate",
    version,
    about = "Authorization gateway for workflow webhooks",
    long_about = "Authorization gateway for workflow webhooks.\n\nThe config is --config PATH, else ./keygate.yaml if it exists, else the built-in defaults (those of config.example.yaml). Every command but `serve` and `check` drives the running gateway's admin API, found through the same config."
)]
pub struct Cli {
    /// Config file (YAML); default: ./keygate.yaml if it exists, else the built-in defaults.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The file a config is read from when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "keygate.yaml";

impl Cli {
    /// The config file to read, `None` for the built-in defaults.
    pub fn config_path(&self) -> Option<PathBuf> {
        match &self.config {
            Some(path) => Some(path.clone()),
            None => {
                let default = PathBuf::from(DEFAULT_CONFIG);
                default.exists().then_some(default)
            }
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (SIGHUP reloads the config, SIGTERM drains and stops).
    Serve {
        /// Replace the keygate running with this config without downtime: join its listeners, then tell it to drain and stop.
        #[arg(long)]
        takeover: bool,
    },
    /// Check the config and the files it names, then exit 0 (valid) or 1, like `nginx -t`.
    Check,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage workflow owners.
    #[command(subcommand)]
    Workflows(WorkflowsCommand),
    /// Set up the store itself.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Manage integration credentials (provider API keys), sealed in the vault.
    #[command(subcommand)]
    Integrations(IntegrationsCommand),
    /// Show the audit log of admin actions (oldest first).
    Audit {
        /// Only entries from this long ago on (e.g. 7d, 12h); default: all kept (audit.retention).
        #[arg(long, value_name = "DUR", value_parser = lifetime)]
        since: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Install, in the engine's database (postgres store), the triggers that tell every keygate of the engine's own key and owner changes at once, and an index on the key hash; prints each change, and is safe to run again.
    Prepare,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key and print it (shown this once: copy it now).
    Create {
        /// The user the key authenticates as (1 to 256 visible ASCII characters).
        #[arg(long, value_parser = user_id)]
        user: String,
        /// A label to tell the key apart in listings.
        #[arg(long)]
        name: Option<String>,
        /// Refuse the key (401) from this long after now on, e.g. 30d, 12h, 90s.
        #[arg(long, value_name = "DUR", value_parser = lifetime)]
        expires_in: Option<String>,
        /// Let the key call only this workflow (repeat for more); default: all of its user's.
        #[arg(long = "workflow", value_name = "WF")]
        workflows: Vec<String>,
        /// The key's own rate, N/DUR (e.g. 100/1m), instead of rate_limit.key_requests; counted per instance.
        #[arg(long, value_name = "N/DUR", value_parser = rate)]
        rate: Option<String>,
        /// Print a JSON object with the id, name, prefix, creation time and key.
        #[arg(long)]
        json: bool,
    },
    /// List keys by prefix, never the keys themselves: one user's, or every user's.
    #[command(group(clap::ArgGroup::new("whose").required(true).args(["user", "all"])))]
    List {
        /// Whose keys to list.
        #[arg(long, value_parser = user_id)]
        user: Option<String>,
        /// Every user's keys.
        #[arg(long)]
        all: bool,
        /// Only keys not used for this long (never used: since created), e.g. 30d.
        #[arg(long, value_name = "DUR", value_parser = lifetime)]
        unused_for: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Replace a key: print a new one with the same user, name, scopes and rate; the old one keeps working for --grace.
    Roll {
        /// The old key's id (`key_…`), not the key itself.
        key_id: String,
        /// How long the old key keeps working (default 0: refused at once; at most keys.max_grace).
        #[arg(long, value_name = "DUR")]
        grace: Option<String>,
        /// Print a JSON object with the new key's id, name, prefix, creation time and key.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id (see `keys list`); refused at once everywhere.
    Revoke {
        /// The key's id (`key_…`), not the key itself.
        key_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum WorkflowsCommand {
    /// Register the user who owns a workflow.
    SetOwner {
        /// The workflow id, as in its webhook URL.
        workflow_id: String,
        /// The owning user's id.
        #[arg(value_parser = user_id)]
        user: String,
    },
    /// Remove a workflow's owner (its webhook then answers 404).
    Remove {
        /// The workflow id.
        workflow_id: String,
    },
    /// List workflows and their owners.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// A duration as the admin API takes it (`90s`, `15m`, `12h`, `30d`).
fn lifetime(value: &str) -> Result<String, String> {
    crate::store::policy::parse_lifetime(value)
        .map(|_| value.to_owned())
        .ok_or_else(|| {
            "expected a duration from 1s to 100 years, like 90s, 15m, 12h or 30d".to_owned()
        })
}

/// A rate as the admin API takes it (`100/1m`).
fn rate(value: &str) -> Result<String, String> {
    crate::store::Rate::parse(value)
        .map(|r| r.to_string())
        .ok_or_else(|| crate::store::policy::RATE_RULE.to_owned())
}

/// A user id as the admin API takes it, checked before any call so the
/// error names the flag.
fn user_id(value: &str) -> Result<String, String> {
    if crate::admin::valid_user_id(value) {
        Ok(value.to_owned())
    } else if value.is_empty() {
        Err("a user id cannot be empty".into())
    } else {
        Err(
            "a user id is 1 to 256 visible ASCII characters (no spaces or control characters)"
                .into(),
        )
    }
}

/// What `keygate check` verifies beyond parsing: that the files the config
/// names can be used. Returns a one-line summary.
pub fn check(config: &Config) -> Result<String, String> {
    if let Some(files) = &config.tls {
        crate::tls::load(files)?;
    }
    let store = match &config.store {
        crate::config::StoreConfig::Embedded { path } => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            if path.exists() {
                std::fs::File::open(path)
                    .map_err(|e| format!("store.embedded.path {}: {e}", path.display()))?;
            } else if let Some(dir) = dir.filter(|d| d.exists())
                && std::fs::metadata(dir).is_ok_and(|m| m.permissions().readonly())
            {
                return Err(format!(
                    "store.embedded.path {}: its folder is read-only",
                    path.display()
                ));
            }
            format!("embedded store {}", path.display())
        }
        crate::config::StoreConfig::Redis(redis) => match &redis.nodes {
            crate::config::RedisNodes::Single(url) => {
                crate::store::redis::node_client(redis, url)
                    .map_err(|e| format!("store.redis.url: {e}"))?;
                "redis store".to_owned()
            }
            crate::config::RedisNodes::Cluster(seeds) => {
                for url in seeds {
                    crate::store::redis::node_client(redis, url)
                        .map_err(|e| format!("store.redis.cluster: {e}"))?;
                }
                format!("redis cluster store, {} seed nodes", seeds.len())
            }
        },
        crate::config::StoreConfig::Postgres(postgres) => {
            crate::store::postgres::tls::Connector::new(&postgres.tls)?;
            let database = postgres.connect.get_dbname().unwrap_or("(the user's)");
            format!("postgres store, database {database}")
        }
    };
    if config.admin.token.is_none() && config.admin.token_file.exists() {
        read_token_file(&config.admin.token_file).map_err(|e| {
            format!(
                "admin.token_file {}: {e}",
                config.admin.token_file.display()
            )
        })?;
    }
    Ok(format!(
        "listen {}, admin {}, {store}, {} route{}",
        config.listen,
        config.admin.listen,
        config.routes.len(),
        if config.routes.len() == 1 { "" } else { "s" }
    ))
}

/// A failure, worded as the one line the CLI prints.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The one line a failed admin call comes to.
fn worded(e: CallError, client: Option<&AdminClient>, config: &Config) -> CliError {
    CliError(match e {
        CallError::NoToken(e) => format!(
            "cannot read the admin token {}: {e} (start `keygate serve` with this config first, or set admin.token)",
            config.admin.token_file.display()
        ),
        CallError::Unreachable(e) => format!(
            "cannot reach the gateway's admin API at {} ({e}); is `keygate serve` running with this config?",
            client.map_or(config.admin.listen, |c| c.addr)
        ),
        CallError::Timeout => "the admin API did not answer within 30 s".into(),
        CallError::Status(StatusCode::UNAUTHORIZED, _) => {
            "the admin API refused the token (is the token file or admin.token from another config?)".into()
        }
        CallError::Status(status, body) => body
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| format!("admin API answered {status}"), str::to_owned),
    })
}

/// `store prepare`: connects to the engine's database itself (no running
/// gateway needed) and returns a line per object it checked or made.
pub async fn store_prepare(config: &Config) -> Result<String, CliError> {
    let crate::config::StoreConfig::Postgres(postgres) = &config.store else {
        let kind = match config.store {
            crate::config::StoreConfig::Embedded { .. } => "embedded",
            _ => "redis",
        };
        return Err(CliError(format!(
            "store prepare is for the postgres store; this config uses the {kind} store, which needs no preparing"
        )));
    };
    let mut client = crate::store::postgres::open_driven(postgres)
        .await
        .map_err(|e| CliError(format!("cannot reach the engine's database: {e}")))?;
    if let Err(problems) = crate::store::postgres::schema::check(&client, postgres)
        .await
        .map_err(|e| CliError(format!("store prepare: {e}")))?
    {
        return Err(CliError(problems));
    }
    let done = crate::store::postgres::prepare::prepare(&mut client, postgres)
        .await
        .map_err(CliError)?;
    Ok(done.join("\n"))
}

/// Runs an admin command, returning what to print on stdout.
pub async fn admin_command(config: &Config, command: Command) -> Result<String, CliError> {
    // Never echo a secret, not even in an error.
    let looks_secret = |id: &str| {
        [
            crate::key::KEY_SCHEME,
            "sk-",
            crate::vault::run_token::SCHEME,
        ]
        .iter()
        .any(|scheme| id.starts_with(scheme))
    };
    if let Command::Integrations(IntegrationsCommand::Remove { id }) = &command
        && looks_secret(id)
    {
        return Err(CliError(
            "that looks like a secret, not an integration id; use `integrations list` to find the id".into(),
        ));
    }
    if let Command::Keys(KeysCommand::Revoke { key_id } | KeysCommand::Roll { key_id, .. }) =
        &command
        && looks_secret(key_id)
    {
        return Err(CliError(
            "that looks like a key, not a key id; use `keys list` to find the id".into(),
        ));
    }
    let client = AdminClient::from_config(config).map_err(|e| worded(e, None, config))?;
    let call = async |method: Method, path: &str, body: Option<Value>| {
        client
            .call(method, path, body)
            .await
            .map_err(|e| worded(e, Some(&client), config))
    };
    // The answer whatever its status, for callers that branch on it.
    let raw = async |method: Method, path: &str, body: Option<Value>| match client
        .call(method, path, body)
        .await
    {
        Ok(v) => Ok(Ok(v)),
        Err(CallError::Status(status, v)) if status != StatusCode::UNAUTHORIZED => {
            Ok(Err((status, v)))
        }
        Err(e) => Err(worded(e, Some(&client), config)),
    };
    match command {
        Command::Serve { .. } | Command::Check | Command::Store(_) => {
            Err(CliError("not an admin command".into()))
        }
        Command::Keys(KeysCommand::Create {
            user,
            name,
            expires_in,
            workflows,
            rate,
            json,
        }) => {
            let mut body = serde_json::json!({ "userId": user });
            if let Some(name) = name {
                body["name"] = Value::String(name);
            }
            if let Some(expires_in) = expires_in {
                body["expiresIn"] = Value::String(expires_in);
            }
            if !workflows.is_empty() {
                body["workflows"] = serde_json::json!(workflows);
            }
            if let Some(rate) = rate {
                body["rate"] = Value::String(rate);
            }
            let created = call(Method::POST, "/admin/v1/keys", Some(body)).await?;
            shown_key(&created, json)
        }
        Command::Keys(KeysCommand::Roll {
            key_id,
            grace,
            json,
        }) => {
            let path = format!("/admin/v1/keys/{}/roll", percent_encode(&key_id));
            let body = grace.map_or_else(
                || serde_json::json!({}),
                |g| serde_json::json!({ "grace": g }),
            );
            let rolled = match raw(Method::POST, &path, Some(body)).await? {
                Ok(rolled) => rolled,
                // The new key exists though the old one could not be ended:
                // show it (it is shown only this once), then fail.
                Err((status, answer)) if answer.get("key").is_some() => {
                    let key = shown_key(&answer, json)?;
                    println!("{key}");
                    return Err(CliError(format!(
                        "{}: {}",
                        status.as_u16(),
                        answer.get("error").and_then(Value::as_str).unwrap_or("")
                    )));
                }
                Err((_, answer)) => {
                    return Err(CliError(
                        answer
                            .get("error")
                            .and_then(Value::as_str)
                            .unwrap_or("the roll failed")
                            .to_owned(),
                    ));
                }
            };
            if let Some(until) = rolled["rolled"]["expiresAt"].as_str() {
                eprintln!("keygate: {key_id} keeps working until {until}");
            }
            shown_key(&rolled, json)
        }
        Command::Keys(KeysCommand::List {
            user,
            all,
            unused_for,
            json,
        }) => {
            let mut path = match (all, user) {
                (true, _) => "/admin/v1/keys?all=true".to_owned(),
                (false, Some(user)) => format!("/admin/v1/keys?userId={}", percent_encode(&user)),
                (false, None) => return Err(CliError("give --user USER or --all".into())),
            };
            if let Some(d) = unused_for {
                path.push_str(&format!("&unusedFor={}", percent_encode(&d)));
            }
            let keys = call(Method::GET, &path, None).await?;
            if json {
                return Ok(keys.to_string());
            }
            Ok(key_table(&keys, all))
        }
        Command::Audit { since, json } => {
            let path = match since {
                Some(d) => format!("/admin/v1/audit?since={}", percent_encode(&d)),
                None => "/admin/v1/audit".to_owned(),
            };
            let entries = call(Method::GET, &path, None).await?;
            if json {
                return Ok(entries.to_string());
            }
            Ok(audit_lines(&entries))
        }
        Command::Keys(KeysCommand::Revoke { key_id }) => {
            let path = format!("/admin/v1/keys/{}", percent_encode(&key_id));
            let answer = call(Method::DELETE, &path, None).await?;
            if let Some(warning) = answer.get("warning").and_then(Value::as_str) {
                eprintln!("keygate: warning: {warning}");
            }
            Ok(format!("revoked {key_id}"))
        }
        Command::Workflows(WorkflowsCommand::SetOwner { workflow_id, user }) => {
            let path = format!("/admin/v1/workflows/{}", percent_encode(&workflow_id));
            let body = serde_json::json!({ "userId": user });
            let answer = call(Method::PUT, &path, Some(body)).await?;
            Ok(match answer.get("note").and_then(Value::as_str) {
                Some(note) => format!("workflow {workflow_id} is owned by {user} ({note})"),
                None => format!("workflow {workflow_id} is owned by {user}"),
            })
        }
        Command::Workflows(WorkflowsCommand::Remove { workflow_id }) => {
            let path = format!("/admin/v1/workflows/{}", percent_encode(&workflow_id));
            call(Method::DELETE, &path, None).await?;
            Ok(format!("removed workflow {workflow_id}"))
        }
        Command::Integrations(command) => integrations::run(command, call, raw).await,
        Command::Workflows(WorkflowsCommand::List { json }) => {
            let list = call(Method::GET, "/admin/v1/workflows", None).await?;
            if json {
                return Ok(list.to_string());
            }
            let mut out = format!("{:<40} {}", "WORKFLOW", "OWNER");
            for w in list.as_array().into_iter().flatten() {
                let field = |name: &str| {
                    w.get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("-")
                        .to_owned()
                };
                out.push_str(&format!(
                    "\n{:<40} {}",
                    field("workflowId"),
                    field("userId")
                ));
            }
            Ok(out)
        }
    }
}

/// A key just made: the key alone, or the whole answer with `--json`.
fn shown_key(created: &Value, json: bool) -> Result<String, CliError> {
    if json {
        let mut answer = created.clone();
        if let Some(object) = answer.as_object_mut() {
            object.remove("rolled");
        }
        return Ok(answer.to_string());
    }
    created
        .get("key")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| CliError("the admin API returned no key".into()))
}

/// `keys list` as a table.
fn key_table(keys: &Value, with_user: bool) -> String {
    let field = |k: &Value, name: &str| {
        k.get(name)
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned()
    };
    let mut out = String::new();
    if with_user {
        out.push_str(&format!("{:<24} ", "USER"));
    }
    out.push_str(&format!(
        "{:<22} {:<12} {:<20} {:<25} {:<25} {}",
        "ID", "PREFIX", "NAME", "CREATED", "LAST USED", "EXPIRES"
    ));
    for k in keys.as_array().into_iter().flatten() {
        out.push('\n');
        if with_user {
            out.push_str(&format!("{:<24} ", field(k, "userId")));
        }
        let mut line = format!(
            "{:<22} {:<12} {:<20} {:<25} {:<25} {}",
            field(k, "id"),
            field(k, "keyPrefix"),
            field(k, "name"),
            field(k, "createdAt"),
            field(k, "lastUsedAt"),
            field(k, "expiresAt")
        );
        if let Some(list) = k.get("workflows").and_then(Value::as_array) {
            let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
            line.push_str(&format!("  workflows {}", names.join(",")));
        }
        if let Some(rate) = k.get("rate").and_then(Value::as_str) {
            line.push_str(&format!("  rate {rate}"));
        }
        out.push_str(line.trim_end());
    }
    out
}

/// `audit` as one line per entry.
fn audit_lines(entries: &Value) -> String {
    let mut out = Vec::new();
    for e in entries.as_array().into_iter().flatten() {
        let text = |name: &str| e.get(name).and_then(Value::as_str);
        let mut line = format!(
            "{} {:<20}",
            text("at").unwrap_or("-"),
            text("action").unwrap_or("-")
        );
        for (label, name) in [
            ("key", "keyId"),
            ("prefix", "keyPrefix"),
            ("user", "userId"),
            ("workflow", "workflowId"),
            ("integration", "integrationId"),
        ] {
            if let Some(value) = text(name) {
                line.push_str(&format!(" {label} {value}"));
            }
        }
        if let Some(detail) = text("detail") {
            line.push_str(&format!(" ({detail})"));
        }
        line.push_str(&format!(" by {}", text("caller").unwrap_or("-")));
        out.push(line);
    }
    out.join("\n")
}

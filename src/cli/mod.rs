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
        /// Print a JSON object with the id, name, prefix, creation time and key.
        #[arg(long)]
        json: bool,
    },
    /// List a user's keys by prefix, never the keys themselves.
    List {
        /// Whose keys to list.
        #[arg(long, value_parser = user_id)]
        user: String,
        /// Print a JSON array.
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
    if let Command::Keys(KeysCommand::Revoke { key_id }) = &command
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
        Command::Keys(KeysCommand::Create { user, name, json }) => {
            let mut body = serde_json::json!({ "userId": user });
            if let Some(name) = name {
                body["name"] = Value::String(name);
            }
            let created = call(Method::POST, "/admin/v1/keys", Some(body)).await?;
            if json {
                Ok(created.to_string())
            } else {
                created
                    .get("key")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| CliError("the admin API returned no key".into()))
            }
        }
        Command::Keys(KeysCommand::List { user, json }) => {
            let path = format!("/admin/v1/keys?userId={}", percent_encode(&user));
            let keys = call(Method::GET, &path, None).await?;
            if json {
                return Ok(keys.to_string());
            }
            let mut out = format!(
                "{:<22} {:<12} {:<20} {:<25} {}",
                "ID", "PREFIX", "NAME", "CREATED", "LAST USED"
            );
            for k in keys.as_array().into_iter().flatten() {
                let field = |name: &str| {
                    k.get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("-")
                        .to_owned()
                };
                out.push_str(&format!(
                    "\n{:<22} {:<12} {:<20} {:<25} {}",
                    field("id"),
                    field("keyPrefix"),
                    field("name"),
                    field("createdAt"),
                    field("lastUsedAt")
                ));
            }
            Ok(out)
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

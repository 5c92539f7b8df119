//! `keygate integrations ...`: provider credentials through the admin API.
//! A secret is read from stdin, never from an argument (shell history and
//! `ps` keep arguments). `import` reads the workflow-builder template's own
//! `integrations` table, opens each config with the template's key
//! (`INTEGRATION_ENCRYPTION_KEY`) and hands it to the vault.

use super::CliError;
use crate::vault::Secret;
use crate::vault::import::{open_template, template_key};
use clap::Subcommand;
use http::{Method, StatusCode};
use serde_json::Value;
use std::io::{IsTerminal, Read};
use zeroize::Zeroizing;

#[derive(Subcommand, Debug)]
pub enum IntegrationsCommand {
    /// Add a provider credential for a user; the secret is read from stdin.
    Add {
        /// Whose credential it is.
        #[arg(long, value_parser = super::user_id)]
        user: String,
        /// The provider type (skytells, stripe, github, ...; egress.providers adds others).
        #[arg(long = "type", value_name = "TYPE")]
        kind: String,
        /// A label to tell it apart in listings (default: the type).
        #[arg(long)]
        name: Option<String>,
        /// The credential field the secret is for (default: the type's, such as apiKey).
        #[arg(long)]
        field: Option<String>,
        /// Print a JSON object with the id, type, name, creation time and master key id.
        #[arg(long)]
        json: bool,
    },
    /// List a user's integrations, never their secrets.
    List {
        /// Whose integrations to list.
        #[arg(long, value_parser = super::user_id)]
        user: String,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove an integration by its id.
    Remove {
        /// The integration's id (see `integrations list`).
        id: String,
    },
    /// Re-seal every integration under the first of vault.master_keys, so older keys can be dropped.
    Rekey,
    /// Bring over the workflow-builder template's integrations (INTEGRATION_ENCRYPTION_KEY in the environment).
    Import {
        /// The template's database, postgres://...
        #[arg(long, value_name = "URL")]
        postgres: String,
    },
}

/// The secret on stdin, less the line end a shell or `echo` adds.
fn secret_from_stdin() -> Result<Zeroizing<String>, CliError> {
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("keygate: reading the secret from stdin (end with Ctrl-D)");
    }
    let mut secret = Zeroizing::new(String::new());
    stdin
        .read_to_string(&mut secret)
        .map_err(|e| CliError(format!("cannot read the secret from stdin: {e}")))?;
    let trimmed = secret.trim_end_matches(['\n', '\r']).len();
    secret.truncate(trimmed);
    if secret.is_empty() {
        return Err(CliError(
            "no secret on stdin (pipe it in: keygate integrations add ... < file)".into(),
        ));
    }
    Ok(secret)
}

fn table(list: &Value) -> String {
    let mut out = format!(
        "{:<26} {:<12} {:<20} {:<25} {:<25} {}",
        "ID", "TYPE", "NAME", "CREATED", "LAST USED", "KEY"
    );
    for i in list.as_array().into_iter().flatten() {
        let field = |name: &str| {
            i.get(name)
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_owned()
        };
        out.push_str(&format!(
            "\n{:<26} {:<12} {:<20} {:<25} {:<25} {}",
            field("id"),
            field("type"),
            field("name"),
            field("createdAt"),
            field("lastUsedAt"),
            field("keyId")
        ));
    }
    out
}

pub(super) async fn run(
    command: IntegrationsCommand,
    call: impl AsyncFn(Method, &str, Option<Value>) -> Result<Value, CliError>,
    raw: impl AsyncFn(
        Method,
        &str,
        Option<Value>,
    ) -> Result<Result<Value, (StatusCode, Value)>, CliError>,
) -> Result<String, CliError> {
    match command {
        IntegrationsCommand::Add {
            user,
            kind,
            name,
            field,
            json,
        } => {
            let secret = secret_from_stdin()?;
            if secret.starts_with(crate::key::KEY_SCHEME) {
                return Err(CliError(
                    "keygate API keys (wfb_…) cannot be provider credentials".into(),
                ));
            }
            let mut body = serde_json::json!({ "userId": user, "type": kind });
            if let Some(name) = name {
                body["name"] = Value::String(name);
            }
            if let Some(field) = field {
                body["field"] = Value::String(field);
            }
            body["secret"] = Value::String(secret.as_str().to_owned());
            drop(secret);
            let added = call(Method::POST, "/admin/v1/integrations", Some(body)).await?;
            if json {
                Ok(added.to_string())
            } else {
                added
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| CliError("the admin API returned no id".into()))
            }
        }
        IntegrationsCommand::List { user, json } => {
            let path = format!(
                "/admin/v1/integrations?userId={}",
                crate::admin::percent_encode(&user)
            );
            let list = call(Method::GET, &path, None).await?;
            Ok(if json { list.to_string() } else { table(&list) })
        }
        IntegrationsCommand::Remove { id } => {
            let path = format!(
                "/admin/v1/integrations/{}",
                crate::admin::percent_encode(&id)
            );
            call(Method::DELETE, &path, None).await?;
            Ok(format!("removed integration {id}"))
        }
        IntegrationsCommand::Rekey => {
            let done = call(Method::POST, "/admin/v1/integrations/rekey", None).await?;
            let count = |name: &str| done.get(name).and_then(Value::as_u64).unwrap_or(0);
            let key = done.get("keyId").and_then(Value::as_str).unwrap_or("?");
            let failed = done
                .get("failed")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for f in &failed {
                eprintln!(
                    "keygate: integration {}: {}",
                    f.get("id").and_then(Value::as_str).unwrap_or("?"),
                    f.get("error").and_then(Value::as_str).unwrap_or("?")
                );
            }
            let summary = format!(
                "rekeyed {} integrations under {key} ({} already were)",
                count("rekeyed"),
                count("alreadyCurrent")
            );
            if failed.is_empty() {
                Ok(summary)
            } else {
                println!("{summary}");
                Err(CliError(format!(
                    "{} integrations could not be re-sealed (named above)",
                    failed.len()
                )))
            }
        }
        IntegrationsCommand::Import { postgres } => import(&postgres, raw).await,
    }
}

/// Brings over every row of the template's `integrations` table.
async fn import(
    url: &str,
    add: impl AsyncFn(
        Method,
        &str,
        Option<Value>,
    ) -> Result<Result<Value, (StatusCode, Value)>, CliError>,
) -> Result<String, CliError> {
    let key = std::env::var("INTEGRATION_ENCRYPTION_KEY").map_err(|_| {
        CliError(
            "INTEGRATION_ENCRYPTION_KEY is not set (the template's key, 64 hex characters)".into(),
        )
    })?;
    let key = template_key(&key).map_err(CliError)?;
    let (connect, tls) = crate::config::database_url(url, std::path::Path::new("."))
        .map_err(|e| CliError(e.0.replace("store.postgres.url", "--postgres")))?;
    let (client, connection) =
        crate::store::postgres::open_with(&tls, std::time::Duration::from_secs(10), &connect)
            .await
            .map_err(|e| CliError(format!("cannot reach the template's database: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let rows = client
        .query(
            "SELECT id, user_id, name, type, config #>> '{}', created_at FROM integrations ORDER BY created_at, id",
            &[],
        )
        .await
        .map_err(|e| CliError(format!("cannot read the template's integrations table: {e}")))?;
    let (mut imported, mut present, mut failed) = (0, 0, 0);
    for row in &rows {
        let id: String = row.get(0);
        let mut fail = |why: String| {
            failed += 1;
            eprintln!("keygate: integration {id}: {why}");
        };
        let Some(stored) = row.get::<_, Option<String>>(4) else {
            fail("its config is empty".into());
            continue;
        };
        let plain = match open_template(&key, &stored) {
            Ok(plain) => plain,
            Err(why) => {
                fail(why);
                continue;
            }
        };
        let fields = match Secret::from_json(plain).and_then(|s| s.fields()) {
            Ok(fields) => fields,
            Err(why) => {
                fail(why);
                continue;
            }
        };
        let created: std::time::SystemTime = row.get(5);
        let created_at = created
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let body = serde_json::json!({
            "id": id,
            "userId": row.get::<_, String>(1),
            "name": row.get::<_, String>(2),
            "type": row.get::<_, String>(3),
            "fields": fields.iter().map(|(k, v)| (k.clone(), Value::String(v.as_str().to_owned()))).collect::<serde_json::Map<_, _>>(),
            "createdAt": created_at,
        });
        drop(fields);
        match add(Method::POST, "/admin/v1/integrations", Some(body)).await? {
            Ok(_) => imported += 1,
            Err((StatusCode::CONFLICT, _)) => present += 1,
            Err((status, answer)) => fail(
                answer
                    .get("error")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("the admin API answered {status}"), str::to_owned),
            ),
        }
    }
    let summary = format!("imported {imported}, already present {present}, failed {failed}");
    if failed == 0 {
        Ok(summary)
    } else {
        println!("{summary}");
        Err(CliError(format!(
            "{failed} integrations were not imported (named above)"
        )))
    }
}

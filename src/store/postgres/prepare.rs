//! `keygate store prepare`: what keygate installs in the engine's database
//! so that the engine's own writes reach every instance's caches at once.
//!
//! - On the keys table, a row trigger after `INSERT`, `DELETE` and
//!   `UPDATE OF` the hash or user column, and a statement trigger after
//!   `TRUNCATE`, both calling one function that `pg_notify`s the channel
//!   with `key:<hash>` (the old and the new hash) or `flush`.
//! - The same on the workflows table, with `workflow:<id>`, after `UPDATE
//!   OF` the id or owner column.
//! - An index on the key hash column (`CREATE INDEX CONCURRENTLY`), which
//!   the template lacks: every cache miss looks a hash up.
//! - keygate's own `keygate_integrations` table, for integration
//!   credentials (their secrets sealed by the vault).
//!
//! keygate's own `lastUsedAt` writes touch neither watched column, so they
//! notify nobody. Each object is checked against what this config wants
//! and only what is missing or different is (re)made, so a second run
//! changes nothing and takes no lock.

use super::sql::quoted;
use crate::config::PostgresConfig;
use tokio_postgres::{Client, GenericClient};

/// What `pg_trigger.tgtype` holds for the two triggers (row + insert +
/// delete + update, after; and truncate, per statement, after).
const ROW_TRIGGER_TYPE: i16 = 1 | 4 | 8 | 16;
const TRUNCATE_TRIGGER_TYPE: i16 = 32;
const ROW_TRIGGER: &str = "keygate_notify";
const TRUNCATE_TRIGGER: &str = "keygate_notify_truncate";

/// The notify function and triggers for one table.
struct Watch {
    /// The table, as configured (`schema.name` or `name`).
    table: String,
    /// The function, in the table's schema.
    function: String,
    body: String,
    /// The columns whose update notifies.
    columns: [String; 2],
}

fn watches(config: &PostgresConfig) -> [Watch; 2] {
    let keys = &config.tables.api_keys;
    let workflows = &config.tables.workflows;
    let in_schema_of = |table: &str, name: &str| match table.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.{name}"),
        None => name.to_owned(),
    };
    [
        Watch {
            table: keys.table.clone(),
            function: in_schema_of(&keys.table, "keygate_notify_api_keys"),
            body: body(&config.channel, "key:", &keys.key_hash),
            columns: [keys.key_hash.clone(), keys.user_id.clone()],
        },
        Watch {
            table: workflows.table.clone(),
            function: in_schema_of(&workflows.table, "keygate_notify_workflows"),
            body: body(&config.channel, "workflow:", &workflows.id),
            columns: [workflows.id.clone(), workflows.user_id.clone()],
        },
    ]
}

/// A trigger function's PL/pgSQL: notify with the old and the new value of
/// `column`, or `flush` after a `TRUNCATE`. Channel and column are
/// identifiers the config checked, so they go in as they are.
fn body(channel: &str, tag: &str, column: &str) -> String {
    let column = quoted(column);
    format!(
        "
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('{channel}', 'flush');
    RETURN NULL;
  END IF;
  IF TG_OP IN ('UPDATE', 'DELETE') THEN
    PERFORM pg_notify('{channel}', '{tag}' || OLD.{column});
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    PERFORM pg_notify('{channel}', '{tag}' || NEW.{column});
  END IF;
  RETURN NULL;
END
"
    )
}

/// The state of one object against what the config wants.
#[derive(Debug, PartialEq, Eq)]
enum State {
    Current,
    Missing,
    Different,
}

async fn function_state(
    client: &impl GenericClient,
    watch: &Watch,
) -> Result<State, tokio_postgres::Error> {
    let source: Option<String> = client
        .query_one(
            "SELECT (SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure($1))",
            &[&format!("{}()", quoted(&watch.function))],
        )
        .await?
        .get(0);
    Ok(match source {
        None => State::Missing,
        Some(source) if source == watch.body => State::Current,
        Some(_) => State::Different,
    })
}

async fn trigger_state(
    client: &impl GenericClient,
    watch: &Watch,
    name: &str,
    kind: i16,
    columns: &[String],
) -> Result<State, tokio_postgres::Error> {
    let mut expected: Vec<String> = columns.to_vec();
    expected.sort();
    let row = client
        .query_opt(
            "SELECT t.tgfoid = to_regprocedure($2)::oid AND t.tgenabled <> 'D' AND t.tgtype = $4 \
               AND coalesce((SELECT array_agg(a.attname::text ORDER BY a.attname::text) \
                    FROM unnest(t.tgattr::int2[]) AS n(num) \
                    JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = n.num), '{}') = $5::text[] \
             FROM pg_trigger t WHERE t.tgrelid = to_regclass($1) AND t.tgname = $3 AND NOT t.tgisinternal",
            &[
                &quoted(&watch.table),
                &format!("{}()", quoted(&watch.function)),
                &name,
                &kind,
                &expected,
            ],
        )
        .await?;
    Ok(match row {
        None => State::Missing,
        Some(row) if row.get::<_, Option<bool>>(0) == Some(true) => State::Current,
        Some(_) => State::Different,
    })
}

/// Whether every trigger is in place as this config wants it; `Err` names
/// what is not.
pub async fn installed(
    client: &Client,
    config: &PostgresConfig,
) -> Result<Result<(), String>, tokio_postgres::Error> {
    let mut missing = Vec::new();
    for watch in watches(config) {
        if function_state(client, &watch).await? != State::Current {
            missing.push(format!("function {}()", watch.function));
        }
        if trigger_state(
            client,
            &watch,
            ROW_TRIGGER,
            ROW_TRIGGER_TYPE,
            &watch.columns,
        )
        .await?
            != State::Current
        {
            missing.push(format!("trigger {ROW_TRIGGER} on {}", watch.table));
        }
        if trigger_state(client, &watch, TRUNCATE_TRIGGER, TRUNCATE_TRIGGER_TYPE, &[]).await?
            != State::Current
        {
            missing.push(format!("trigger {TRUNCATE_TRIGGER} on {}", watch.table));
        }
    }
    Ok(if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    })
}

/// Installs what is missing or different; returns a line per object, saying
/// what was done to it.
pub async fn prepare(client: &mut Client, config: &PostgresConfig) -> Result<Vec<String>, String> {
    let failed = |e: tokio_postgres::Error| format!("store prepare: {}", super::describe(&e));
    let mut done = Vec::new();
    // Functions and triggers change together or not at all.
    let transaction = client.transaction().await.map_err(failed)?;
    for watch in watches(config) {
        let function = quoted(&watch.function);
        let table = quoted(&watch.table);
        let function_was = function_state(&transaction, &watch).await.map_err(failed)?;
        if function_was != State::Current {
            transaction
                .batch_execute(&format!(
                    "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $keygate${}$keygate$",
                    watch.body
                ))
                .await
                .map_err(failed)?;
        }
        done.push(line(
            &format!("function {}()", watch.function),
            &function_was,
        ));
        let columns = watch
            .columns
            .iter()
            .map(|c| quoted(c))
            .collect::<Vec<_>>()
            .join(", ");
        let triggers = [
            (
                ROW_TRIGGER,
                ROW_TRIGGER_TYPE,
                &watch.columns[..],
                format!("AFTER INSERT OR DELETE OR UPDATE OF {columns} ON {table} FOR EACH ROW"),
            ),
            (
                TRUNCATE_TRIGGER,
                TRUNCATE_TRIGGER_TYPE,
                &[][..],
                format!("AFTER TRUNCATE ON {table} FOR EACH STATEMENT"),
            ),
        ];
        for (name, kind, watched, when) in triggers {
            let was = trigger_state(&transaction, &watch, name, kind, watched)
                .await
                .map_err(failed)?;
            if was != State::Current {
                transaction
                    .batch_execute(&format!(
                        "DROP TRIGGER IF EXISTS \"{name}\" ON {table}; \
                         CREATE TRIGGER \"{name}\" {when} EXECUTE FUNCTION {function}()"
                    ))
                    .await
                    .map_err(failed)?;
            }
            done.push(line(&format!("trigger {name} on {}", watch.table), &was));
        }
    }
    done.push(
        integrations_table(&transaction, config)
            .await
            .map_err(failed)?,
    );
    for (name, columns) in [
        (
            super::sql::policies_table(&config.tables),
            "key_id text PRIMARY KEY, expires_at timestamp, workflows text[], rate text",
        ),
        (
            super::sql::audit_table(&config.tables),
            "at timestamp NOT NULL, id text NOT NULL, entry text NOT NULL, PRIMARY KEY (at, id)",
        ),
    ] {
        done.push(
            own_table(&transaction, &name, columns, None)
                .await
                .map_err(failed)?,
        );
    }
    transaction.commit().await.map_err(failed)?;
    done.push(hash_index(client, config).await.map_err(failed)?);
    Ok(done)
}

/// keygate's own table for integration credentials (sealed secrets only),
/// and its index by user.
async fn integrations_table(
    client: &impl GenericClient,
    config: &PostgresConfig,
) -> Result<String, tokio_postgres::Error> {
    own_table(
        client,
        &super::sql::integrations_table(&config.tables),
        "id text PRIMARY KEY, user_id text NOT NULL, type text NOT NULL, name text NOT NULL, \
         created_at timestamp NOT NULL, last_used_at timestamp, \
         key_id text NOT NULL, nonce bytea NOT NULL, ciphertext bytea NOT NULL",
        Some("keygate_integrations_user_id (user_id)"),
    )
    .await
}

/// One of keygate's own tables (integrations, key policies, the audit
/// log), made if missing, with an index (`name (columns)`) if given.
async fn own_table(
    client: &impl GenericClient,
    name: &str,
    columns: &str,
    index: Option<&str>,
) -> Result<String, tokio_postgres::Error> {
    let table = quoted(name);
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0);
    if exists {
        return Ok(format!("table {name}: unchanged"));
    }
    let mut ddl = format!("CREATE TABLE {table} ({columns})");
    if let Some(index) = index {
        let (index_name, on) = index.split_once(' ').unwrap_or((index, ""));
        ddl.push_str(&format!("; CREATE INDEX {index_name} ON {table} {on}"));
    }
    client.batch_execute(&ddl).await?;
    Ok(format!("table {name}: created"))
}

/// Whether keygate's integrations table is there.
pub async fn integrations_table_exists(
    client: &Client,
    config: &PostgresConfig,
) -> Result<bool, tokio_postgres::Error> {
    let table = quoted(&super::sql::integrations_table(&config.tables));
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0))
}

fn line(what: &str, was: &State) -> String {
    match was {
        State::Current => format!("{what}: unchanged"),
        State::Missing => format!("{what}: created"),
        State::Different => format!("{what}: updated"),
    }
}

/// An index led by the hash column, unless a valid one exists (the
/// engine's, or ours from an earlier run); a build that failed half-way
/// (an invalid index) is dropped and made again.
async fn hash_index(
    client: &Client,
    config: &PostgresConfig,
) -> Result<String, tokio_postgres::Error> {
    let keys = &config.tables.api_keys;
    let table = quoted(&keys.table);
    let name = match keys.table.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.keygate_api_keys_key_hash"),
        None => "keygate_api_keys_key_hash".to_owned(),
    };
    let what = format!("index on {} ({})", keys.table, keys.key_hash);
    let existing = client
        .query(
            "SELECT c.relname::text, i.indisvalid FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = to_regclass($1) AND a.attname = $2",
            &[&table, &keys.key_hash],
        )
        .await?;
    if let Some(valid) = existing.iter().find(|row| row.get::<_, bool>(1)) {
        let index: String = valid.get(0);
        return Ok(format!("{what}: unchanged ({index})"));
    }
    let ours = quoted(&name);
    let mut made = "created";
    if existing
        .iter()
        .any(|row| row.get::<_, String>(0) == "keygate_api_keys_key_hash")
    {
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {ours}"))
            .await?;
        made = "made again (an earlier build had not finished)";
    }
    // CONCURRENTLY: the engine keeps writing while the index is built.
    let unqualified = quoted(name.rsplit('.').next().unwrap_or(&name));
    client
        .batch_execute(&format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {unqualified} ON {table} ({})",
            quoted(&keys.key_hash)
        ))
        .await?;
    Ok(format!("{what}: {made} ({name})"))
}

//! Whether the engine's tables have the columns the config names: checked
//! when the gateway starts, so a wrong `tables:` mapping is an error that
//! names the table and column, not a 503 on the first request.

use super::sql::quoted;
use crate::config::PostgresConfig;
use tokio_postgres::Client;

type Wanted<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

/// `Err` names every table or column the config expects and the database
/// lacks.
pub async fn check(
    client: &Client,
    config: &PostgresConfig,
) -> Result<Result<(), String>, tokio_postgres::Error> {
    let t = &config.tables;
    let k = &t.api_keys;
    // (config section, table, [(config name, column)])
    let wanted: [Wanted<'_>; 3] = [
        (
            "api_keys",
            &k.table,
            vec![
                ("id", &k.id),
                ("user_id", &k.user_id),
                ("name", &k.name),
                ("key_hash", &k.key_hash),
                ("key_prefix", &k.key_prefix),
                ("created_at", &k.created_at),
                ("last_used_at", &k.last_used_at),
            ],
        ),
        (
            "workflows",
            &t.workflows.table,
            vec![("id", &t.workflows.id), ("user_id", &t.workflows.user_id)],
        ),
        ("users", &t.users.table, vec![("id", &t.users.id)]),
    ];
    let mut problems = Vec::new();
    for (section, table, columns) in wanted {
        let row = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL, coalesce((SELECT array_agg(attname::text) \
                 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped), '{}')",
                &[&quoted(table)],
            )
            .await?;
        let field = format!("store.postgres.tables.{section}");
        if !row.get::<_, bool>(0) {
            problems.push(format!("{field}: table {table:?} does not exist"));
            continue;
        }
        let present: Vec<String> = row.get(1);
        for (name, column) in columns {
            if !present.iter().any(|p| p == column) {
                problems.push(format!(
                    "{field}.{name}: table {table:?} has no column {column:?}"
                ));
            }
        }
    }
    Ok(if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    })
}

//! The statements the postgres store runs, written once from the
//! configured table and column names (each quoted, so an engine's
//! `"userId"` keeps its case). Every one is prepared once per connection.

use crate::config::EngineTables;

/// A configured name as SQL: `"name"`, or `"schema"."name"`. The config
/// admits only letters, digits and `_`, so nothing needs escaping.
pub fn quoted(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join(".")
}

/// The columns of a key row, in the order [`super::key_record`] reads them,
/// each after `table.` when given.
fn key_columns(t: &EngineTables, table: Option<&str>) -> String {
    let k = &t.api_keys;
    let at = table.map(|t| format!("{t}.")).unwrap_or_default();
    [
        &k.id,
        &k.user_id,
        &k.name,
        &k.key_hash,
        &k.key_prefix,
        &k.created_at,
        &k.last_used_at,
    ]
    .iter()
    .map(|c| format!("{at}{}", quoted(c)))
    .collect::<Vec<_>>()
    .join(", ")
}

/// keygate's own table beside the engine's keys table (in its schema when
/// that is given), made by `store prepare`.
fn own_table(t: &EngineTables, name: &str) -> String {
    match t.api_keys.table.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.{name}"),
        None => name.to_owned(),
    }
}

/// keygate's table of key policies (expiry, workflow scopes, rate), one
/// row per key that has one.
pub(super) fn policies_table(t: &EngineTables) -> String {
    own_table(t, "keygate_key_policies")
}

/// keygate's audit log table.
pub(super) fn audit_table(t: &EngineTables) -> String {
    own_table(t, "keygate_audit")
}

/// keygate's own table for integration credentials, beside the engine's
/// keys table (in its schema when that is given), made by `store prepare`.
pub(super) fn integrations_table(t: &EngineTables) -> String {
    own_table(t, "keygate_integrations")
}

/// The columns of an integration row, in the order
/// [`super::integration_record`] reads them.
const INTEGRATION_COLUMNS: &str =
    "id, user_id, type, name, created_at, last_used_at, key_id, nonce, ciphertext";

pub(super) struct Statements {
    /// The key reads (and the delete) on the engine's table alone.
    pub(super) keys: KeyStatements,
    pub(super) insert_key: String,
    pub(super) last_used: String,
    pub(super) user_exists: String,
    pub(super) get_owner: String,
    pub(super) set_owner: String,
    pub(super) list_workflows: String,
    pub(super) insert_integration: String,
    pub(super) get_integration: String,
    pub(super) list_integrations: String,
    pub(super) all_integrations: String,
    pub(super) reseal_integration: String,
    pub(super) delete_integration: String,
    pub(super) integration_used: String,
    /// With keygate's policies table: the same reads with the policy
    /// columns after the key's, and the writes of policies.
    pub(super) with_policies: PolicyStatements,
    pub(super) policies_exist: String,
    pub(super) insert_audit: String,
    pub(super) trim_audit: String,
    pub(super) list_audit: String,
}

/// The statements that read a key row (and the one that deletes it,
/// returning the row), in [`super::key_record`]'s column order.
pub(super) struct KeyStatements {
    pub(super) find_by_hash: String,
    pub(super) list_keys: String,
    pub(super) list_all_keys: String,
    pub(super) get_key: String,
    pub(super) delete_key: String,
}

pub(super) struct PolicyStatements {
    pub(super) keys: KeyStatements,
    pub(super) insert_policy: String,
    pub(super) expire_key: String,
    pub(super) expired_keys: String,
}

impl Statements {
    pub(super) fn new(t: &EngineTables) -> Statements {
        let keys = quoted(&t.api_keys.table);
        let k = &t.api_keys;
        let (id, user, hash, created, last_used) = (
            quoted(&k.id),
            quoted(&k.user_id),
            quoted(&k.key_hash),
            quoted(&k.created_at),
            quoted(&k.last_used_at),
        );
        let columns = key_columns(t, None);
        let joined = format!(
            "{}, p.expires_at, p.workflows, p.rate",
            key_columns(t, Some("k"))
        );
        let policies = quoted(&policies_table(t));
        let audit = quoted(&audit_table(t));
        let from = format!("{keys} AS k LEFT JOIN {policies} AS p ON p.key_id = k.{id}");
        let workflows = quoted(&t.workflows.table);
        let (workflow_id, owner) = (quoted(&t.workflows.id), quoted(&t.workflows.user_id));
        let users = quoted(&t.users.table);
        let user_id = quoted(&t.users.id);
        let integrations = quoted(&integrations_table(t));
        let all = INTEGRATION_COLUMNS;
        Statements {
            keys: KeyStatements {
                find_by_hash: format!("SELECT {columns} FROM {keys} WHERE {hash} = $1"),
                list_keys: format!(
                    "SELECT {columns} FROM {keys} WHERE {user} = $1 ORDER BY {created} DESC, {id} DESC"
                ),
                list_all_keys: format!(
                    "SELECT {columns} FROM {keys} ORDER BY {created} DESC, {id} DESC"
                ),
                get_key: format!("SELECT {columns} FROM {keys} WHERE {id} = $1"),
                delete_key: format!("DELETE FROM {keys} WHERE {id} = $1 RETURNING {columns}"),
            },
            insert_key: format!(
                "INSERT INTO {keys} ({id}, {user}, {}, {hash}, {}, {created}) VALUES ($1, $2, $3, $4, $5, $6)",
                quoted(&k.name),
                quoted(&k.key_prefix),
            ),
            // One statement a flush, whatever its size; a time never moves
            // back, and a key deleted meanwhile has no row to update.
            last_used: format!(
                "UPDATE {keys} AS k SET {last_used} = u.at \
                 FROM unnest($1::text[], $2::timestamp[]) AS u(id, at) \
                 WHERE k.{id} = u.id AND (k.{last_used} IS NULL OR k.{last_used} < u.at)"
            ),
            user_exists: format!("SELECT 1 FROM {users} WHERE {user_id} = $1"),
            get_owner: format!("SELECT {owner} FROM {workflows} WHERE {workflow_id} = $1"),
            set_owner: format!("UPDATE {workflows} SET {owner} = $2 WHERE {workflow_id} = $1"),
            list_workflows: format!(
                "SELECT {workflow_id}, {owner} FROM {workflows} ORDER BY {workflow_id}"
            ),
            insert_integration: format!(
                "INSERT INTO {integrations} (id, user_id, type, name, created_at, key_id, nonce, ciphertext) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ),
            get_integration: format!("SELECT {all} FROM {integrations} WHERE id = $1"),
            list_integrations: format!(
                "SELECT {all} FROM {integrations} WHERE user_id = $1 ORDER BY created_at DESC, id DESC"
            ),
            all_integrations: format!("SELECT {all} FROM {integrations} ORDER BY id"),
            reseal_integration: format!(
                "UPDATE {integrations} SET key_id = $2, nonce = $3, ciphertext = $4 WHERE id = $1"
            ),
            delete_integration: format!("DELETE FROM {integrations} WHERE id = $1 RETURNING {all}"),
            integration_used: format!(
                "UPDATE {integrations} SET last_used_at = $2 \
                 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)"
            ),
            policies_exist: format!(
                "SELECT to_regclass('{}') IS NOT NULL AND to_regclass('{}') IS NOT NULL",
                policies.replace('\'', "''"),
                audit.replace('\'', "''")
            ),
            insert_audit: format!("INSERT INTO {audit} (at, id, entry) VALUES ($1, $2, $3)"),
            trim_audit: format!("DELETE FROM {audit} WHERE at < $1"),
            list_audit: format!("SELECT entry FROM {audit} WHERE at >= $1 ORDER BY at, id"),
            with_policies: PolicyStatements {
                keys: KeyStatements {
                    find_by_hash: format!("SELECT {joined} FROM {from} WHERE k.{hash} = $1"),
                    list_keys: format!(
                        "SELECT {joined} FROM {from} WHERE k.{user} = $1 ORDER BY k.{created} DESC, k.{id} DESC"
                    ),
                    list_all_keys: format!(
                        "SELECT {joined} FROM {from} ORDER BY k.{created} DESC, k.{id} DESC"
                    ),
                    get_key: format!("SELECT {joined} FROM {from} WHERE k.{id} = $1"),
                    delete_key: format!(
                        "WITH gone AS (DELETE FROM {policies} WHERE key_id = $1 \
                           RETURNING expires_at, workflows, rate) \
                         DELETE FROM {keys} WHERE {id} = $1 RETURNING {columns}, \
                           (SELECT expires_at FROM gone), (SELECT workflows FROM gone), (SELECT rate FROM gone)"
                    ),
                },
                insert_policy: format!(
                    "INSERT INTO {policies} (key_id, expires_at, workflows, rate) VALUES ($1, $2, $3, $4)"
                ),
                expire_key: format!(
                    "INSERT INTO {policies} AS p (key_id, expires_at) \
                     SELECT {id}, $2 FROM {keys} WHERE {id} = $1 \
                     ON CONFLICT (key_id) DO UPDATE SET expires_at = \
                       LEAST(coalesce(p.expires_at, EXCLUDED.expires_at), EXCLUDED.expires_at)"
                ),
                expired_keys: format!("SELECT {joined} FROM {from} WHERE p.expires_at <= $1"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn names_are_quoted_and_mapped() {
        assert_eq!(quoted("engine.api_keys"), "\"engine\".\"api_keys\"");
        let yaml = "store:\n  postgres:\n    url: postgres://u@h/db\n    tables:\n      workflows: {table: flows, user_id: userId}\n";
        let config = Config::from_yaml(yaml, std::path::Path::new(".")).unwrap();
        let crate::config::StoreConfig::Postgres(pg) = config.store else {
            panic!("not postgres")
        };
        let sql = Statements::new(&pg.tables);
        assert_eq!(
            sql.get_owner,
            "SELECT \"userId\" FROM \"flows\" WHERE \"id\" = $1"
        );
        assert!(
            sql.keys
                .find_by_hash
                .ends_with("FROM \"api_keys\" WHERE \"key_hash\" = $1"),
            "{}",
            sql.keys.find_by_hash
        );
    }
}

//! A cluster's health as `/readyz` reports it: every master the cluster
//! knows (from `CLUSTER NODES`, asked of whichever node answers), each
//! asked for a PING on a connection of its own. Any that does not answer
//! is named, so an operator sees which slots are out.

use super::conn::{Conn, address_url, node_client};
use crate::config::RedisConfig;

/// The masters `CLUSTER NODES` lists: `ip:port`, and whether it is
/// flagged failed.
pub(super) fn masters(nodes: &str) -> Vec<(String, bool)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (address, flags) = (fields.get(1)?, fields.get(2)?);
            if !flags.split(',').any(|f| f == "master") {
                return None;
            }
            // `ip:port@bus[,hostname]`
            let address = address.split('@').next()?.to_owned();
            let failed = flags.split(',').any(|f| f == "fail" || f == "fail?");
            Some((address, failed))
        })
        .collect()
}

/// `Err` names the masters that do not answer.
pub(super) async fn cluster(conn: &mut Conn, config: &RedisConfig) -> Result<(), String> {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(conn)
        .await
        .map_err(|e| format!("redis cluster: {e}"))?;
    let masters = masters(&nodes);
    if masters.is_empty() {
        return Err("redis cluster: CLUSTER NODES lists no master".into());
    }
    let mut down = Vec::new();
    for (address, failed) in masters {
        if failed {
            down.push(address);
            continue;
        }
        let answered = async {
            let client = node_client(config, &address_url(config, &address))?;
            let mut node = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query_async::<String>(&mut node)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(config.timeout, answered).await {
            Ok(Ok(_)) => {}
            _ => down.push(address),
        }
    }
    match down.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "redis cluster degraded: masters not answering: {}",
            down.join(", ")
        )),
    }
}

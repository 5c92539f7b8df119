//! Moving a store written before the cluster-ready layout: last-used times
//! from the one `lastused` sorted set into each key's hash (the newer time
//! kept), owners from the one `owners` hash into `owner:<id>` keys (one
//! already written the new way wins) and the `workflows` set. Each entry is
//! moved, then taken out of the old key, so a run that stops half-way
//! (Redis lost, the process stopped) is finished by the next; a store with
//! nothing old is left as it is.

use super::conn::Conn;
use super::{RedisStore, keep_newer};
use redis::RedisResult;

/// Entries moved per round trip.
const BATCH: usize = 500;

/// Returns how many last-used times and owners were moved.
pub(super) async fn run(store: &RedisStore, conn: &mut Conn) -> RedisResult<(usize, usize)> {
    let last_used_key = format!("{}lastused", store.prefix);
    let mut moved_times = 0;
    loop {
        let page: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&last_used_key)
            .arg(0)
            .arg(BATCH - 1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        if page.is_empty() {
            break;
        }
        let writes = page
            .iter()
            // Unix ms fit a double's 53-bit mantissa exactly.
            .map(|(hash, at)| keep_newer(format!("{}key:{hash}", store.prefix), *at as i64))
            .collect();
        super::each::<i64>(conn, writes).await?;
        let mut done = redis::cmd("ZREM");
        done.arg(&last_used_key);
        for (hash, _) in &page {
            done.arg(hash);
        }
        done.query_async::<i64>(conn).await?;
        moved_times += page.len();
    }
    let owners_key = store.legacy_owners_key();
    let mut moved_owners = 0;
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(&owners_key)
            .arg(cursor)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        if !page.is_empty() {
            let mut writes = Vec::with_capacity(page.len() * 2);
            for (workflow, owner) in &page {
                let mut set = redis::cmd("SET");
                set.arg(store.owner_key(workflow)).arg(owner).arg("NX");
                writes.push(set);
            }
            super::each::<Option<String>>(conn, writes).await?;
            let mut listed = redis::cmd("SADD");
            listed.arg(store.workflows_key());
            let mut done = redis::cmd("HDEL");
            done.arg(&owners_key);
            for (workflow, _) in &page {
                listed.arg(workflow);
                done.arg(workflow);
            }
            listed.query_async::<i64>(conn).await?;
            done.query_async::<i64>(conn).await?;
            moved_owners += page.len();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok((moved_times, moved_owners))
}

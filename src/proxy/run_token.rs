//! The run token a permitted webhook call carries upstream (with a vault):
//! the engine hands it to the run's steps, and egress lets them use the
//! owner's integration credentials with it. Minting one is an HMAC, so each
//! thread keeps the token it minted per key for a minute and sends that
//! while it still has most of its life ahead.

use crate::vault::Credentials;
use std::cell::RefCell;
use std::collections::HashMap;

/// How long a thread reuses a token it minted.
const REUSE_SECS: i64 = 60;
/// Tokens kept per thread at the most; past it the cache starts over.
const CAPACITY: usize = 10_000;

struct Minted {
    /// Which `Credentials` minted it (one per gateway).
    by: usize,
    user_id: String,
    token: String,
    minted_at: i64,
}

thread_local! {
    static MINTED: RefCell<HashMap<String, Minted>> = RefCell::new(HashMap::new());
}

/// Hands `f` a run token for `user_id`'s key `key_id`.
pub(crate) fn with_run_token<R>(
    credentials: &Credentials,
    user_id: &str,
    key_id: &str,
    f: impl FnOnce(&str) -> R,
) -> R {
    let ttl = credentials.run_token_ttl;
    // A token must keep most of its life: reuse only when the TTL is long
    // next to the reuse window.
    if ttl.as_secs() < 4 * REUSE_SECS.unsigned_abs() {
        let (token, _) = credentials.run_token(user_id, key_id, ttl);
        return f(&token);
    }
    let now = crate::clock::now_ms().div_euclid(1000);
    let by = std::ptr::from_ref(credentials) as usize;
    MINTED.with(|minted| {
        let mut minted = minted.borrow_mut();
        let fresh = minted.get(key_id).is_some_and(|m| {
            m.by == by
                && m.user_id == user_id
                && now - m.minted_at < REUSE_SECS
                && now >= m.minted_at
        });
        if !fresh {
            if minted.len() >= CAPACITY {
                minted.clear();
            }
            let (token, _) = credentials.run_token(user_id, key_id, ttl);
            minted.insert(
                key_id.to_owned(),
                Minted {
                    by,
                    user_id: user_id.to_owned(),
                    token,
                    minted_at: now,
                },
            );
        }
        f(&minted[key_id].token)
    })
}

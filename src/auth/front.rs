//! Per-thread copies of the answers a thread served, in front of the key
//! and owner caches: a cache read takes a shard lock and records an access
//! for the eviction policy, which costs more than the rest of the check. A
//! copy is served under the same fence test as a cache entry, and never
//! past the TTL of the store read it came from.

use super::Auth;
use super::fence::Fenced;
use super::principal::Principal;
use crate::key::KeyHash;
use std::sync::Arc;

/// One thread's front copies for one [`Auth`].
#[derive(Default)]
pub(super) struct Front {
    pub(super) keys: std::collections::HashMap<KeyHash, Fenced<Arc<Principal>>>,
    pub(super) owners: std::collections::HashMap<Box<str>, Fenced<Option<Arc<str>>>>,
}

thread_local! {
    /// Front copies by [`Auth::id`]; a process normally has one `Auth`.
    static FRONTS: std::cell::RefCell<Vec<(u64, Front)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Auth {
    pub(super) fn with_front<R>(&self, f: impl FnOnce(&mut Front) -> R) -> R {
        FRONTS.with(|fronts| {
            let mut fronts = fronts.borrow_mut();
            let index = match fronts.iter().position(|(id, _)| *id == self.id) {
                Some(i) => i,
                None => {
                    // Other `Auth`s (tests make many) keep a few slots.
                    if fronts.len() >= 8 {
                        fronts.remove(0);
                    }
                    fronts.push((self.id, Front::default()));
                    fronts.len() - 1
                }
            };
            f(&mut fronts[index].1)
        })
    }
}

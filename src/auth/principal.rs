//! Who a valid key belongs to: what the proxy injects upstream, kept small
//! because one sits in the cache per valid key.

use std::sync::atomic::{AtomicI64, AtomicU64};

/// Who a valid key belongs to: what the proxy injects upstream. One of
/// these sits in the cache per valid key, so it is kept small: both ids
/// share one allocation and the prefix is stored inline.
#[derive(Debug)]
pub struct Principal {
    /// The key id followed by the user id.
    ids: Box<str>,
    split: usize,
    prefix: [u8; crate::key::PREFIX_LEN],
    prefix_len: u8,
    /// Last time (Unix ms) noted for the usage batcher, so a busy key
    /// touches the shared pending map at most once per millisecond.
    pub last_noted: AtomicI64,
    /// The per-key rate window (see `proxy::key_rate`): window number in
    /// the high 40 bits, requests counted in it in the low 24.
    pub(crate) rate: AtomicU64,
    /// An expiry, workflow scopes or a rate of its own; most keys have none.
    policy: Option<Box<Policy>>,
}

/// What limits a key beyond its owner.
#[derive(Debug, Default)]
pub struct Policy {
    /// Unix ms from which it is refused.
    pub expires_at: Option<i64>,
    /// The workflows it may call; `None`: all its user's.
    pub workflows: Option<Box<[Box<str>]>>,
    pub rate: Option<crate::store::Rate>,
}

impl Principal {
    pub fn new(key_id: &str, user_id: &str, prefix: &str) -> Principal {
        // Stored prefixes are ASCII (`wfb_` + base64url); anything else is
        // shown as nothing rather than cut inside a character.
        let prefix = if prefix.is_ascii() {
            prefix.as_bytes()
        } else {
            b""
        };
        let len = prefix.len().min(crate::key::PREFIX_LEN);
        let mut inline = [0u8; crate::key::PREFIX_LEN];
        inline[..len].copy_from_slice(&prefix[..len]);
        Principal {
            ids: format!("{key_id}{user_id}").into_boxed_str(),
            split: key_id.len(),
            prefix: inline,
            prefix_len: len as u8,
            last_noted: AtomicI64::new(0),
            rate: AtomicU64::new(0),
            policy: None,
        }
    }

    /// With an expiry, scopes or a rate of its own.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Principal {
        let none =
            policy.expires_at.is_none() && policy.workflows.is_none() && policy.rate.is_none();
        self.policy = (!none).then(|| Box::new(policy));
        self
    }

    /// Whether it has expired by `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.policy
            .as_ref()
            .and_then(|p| p.expires_at)
            .is_some_and(|at| now_ms >= at)
    }

    /// Whether its scopes admit `workflow` (no scopes: every workflow).
    pub fn allows(&self, workflow: &str) -> bool {
        match self.policy.as_ref().and_then(|p| p.workflows.as_ref()) {
            None => true,
            Some(list) => list.iter().any(|w| &**w == workflow),
        }
    }

    /// Its own rate, if it has one.
    pub fn own_rate(&self) -> Option<crate::store::Rate> {
        self.policy.as_ref().and_then(|p| p.rate)
    }

    pub fn key_id(&self) -> &str {
        &self.ids[..self.split]
    }

    pub fn user_id(&self) -> &str {
        &self.ids[self.split..]
    }

    /// The key's first characters, for logs; never the key.
    pub fn prefix(&self) -> &str {
        std::str::from_utf8(&self.prefix[..usize::from(self.prefix_len)]).unwrap_or("")
    }
}

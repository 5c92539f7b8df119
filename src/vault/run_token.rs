//! Run tokens: what a webhook call's steps (or a scheduled run's, minted by
//! the admin API) present to egress, naming the user whose credentials they
//! may use, the key that started the run, and until when. Spelled `kgr_` +
//! base64url, so one is never mistaken for a `wfb_` key or a provider's.
//!
//! A token is `version ‖ expiry ‖ user ‖ key id`, then an HMAC-SHA256 of
//! all that. The MAC key is `vault.run_token_key` if set, else derived from
//! each master key (HMAC-SHA256 of a fixed label under it): the first signs,
//! every one verifies, so tokens outlive a key rotation for their TTL.
//! Verification compares MACs in constant time.

use crate::config::VaultConfig;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

pub const SCHEME: &str = "kgr_";
const VERSION: u8 = 1;
const MAC_LEN: usize = 32;
const DERIVATION_LABEL: &[u8] = b"keygate run token v1";

/// Whose run this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunClaims {
    pub user_id: String,
    /// The key that started the run; empty for a minted token.
    pub key_id: String,
    /// Unix seconds.
    pub expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token, or one whose MAC does not verify.
    Invalid,
    Expired,
}

pub struct RunTokens {
    /// The first signs; all verify.
    keys: Vec<Zeroizing<[u8; 32]>>,
}

impl fmt::Debug for RunTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunTokens({} keys)", self.keys.len())
    }
}

impl RunTokens {
    pub fn new(config: &VaultConfig) -> RunTokens {
        let keys = match &config.run_token_key {
            Some(key) => vec![key.0.clone()],
            None => config
                .master_keys
                .iter()
                .map(|master| {
                    let mut mac = HmacSha256::new_from_slice(master.key.0.as_slice())
                        .expect("HMAC takes any key length");
                    mac.update(DERIVATION_LABEL);
                    let mut key = Zeroizing::new([0u8; 32]);
                    key.copy_from_slice(&mac.finalize().into_bytes());
                    key
                })
                .collect(),
        };
        RunTokens { keys }
    }

    fn mac(key: &[u8; 32], body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(body);
        mac
    }

    pub fn sign(&self, claims: &RunClaims) -> String {
        let mut token = body(claims);
        let tag = Self::mac(&self.keys[0], &token).finalize().into_bytes();
        token.extend_from_slice(&tag);
        let mut out = String::with_capacity(SCHEME.len() + token.len().div_ceil(3) * 4);
        out.push_str(SCHEME);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&token, &mut out);
        out
    }

    /// The claims of a valid, unexpired token at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<RunClaims, TokenError> {
        let encoded = token.strip_prefix(SCHEME).ok_or(TokenError::Invalid)?;
        if encoded.len() > 2048 {
            return Err(TokenError::Invalid);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| TokenError::Invalid)?;
        if raw.len() < MAC_LEN {
            return Err(TokenError::Invalid);
        }
        let (signed, tag) = raw.split_at(raw.len() - MAC_LEN);
        let genuine = self
            .keys
            .iter()
            .any(|key| Self::mac(key, signed).verify_slice(tag).is_ok());
        if !genuine {
            return Err(TokenError::Invalid);
        }
        let claims = parse(signed).ok_or(TokenError::Invalid)?;
        if claims.expires_at <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// `version ‖ expiry (i64 BE) ‖ len ‖ user ‖ len ‖ key id`, lengths u16 BE.
fn body(claims: &RunClaims) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + claims.user_id.len() + claims.key_id.len() + MAC_LEN);
    out.push(VERSION);
    out.extend_from_slice(&claims.expires_at.to_be_bytes());
    for field in [&claims.user_id, &claims.key_id] {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&field.as_bytes()[..usize::from(len)]);
    }
    out
}

fn parse(body: &[u8]) -> Option<RunClaims> {
    let (&version, rest) = body.split_first()?;
    if version != VERSION || rest.len() < 8 {
        return None;
    }
    let (expiry, mut rest) = rest.split_at(8);
    let expires_at = i64::from_be_bytes(expiry.try_into().ok()?);
    let mut field = || -> Option<String> {
        if rest.len() < 2 {
            return None;
        }
        let (len, after) = rest.split_at(2);
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if after.len() < len {
            return None;
        }
        let (value, after) = after.split_at(len);
        rest = after;
        String::from_utf8(value.to_vec()).ok()
    };
    let user_id = field()?;
    let key_id = field()?;
    if !rest.is_empty() {
        return None;
    }
    Some(RunClaims {
        user_id,
        key_id,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MasterKey, SecretKey};

    fn tokens(keys: &[(&str, u8)]) -> RunTokens {
        RunTokens::new(&VaultConfig {
            master_keys: keys
                .iter()
                .map(|(id, b)| MasterKey {
                    id: (*id).to_owned(),
                    key: SecretKey(Zeroizing::new([*b; 32])),
                })
                .collect(),
            run_token_key: None,
        })
    }

    fn claims() -> RunClaims {
        RunClaims {
            user_id: "alice".into(),
            key_id: "key_1".into(),
            expires_at: 1_000,
        }
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let t = tokens(&[("k1", 1)]);
        let token = t.sign(&claims());
        assert!(token.starts_with("kgr_"));
        assert_eq!(t.verify(&token, 999), Ok(claims()));
        assert_eq!(t.verify(&token, 1_000), Err(TokenError::Expired));
    }

    #[test]
    fn a_tampered_or_foreign_token_is_invalid() {
        let t = tokens(&[("k1", 1)]);
        let token = t.sign(&claims());
        let mut bytes = token.into_bytes();
        let last = bytes.len() - 5;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(t.verify(&tampered, 0), Err(TokenError::Invalid));
        let other = tokens(&[("k1", 2)]).sign(&claims());
        assert_eq!(t.verify(&other, 0), Err(TokenError::Invalid));
        for junk in [
            "",
            "kgr_",
            "kgr_!!",
            "wfb_abc",
            "sk-x",
            &format!("kgr_{}", "A".repeat(3000)),
        ] {
            assert_eq!(t.verify(junk, 0), Err(TokenError::Invalid), "{junk}");
        }
    }

    #[test]
    fn tokens_outlive_a_key_rotation() {
        let old = tokens(&[("k1", 1)]).sign(&claims());
        let rotated = tokens(&[("k2", 2), ("k1", 1)]);
        assert_eq!(rotated.verify(&old, 0), Ok(claims()));
        assert_eq!(
            tokens(&[("k2", 2)]).verify(&old, 0),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn claims_round_trip_whatever_their_contents() {
        let t = tokens(&[("k1", 1)]);
        for (user, key) in [("", ""), ("ü:ser", "key"), ("u", &*"k".repeat(300))] {
            let c = RunClaims {
                user_id: user.into(),
                key_id: key.into(),
                expires_at: i64::MAX,
            };
            assert_eq!(t.verify(&t.sign(&c), 0), Ok(c));
        }
    }
}

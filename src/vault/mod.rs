//! Integration credentials (a provider's API key, say): sealed with
//! AES-256-GCM under the configured master keys and opened only for the
//! length of one request. Each seal uses a fresh random 96-bit nonce and
//! binds the ciphertext to its record (associated data
//! `keygate:integration:v1:<id>:<userId>:<type>`), so a ciphertext copied
//! onto another record does not open. The first master key seals; every
//! listed key opens what it sealed, which is how keys are rotated (`keygate
//! integrations rekey`).
//!
//! - [`run_token`]: the `kgr_` tokens a webhook call's steps present to
//!   egress, naming whose credentials they may use;
//! - [`import`]: opening the workflow-builder template's own encrypted
//!   integration configs, to bring them over.

pub mod import;
pub mod run_token;

use crate::config::{EgressConfig, MintToken, Provider, VaultConfig};
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use run_token::{RunClaims, RunTokens};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use zeroize::Zeroizing;

/// A credential's secret fields as JSON (`{"apiKey": "sk-…"}`), zeroed when
/// dropped.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// From a JSON object of string fields; anything else is refused.
    pub fn from_json(json: Zeroizing<Vec<u8>>) -> Result<Secret, String> {
        let secret = Secret(json);
        secret.fields()?;
        Ok(secret)
    }

    /// One field and its value.
    pub fn single(field: &str, value: &str) -> Secret {
        let json = serde_json::to_vec(&BTreeMap::from([(field, value)])).unwrap_or_default();
        Secret(Zeroizing::new(json))
    }

    /// The fields, each value zeroed when dropped.
    pub fn fields(&self) -> Result<BTreeMap<String, Zeroizing<String>>, String> {
        serde_json::from_slice(&self.0)
            .map_err(|_| "the credential is not a JSON object of string fields".to_owned())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// What a sealed secret is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub kind: &'a str,
}

impl Binding<'_> {
    fn associated_data(&self) -> Vec<u8> {
        format!(
            "keygate:integration:v1:{}:{}:{}",
            self.id, self.user_id, self.kind
        )
        .into_bytes()
    }
}

/// A secret as stored: which master key sealed it, its nonce and the
/// ciphertext with its tag.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: [u8; 12],
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultError {
    /// Sealed under a master key the config does not list.
    MissingKey { record: String, key_id: String },
    /// Does not open under its key: the key is not the one it was sealed
    /// with, or the ciphertext belongs to another record.
    WrongKeyOrRecord { record: String, key_id: String },
    /// The OS random source failed.
    Random,
}

impl fmt::Display for VaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VaultError::MissingKey { record, key_id } => write!(
                f,
                "integration {record} is sealed under master key {key_id:?}, which vault.master_keys does not list"
            ),
            VaultError::WrongKeyOrRecord { record, key_id } => write!(
                f,
                "integration {record} does not decrypt under master key {key_id:?}: the key is not the one it was sealed with, or the ciphertext belongs to another record"
            ),
            VaultError::Random => f.write_str("the OS random source failed"),
        }
    }
}

impl std::error::Error for VaultError {}

/// All that works with integration credentials, shared by the admin API
/// (adding, re-sealing, minting run tokens), the data plane (a run token on
/// every permitted webhook call) and egress (opening and injecting).
pub struct Credentials {
    pub vault: Vault,
    pub run_tokens: RunTokens,
    pub providers: std::collections::BTreeMap<String, Provider>,
    pub run_token_ttl: Duration,
    pub mint_token: Option<MintToken>,
}

impl Credentials {
    pub fn new(vault: &VaultConfig, egress: &EgressConfig) -> Credentials {
        Credentials {
            vault: Vault::new(vault),
            run_tokens: RunTokens::new(vault),
            providers: egress.providers.clone(),
            run_token_ttl: egress.run_token_ttl,
            mint_token: egress.mint_token.clone(),
        }
    }

    /// A run token for a call `key_id` of `user_id` made now.
    pub fn run_token(&self, user_id: &str, key_id: &str, ttl: Duration) -> (String, i64) {
        let expires_at = crate::clock::now_ms().div_euclid(1000)
            + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let token = self.run_tokens.sign(&RunClaims {
            user_id: user_id.to_owned(),
            key_id: key_id.to_owned(),
            expires_at,
        });
        (token, expires_at)
    }
}

pub struct Vault {
    /// In config order: the first seals.
    keys: Vec<(String, Aes256Gcm)>,
}

impl Vault {
    pub fn new(config: &VaultConfig) -> Vault {
        Vault {
            keys: config
                .master_keys
                .iter()
                .map(|k| {
                    let cipher =
                        Aes256Gcm::new_from_slice(k.key.0.as_slice()).expect("a 32-byte key");
                    (k.id.clone(), cipher)
                })
                .collect(),
        }
    }

    /// The master key new seals use.
    pub fn sealing_key_id(&self) -> &str {
        &self.keys[0].0
    }

    pub fn seal(&self, binding: Binding<'_>, secret: &Secret) -> Result<Sealed, VaultError> {
        let (key_id, cipher) = &self.keys[0];
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|_| VaultError::Random)?;
        let aad = binding.associated_data();
        let ciphertext = cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: secret.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::Random)?;
        Ok(Sealed {
            key_id: key_id.clone(),
            nonce,
            ciphertext,
        })
    }

    pub fn open(&self, binding: Binding<'_>, sealed: &Sealed) -> Result<Secret, VaultError> {
        let Some((_, cipher)) = self.keys.iter().find(|(id, _)| *id == sealed.key_id) else {
            return Err(VaultError::MissingKey {
                record: binding.id.to_owned(),
                key_id: sealed.key_id.clone(),
            });
        };
        let aad = binding.associated_data();
        cipher
            .decrypt(
                &sealed.nonce.into(),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map(|plain| Secret(Zeroizing::new(plain)))
            .map_err(|_| VaultError::WrongKeyOrRecord {
                record: binding.id.to_owned(),
                key_id: sealed.key_id.clone(),
            })
    }

    /// Whether `sealed` is under the sealing key already.
    pub fn is_current(&self, sealed: &Sealed) -> bool {
        sealed.key_id == self.keys[0].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MasterKey, SecretKey};

    fn vault(ids: &[(&str, u8)]) -> Vault {
        Vault::new(&VaultConfig {
            master_keys: ids
                .iter()
                .map(|(id, byte)| MasterKey {
                    id: (*id).to_owned(),
                    key: SecretKey(Zeroizing::new([*byte; 32])),
                })
                .collect(),
            run_token_key: None,
        })
    }

    const BOUND: Binding<'static> = Binding {
        id: "int_1",
        user_id: "alice",
        kind: "skytells",
    };

    #[test]
    fn a_sealed_secret_opens_only_for_its_record() {
        let v = vault(&[("k1", 1)]);
        let sealed = v.seal(BOUND, &Secret::single("apiKey", "sk-live")).unwrap();
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"sk-live"));
        let opened = v.open(BOUND, &sealed).unwrap();
        assert_eq!(opened.fields().unwrap()["apiKey"].as_str(), "sk-live");
        for other in [
            Binding {
                id: "int_2",
                ..BOUND
            },
            Binding {
                user_id: "bob",
                ..BOUND
            },
            Binding {
                kind: "stripe",
                ..BOUND
            },
        ] {
            assert!(matches!(
                v.open(other, &sealed),
                Err(VaultError::WrongKeyOrRecord { .. })
            ));
        }
        // A fresh nonce every time.
        let again = v.seal(BOUND, &Secret::single("apiKey", "sk-live")).unwrap();
        assert_ne!(again.nonce, sealed.nonce);
    }

    #[test]
    fn keys_rotate_and_a_missing_one_is_named() {
        let old = vault(&[("k1", 1)]);
        let sealed = old.seal(BOUND, &Secret::single("apiKey", "sk")).unwrap();
        let rotated = vault(&[("k2", 2), ("k1", 1)]);
        assert!(!rotated.is_current(&sealed));
        let opened = rotated.open(BOUND, &sealed).unwrap();
        let resealed = rotated.seal(BOUND, &opened).unwrap();
        assert_eq!(resealed.key_id, "k2");
        let dropped = vault(&[("k2", 2)]);
        assert!(dropped.open(BOUND, &resealed).is_ok());
        let e = dropped.open(BOUND, &sealed).unwrap_err();
        assert!(e.to_string().contains("\"k1\""), "{e}");
        let wrong = vault(&[("k1", 9)]);
        let e = wrong.open(BOUND, &sealed).unwrap_err();
        assert!(matches!(e, VaultError::WrongKeyOrRecord { .. }));
        assert!(!format!("{sealed:?}").contains("ciphertext:"));
    }

    #[test]
    fn only_json_objects_of_strings_are_secrets() {
        assert!(Secret::from_json(Zeroizing::new(b"{\"apiKey\":\"x\"}".to_vec())).is_ok());
        assert!(Secret::from_json(Zeroizing::new(b"[1]".to_vec())).is_err());
        assert!(Secret::from_json(Zeroizing::new(b"{\"n\":1}".to_vec())).is_err());
        assert_eq!(format!("{:?}", Secret::single("apiKey", "sk")), "Secret(…)");
    }
}

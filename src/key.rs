//! The `wfb_` API key: generation from the OS CSPRNG, the shape parser used
//! on every request, and the SHA-256 hash and 11-character prefix that are
//! the only things ever stored.

use sha2::{Digest, Sha256};
use std::fmt;

/// Every keygate key starts with this.
pub const KEY_SCHEME: &str = "wfb_";
/// Random bytes behind a new key: 28 bytes encode to 38 base64url characters.
const KEY_RANDOM_BYTES: usize = 28;
/// Length of a key keygate issues: `wfb_` + 38.
pub const KEY_LEN: usize = 42;
/// Keys imported from workflow-builder databases carry 32 characters.
const MIN_BODY_LEN: usize = 32;
const MAX_BODY_LEN: usize = 38;
/// Characters of a key shown after creation (`wfb_` + 7).
pub const PREFIX_LEN: usize = 11;

/// A freshly generated key. Holds the only copy of the secret; its `Debug`
/// shows the prefix alone so it cannot leak through a log line.
pub struct NewKey {
    secret: String,
}

impl NewKey {
    pub fn generate() -> Result<NewKey, getrandom::Error> {
        let mut bytes = [0u8; KEY_RANDOM_BYTES];
        getrandom::fill(&mut bytes)?;
        let mut secret = String::with_capacity(KEY_LEN);
        secret.push_str(KEY_SCHEME);
        secret.push_str(&base64url(&bytes));
        Ok(NewKey { secret })
    }

    /// The full key, to be shown to its owner exactly once.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.secret)
    }

    pub fn prefix(&self) -> String {
        prefix_of(&self.secret)
    }
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NewKey({}…)", self.prefix())
    }
}

/// The first 11 characters of a key, safe to store and display.
pub fn prefix_of(key: &str) -> String {
    key.chars().take(PREFIX_LEN).collect()
}

/// What a presented credential turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    /// A well-formed `wfb_` key.
    Key(&'a str),
    /// A Skytells integration key (`sk-...`): never valid on a webhook.
    IntegrationKey,
    /// Anything else.
    Malformed,
}

/// Classifies a credential without allocating; never panics.
pub fn classify(credential: &str) -> Presented<'_> {
    if is_wfb_key(credential) {
        Presented::Key(credential)
    } else if credential.starts_with("sk-") {
        Presented::IntegrationKey
    } else {
        Presented::Malformed
    }
}

/// `wfb_` followed by 32 to 38 base64url characters.
pub fn is_wfb_key(s: &str) -> bool {
    let Some(body) = s.strip_prefix(KEY_SCHEME) else {
        return false;
    };
    (MIN_BODY_LEN..=MAX_BODY_LEN).contains(&body.len())
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// SHA-256 of a whole key: the only form in which a key is stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Lower-case hex: how stores keep it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<KeyHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(KeyHash(out))
    }
}

/// Hashes are secrets' fingerprints: never print one.
impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// Unpadded base64url (RFC 4648 §5).
pub fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A random identifier with a readable tag, such as `key_…`.
pub fn random_id(tag: &str) -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{tag}_{}", base64url(&bytes)))
}

/// `len` characters of `[0-9a-z]`, each uniformly drawn (bytes past the
/// last whole multiple of 36 are drawn again), as the engine's own ids.
pub fn random_lowercase_id(len: usize) -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut id = String::with_capacity(len);
    let mut bytes = [0u8; 32];
    while id.len() < len {
        getrandom::fill(&mut bytes)?;
        for b in bytes.iter().filter(|b| **b < 252) {
            if id.len() < len {
                id.push(char::from(ALPHABET[usize::from(*b % 36)]));
            }
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lowercase_ids_look_like_the_engines() {
        let id = random_lowercase_id(21).unwrap();
        assert_eq!(id.len(), 21);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        );
        assert_ne!(id, random_lowercase_id(21).unwrap());
    }

    #[test]
    fn generated_key_has_the_documented_shape() {
        let key = NewKey::generate().unwrap();
        assert_eq!(key.secret().len(), KEY_LEN);
        assert!(key.secret().starts_with("wfb_"));
        assert!(is_wfb_key(key.secret()));
        assert_eq!(key.prefix(), &key.secret()[..11]);
        assert!(!format!("{key:?}").contains(key.secret()));
    }

    #[test]
    fn generated_keys_differ() {
        let a = NewKey::generate().unwrap();
        let b = NewKey::generate().unwrap();
        assert_ne!(a.secret(), b.secret());
    }

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn hash_is_sha256_of_the_whole_key_in_hex() {
        // sha256("abc")
        assert_eq!(
            KeyHash::of("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let h = KeyHash::of("wfb_x");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex("zz"), None);
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }

    #[test]
    fn imported_36_character_keys_are_accepted() {
        let key = format!("wfb_{}", "a".repeat(32));
        assert_eq!(key.len(), 36);
        assert_eq!(classify(&key), Presented::Key(&key));
    }

    #[test]
    fn integration_keys_are_told_apart() {
        assert_eq!(classify("sk-live-123"), Presented::IntegrationKey);
        assert_eq!(classify("wfb_short"), Presented::Malformed);
        assert_eq!(classify(""), Presented::Malformed);
    }

    proptest! {
        #[test]
        fn any_body_of_valid_length_and_alphabet_parses(body in "[A-Za-z0-9_-]{32,38}") {
            let key = format!("wfb_{body}");
            prop_assert!(is_wfb_key(&key));
        }

        #[test]
        fn wrong_lengths_are_rejected(body in "[A-Za-z0-9_-]{0,31}|[A-Za-z0-9_-]{39,80}") {
            let key = format!("wfb_{body}");
            prop_assert!(!is_wfb_key(&key));
        }

        #[test]
        fn foreign_characters_are_rejected(
            head in "[A-Za-z0-9_-]{0,20}",
            bad in "[^A-Za-z0-9_-]",
            tail in "[A-Za-z0-9_-]{0,20}",
        ) {
            let key = format!("wfb_{head}{bad}{tail}");
            prop_assert!(!is_wfb_key(&key));
        }

        #[test]
        fn arbitrary_input_never_panics(s in any::<String>()) {
            let _ = classify(&s);
            let _ = prefix_of(&s);
        }

        #[test]
        fn wrong_scheme_is_rejected(scheme in "[a-zA-Z_]{0,6}", body in "[A-Za-z0-9_-]{38}") {
            prop_assume!(scheme != "wfb_");
            let key = format!("{scheme}{body}");
            prop_assert!(!is_wfb_key(&key));
        }

        #[test]
        fn encoding_length_is_unpadded(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let enc = base64url(&bytes);
            prop_assert_eq!(enc.len(), (bytes.len() * 4).div_ceil(3));
        }
    }
}

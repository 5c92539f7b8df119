//! The workflow-builder template's own encryption of integration configs,
//! read to bring them over (`keygate integrations import`): AES-256-GCM
//! with a 16-byte IV and no associated data, under the hex key in
//! `INTEGRATION_ENCRYPTION_KEY`, stored as the string
//! `"<iv hex>:<tag hex>:<ciphertext hex>"`; the plaintext is the config as
//! JSON.

use aes_gcm::aead::Aead;
use aes_gcm::aead::consts::U16;
use aes_gcm::{AesGcm, KeyInit, aes::Aes256};
use zeroize::Zeroizing;

type TemplateCipher = AesGcm<Aes256, U16>;

/// The template's key, from its 64 hex characters.
pub fn template_key(hex_text: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_text.trim(), key.as_mut_slice()).map_err(|_| {
        format!(
            "INTEGRATION_ENCRYPTION_KEY: expected 64 hex characters, got {}",
            hex_text.trim().len()
        )
    })?;
    Ok(key)
}

/// Opens one stored config; the plaintext JSON, zeroed when dropped.
pub fn open_template(key: &[u8; 32], stored: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let parts: Vec<&str> = stored.split(':').collect();
    let [iv, tag, ciphertext] = parts[..] else {
        return Err("not iv:tag:ciphertext".to_owned());
    };
    let iv: [u8; 16] = hex::decode(iv)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or("the IV is not 16 hex bytes")?;
    let tag = hex::decode(tag).map_err(|_| "the tag is not hex")?;
    if tag.len() != 16 {
        return Err("the tag is not 16 bytes".to_owned());
    }
    let mut sealed = hex::decode(ciphertext).map_err(|_| "the ciphertext is not hex")?;
    sealed.extend_from_slice(&tag);
    let cipher = TemplateCipher::new_from_slice(key).map_err(|_| "a 32-byte key")?;
    cipher
        .decrypt(&iv.into(), sealed.as_slice())
        .map(Zeroizing::new)
        .map_err(|_| "does not decrypt under INTEGRATION_ENCRYPTION_KEY".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_templates_test_vector_opens() {
        let key = [1u8; 32];
        let stored = "02020202020202020202020202020202:e88e79a614a4058b0a4f737d55fd150c:0b14f63ab68a4a6dfc16506fce77a74f85cdbb55";
        let plain = open_template(&key, stored).unwrap();
        assert_eq!(plain.as_slice(), br#"{"apiKey":"sk-test"}"#);
        assert!(open_template(&[2u8; 32], stored).is_err());
        assert!(open_template(&key, "zz").is_err());
        let tampered = stored.replace(":0b14", ":0c14");
        assert!(open_template(&key, &tampered).is_err());
        assert!(template_key(&"01".repeat(32)).is_ok());
        assert!(template_key("abc").unwrap_err().contains("64 hex"));
    }
}

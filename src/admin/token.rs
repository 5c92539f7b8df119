//! The admin token: from `admin.token`, or a file the server creates
//! (mode 0600) for the CLI on the same machine to read; checked in
//! constant time, as a SHA-256 digest.

use crate::proxy::credentials;
use http::Request;
use http::header;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// The token a request must present, kept as its digest: compared in
/// constant time, never logged.
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    pub fn new(token: &str) -> AdminToken {
        AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `presented` is this token (the panel's sign-in form).
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        subtle::ConstantTimeEq::ct_eq(&digest[..], &self.digest[..]).into()
    }

    /// Whether `request` carries `Authorization: Bearer <this token>`.
    pub fn admits<B>(&self, request: &Request<B>) -> bool {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| credentials::bearer(v.as_bytes()));
        let Some(presented) = presented else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        subtle::ConstantTimeEq::ct_eq(&digest[..], &self.digest[..]).into()
    }
}

/// The token the server answers to: `admin.token` if set, else the token
/// file, created with mode 0600 when missing.
pub fn server_token(configured: Option<&str>, file: &Path) -> Result<String, String> {
    if let Some(token) = configured {
        return Ok(token.to_owned());
    }
    match read_token_file(file) {
        Ok(token) => {
            warn_if_shared(file);
            return Ok(token);
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!(
                "cannot read admin token file {}: {e}",
                file.display()
            ));
        }
        Err(_) => {}
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("OS random source failed: {e}"))?;
    let token = crate::key::base64url(&bytes);
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(file) {
        Ok(mut f) => {
            f.write_all(token.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("cannot write admin token file {}: {e}", file.display()))?;
            Ok(token)
        }
        // Another instance with the same config created it first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_token_file(file)
            .map_err(|e| format!("cannot read admin token file {}: {e}", file.display())),
        Err(e) => Err(format!(
            "cannot create admin token file {}: {e}",
            file.display()
        )),
    }
}

/// The token file should be readable by its owner alone.
fn warn_if_shared(file: &Path) {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(file) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %file.display(), "admin token file is readable by other users; chmod 600 it");
        }
    }
}

pub fn read_token_file(file: &Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(file)?.trim().to_owned();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/admin.token");
        let first = server_token(None, &file).unwrap();
        assert!(first.len() >= 40);
        assert_eq!(server_token(None, &file).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            server_token(Some("configured-token-123"), &file).unwrap(),
            "configured-token-123"
        );
    }
}

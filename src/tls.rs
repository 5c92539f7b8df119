//! TLS with rustls and the ring provider, PEM files parsed by
//! rustls-pki-types. As a server (the data plane): ALPN offering h2 then
//! http/1.1, the certificate held by [`Certs`], so a reload serves a
//! renewed one to new connections without a restart. As a client (https
//! upstreams, egress to providers): [`client_config`], the bundled web
//! roots (webpki-roots) and any CA file the config names.

use crate::config::TlsFiles;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{Error, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// The certificate new connections are served, replaceable in place.
#[derive(Debug)]
pub struct Certs {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certs {
    /// Reads the files and puts their certificate in force; on an error the
    /// one in force stays.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), String> {
        let key = load(files)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
        Ok(())
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The TLS client config for HTTPS peers: the web roots, plus `ca_file`'s
/// certificates (a private CA, or a test's); `field` names the setting in
/// errors.
pub(crate) fn client_config(
    ca_file: Option<&std::path::Path>,
    field: &str,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("{field} {shown}: {e}"))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{field} {shown}: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("{field} {shown}: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{field} {shown}: no certificate in it"));
        }
    }
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate chain and key in `files`, checked to belong together;
/// each kind of fault is named for the file it is in.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let cert_file = files.cert.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(std::iter::Iterator::collect::<Result<_, _>>)
        .map_err(|e| format!("tls.cert {cert_file}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("tls.cert {cert_file}: no certificate found"));
    }
    let key_file = files.key.display();
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| format!("tls.key {key_file}: {e}"))?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| match e {
        Error::InconsistentKeys(_) => {
            format!("tls: the key in {key_file} does not belong to the certificate in {cert_file}")
        }
        Error::InvalidCertificate(_) | Error::NoCertificatesPresented => {
            format!("tls.cert {cert_file}: not a valid certificate ({e})")
        }
        Error::General(_) => format!("tls.key {key_file}: not a usable private key ({e})"),
        other => format!("tls: {other}"),
    })
}

/// An acceptor serving what `certs` holds.
pub fn acceptor(files: &TlsFiles) -> Result<(TlsAcceptor, Arc<Certs>), String> {
    let certs = Arc::new(Certs {
        current: RwLock::new(Arc::new(load(files)?)),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &std::path::Path, cert: &str, key: &str) -> TlsFiles {
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    #[test]
    fn each_kind_of_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (a.cert.pem(), a.signing_key.serialize_pem());
        assert!(load(&files(dir.path(), &cert, &key)).is_ok());

        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = load(&files(dir.path(), garbage, &key)).unwrap_err();
        assert!(
            e.contains("cert.pem") && e.contains("not a valid certificate"),
            "{e}"
        );

        let e = load(&files(dir.path(), "no PEM here", &key)).unwrap_err();
        assert!(e.contains("no certificate found"), "{e}");

        let e = load(&files(dir.path(), &cert, &b.signing_key.serialize_pem())).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");

        let e = load(&files(dir.path(), &cert, "no key")).unwrap_err();
        assert!(e.contains("tls.key"), "{e}");
    }
}

//! TLS to the database: rustls with the ring provider, checking the
//! server's certificate as the URL's `sslmode` says (libpq's meaning:
//! `prefer` and `require` encrypt without checking unless `sslrootcert` is
//! given, `verify-ca` checks the chain, `verify-full` the chain and the
//! host name). Either way the TLS handshake's signatures are verified, and
//! the connection offers SCRAM channel binding (`tls-server-end-point`), so
//! a password never crosses to a server in the middle even when the
//! certificate is not checked.

use crate::config::{PgTls, RootCerts};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use sha2::Digest;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

type Socket = tokio_postgres::Socket;

/// Makes a TLS session per connection, as the config's [`PgTls`] says.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
}

impl Connector {
    pub fn new(tls: &PgTls) -> Result<Connector, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match tls {
            PgTls::Disable | PgTls::Prefer | PgTls::Require { roots: None } => {
                Arc::new(Unchecked(provider.clone()))
            }
            PgTls::Require { roots: Some(roots) } | PgTls::VerifyCa { roots } => {
                Arc::new(ChainOnly(webpki(roots, &provider)?))
            }
            PgTls::VerifyFull { roots } => webpki(roots, &provider)?,
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("store.postgres.url: TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Connector {
            config: Arc::new(config),
        })
    }
}

fn webpki(
    roots: &RootCerts,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::File(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("store.postgres.url: sslrootcert {shown}: {e}"))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("store.postgres.url: sslrootcert {shown}: {e}"))?;
                store
                    .add(cert)
                    .map_err(|e| format!("store.postgres.url: sslrootcert {shown}: {e}"))?;
            }
            if store.is_empty() {
                return Err(format!(
                    "store.postgres.url: sslrootcert {shown} holds no certificate"
                ));
            }
        }
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(
                    "store.postgres.url: sslrootcert=system, but the system has no CA certificates"
                        .to_owned(),
                );
            }
        }
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| format!("store.postgres.url: TLS: {e}"))
}

/// `prefer` and `require` without `sslrootcert`: any certificate, but the
/// handshake's signatures verified with the one it presents.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the
/// certificate is not compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = TlsStream;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Connect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One connection's TLS handshake.
pub struct Connect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for Connect {
    type Stream = TlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            Ok(TlsStream(connector.connect(self.name, stream).await?))
        })
    }
}

/// A TLS session to the database.
pub struct TlsStream(tokio_rustls::client::TlsStream<Socket>);

impl tokio_postgres::tls::TlsStream for TlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        match session.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => ChannelBinding::tls_server_end_point(server_end_point(cert)),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929 §4.1: the certificate hashed with its signature's hash, SHA-256
/// where that is MD5 or SHA-1 (or none, as for Ed25519).
fn server_end_point(cert: &[u8]) -> Vec<u8> {
    match signature_hash(cert) {
        Some(Hash::Sha384) => sha2::Sha384::digest(cert).to_vec(),
        Some(Hash::Sha512) => sha2::Sha512::digest(cert).to_vec(),
        _ => sha2::Sha256::digest(cert).to_vec(),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Hash {
    Sha384,
    Sha512,
}

/// The hash of the certificate's `signatureAlgorithm`, for the two that
/// are not SHA-256 in the end-point rule.
fn signature_hash(cert: &[u8]) -> Option<Hash> {
    const SHA384: [&[u8]; 2] = [
        // sha384WithRSAEncryption 1.2.840.113549.1.1.12
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c],
        // ecdsa-with-SHA384 1.2.840.10045.4.3.3
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
    ];
    const SHA512: [&[u8]; 2] = [
        // sha512WithRSAEncryption 1.2.840.113549.1.1.13
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d],
        // ecdsa-with-SHA512 1.2.840.10045.4.3.4
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
    ];
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm
    // SEQUENCE { algorithm OID, ... }, signatureValue BIT STRING }
    let (_, inner) = der_element(cert, 0x30)?;
    let (rest, _tbs) = der_element(inner, 0x30)?;
    let (_, algorithm) = der_element(rest, 0x30)?;
    let (_, oid) = der_element(algorithm, 0x06)?;
    if SHA384.contains(&oid) {
        Some(Hash::Sha384)
    } else if SHA512.contains(&oid) {
        Some(Hash::Sha512)
    } else {
        None
    }
}

/// One DER element with tag `tag` at the start of `input`: what follows
/// it, and its contents.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len_byte, rest) = rest.split_first()?;
    let (len, rest) = if len_byte < 0x80 {
        (usize::from(len_byte), rest)
    } else {
        let count = usize::from(len_byte & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(count);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    (rest.len() >= len).then(|| (&rest[len..], &rest[..len]))
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_signed_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["db.test".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let p256 = cert_signed_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(signature_hash(&p256), None);
        assert_eq!(
            server_end_point(&p256),
            sha2::Sha256::digest(&p256).to_vec()
        );
        let p384 = cert_signed_with(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(signature_hash(&p384), Some(Hash::Sha384));
        assert_eq!(server_end_point(&p384).len(), 48);
        let ed = cert_signed_with(&rcgen::PKCS_ED25519);
        assert_eq!(server_end_point(&ed).len(), 32);
    }

    #[test]
    fn malformed_der_is_not_read_past_its_end() {
        assert_eq!(der_element(&[0x30, 0x85, 1, 2, 3, 4, 5], 0x30), None);
        assert_eq!(der_element(&[0x30, 0x05, 1], 0x30), None);
        assert_eq!(der_element(&[0x31, 0x00], 0x30), None);
        assert_eq!(signature_hash(&[]), None);
        assert_eq!(
            der_element(&[0x30, 0x01, 9, 7], 0x30),
            Some((&[7u8][..], &[9u8][..]))
        );
    }
}

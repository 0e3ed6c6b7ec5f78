//! Who is accepted as a peer: a certificate the CA signed with an allowed identity
//! ([`CaVerifier`]), or the one key a pre-shared key derives ([`PinnedVerifier`]); and the
//! helpers that make a CA, node certificates and pre-shared keys.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use super::params::{config_err, Made, TlsError, PSK_IDENTITY};

/// A certificate that is valid but names nobody this node accepts.
#[derive(Debug)]
struct IdentityRefused {
    presented: Vec<String>,
    allowed: Vec<String>,
}

impl fmt::Display for IdentityRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the peer's identity ({}) is not one this node accepts ({})",
            if self.presented.is_empty() {
                "none".into()
            } else {
                self.presented.join(", ")
            },
            self.allowed.join(", ")
        )
    }
}

impl std::error::Error for IdentityRefused {}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn bad_encoding(_: webpki::Error) -> Error {
    Error::InvalidCertificate(CertificateError::BadEncoding)
}

fn tls13_only() -> Error {
    Error::General("TLS 1.2 is not offered".into())
}

fn check_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// The handshake-signature half of both verifier traits, the same for every verifier here:
/// TLS 1.3 only, the provider's algorithms, `$schemes` offered (`self_schemes`: all the
/// provider has).
macro_rules! handshake_signatures {
    (self_schemes) => {
        handshake_signatures!(@common);
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
    ($schemes:expr) => {
        handshake_signatures!(@common);
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            $schemes
        }
    };
    (@common) => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(tls13_only())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            check_signature(&self.provider, message, cert, dss)
        }
    };
}

/// Certificate mode: the chain must lead to the CA, and the certificate must name one of the
/// allowed identities — the same rule for a server (checked by the client) and a client.
#[derive(Debug)]
pub(super) struct CaVerifier {
    server: Arc<rustls::client::WebPkiServerVerifier>,
    client: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
    provider: Arc<CryptoProvider>,
}

impl CaVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        names: Vec<ServerName<'static>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<CaVerifier, TlsError> {
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(config_err)?;
        let client = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(config_err)?;
        Ok(CaVerifier {
            server,
            client,
            names,
            provider,
        })
    }

    /// Whether `ee` names an allowed identity.
    fn check_identity(&self, ee: &CertificateDer<'_>) -> Result<(), Error> {
        let cert = webpki::EndEntityCert::try_from(ee).map_err(bad_encoding)?;
        if self
            .names
            .iter()
            .any(|n| cert.verify_is_valid_for_subject_name(n).is_ok())
        {
            return Ok(());
        }
        Err(other(IdentityRefused {
            presented: cert.valid_dns_names().map(str::to_owned).collect(),
            allowed: self.names.iter().map(|n| n.to_str().into_owned()).collect(),
        }))
    }
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // the chain, checked with the first allowed name: a name mismatch comes only after the
        // chain is found good, and then the identity check below decides
        match self
            .server
            .verify_server_cert(end_entity, intermediates, &self.names[0], ocsp, now)
        {
            Ok(_)
            | Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        self.check_identity(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!(self_schemes);
}

impl ClientCertVerifier for CaVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.client.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.client
            .verify_client_cert(end_entity, intermediates, now)?;
        self.check_identity(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!(self_schemes);
}

/// A key that is not the pre-shared key's.
#[derive(Debug)]
struct NotThePsk;

impl fmt::Display for NotThePsk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the peer does not hold this node's pre-shared key")
    }
}

impl std::error::Error for NotThePsk {}

/// Pre-shared-key mode: the peer's certificate must carry exactly the public key derived from
/// the key (and the handshake signature proves it holds the private half).
#[derive(Debug)]
pub(super) struct PinnedVerifier {
    spki: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub(super) fn new(spki: Vec<u8>, provider: Arc<CryptoProvider>) -> PinnedVerifier {
        PinnedVerifier { spki, provider }
    }

    fn check(&self, ee: &CertificateDer<'_>) -> Result<(), Error> {
        let cert = webpki::EndEntityCert::try_from(ee).map_err(bad_encoding)?;
        if cert.subject_public_key_info().as_ref() == self.spki.as_slice() {
            Ok(())
        } else {
            Err(other(NotThePsk))
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!(vec![SignatureScheme::ED25519]);
}

impl ClientCertVerifier for PinnedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!(vec![SignatureScheme::ED25519]);
}

/// The HKDF output length for an Ed25519 seed.
struct SeedLen;

impl ring::hkdf::KeyType for SeedLen {
    fn len(&self) -> usize {
        32
    }
}

/// PKCS#8 v1 of an Ed25519 private key (RFC 8410): this fixed prefix, then the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The certificate, PKCS#8 private key and public key (SPKI) a pre-shared key derives: the
/// same on every node that holds the key.
pub(super) fn psk_identity(
    psk: &[u8],
) -> Result<(CertificateDer<'static>, Vec<u8>, Vec<u8>), TlsError> {
    use ring::hkdf;
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"vmm migration pre-shared key v1").extract(psk);
    let mut seed = [0u8; 32];
    prk.expand(&[b"ed25519 identity"], SeedLen)
        .and_then(|okm| okm.fill(&mut seed))
        .map_err(|_| TlsError::Config("deriving the pre-shared key's identity".into()))?;
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&seed);
    let key = rcgen::KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8.as_slice()))
        .map_err(config_err)?;
    let mut params =
        rcgen::CertificateParams::new(vec![PSK_IDENTITY.to_string()]).map_err(config_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "vmm pre-shared key");
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[1]));
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(9999, 12, 31);
    let cert = params.self_signed(&key).map_err(config_err)?;
    let der = cert.der().clone();
    let spki = webpki::EndEntityCert::try_from(&der)
        .map_err(config_err)?
        .subject_public_key_info()
        .as_ref()
        .to_vec();
    Ok((der, pkcs8, spki))
}

/// Creates `path` with `mode`, refusing one that exists (see [`crate::create_private`]).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Read {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(err)
}

pub(super) fn make_psk(path: &Path) -> Result<(), TlsError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| TlsError::Config("the kernel's random source failed".into()))?;
    let mut hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    hex.push('\n');
    write_new(path, hex.as_bytes(), 0o600)
}

pub(super) fn make_certificates(dir: &Path, names: &[String]) -> Result<Made, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    for n in names {
        if ServerName::try_from(n.as_str()).is_err()
            || n.contains('/')
            || n.starts_with('.')
            || n == "ca"
        {
            return Err(TlsError::BadPeer(n.clone()));
        }
    }
    let mut files: Vec<PathBuf> = Vec::new();
    let mut write = |name: &str, data: &[u8], mode: u32| -> Result<(), TlsError> {
        let p = dir.join(name);
        write_new(&p, data, mode)?;
        files.push(p);
        Ok(())
    };
    let ca_key = KeyPair::generate().map_err(config_err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(config_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "vmm migration CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(config_err)?;
    write("ca.pem", ca_cert.pem().as_bytes(), 0o644)?;
    write("ca-key.pem", ca_key.serialize_pem().as_bytes(), 0o600)?;
    let issuer = Issuer::from_params(&ca, &ca_key);
    for n in names {
        let key = KeyPair::generate().map_err(config_err)?;
        let mut p = CertificateParams::new(vec![n.clone()]).map_err(config_err)?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, n.as_str());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).map_err(config_err)?;
        write(&format!("{n}.pem"), cert.pem().as_bytes(), 0o644)?;
        write(
            &format!("{n}-key.pem"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
    }
    Ok(Made { files })
}

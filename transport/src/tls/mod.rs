//! Authentication and encryption of every connection: TLS 1.3 (rustls, the ring provider),
//! both sides presenting a certificate and checking the other's.
//!
//! Two ways to give a node its credentials ([`Security`]):
//! - **Certificates**: a CA, this node's certificate and key, and the identities (DNS names in
//!   the certificate's subject alternative names) of the peers it accepts. A peer must present a
//!   certificate the CA signed *and* one of those names; the check is the same in both
//!   directions (the source checks the destination, the destination checks the source).
//! - **A pre-shared key** (a file of at least 32 characters): both sides derive the same
//!   Ed25519 key and self-signed certificate from it (HKDF-SHA256), and each accepts only a peer
//!   that proves it holds that key. Whoever knows the key is a peer; nobody else is.
//!
//! [`Security::Insecure`] sends everything in the clear; it exists for tests of the wire format
//! and for a user who says so on the command line (and is warned in the log). The default,
//! [`Security::Unset`], refuses every connection: a library user who forgets to choose gets an
//! error, never plaintext.
//!
//! Sessions are not resumed (no tickets), so every connection, reconnects included, runs a
//! full handshake with both certificates checked.

mod params;
mod stream;
mod verify;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub(crate) use params::config_err;
pub use params::{Made, TlsError, HANDSHAKE_TIMEOUT, MIN_PSK_LEN, PSK_IDENTITY};
pub use stream::{RawIo, TlsStream, MAX_RECORDS};

/// How this node's connections are secured.
#[derive(Clone, Default)]
pub enum Security {
    /// Nothing chosen: every connection is refused with an error that says so.
    #[default]
    Unset,
    /// Plaintext: no authentication, no encryption (an explicit choice).
    Insecure,
    /// Mutually authenticated TLS 1.3.
    Tls(Arc<TlsConfig>),
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The rustls configurations of one node, both roles.
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    what: String,
}

fn unset() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "no credentials configured: give a pre-shared key or certificates (or choose plaintext explicitly with --insecure)",
    )
}

/// The crypto provider: ring, TLS 1.3 suites only, AES-128-GCM first (the fastest where the
/// CPU has AES instructions, as every migration host has).
///
/// rustls 0.23.48 marks ring's provider deprecated because it has no post-quantum key
/// exchange (X25519MLKEM768); aws-lc-rs has one but needs cmake and a C toolchain to build.
/// The key exchange here is X25519 (then P-256, P-384).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// Refuses a key file that others can read (a key that leaked is no key).
fn check_private(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let mode = m.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyNotPrivate {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

fn pem_err(path: &Path, what: impl fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.into(),
        what: what.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err(path, "holds no certificate"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    check_private(path)?;
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| pem_err(path, format!("holds no private key: {e}")))
}

impl Security {
    /// Certificate mode: `ca` signs every node's certificate, `cert` and `key` are this node's,
    /// and a peer is accepted only with one of the `peers` identities.
    pub fn certificates(
        ca: &Path,
        cert: &Path,
        key: &Path,
        peers: &[String],
    ) -> Result<Security, TlsError> {
        if peers.is_empty() {
            return Err(TlsError::NoPeers);
        }
        let mut names = Vec::new();
        for p in peers {
            let n = ServerName::try_from(p.clone()).map_err(|_| TlsError::BadPeer(p.clone()))?;
            names.push(n);
        }
        let mut roots = RootCertStore::empty();
        for c in load_certs(ca)? {
            roots
                .add(c)
                .map_err(|e| pem_err(ca, format!("not a usable CA certificate: {e}")))?;
        }
        let chain = load_certs(cert)?;
        let key = load_key(key)?;
        let provider = provider();
        let verifier = Arc::new(verify::CaVerifier::new(
            Arc::new(roots),
            names,
            provider.clone(),
        )?);
        let what = format!(
            "TLS 1.3, certificates (CA {}, this node {}, peers accepted: {})",
            ca.display(),
            cert.display(),
            peers.join(", ")
        );
        Self::build(provider, verifier, chain, key, what)
    }

    /// Pre-shared-key mode from a file (its content, white space trimmed, is the key).
    pub fn psk_file(path: &Path) -> Result<Security, TlsError> {
        check_private(path)?;
        let raw = read_file(path)?;
        let key = raw.trim_ascii();
        if key.len() < MIN_PSK_LEN {
            return Err(TlsError::ShortPsk {
                path: path.into(),
                len: key.len(),
            });
        }
        Self::psk(key, &format!("TLS 1.3, pre-shared key {}", path.display()))
    }

    /// Pre-shared-key mode from the key itself; `what` names it in logs.
    pub fn psk(key: &[u8], what: &str) -> Result<Security, TlsError> {
        let (cert, pkcs8, spki) = verify::psk_identity(key)?;
        let provider = provider();
        let verifier = Arc::new(verify::PinnedVerifier::new(spki, provider.clone()));
        Self::build(
            provider,
            verifier,
            vec![cert],
            PrivateKeyDer::Pkcs8(pkcs8.into()),
            what.to_string(),
        )
    }

    fn build<V>(
        provider: Arc<CryptoProvider>,
        verifier: Arc<V>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        what: String,
    ) -> Result<Security, TlsError>
    where
        V: rustls::client::danger::ServerCertVerifier
            + rustls::server::danger::ClientCertVerifier
            + 'static,
    {
        let versions = &[&rustls::version::TLS13];
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(config_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        // every connection authenticates in full: no tickets, no resumption, no name sent
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_sni = false;
        // the record layer after the handshake is ours (see `stream`)
        client.enable_secret_extraction = true;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(config_err)?;
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Security::Tls(Arc::new(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
            what,
        })))
    }

    /// One line for logs and reports: what protects the connections.
    pub fn describe(&self) -> String {
        match self {
            Security::Unset => "no credentials configured (every connection refused)".into(),
            Security::Insecure => "PLAINTEXT (insecure: no authentication, no encryption)".into(),
            Security::Tls(t) => t.what.clone(),
        }
    }

    /// Whether connections are authenticated and encrypted.
    pub fn is_secure(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// A new connection state for the client side of a handshake: None for plaintext, an
    /// error when nothing was chosen.
    pub(crate) fn client_conn(&self) -> io::Result<Option<rustls::Connection>> {
        match self {
            Security::Unset => Err(unset()),
            Security::Insecure => Ok(None),
            Security::Tls(t) => rustls::ClientConnection::new(
                t.client.clone(),
                ServerName::try_from("peer").expect("a valid DNS name"),
            )
            .map(|c| Some(c.into()))
            .map_err(stream::tls_error),
        }
    }

    /// A new connection state for the server side of a handshake (see [`Self::client_conn`]).
    pub(crate) fn server_conn(&self) -> io::Result<Option<rustls::Connection>> {
        match self {
            Security::Unset => Err(unset()),
            Security::Insecure => Ok(None),
            Security::Tls(t) => rustls::ServerConnection::new(t.server.clone())
                .map(|c| Some(c.into()))
                .map_err(stream::tls_error),
        }
    }
}

/// 64 bits from the kernel's random source (session ids, tokens: unguessable).
pub fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // never seen; ids must still differ: the clock and the pid
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    u64::from_le_bytes(b)
}

/// Writes a new CA (`ca.pem`, `ca-key.pem`) and, for each name, a node certificate signed by
/// it (`NAME.pem`, `NAME-key.pem`; the name is its identity, for both client and server use)
/// into `dir`. Keys are created 0600; nothing that exists is overwritten.
pub fn make_certificates(dir: &Path, names: &[String]) -> Result<Made, TlsError> {
    verify::make_certificates(dir, names)
}

/// Writes a new random pre-shared key (64 hex digits) to `path`, created 0600 (an existing
/// file is not overwritten).
pub fn make_psk(path: &Path) -> Result<(), TlsError> {
    verify::make_psk(path)
}

//! TLS for `tls:` and `wss:` listeners and for outgoing TLS connections (rustls, ring).
//!
//! Owns: the server's certificate and key (re-read on reload, the new ones used by new
//! handshakes only), the roots outgoing connections verify servers against, and client
//! certificates for mutual TLS by server name. Must not touch: sockets (the stream
//! transport does the handshakes with what this gives it).

use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the TLS side reads: `tls.cert`, `tls.key`, `tls.ca` (empty: the system's roots).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle outgoing connections verify servers against; `None`: the system's roots.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// The certificate chain in a PEM file (leaf first).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let data = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let data = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&data)
        .map_err(|e| file_error(path, format!("no usable PRIVATE KEY block: {e}")))
}

/// ring, not aws-lc-rs: it builds with only a C compiler, fast on the 2-core CI; rustls
/// marks it deprecated for lacking post-quantum key exchange, which SIP peers do not offer
/// yet.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.2 and 1.3 only (the and RFC 8996's floor).
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            file_error(
                &files.key,
                format!(
                    "does not go with the certificate in {}: {e}",
                    files.cert.display()
                ),
            )
        })?;
    Ok(Arc::new(config))
}

fn root_store(ca: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system store may hold certificates rustls cannot use: skip those.
                let _ = roots.add(cert);
            }
        }
    }
    Ok(roots)
}

/// A client certificate and key for mutual TLS towards one server name.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The server's TLS state: shared by the listeners and outgoing connections.
pub struct TlsContext {
    files: TlsFiles,
    server: RwLock<Option<Arc<rustls::ServerConfig>>>,
    roots: Arc<rustls::RootCertStore>,
    /// Outgoing configuration without a client certificate.
    client: Arc<rustls::ClientConfig>,
    /// Outgoing configurations with a client certificate, by server name (lower case).
    identities: RwLock<HashMap<String, Arc<rustls::ClientConfig>>>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// Loads the certificate and key (when `files.cert` is set) and the roots.
    pub fn load(files: TlsFiles) -> Result<TlsContext, TlsError> {
        let server = if files.cert.as_os_str().is_empty() {
            None
        } else {
            Some(server_config(&files)?)
        };
        let roots = Arc::new(root_store(files.ca.as_deref())?);
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(VERSIONS)
                .map_err(|e| TlsError::Config(e.to_string()))?
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
        );
        Ok(TlsContext {
            files,
            server: RwLock::new(server),
            roots,
            client,
            identities: RwLock::new(HashMap::new()),
        })
    }

    /// The configuration new handshakes on `tls:`/`wss:` listeners use; `None` when no
    /// certificate is configured.
    pub fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.server.read().clone()
    }

    /// Re-reads the certificate and key; on error the running ones stay. Established
    /// connections keep the session they have.
    pub fn reload(&self) -> Result<(), TlsError> {
        if self.files.cert.as_os_str().is_empty() {
            return Ok(());
        }
        let config = server_config(&self.files)?;
        *self.server.write() = Some(config);
        Ok(())
    }

    /// Presents `identity` to servers named `server_name` (mutual TLS, e.g. a trunk's).
    pub fn add_client_identity(
        &self,
        server_name: &str,
        identity: &ClientIdentity,
    ) -> Result<(), TlsError> {
        let certs = read_certs(&identity.cert)?;
        let key = read_key(&identity.key)?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(certs, key)
            .map_err(|e| {
                file_error(
                    &identity.key,
                    format!(
                        "does not go with the certificate in {}: {e}",
                        identity.cert.display()
                    ),
                )
            })?;
        self.identities
            .write()
            .insert(server_name.to_ascii_lowercase(), Arc::new(config));
        Ok(())
    }

    /// The client configuration and name to verify for a connection to `server_name` (a
    /// host name or an IP address literal).
    pub fn client_for(
        &self,
        server_name: &str,
    ) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), TlsError> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| TlsError::Config(format!("{server_name:?}: not a server name: {e}")))?;
        let config = self
            .identities
            .read()
            .get(&server_name.to_ascii_lowercase())
            .cloned()
            .unwrap_or_else(|| self.client.clone());
        Ok((config, name))
    }
}

/// Server names by address, as the locator found them (RFC 5922 7: a TLS peer is verified
/// against the SIP domain it was looked up by, not its IP). A process-wide table because
/// the locator and the connections are built apart; bounded: cleared when it grows past
/// [`MAX_NAMES`] (names are re-learnt at the next look-up).
static SERVER_NAMES: std::sync::LazyLock<RwLock<HashMap<std::net::SocketAddr, String>>> =
    std::sync::LazyLock::new(|| RwLock::new(HashMap::new()));

const MAX_NAMES: usize = 10_000;

/// Notes that `addr` was found for `name`, to verify its certificate against `name`.
pub fn remember_server_name(addr: std::net::SocketAddr, name: &str) {
    let mut names = SERVER_NAMES.write();
    if names.len() >= MAX_NAMES && !names.contains_key(&addr) {
        names.clear();
    }
    names.insert(addr, name.to_ascii_lowercase());
}

/// The name `addr` was found by, if the locator found it by a name.
pub fn server_name_for(addr: std::net::SocketAddr) -> Option<String> {
    SERVER_NAMES.read().get(&addr).cloned()
}

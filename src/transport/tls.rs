//! TLS for `tls:` and `wss:` listeners and for outgoing TLS connections (rustls, ring).
//!
//! Owns: the server's certificate and key (re-read on reload, the new ones used by new
//! handshakes only), the roots outgoing connections verify servers against, and client
//! certificates for mutual TLS by server name. Must not touch: sockets (the stream
//! transport does the handshakes with what this gives it).
//!
//! Every certificate and key pair read here passes [`check_files`] first (start, reload,
//! `strowger check`, trunks' client certificates): a key that does not go with its
//! certificate, or a certificate outside its validity dates, is refused with the file and
//! the problem rather than failing handshakes later.

use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// What [`check_files`] found in a good certificate: for the operator (start-up log,
/// `strowger check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The leaf's subject, e.g. `CN=sip.example.com`.
    pub subject: String,
    /// The leaf's subject alternative names (DNS names and IP addresses).
    pub sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Certificates in the file (the leaf and its intermediates).
    pub chain_len: usize,
}

impl CertSummary {
    /// Time left before `not_after` (zero once past).
    pub fn expires_in(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }
}

impl std::fmt::Display for CertSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "subject {:?}", self.subject)?;
        if !self.sans.is_empty() {
            write!(f, ", names {}", self.sans.join(", "))?;
        }
        write!(
            f,
            ", valid from {} until {}",
            utc(self.not_before),
            utc(self.not_after)
        )
    }
}

/// Under this much validity left, start-up and `strowger check` warn.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// Checks a certificate chain file and its private key file, as now: both PEM, the key
/// the leaf's, the leaf within its validity dates. The error names the file at fault.
pub fn check_files(cert: &Path, key: &Path) -> Result<CertSummary, TlsError> {
    check_files_at(cert, key, SystemTime::now())
}

/// [`check_files`] at time `now`.
pub fn check_files_at(cert: &Path, key: &Path, now: SystemTime) -> Result<CertSummary, TlsError> {
    let certs = read_certs(cert)?;
    let summary = summarize(cert, &certs, now)?;
    let der = read_key(key)?;
    // The same test rustls makes when it is given the pair, done here to name the file.
    match rustls::sign::CertifiedKey::from_der(certs, der, &provider()) {
        Ok(_) => Ok(summary),
        Err(rustls::Error::InconsistentKeys(_)) => Err(file_error(
            key,
            format!(
                "this private key does not go with the certificate in {} (their public keys differ)",
                cert.display()
            ),
        )),
        Err(e) => Err(file_error(key, format!("unusable private key: {e}"))),
    }
}

/// The leaf of `certs` (read from `path`): its names and dates, refused outside them.
fn summarize(
    path: &Path,
    certs: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<CertSummary, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let leaf = certs
        .first()
        .ok_or_else(|| file_error(path, "no certificate"))?;
    let (_, x509) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| file_error(path, format!("the first certificate is not X.509: {e}")))?;
    let validity = x509.validity();
    let not_before = unix_time(validity.not_before.timestamp());
    let not_after = unix_time(validity.not_after.timestamp());
    if now < not_before {
        return Err(file_error(
            path,
            format!(
                "certificate not valid yet: valid from {} (the clock says {})",
                utc(not_before),
                utc(now)
            ),
        ));
    }
    if now > not_after {
        return Err(file_error(
            path,
            format!("certificate expired on {}", utc(not_after)),
        ));
    }
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = x509.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push((*d).to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        sans.push(std::net::IpAddr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        sans.push(std::net::IpAddr::from(a).to_string());
                    }
                }
                GeneralName::URI(u) => sans.push((*u).to_string()),
                _ => {}
            }
        }
    }
    Ok(CertSummary {
        subject: x509.subject().to_string(),
        sans,
        not_before,
        not_after,
        chain_len: certs.len(),
    })
}

fn unix_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// `2026-01-31T12:00:00Z` (RFC 3339, UTC); dates before 1970 as 1970.
pub fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
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

fn server_config(files: &TlsFiles) -> Result<(Arc<rustls::ServerConfig>, CertSummary), TlsError> {
    let summary = check_files(&files.cert, &files.key)?;
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
    Ok((Arc::new(config), summary))
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
        None => roots.roots.extend(system_roots().roots.iter().cloned()),
    }
    Ok(roots)
}

/// Checks a CA bundle (`tls.ca`): PEM certificates usable as roots; how many it holds.
pub fn check_ca(path: &Path) -> Result<usize, TlsError> {
    root_store(Some(path)).map(|roots| roots.len())
}

/// The system's trust store, read once per process: every server start builds a
/// [`TlsContext`] (a dial plan may dial `sips:` anywhere), and the store is a few hundred
/// files the tests would otherwise parse for each server they start.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A system store may hold certificates rustls cannot use: skip those.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            tracing::warn!(
                errors = ?found.errors,
                "no system CA certificates found: outgoing TLS verifies nothing until tls.ca is set"
            );
        }
        roots
    })
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
    /// What the certificate in use is (with `server`).
    summary: RwLock<Option<CertSummary>>,
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
        let (server, summary) = if files.cert.as_os_str().is_empty() {
            (None, None)
        } else {
            let (config, summary) = server_config(&files)?;
            (Some(config), Some(summary))
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
            summary: RwLock::new(summary),
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

    /// The server certificate in use (`None`: no `tls.cert`).
    pub fn certificate(&self) -> Option<CertSummary> {
        self.summary.read().clone()
    }

    /// The files this context reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the certificate and key (checked as at start); on error the running ones
    /// stay. Established connections keep the session they have: only new handshakes see
    /// the new certificate. The CA bundle and client certificates are read at start only.
    pub fn reload(&self) -> Result<(), TlsError> {
        if self.files.cert.as_os_str().is_empty() {
            return Ok(());
        }
        let (config, summary) = server_config(&self.files)?;
        *self.server.write() = Some(config);
        *self.summary.write() = Some(summary);
        Ok(())
    }

    /// Presents `identity` to servers named `server_name` (mutual TLS, e.g. a trunk's).
    pub fn add_client_identity(
        &self,
        server_name: &str,
        identity: &ClientIdentity,
    ) -> Result<(), TlsError> {
        check_files(&identity.cert, &identity.key)?;
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

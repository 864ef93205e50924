//! The registrar's port to the layers above it: where registered devices are, as the dial
//! plan (`registrar.lookup(aor)`), presence and the B2BUA's transfer targets ask. The
//! server's location service implements [`LocationService`] over the registrar's bindings;
//! the script engine and the transaction users hold it as `Arc<dyn LocationService>`.

/// Where registered devices are: the registrar, seen from a dial plan.
pub trait LocationService: Send + Sync + 'static {
    /// The contact URIs of the live bindings of `aor` (a SIP URI; only its user and host
    /// count), best first (q, then most recent).
    fn lookup(&self, aor: &str) -> Vec<String>;
}

//! The UAS core (RFC 3261 8.2): validates every new request and answers what the server
//! answers itself (OPTIONS), before call logic sees anything.

mod options;
mod validate;

pub use options::options_ok;
pub use validate::{validate, ACCEPTED_SDP_TYPES, SUPPORTED_OPTIONS};

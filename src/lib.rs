//! Strowger: a programmable SIP B2BUA.

pub mod dialog;
pub mod sip;
pub mod transport;
pub mod uas;

//! Strowger: a programmable SIP B2BUA.

pub mod admin;
pub mod auth;
pub mod b2bua;
pub mod cluster;
pub mod config;
pub mod config_section;
pub mod dialog;
pub mod huntgroup;
pub mod logging;
pub mod metrics;
pub mod overload;
pub mod pike;
pub mod presence;
pub mod registrar;
pub mod script;
pub mod server;
pub(crate) mod shard;
pub mod simulate;
pub mod sip;
pub mod storage;
pub mod testkit;
pub mod trace;
pub mod transaction;
pub mod transport;
pub mod trunk;
pub mod uas;

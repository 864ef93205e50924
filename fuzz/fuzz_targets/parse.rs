//! Fuzzes the SIP parser and what reads a parsed request without a network: parse,
//! validate, build the error response, serialize and re-parse
//! (`strowger::uas::check_invariants`). Run: `cargo +nightly fuzz run parse` in fuzz/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strowger::uas::check_invariants(data);
});

//! Fuzzes the SIP parser and what reads a parsed request without a network: parse,
//! validate, build the error response, serialize and re-parse
//! (`strowger::uas::check_invariants`, which adds validation to
//! `strowger::sip::check_invariants`). Run: `bash fuzz/run.sh parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strowger::uas::check_invariants(data);
});

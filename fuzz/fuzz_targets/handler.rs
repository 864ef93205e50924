//! Fuzzes what a datagram meets in the server, without sockets
//! (`strowger::server::fuzzing::MessageHandler`): the memory transport's inbound path
//! (parse, Via received/rport), the dispatcher (stateless 400/505 for malformed requests),
//! the transaction layer (matching, creation, retransmission absorption, merged requests,
//! CANCEL, ACK, timers), the UAS core (validation, OPTIONS, REFER, dialog table lookup).
//!
//! An input is up to `MAX_DATAGRAMS` datagrams separated by a line `%%` (`\n%%\n`; the
//! newline before it stays with the datagram before), sent in order from a phone at
//! 192.0.2.1:5060 to the server at 192.0.2.10:5060, so that retransmissions, CANCELs and
//! ACKs can meet the transaction they belong to. After the last one the paused clock runs 100
//! virtual seconds: every transaction timer fires (the longest, Timer H/J/L, is 64*T1 =
//! 32 s). Then checks, for each input:
//! - no transaction is left (a transaction that never ends is memory that grows per
//!   request; it also keeps inputs independent of each other);
//! - every message the server sent to the phone parses.
//!
//! The server is built once (its script engine and tables are reused); no state survives
//! an input but counters. Run: `bash fuzz/run.sh handler`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::time::Duration;
use strowger::config::Config;
use strowger::script::{EngineOptions, ScriptEngine};
use strowger::server::fuzzing::MessageHandler;
use strowger::transport::{MemoryEndpoint, MemoryNetwork};

/// Between two datagrams of one input.
const SEPARATOR: &[u8] = b"\n%%\n";
const MAX_DATAGRAMS: usize = 8;

struct Harness {
    rt: tokio::runtime::Runtime,
    handler: MessageHandler,
    server: SocketAddr,
    phone: MemoryEndpoint,
}

fn harness() -> Harness {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let config = Config::from_toml_str("", "fuzz").expect("default configuration");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/default.lua");
    let (handler, network) = rt.block_on(async {
        let mut opts = EngineOptions::new(script);
        opts.pool_size = 1;
        let scripts = ScriptEngine::load(opts).expect("scripts/default.lua loads");
        let network = MemoryNetwork::new();
        let server: SocketAddr = "192.0.2.10:5060".parse().unwrap();
        let handler = MessageHandler::new(&config, scripts, &network, server)
            .await
            .expect("message handler");
        (handler, network)
    });
    let server = handler
        .transports
        .local_addrs()
        .first()
        .map(|(_, a)| *a)
        .expect("memory address");
    let phone = network.endpoint("192.0.2.1:5060".parse().unwrap());
    Harness {
        rt,
        handler,
        server,
        phone,
    }
}

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() < MAX_DATAGRAMS - 1 {
        match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(i) => {
                out.push(&rest[..=i]);
                rest = &rest[i + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// `HANDLER_TRACE=1`: print what the server sent to the phone (to read a reproducer).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("HANDLER_TRACE").is_some())
}

thread_local! {
    static HARNESS: std::cell::RefCell<Option<Harness>> = const { std::cell::RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        let h = h.get_or_insert_with(harness);
        let Harness {
            rt,
            handler,
            server,
            phone,
        } = h;
        rt.block_on(async {
            for d in split(data) {
                phone.send(*server, Bytes::copy_from_slice(d));
                // The server's receive task runs while this one sleeps (virtual time).
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_secs(100)).await;
            while let Ok(Some((_, sent))) = tokio::time::timeout(Duration::ZERO, phone.recv()).await {
                if trace() {
                    eprintln!("--- sent to the phone:\n{}", String::from_utf8_lossy(&sent));
                }
                if let Err(e) = strowger::sip::parse(&sent) {
                    panic!(
                        "the server sent a message that does not parse ({e}):\n{}",
                        String::from_utf8_lossy(&sent)
                    );
                }
            }
            let left = handler.layer.len();
            assert_eq!(left, 0, "transactions left after every timer fired");
            assert_eq!(handler.dialogs.len(), 0, "dialogs left");
        });
    });
});

//! The 10.3 rules against an in-memory store that can be told to fail.

use super::*;
use crate::sip::{parse, SipMessage};
use std::sync::atomic::AtomicBool;

#[derive(Default)]
struct MemStore {
    aors: Mutex<HashMap<String, Vec<Binding>>>,
    fail: AtomicBool,
}

impl MemStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(StoreError::WorkerGone);
        }
        Ok(())
    }
}

impl BindingStore for MemStore {
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Binding>, StoreError>> {
        let r = self
            .check()
            .map(|_| self.aors.lock().values().flatten().cloned().collect());
        Box::pin(async move { r })
    }
    fn load_aor<'a>(&'a self, aor: &'a str) -> BoxFuture<'a, Result<Vec<Binding>, StoreError>> {
        let r = self
            .check()
            .map(|_| self.aors.lock().get(aor).cloned().unwrap_or_default());
        Box::pin(async move { r })
    }
    fn replace_aor<'a>(
        &'a self,
        aor: &'a str,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let r = self.check().map(|_| {
            let mut m = self.aors.lock();
            if bindings.is_empty() {
                m.remove(aor);
            } else {
                m.insert(aor.to_owned(), bindings.to_vec());
            }
        });
        Box::pin(async move { r })
    }
    fn remove_expired(&self, now: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        let r = self.check().map(|_| {
            let mut n = 0;
            let mut m = self.aors.lock();
            for list in m.values_mut() {
                let before = list.len();
                list.retain(|b| b.expires_at > now);
                n += (before - list.len()) as u64;
            }
            m.retain(|_, l| !l.is_empty());
            n
        });
        Box::pin(async move { r })
    }
}

const AOR: &str = "sip:alice@example.com";

fn register(call_id: &str, cseq: u32, extra: &[&str]) -> Request {
    let mut s = format!(
        "REGISTER sip:example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK{cseq}x\r\n\
         From: <sip:alice@example.com>;tag=f1\r\n\
         To: <sip:alice@example.com>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} REGISTER\r\n"
    );
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("Content-Length: 0\r\n\r\n");
    match parse(s.as_bytes()) {
        Ok((SipMessage::Request(r), _)) => r,
        other => panic!("test request does not parse: {other:?}"),
    }
}

fn src() -> RegisterSource {
    RegisterSource {
        transport: TransportKind::Udp,
        addr: "192.0.2.1:5060".parse().unwrap(),
        connection: None,
    }
}

async fn registrar(store: Arc<MemStore>) -> Registrar {
    let cfg = RegistrarConfig {
        min_expires: 10,
        max_expires: 600,
        default_expires: 300,
        max_contacts: 3,
    };
    Registrar::start(cfg, store).await.unwrap()
}

/// Issue 15: an address of record takes at most `max_contacts` bindings; more get 503 and
/// are counted, while refreshing and removing stay possible.
#[tokio::test]
async fn contacts_per_address_are_bounded() {
    let store = Arc::new(MemStore::default());
    let reg = registrar(store.clone()).await;
    let ask = |call_id: &'static str, seq: u32, contact: String| {
        let reg = reg.clone();
        async move {
            let r = reg
                .register(&register(call_id, seq, &[&contact]), src(), AOR)
                .await;
            (r.status, r.reason)
        }
    };
    for i in 1..=3u32 {
        let c = format!("Contact: <sip:a{i}@192.0.2.1>");
        assert_eq!(ask("c1", i, c).await.0, 200);
    }
    let refused = ask("c1", 10, "Contact: <sip:a4@192.0.2.1>".into()).await;
    assert_eq!(refused, (503, "Too many registered contacts".into()));
    assert_eq!(reg.lookup(AOR).len(), 3);
    assert_eq!(reg.stats().too_many_contacts.load(Ordering::Relaxed), 1);
    // Several at once past the bound: refused as a whole.
    let two = "Contact: <sip:b1@192.0.2.1>, <sip:b2@192.0.2.1>".to_owned();
    assert_eq!(ask("c2", 1, two).await.0, 503);
    // A refresh, and a removal, of what is there are fine; then there is room again.
    assert_eq!(
        ask("c1", 11, "Contact: <sip:a1@192.0.2.1>".into()).await.0,
        200
    );
    let remove = "Contact: <sip:a1@192.0.2.1>;expires=0".to_owned();
    assert_eq!(ask("c1", 12, remove).await.0, 200);
    assert_eq!(
        ask("c1", 13, "Contact: <sip:a4@192.0.2.1>".into()).await.0,
        200
    );
}

fn contacts(r: &Response) -> Vec<String> {
    r.headers.get_all("Contact").map(str::to_owned).collect()
}

#[tokio::test]
async fn refresh_and_remove_follow_call_id_and_cseq() {
    let store = Arc::new(MemStore::default());
    let reg = registrar(store.clone()).await;
    let r = reg
        .register(
            &register("c1", 5, &["Contact: <sip:a@192.0.2.1>"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.base.to.tag().is_some(), "registrar answers with a To tag");
    assert!(r.headers.has("Date"));
    assert_eq!(reg.lookup(AOR).len(), 1);

    // Same Call-ID, same CSeq: an old or replayed request; nothing changes (10.3 step 7).
    let r = reg
        .register(
            &register("c1", 5, &["Contact: <sip:a@192.0.2.1>;expires=0"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(reg.lookup(AOR).len(), 1);
    // Lower CSeq with the same Call-ID: refused too.
    let r = reg
        .register(
            &register("c1", 4, &["Contact: <sip:a@192.0.2.1>;expires=0"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(r.status, 500);
    // Another Call-ID may update it whatever its CSeq.
    let r = reg
        .register(
            &register("c2", 1, &["Contact: <sip:a@192.0.2.1>;expires=100"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(reg.stats().refreshed.load(Ordering::Relaxed), 1);
    let b = &reg.lookup(AOR)[0];
    assert_eq!((b.call_id.as_str(), b.cseq), ("c2", 1));
    // And a higher CSeq of the new Call-ID removes it.
    let r = reg
        .register(
            &register("c2", 2, &["Contact: <sip:a@192.0.2.1>", "Expires: 0"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(contacts(&r).is_empty());
    assert!(reg.lookup(AOR).is_empty());
    assert_eq!(reg.count(), 0);
    assert!(store.aors.lock().is_empty());
}

#[tokio::test]
async fn a_contact_listed_twice_is_one_binding() {
    let reg = registrar(Arc::new(MemStore::default())).await;
    let r = reg
        .register(
            &register(
                "c1",
                1,
                &["Contact: <sip:a@h>;expires=100, <sip:a@h>;expires=200"],
            ),
            src(),
            AOR,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(contacts(&r), ["<sip:a@h>;expires=200;q=1"]);
    assert_eq!(reg.stats().registered.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn wildcard_respects_cseq_of_every_binding() {
    let reg = registrar(Arc::new(MemStore::default())).await;
    reg.register(&register("c1", 7, &["Contact: <sip:a@h>"]), src(), AOR)
        .await;
    reg.register(&register("c2", 1, &["Contact: <sip:b@h>"]), src(), AOR)
        .await;
    let stale = register("c1", 6, &["Contact: *", "Expires: 0"]);
    assert_eq!(reg.register(&stale, src(), AOR).await.status, 500);
    assert_eq!(reg.lookup(AOR).len(), 2);
    let ok = register("c3", 1, &["Contact: *", "Expires: 0"]);
    assert_eq!(reg.register(&ok, src(), AOR).await.status, 200);
    assert!(reg.lookup(AOR).is_empty());
    assert_eq!(reg.stats().removed.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn interval_limits() {
    let reg = registrar(Arc::new(MemStore::default())).await;
    let r = reg
        .register(
            &register("c1", 1, &["Contact: <sip:a@h>;expires=5"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(r.status, 423);
    assert_eq!(r.headers.get("Min-Expires"), Some("10"));
    // Expires 0 is not "too brief": it removes (nothing here).
    let r = reg
        .register(
            &register("c1", 2, &["Contact: <sip:a@h>", "Expires: 0"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(r.status, 200);
    let r = reg
        .register(
            &register("c1", 3, &["Contact: <sip:a@h>;expires=99999"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(contacts(&r), ["<sip:a@h>;expires=600;q=1"]);
    // default_expires applies without any expiry given.
    let r = reg
        .register(
            &register("c1", 4, &["Contact: <sip:b@h>;q=0.5"]),
            src(),
            AOR,
        )
        .await;
    assert_eq!(
        contacts(&r),
        ["<sip:a@h>;expires=600;q=1", "<sip:b@h>;expires=300;q=0.5"]
    );
}

#[tokio::test]
async fn store_failure_is_500_and_changes_nothing() {
    let store = Arc::new(MemStore::default());
    let reg = registrar(store.clone()).await;
    reg.register(&register("c1", 1, &["Contact: <sip:a@h>"]), src(), AOR)
        .await;
    store.fail.store(true, Ordering::Relaxed);
    let r = reg
        .register(&register("c1", 2, &["Contact: <sip:b@h>"]), src(), AOR)
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(reg.stats().store_errors.load(Ordering::Relaxed), 1);
    let now: Vec<String> = reg.lookup(AOR).into_iter().map(|b| b.contact).collect();
    assert_eq!(now, ["sip:a@h"]);
    store.fail.store(false, Ordering::Relaxed);
    // The refused request did not move the CSeq either: 2 is still acceptable.
    let r = reg
        .register(&register("c1", 2, &["Contact: <sip:b@h>"]), src(), AOR)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(reg.count(), 2);
}

#[tokio::test]
async fn malformed_requests_get_400_naming_the_defect() {
    let store = Arc::new(MemStore::default());
    let reg = registrar(store.clone()).await;
    let cases = [
        (
            vec!["Contact: <sip:a@h>;expires=soon"],
            "Bad expires parameter in Contact",
        ),
        (
            vec!["Contact: <sip:a@h>", "Expires: never"],
            "Malformed Expires header",
        ),
        (
            vec!["Contact: <sip:a@h"],
            "Malformed Contact header (missing '>')",
        ),
        (vec!["Contact: *"], "Contact * requires Expires: 0"),
        // The good first contact must not be written either.
        (
            vec!["Contact: <sip:ok@h>, <sip:bad@h>;q=7"],
            "Bad q parameter in Contact",
        ),
    ];
    for (i, (headers, reason)) in cases.iter().enumerate() {
        let r = reg
            .register(&register("c1", i as u32 + 1, headers), src(), AOR)
            .await;
        assert_eq!((r.status, r.reason.as_str()), (400, *reason));
    }
    assert_eq!(reg.count(), 0);
    assert!(store.aors.lock().is_empty());
}

#[tokio::test]
async fn instance_and_reg_id_replace_the_device_binding() {
    let reg = registrar(Arc::new(MemStore::default())).await;
    let inst = "+sip.instance=\"<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>\"";
    let first = format!("Contact: <sip:a@192.0.2.1:5060>;{inst};reg-id=1");
    reg.register(&register("c1", 1, &[&first]), src(), AOR)
        .await;
    // The device comes back from another address with a new Call-ID: same binding.
    let moved = format!("Contact: <sip:a@198.51.100.7:41000>;{inst};reg-id=1");
    let r = reg
        .register(&register("c9", 1, &[&moved]), src(), AOR)
        .await;
    assert_eq!(r.status, 200);
    let l = reg.lookup(AOR);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].contact, "sip:a@198.51.100.7:41000");
    assert_eq!(l[0].reg_id, Some(1));
    assert!(contacts(&r)[0].contains("reg-id=1"));
    // A second flow (reg-id 2) of the same device is a binding of its own (RFC 5626 6).
    let flow2 = format!("Contact: <sip:a@198.51.100.7:41001>;{inst};reg-id=2");
    reg.register(&register("c9", 2, &[&flow2]), src(), AOR)
        .await;
    assert_eq!(reg.lookup(AOR).len(), 2);
}

#[test]
fn q_and_dates_format() {
    assert_eq!(format_q(1.0), "1");
    assert_eq!(format_q(0.5), "0.5");
    assert_eq!(format_q(0.125), "0.125");
    assert_eq!(format_q(0.0), "0");
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(http_date(1_289_690_940), "Sat, 13 Nov 2010 23:29:00 GMT");
    assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
}

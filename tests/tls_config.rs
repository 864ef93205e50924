//! `tls.cert`/`tls.key` checks and reload (src/transport/tls.rs) with certificates made by
//! rcgen in a temporary directory: a good pair, a key that is not the certificate's, an
//! expired and a not-yet-valid certificate, files that are not PEM or missing, and a reload
//! that swaps certificates or, failing, keeps the running one.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use strowger::transport::tls::{check_files, check_files_at, ClientIdentity, TlsFiles};
use strowger::transport::TlsContext;

/// A certificate for `name` valid between the two dates (years), and its key, as PEM.
fn cert_pem(name: &str, from: i32, until: i32) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Writes a certificate and key for `name` as `<stem>.crt` / `<stem>.key` in `dir`.
fn write_pair(dir: &Path, stem: &str, name: &str, from: i32, until: i32) -> (PathBuf, PathBuf) {
    let (cert, key) = cert_pem(name, from, until);
    let (c, k) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

fn files(cert: &Path, key: &Path) -> TlsFiles {
    TlsFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        ca: None,
    }
}

#[test]
fn a_good_pair_is_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = write_pair(dir.path(), "good", "sip.example.test", 2000, 2100);
    let s = check_files(&c, &k).unwrap();
    assert_eq!(s.subject, "CN=sip.example.test");
    assert_eq!(s.sans, vec!["sip.example.test"]);
    assert_eq!(s.chain_len, 1);
    assert!(s.expires_in(SystemTime::now()) > Duration::from_secs(86_400 * 365 * 50));
    let text = s.to_string();
    assert!(text.contains("until 2100-01-01T00:00:00Z"), "{text}");
    assert!(text.contains("from 2000-01-01T00:00:00Z"), "{text}");
}

#[test]
fn a_key_of_another_certificate_is_refused_naming_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = write_pair(dir.path(), "a", "a.example.test", 2000, 2100);
    let (_, other_key) = write_pair(dir.path(), "b", "b.example.test", 2000, 2100);
    let e = check_files(&c, &other_key).unwrap_err().to_string();
    assert!(e.starts_with(&other_key.display().to_string()), "{e}");
    assert!(e.contains("does not go with the certificate"), "{e}");
    assert!(TlsContext::load(files(&c, &other_key)).is_err());
}

#[test]
fn expired_and_not_yet_valid_certificates_are_refused_with_their_dates() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = write_pair(dir.path(), "old", "old.example.test", 2000, 2001);
    let e = check_files(&c, &k).unwrap_err().to_string();
    assert!(e.starts_with(&c.display().to_string()), "{e}");
    assert!(e.contains("expired on 2001-01-01T00:00:00Z"), "{e}");
    let e = TlsContext::load(files(&c, &k)).unwrap_err().to_string();
    assert!(e.contains("expired"), "{e}");

    let (c, k) = write_pair(dir.path(), "new", "new.example.test", 2200, 2300);
    let e = check_files(&c, &k).unwrap_err().to_string();
    assert!(e.contains("not valid yet: valid from 2200-01-01"), "{e}");

    // The same pair at a time inside its dates is good: only the clock decides.
    let in_2250 = SystemTime::UNIX_EPOCH + Duration::from_secs(280 * 365 * 86_400);
    check_files_at(&c, &k, in_2250).unwrap();
}

#[test]
fn files_that_are_not_pem_or_missing_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = write_pair(dir.path(), "good", "sip.example.test", 2000, 2100);
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "this is not a certificate\n").unwrap();
    let e = check_files(&junk, &k).unwrap_err().to_string();
    assert!(e.starts_with(&junk.display().to_string()), "{e}");
    assert!(e.contains("no CERTIFICATE"), "{e}");
    let e = check_files(&c, &junk).unwrap_err().to_string();
    assert!(e.starts_with(&junk.display().to_string()), "{e}");
    assert!(e.contains("PRIVATE KEY"), "{e}");
    // A certificate where the key should be, and the other way round.
    assert!(check_files(&c, &c).is_err());
    assert!(check_files(&k, &k).is_err());
    let missing = dir.path().join("missing.pem");
    let e = check_files(&missing, &k).unwrap_err().to_string();
    assert!(e.starts_with(&missing.display().to_string()), "{e}");
    assert!(e.contains("No such file"), "{e}");
}

#[test]
fn reload_swaps_the_certificate_and_a_failed_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = write_pair(dir.path(), "live", "one.example.test", 2000, 2100);
    let ctx = TlsContext::load(files(&c, &k)).unwrap();
    assert_eq!(ctx.certificate().unwrap().subject, "CN=one.example.test");
    let first = ctx.server_config().unwrap();

    // A renewed certificate under the same file names.
    let (cert, key) = cert_pem("two.example.test", 2000, 2100);
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    ctx.reload().unwrap();
    assert_eq!(ctx.certificate().unwrap().subject, "CN=two.example.test");
    let second = ctx.server_config().unwrap();
    assert!(!std::sync::Arc::ptr_eq(&first, &second));

    // Half-way through a renewal: the new certificate with the old key. Refused; the
    // running pair stays.
    let (cert, _) = cert_pem("three.example.test", 2000, 2100);
    std::fs::write(&c, cert).unwrap();
    let e = ctx.reload().unwrap_err().to_string();
    assert!(e.contains("does not go with"), "{e}");
    assert_eq!(ctx.certificate().unwrap().subject, "CN=two.example.test");
    assert!(std::sync::Arc::ptr_eq(
        &second,
        &ctx.server_config().unwrap()
    ));

    // An expired one is refused the same way; so is a deleted file.
    let (cert, key) = cert_pem("four.example.test", 2000, 2001);
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    assert!(ctx.reload().unwrap_err().to_string().contains("expired"));
    std::fs::remove_file(&c).unwrap();
    assert!(ctx.reload().is_err());
    assert_eq!(ctx.certificate().unwrap().subject, "CN=two.example.test");
}

#[test]
fn without_a_certificate_only_the_client_side_exists() {
    let ctx = TlsContext::load(TlsFiles::default()).unwrap();
    assert!(ctx.server_config().is_none());
    assert!(ctx.certificate().is_none());
    ctx.reload().unwrap();
    assert!(ctx.client_for("sip.example.test").is_ok());
}

#[test]
fn a_ca_bundle_and_client_identities_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = write_pair(dir.path(), "ca", "ca.example.test", 2000, 2100);
    let ctx = TlsContext::load(TlsFiles {
        ca: Some(ca.clone()),
        ..TlsFiles::default()
    })
    .unwrap();
    let (c, k) = write_pair(dir.path(), "client", "pbx.example.test", 2000, 2100);
    ctx.add_client_identity(
        "Carrier.Example.Test",
        &ClientIdentity {
            cert: c.clone(),
            key: k,
        },
    )
    .unwrap();
    let (with_cert, _) = ctx.client_for("carrier.example.test").unwrap();
    let (plain, _) = ctx.client_for("other.example.test").unwrap();
    assert!(!std::sync::Arc::ptr_eq(&with_cert, &plain));
    // An expired client certificate is refused like the server's.
    let (old_c, old_k) = write_pair(dir.path(), "old", "pbx.example.test", 2000, 2001);
    let e = ctx
        .add_client_identity(
            "x.example.test",
            &ClientIdentity {
                cert: old_c,
                key: old_k,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    // A CA file that is not PEM stops the load.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "nope").unwrap();
    let e = TlsContext::load(TlsFiles {
        ca: Some(junk.clone()),
        ..TlsFiles::default()
    })
    .unwrap_err();
    assert!(
        e.to_string().starts_with(&junk.display().to_string()),
        "{e}"
    );
}

const TOKEN: &str = "tls-test-token";

/// A server with a `tls:` listener using `cert`/`key`, admin on a free loopback port.
fn server_config(dir: &Path, cert: &Path, key: &Path) -> strowger::config::Config {
    let mut c = strowger::config::Config::default();
    c.sip.listen = vec!["udp:127.0.0.1:0".into(), "tls:127.0.0.1:0".into()];
    c.sip.domain = "strowger.test".into();
    c.http.listen = "127.0.0.1:0".into();
    c.http.token = TOKEN.into();
    c.storage.dir = dir.join("data").display().to_string();
    c.tls.cert = cert.display().to_string();
    c.tls.key = key.display().to_string();
    c
}

#[tokio::test]
async fn admin_reload_swaps_the_certificate_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = write_pair(dir.path(), "server", "one.example.test", 2000, 2100);
    let server = strowger::server::start(&server_config(dir.path(), &c, &k))
        .await
        .expect("server starts");
    let admin = server.admin_addr();
    assert_eq!(
        server.tls().certificate().unwrap().subject,
        "CN=one.example.test"
    );

    let (cert, key) = cert_pem("two.example.test", 2000, 2100);
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    let answer = strowger::admin::request_reload(admin, TOKEN).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["reloaded"], true, "{answer}");
    assert_eq!(v["tls"], "reloaded", "{answer}");
    assert_eq!(
        server.tls().certificate().unwrap().subject,
        "CN=two.example.test"
    );

    // An expired renewal: 422, the script reloaded all the same, the certificate kept.
    let (cert, key) = cert_pem("three.example.test", 2000, 2001);
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    let resp = strowger::admin::send(admin, hyper::Method::POST, "/reload", Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let v: serde_json::Value = serde_json::from_str(resp.body()).unwrap();
    assert_eq!(v["reloaded"], true, "{v}");
    assert_eq!(v["tls"], "refused", "{v}");
    assert!(v["tls_error"].as_str().unwrap().contains("expired"), "{v}");
    assert_eq!(
        server.tls().certificate().unwrap().subject,
        "CN=two.example.test"
    );
    server.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_server_without_tls_answers_reload_with_tls_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = strowger::config::Config::default();
    config.sip.listen = vec!["udp:127.0.0.1:0".into()];
    config.http.listen = "127.0.0.1:0".into();
    config.http.token = TOKEN.into();
    config.storage.dir = dir.path().join("data").display().to_string();
    let server = strowger::server::start(&config).await.unwrap();
    // The client side exists all the same: a dial plan may dial sips:.
    assert!(server.tls().certificate().is_none());
    assert!(server.tls().client_for("sip.example.test").is_ok());
    let answer = strowger::admin::request_reload(server.admin_addr(), TOKEN)
        .await
        .unwrap();
    assert!(answer.contains(r#""tls":"none""#), "{answer}");
    server.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn start_is_refused_with_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = write_pair(dir.path(), "old", "old.example.test", 2000, 2001);
    let e = strowger::server::start(&server_config(dir.path(), &c, &k))
        .await
        .err()
        .expect("an expired certificate stops the start");
    let text = format!("{e:#}");
    assert!(text.contains("tls.cert"), "{text}");
    assert!(text.contains(&c.display().to_string()), "{text}");
    assert!(text.contains("expired on 2001-01-01"), "{text}");

    // A trunk's client certificate that is not its key's: named by the trunk's keys.
    let (good_c, good_k) = write_pair(dir.path(), "good", "sip.example.test", 2000, 2100);
    let (pbx_c, _) = write_pair(dir.path(), "pbx", "pbx.example.test", 2000, 2100);
    let mut config = server_config(dir.path(), &good_c, &good_k);
    let trunk: strowger::trunk::TrunkConfig = toml::from_str(&format!(
        "uri = \"sips:carrier.example.test\"\ntls_cert = {:?}\ntls_key = {:?}\n",
        pbx_c.display().to_string(),
        good_k.display().to_string()
    ))
    .unwrap();
    config.trunks.insert("carrier1".into(), trunk);
    let e = strowger::server::start(&config)
        .await
        .err()
        .expect("a mismatched client key stops the start");
    let text = format!("{e:#}");
    assert!(text.contains("trunks.carrier1.tls_cert"), "{text}");
    assert!(text.contains("does not go with the certificate"), "{text}");
}

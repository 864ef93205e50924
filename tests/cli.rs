//! The `strowger` binary's command line: version, `check` exit codes and messages,
//! `run` + `reload` (with the config's `http.token`) + `registrations` + `trunks` + `drain` +
//! SIGTERM.
//! Runs the built binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_strowger");

/// The binary with no `STROWGER_*` variables inherited, so the outer environment cannot
/// change the outcome.
fn strowger(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key
            .to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("STROWGER_")
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("binary runs");
    (
        status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// A fresh directory under the system temp dir, unique to this test.
fn temp_dir() -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "strowger-cli-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/strowger.toml")
}

#[test]
fn version() {
    let (code, out, _) = run(&mut strowger(&["--version"]));
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("strowger {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_the_shipped_config() {
    let path = shipped_config();
    let (code, out, err) = run(&mut strowger(&[
        "check",
        "--config",
        path.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(
        out.lines().next(),
        Some(format!("configuration OK: {}", path.display()).as_str())
    );
    assert_eq!(out.lines().nth(1), Some("script OK: scripts/default.lua"));
}

#[test]
fn check_refuses_a_script_that_does_not_compile_naming_file_and_line() {
    let dir = temp_dir();
    let script = dir.join("plan.lua");
    std::fs::write(&script, "function on_invite(call)\n  call:dial(\n").unwrap();
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!("[script]\npath = {:?}\n", script.display().to_string()),
    )
    .unwrap();
    let (code, _out, err) = run(&mut strowger(&[
        "check",
        "--config",
        config.to_str().unwrap(),
    ]));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("plan.lua:"), "names the file and line: {err}");
}

#[test]
fn check_falls_back_to_the_built_in_config() {
    // No config/strowger.toml in this directory: the copy inside the binary is used.
    let dir = temp_dir();
    let (code, out, err) = run(strowger(&["check"]).current_dir(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(out.contains("built-in defaults"), "stdout: {out}");
}

#[test]
fn check_refuses_an_unknown_key_naming_file_key_and_line() {
    let dir = temp_dir();
    let path = dir.join("typo.toml");
    std::fs::write(
        &path,
        "[sip]\ndomain = \"example.com\"\n\n[sip.timers]\nt1_ms = 500\nt_1ms = 250\n",
    )
    .unwrap();
    let (code, out, err) = run(&mut strowger(&["check", "-c", path.to_str().unwrap()]));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 2, "stdout: {out} stderr: {err}");
    let expected = format!("{}:6: sip.timers.t_1ms: unknown key", path.display());
    assert!(err.contains(&expected), "stderr: {err}");
}

#[test]
fn check_refuses_a_bad_value_from_the_environment() {
    let path = shipped_config();
    let (code, _, err) = run(strowger(&["check", "--config", path.to_str().unwrap()])
        .env("STROWGER_SIP__TIMERS__T1_MS", "0"));
    assert_eq!(code, 2, "stderr: {err}");
    assert!(
        err.contains("STROWGER_SIP__TIMERS__T1_MS: sip.timers.t1_ms: must be at least 1"),
        "stderr: {err}"
    );
}

#[test]
fn check_refuses_a_missing_explicit_file() {
    let (code, out, err) = run(&mut strowger(&["check", "--config", "/nonexistent"]));
    assert_eq!(code, 2, "stdout: {out}");
    assert!(err.contains("/nonexistent"), "stderr: {err}");
    assert!(out.is_empty(), "stdout: {out}");
}

#[test]
fn logging_init_twice_is_an_error_not_a_panic() {
    // Its own test binary, so installing the global subscriber here disturbs nobody.
    let cfg = strowger::logging::LogConfig {
        level: "off".into(),
        ..Default::default()
    };
    let first = strowger::logging::init(&cfg);
    let second = strowger::logging::init(&cfg);
    assert!(
        first.is_ok() || std::env::var_os("RUST_LOG").is_some(),
        "{first:?}"
    );
    assert!(second.is_err());
}

/// A port that was free a moment ago on 127.0.0.1 (TCP).
fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn run_serves_reload_swaps_the_script_and_sigterm_exits_0() {
    let dir = temp_dir();
    let script = dir.join("plan.lua");
    std::fs::write(&script, "function on_invite(call) call:reject(486) end\n").unwrap();
    let http = format!("127.0.0.1:{}", free_tcp_port());
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n[http]\nlisten = {http:?}\ntoken = \"cli-Token.1\"\n[script]\npath = {:?}\n[storage]\ndir = {:?}\n[shutdown]\ndrain_timeout_s = 1\n[trunks.carrier1]\nuri = \"sip:127.0.0.1:9\"\nmax_channels = 4\n",
            script.display().to_string(),
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let server = strowger(&["run", "--config", cfg])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("server starts");
    // Wait until the admin endpoint answers (bounded).
    let mut answer = None;
    for _ in 0..100 {
        let (code, out, _err) = run(&mut strowger(&["reload", "--config", cfg]));
        if code == 0 {
            answer = Some(out);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let answer = answer.expect("reload answered within 5 s");
    assert!(answer.contains("\"reloaded\":true"), "{answer}");

    // The token comes from the configuration (http.token above): a wrong one (the
    // environment overrides the file) is refused with the server's 401, exit 1.
    let (code, _out, err) =
        run(strowger(&["reload", "--config", cfg]).env("STROWGER_HTTP__TOKEN", "wrong"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, out, err) = run(&mut strowger(&["registrations", "--json", "--config", cfg]));
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_start().starts_with('['), "{out}");
    // `strowger trunks`: a table (or the JSON) of the configured trunks.
    let (code, out, err) = run(&mut strowger(&["trunks", "--config", cfg]));
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("TRUNK "), "{out}");
    assert!(out.contains("carrier1"), "{out}");
    assert!(out.contains("0/4"), "{out}");
    assert!(out.contains("1 trunk(s)"), "{out}");
    let (code, out, err) = run(&mut strowger(&["trunks", "--json", "--config", cfg]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"name\":\"carrier1\""), "{out}");
    // `strowger registrations | head`: a reader that closed the pipe before the output
    // came is not a panic (issue 15); exit 0.
    for args in [
        &["registrations", "--config", cfg][..],
        &["registrations", "--json", "--config", cfg][..],
        &["trunks", "--config", cfg][..],
        &["trunks", "--json", "--config", cfg][..],
    ] {
        let mut child = strowger(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }

    // A script that does not compile is refused, naming file and line; exit 1.
    std::fs::write(&script, "function on_invite(call)\n  call:reject(\n").unwrap();
    let (code, _out, err) = run(&mut strowger(&["reload", "--config", cfg]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("plan.lua:"), "{err}");

    // `strowger drain`: new calls refused from now on; the process keeps running.
    let (code, out, err) = run(&mut strowger(&["drain", "--config", cfg]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"draining\":true"), "{out}");

    // SIGTERM: graceful shutdown, exit 0.
    let status = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = server.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A config running `script` with `[script]` extras, SIP on `sip`, admin on `http`.
fn config_for(dir: &Path, script: &Path, script_extra: &str, sip: &str, http: &str) -> PathBuf {
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [{sip:?}]\n[http]\nlisten = {http:?}\n[script]\npath = {:?}\n{script_extra}\n[storage]\ndir = {:?}\n[shutdown]\ndrain_timeout_s = 1\n",
            script.display().to_string(),
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    config
}

#[test]
fn check_warns_about_a_missing_on_invite_and_misspelled_hooks() {
    let dir = temp_dir();
    let script = dir.join("plan.lua");
    std::fs::write(
        &script,
        "function onInvite(call) end\nfunction on_call_ende(call) end\nfunction helper() end\n",
    )
    .unwrap();
    let config = config_for(&dir, &script, "", "udp:127.0.0.1:0", "127.0.0.1:0");
    let (code, out, err) = run(&mut strowger(&[
        "check",
        "--config",
        config.to_str().unwrap(),
    ]));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "warnings do not fail the check: {err}");
    assert!(out.contains("script OK"), "{out}");
    assert!(
        err.contains("warning:") && err.contains("no on_invite"),
        "{err}"
    );
    assert!(
        err.contains("`onInvite`") && err.contains("did you mean `on_invite`"),
        "{err}"
    );
    assert!(
        err.contains("`on_call_ende`") && err.contains("`on_call_end`"),
        "{err}"
    );
    assert!(!err.contains("helper"), "{err}");
}

#[test]
fn check_refuses_a_slow_top_level_in_bounded_time() {
    let dir = temp_dir();
    let script = dir.join("plan.lua");
    // Quadratic backtracking at top level: seconds with Lua's own matcher, which nothing
    // can interrupt; the server's pattern functions check the time as they go.
    std::fs::write(
        &script,
        "local s = 'x' .. string.rep(' ', 40000) .. 'y'\ns = s:match('^%s*(.-)%s*$')\nfunction on_invite(call) end\n",
    )
    .unwrap();
    let config = config_for(
        &dir,
        &script,
        "time_limit_ms = 100",
        "udp:127.0.0.1:0",
        "127.0.0.1:0",
    );
    let started = std::time::Instant::now();
    let (code, _out, err) = run(&mut strowger(&[
        "check",
        "--config",
        config.to_str().unwrap(),
    ]));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("plan.lua:2: time limit exceeded (100 ms"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn start_up_log_names_version_config_and_script_warnings() {
    let dir = temp_dir();
    let script = dir.join("plan.lua");
    std::fs::write(&script, "function on_Invite(call) end\n").unwrap();
    let http = format!("127.0.0.1:{}", free_tcp_port());
    let config = config_for(&dir, &script, "", "udp:127.0.0.1:0", &http);
    let server = strowger(&["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("server starts");
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(&http).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = server.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(up, "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    let starting = err
        .lines()
        .find(|l| l.contains("strowger starting"))
        .unwrap_or_else(|| panic!("no start-up line: {err}"));
    assert!(starting.contains(env!("CARGO_PKG_VERSION")), "{starting}");
    assert!(starting.contains(config.to_str().unwrap()), "{starting}");
    assert!(err.contains("did you mean `on_invite`"), "{err}");
}

#[test]
fn a_bind_error_is_printed_once() {
    let dir = temp_dir();
    let script = dir.join("plan.lua");
    std::fs::write(&script, "function on_invite(call) end\n").unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let sip = format!("udp:{}", taken.local_addr().unwrap());
    let http = format!("127.0.0.1:{}", free_tcp_port());
    let config = config_for(&dir, &script, "", &sip, &http);
    let (code, _out, err) = run(&mut strowger(&[
        "run",
        "--config",
        config.to_str().unwrap(),
    ]));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.matches("in use").count(), 1, "{err}");
}

/// A self-signed certificate for `name` valid from `from` to `until` (years), written as
/// `<stem>.crt`/`<stem>.key` in `dir`.
fn cert_files(dir: &Path, stem: &str, name: &str, from: i32, until: i32) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn check_says_what_is_wrong_with_each_certificate_file() {
    let dir = temp_dir();
    let (old_cert, old_key) = cert_files(&dir, "old", "sip.example.test", 2000, 2001);
    let (pbx_cert, _) = cert_files(&dir, "pbx", "pbx.example.test", 2000, 2099);
    let (_, other_key) = cert_files(&dir, "other", "other.example.test", 2000, 2099);
    let junk = dir.join("ca.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:5060\", \"tls:127.0.0.1:5061\"]\n\
             [tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\
             [trunks.carrier1]\nuri = \"sips:carrier.example.test\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            s(&old_cert),
            s(&old_key),
            s(&junk),
            s(&pbx_cert),
            s(&other_key)
        ),
    )
    .unwrap();
    let (code, out, err) = run(&mut strowger(&[
        "check",
        "--config",
        config.to_str().unwrap(),
    ]));
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    // Every problem, each with its key, file and what is wrong.
    assert!(
        err.contains(&format!(
            "TLS error: tls.cert: {}: certificate expired on 2001-01-01T00:00:00Z",
            s(&old_cert)
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "TLS error: trunks.carrier1.tls_cert: {}: this private key does not go with the certificate in {}",
            s(&other_key),
            s(&pbx_cert)
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("TLS error: tls.ca: {}: no CERTIFICATE", s(&junk))),
        "{err}"
    );
    assert!(!out.contains("configuration OK"), "{out}");

    // `run` refuses the same files before binding anything, as configuration errors.
    let (code, _out, err) = run(&mut strowger(&[
        "run",
        "--config",
        config.to_str().unwrap(),
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "configuration error: tls.cert: {}: certificate expired",
            s(&old_cert)
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_names_a_good_certificate_its_subject_and_expiry() {
    let dir = temp_dir();
    let (cert, key) = cert_files(&dir, "server", "sip.example.test", 2000, 2099);
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [\"wss:127.0.0.1:7443\"]\n[tls]\ncert = {:?}\nkey = {:?}\n",
            s(&cert),
            s(&key)
        ),
    )
    .unwrap();
    let (code, out, err) = run(&mut strowger(&[
        "check",
        "--config",
        config.to_str().unwrap(),
    ]));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "stderr: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("tls.cert OK:"))
        .unwrap_or_else(|| panic!("no certificate line: {out}"));
    assert!(line.contains(&s(&cert)), "{line}");
    assert!(line.contains("subject \"CN=sip.example.test\""), "{line}");
    assert!(line.contains("until 2099-01-01T00:00:00Z"), "{line}");
}

#[test]
fn check_refuses_a_tls_listener_without_a_certificate() {
    let dir = temp_dir();
    let config = dir.join("c.toml");
    std::fs::write(&config, "[sip]\nlisten = [\n  \"tls:127.0.0.1:5061\",\n]\n").unwrap();
    let (code, _out, err) = run(&mut strowger(&[
        "check",
        "--config",
        config.to_str().unwrap(),
    ]));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(":3: sip.listen: \"tls:127.0.0.1:5061\" needs a certificate"),
        "{err}"
    );
}

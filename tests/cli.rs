//! The `strowger` binary's command line: version, `check` exit codes and messages,
//! `reload`. Runs the built binary; no server is started.

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
fn reload_is_not_implemented_yet() {
    let (code, _, err) = run(&mut strowger(&["reload"]));
    assert_eq!(code, 1);
    assert!(err.contains("not implemented"), "stderr: {err}");
}

#[test]
fn logging_init_twice_is_an_error_not_a_panic() {
    // Its own test binary, so installing the global subscriber here disturbs nobody.
    let cfg = strowger::config::LogConfig {
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

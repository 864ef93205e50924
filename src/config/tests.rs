//! Loading and composing: defaults, the shipped file, file:line:key and environment
//! variable errors for every section. (Each section's own value checks are tested next to
//! its struct.)

use super::*;
use crate::logging::LogFormat;
use std::sync::Mutex;
use std::time::Duration;

/// Tests that change the process environment hold this, so they do not see each
/// other's variables.
static ENV_LOCK: Mutex<()> = Mutex::new(());

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn err_of(text: &str, vars: &[(&str, &str)]) -> ConfigError {
    build("test.toml", text, &env(vars)).expect_err("must be refused")
}

#[test]
fn empty_file_gives_defaults() {
    let c = Config::from_toml_str("", "empty.toml").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(
        c.sip.listen,
        vec!["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]
    );
    assert_eq!(c.sip.domain, "localhost");
    let timers = c.sip.timers.to_timers();
    assert_eq!(
        (timers.t1, timers.t2, timers.t4),
        (
            Duration::from_millis(500),
            Duration::from_millis(4000),
            Duration::from_millis(5000)
        )
    );
    assert_eq!(c.sip.max_message_size, 65535);
    assert_eq!(
        c.sip.user_agent,
        format!("Strowger/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(c.sip.tcp_idle_timeout_s, 300);
    assert_eq!(c.http.listen, "127.0.0.1:9090");
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.script.path, "scripts/default.lua");
    assert_eq!(c.script.memory_limit_kb, 65536);
    assert_eq!(c.script.instruction_limit, 1_000_000);
    assert_eq!(c.script.vm_pool_size, 0);
    assert_eq!(c.shutdown.drain_timeout_s, 10);
    // Sections present but empty are the same.
    let c = Config::from_toml_str("[sip]\n[sip.timers]\n[log]\n", "t.toml").unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn defaults_are_valid() {
    assert!(Config::default().check().is_ok());
}

#[test]
fn embedded_file_equals_defaults() {
    let c = Config::from_toml_str(EMBEDDED, "embedded").unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn shipped_file_lists_every_key_with_its_default() {
    // Every key is written out (so the file documents them all), except user_agent,
    // whose default carries the binary's version and so is shown commented out.
    let file: toml::Table = toml::from_str(EMBEDDED).unwrap();
    let mut defaults = toml::Table::try_from(Config::default()).unwrap();
    let sip = defaults
        .get_mut("sip")
        .and_then(|v| v.as_table_mut())
        .unwrap();
    assert!(sip.remove("user_agent").is_some());
    assert_eq!(file, defaults);
    assert!(EMBEDDED.contains("\n# user_agent = \"Strowger/<version>\"\n"));
    // And every key has its environment variable documented.
    for key in known_keys(&defaults_table()) {
        let var = format!("STROWGER_{}", key.to_uppercase().replace('.', "__"));
        assert!(EMBEDDED.contains(&var), "{var} not documented");
    }
}

#[test]
fn env_overrides_scalar_nested_and_list() {
    let c = build(
        "t.toml",
        "[sip]\ndomain = \"file.example\"\n",
        &env(&[
            ("STROWGER_SIP__DOMAIN", "env-scalar.example"),
            ("STROWGER_SIP__TIMERS__T1_MS", "250"),
            ("STROWGER_SIP__LISTEN", "udp:127.0.0.1:5071,tcp:[::1]:5072"),
            ("STROWGER_LOG__FORMAT", "json"),
            ("OTHER_VAR", "ignored"),
        ]),
    )
    .unwrap();
    assert_eq!(c.sip.domain, "env-scalar.example");
    assert_eq!(c.sip.timers.t1_ms, 250);
    assert_eq!(c.sip.timers.t2_ms, 4000);
    assert_eq!(c.sip.listen, vec!["udp:127.0.0.1:5071", "tcp:[::1]:5072"]);
    assert_eq!(c.log.format, LogFormat::Json);
    // A single list entry and a numeric-looking string.
    let c = build(
        "t.toml",
        "",
        &env(&[
            ("STROWGER_SIP__LISTEN", "tcp:127.0.0.1:5073"),
            ("STROWGER_SIP__DOMAIN", "12345"),
        ]),
    )
    .unwrap();
    assert_eq!(c.sip.listen, vec!["tcp:127.0.0.1:5073"]);
    assert_eq!(c.sip.domain, "12345");
}

#[test]
fn process_env_overrides_via_load() {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("strowger-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("env.toml");
    std::fs::write(&path, "[log]\nlevel = \"warn\"\n").unwrap();
    std::env::set_var("STROWGER_LOG__LEVEL", "debug");
    std::env::set_var("STROWGER_SIP__TIMERS__T2_MS", "4321");
    std::env::set_var(
        "STROWGER_SIP__LISTEN",
        "udp:127.0.0.1:5074,tcp:127.0.0.1:5075",
    );
    let loaded = Config::load_with_source(Some(&path));
    std::env::set_var("STROWGER_SIP__TIMERS__NOPE_MS", "1");
    let unknown = Config::load(Some(&path));
    for var in [
        "STROWGER_LOG__LEVEL",
        "STROWGER_SIP__TIMERS__T2_MS",
        "STROWGER_SIP__LISTEN",
        "STROWGER_SIP__TIMERS__NOPE_MS",
    ] {
        std::env::remove_var(var);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let (c, source) = loaded.unwrap();
    assert_eq!(source, ConfigSource::File(path.clone()));
    assert_eq!(c.log.level, "debug");
    assert_eq!(c.sip.timers.t2_ms, 4321);
    assert_eq!(
        c.sip.listen,
        vec!["udp:127.0.0.1:5074", "tcp:127.0.0.1:5075"]
    );
    let e = unknown.unwrap_err();
    assert_eq!(e.file, "environment variable STROWGER_SIP__TIMERS__NOPE_MS");
    assert_eq!(e.key, "sip.timers.nope_ms");
}

#[test]
fn explicit_missing_file_is_an_error() {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let e = Config::load(Some(Path::new("/nonexistent/strowger.toml"))).unwrap_err();
    assert_eq!(e.file, "/nonexistent/strowger.toml");
    assert!(e.message.contains("cannot read"), "{e}");
}

#[test]
fn unknown_key_in_file_names_key_and_line() {
    let text = "# comment\n[sip]\ndomain = \"x\"\n\n[sip.timers]\nt1_ms = 100\nt3_ms = 7\n";
    let e = err_of(text, &[]);
    assert_eq!(e.key, "sip.timers.t3_ms");
    assert_eq!(e.line, Some(7));
    assert!(e.message.contains("unknown key"), "{e}");
    assert!(
        e.to_string().starts_with("test.toml:7: sip.timers.t3_ms: "),
        "{e}"
    );

    let e = err_of("[sip]\n\n[sipp]\ndomain = \"x\"\n", &[]);
    assert_eq!(e.line, Some(3), "{e}");
    assert_eq!(e.key, "sipp", "{e}");

    let e = err_of("[log]\nformat = \"text\"\nlevle = \"info\"\n", &[]);
    assert_eq!((e.key.as_str(), e.line), ("log.levle", Some(3)), "{e}");
}

#[test]
fn unknown_env_key_is_an_error() {
    let e = err_of("", &[("STROWGER_SIP__DOMAIN_NAME", "x")]);
    assert_eq!(e.file, "environment variable STROWGER_SIP__DOMAIN_NAME");
    assert_eq!(e.key, "sip.domain_name");
    assert!(e.message.contains("unknown key"), "{e}");
    assert!(e.message.contains("sip.domain"), "{e}");
    // A single underscore between levels is the usual slip.
    let e = err_of("", &[("STROWGER_LOG_LEVEL", "debug")]);
    assert_eq!(e.key, "log_level");
    // A section is not a value.
    let e = err_of("", &[("STROWGER_SIP__TIMERS", "x")]);
    assert_eq!(e.key, "sip.timers");
    assert!(e.message.contains("is a section"), "{e}");
    assert!(e.message.contains("sip.timers.t1_ms"), "{e}");
}

#[test]
fn bad_values_name_the_key() {
    let e = err_of("[sip.timers]\nt1_ms = 0\n", &[]);
    assert_eq!(
        e.to_string(),
        "test.toml:2: sip.timers.t1_ms: must be at least 1 (got 0)"
    );

    let e = err_of(
        "[sip]\nlisten = [\n  \"udp:127.0.0.1:5060\",\n  \"udp:nohost\",\n]\n",
        &[],
    );
    assert_eq!((e.key.as_str(), e.line), ("sip.listen", Some(4)), "{e}");
    assert!(e.message.contains("udp:nohost"), "{e}");

    let e = err_of("[log]\nformat = \"xml\"\n", &[]);
    assert_eq!((e.key.as_str(), e.line), ("log.format", Some(2)), "{e}");
    assert!(e.message.contains("xml"), "{e}");

    let e = err_of("[sip.timers]\nt1_ms = 1000\nt2_ms = 999\n", &[]);
    assert_eq!(
        (e.key.as_str(), e.line),
        ("sip.timers.t2_ms", Some(3)),
        "{e}"
    );

    let e = err_of("[sip]\ntimers = { t4_ms = 0 }\n", &[]);
    assert_eq!(
        (e.key.as_str(), e.line),
        ("sip.timers.t4_ms", Some(2)),
        "{e}"
    );

    let e = err_of("[sip]\nmax_message_size = 100\n", &[]);
    assert_eq!(e.key, "sip.max_message_size");

    let e = err_of("[sip]\nmax_message_size = \"big\"\n", &[]);
    assert_eq!(
        (e.key.as_str(), e.line),
        ("sip.max_message_size", Some(2)),
        "{e}"
    );

    let e = err_of("[http]\nlisten = \"localhost:80\"\n", &[]);
    assert_eq!((e.key.as_str(), e.line), ("http.listen", Some(2)), "{e}");

    let e = err_of("[http]\ntoken = \"two words\"\n", &[]);
    assert_eq!((e.key.as_str(), e.line), ("http.token", Some(2)), "{e}");

    let e = err_of("[log]\nlevel = \"verbose\"\n", &[]);
    assert_eq!(e.key, "log.level");
    let e = err_of("[log]\nlevel = \"info,strowger=[\"\n", &[]);
    assert_eq!(e.key, "log.level");

    let e = err_of("[sip]\nuser_agent = \"a\\r\\nX-Injected: 1\"\n", &[]);
    assert_eq!(e.key, "sip.user_agent");

    let e = err_of("[call]\nrecords_file = \"calls\\n.jsonl\"\n", &[]);
    assert_eq!(
        (e.key.as_str(), e.line),
        ("call.records_file", Some(2)),
        "{e}"
    );

    let e = err_of("sip = 5\n", &[]);
    assert_eq!((e.key.as_str(), e.line), ("sip", Some(1)), "{e}");
    assert!(e.message.ends_with("expected a table ([section])"), "{e}");

    // Types are named as TOML names them, not as Rust does.
    let e = err_of("[sip]\nlisten = 5\n", &[]);
    assert_eq!(
        e.to_string(),
        "test.toml:2: sip.listen: invalid type: integer `5`, expected a list ([\"a\", \"b\"])"
    );
    let e = err_of("[sip.timers]\nt1_ms = -1\n", &[]);
    assert!(
        e.message.ends_with("expected a whole number of 0 or more"),
        "{e}"
    );

    let e = err_of("[sip\n", &[]);
    assert_eq!(e.line, Some(1), "{e}");
}

#[test]
fn presence_section_is_checked_with_file_and_line() {
    let c = Config::from_toml_str("[presence]\nmax_message_size = 100\n", "t.toml").unwrap();
    assert_eq!(c.presence.max_message_size, 100);
    let e = Config::from_toml_str(
        "[presence]\nmin_expires = 60\ndefault_expires = 10\n",
        "t.toml",
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "t.toml:3: presence.default_expires: must be at least 60 (got 10)"
    );
    let e = Config::from_toml_str("[presence]\nmax_message_sise = 1\n", "t.toml").unwrap_err();
    assert!(e.to_string().starts_with("t.toml:2:"), "{e}");
    let e = Config::from_toml_str("[presence]\nauthenticate = true\n", "t.toml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "t.toml:2: presence.authenticate: needs registrar.users_file (the users whose \
         credentials are checked)"
    );
}

#[test]
fn dns_section_defaults_env_and_errors() {
    let c = Config::default();
    assert!(c.dns.servers.is_empty());
    assert_eq!(c.dns.timeout_ms, 2000);
    let c = build(
        "t.toml",
        "",
        &env(&[("STROWGER_DNS__SERVERS", "127.0.0.1:5353, ::1")]),
    )
    .unwrap();
    assert_eq!(c.dns.servers, vec!["127.0.0.1:5353", "::1"]);
    // A bad entry is named by key and line, the entry's own line in a list.
    let e = err_of(
        "[dns]\nservers = [\n  \"192.0.2.53\",\n  \"dns.example:53\",\n]\n",
        &[],
    );
    assert_eq!((e.key.as_str(), e.line), ("dns.servers", Some(4)), "{e}");
    assert!(e.message.contains("dns.example:53"), "{e}");
    let e = err_of("[dns]\nservers = []\ntimeout_ms = 0\n", &[]);
    assert_eq!(
        e.to_string(),
        "test.toml:3: dns.timeout_ms: must be at least 1 (got 0)"
    );
    let e = err_of("", &[("STROWGER_DNS__SERVERS", "127.0.0.1:0")]);
    assert_eq!(e.key, "dns.servers", "{e}");
}

#[test]
fn keepalive_interval_is_off_or_in_range() {
    assert_eq!(Config::default().registrar.keepalive_interval_s, 0);
    for ok in [0, 5, 30, 3600] {
        let c = build(
            "t.toml",
            &format!("[registrar]\nkeepalive_interval_s = {ok}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.registrar.keepalive_interval_s, ok);
    }
    for bad in [1, 4, 3601] {
        let e = err_of(
            &format!("[registrar]\nmin_expires = 60\nkeepalive_interval_s = {bad}\n"),
            &[],
        );
        assert_eq!(
            e.to_string(),
            format!(
                "test.toml:3: registrar.keepalive_interval_s: must be 0 (off) or between \
                 5 and 3600 (got {bad})"
            )
        );
    }
    let c = build(
        "t.toml",
        "",
        &env(&[("STROWGER_REGISTRAR__KEEPALIVE_INTERVAL_S", "25")]),
    )
    .unwrap();
    assert_eq!(c.registrar.keepalive_interval_s, 25);
    let e = err_of("", &[("STROWGER_REGISTRAR__KEEPALIVE_INTERVAL_S", "2")]);
    assert_eq!(
        e.file,
        "environment variable STROWGER_REGISTRAR__KEEPALIVE_INTERVAL_S"
    );
}

#[test]
fn bad_env_values_name_the_variable() {
    let e = err_of("", &[("STROWGER_SIP__TIMERS__T1_MS", "0")]);
    assert_eq!(
        e.to_string(),
        "environment variable STROWGER_SIP__TIMERS__T1_MS: sip.timers.t1_ms: \
         must be at least 1 (got 0)"
    );
    let e = err_of("", &[("STROWGER_SIP__TIMERS__T1_MS", "soon")]);
    assert_eq!(e.file, "environment variable STROWGER_SIP__TIMERS__T1_MS");
    assert_eq!(e.key, "sip.timers.t1_ms");
    let e = err_of("", &[("STROWGER_LOG__FORMAT", "xml")]);
    assert_eq!(e.file, "environment variable STROWGER_LOG__FORMAT", "{e}");
    assert_eq!(e.key, "log.format", "{e}");
    assert_eq!(
        e.message, "unknown variant `xml`, expected `text` or `json`",
        "{e}"
    );
    let e = err_of(
        "",
        &[("STROWGER_SIP__LISTEN", "udp:127.0.0.1:5076,udp:nohost")],
    );
    assert_eq!(e.file, "environment variable STROWGER_SIP__LISTEN");
    assert_eq!(e.key, "sip.listen");
}

#[test]
fn error_display_without_line_or_key() {
    let e = ConfigError {
        file: "f.toml".into(),
        key: String::new(),
        line: None,
        message: "gone".into(),
    };
    assert_eq!(e.to_string(), "f.toml: gone");
}

#[test]
fn huntgroup_errors_name_file_line_and_nested_key() {
    let ok = "[huntgroups.support]\nstrategy = \"weighted\"\nmembers = [\"1001\", \"sip:b@example.com\"]\nweights = [3, 1]\n";
    let c = Config::from_toml_str(ok, "t.toml").unwrap();
    assert_eq!(c.huntgroups["support"].weights, vec![3, 1]);
    assert_eq!(c.huntgroups["support"].ring_timeout, 15);
    for (text, want) in [
        (
            "[huntgroups.support]\nmembers = [\"1001\"]\nstrategy = \"ring-some\"\n",
            "t.toml:3: huntgroups.support.strategy: unknown strategy",
        ),
        (
            "[huntgroups.support]\nstrategy = \"linear\"\n",
            "t.toml:1: huntgroups.support.members: at least one member",
        ),
        (
            "[huntgroups.support]\nmembers = [\n  \"1001\",\n  \"sip:bad uri\",\n]\n",
            "t.toml:4: huntgroups.support.members: bad member",
        ),
        (
            "[huntgroups.support]\nmembers = [\"1001\", \"1002\"]\nweights = [1]\n",
            "t.toml:3: huntgroups.support.weights: one weight per member",
        ),
        (
            "[huntgroups.support]\nmembers = [\"1001\"]\nring_timeout = 0\n",
            "t.toml:3: huntgroups.support.ring_timeout: must be between 1",
        ),
        (
            "[huntgroups.Support]\nmembers = [\"1001\"]\n",
            "huntgroups.Support: a group name is lower-case",
        ),
        (
            "[huntgroups.support]\nmembers = [\"1001\"]\nring_time = 3\n",
            "t.toml:3: huntgroups.support.ring_time: unknown key",
        ),
    ] {
        let e = Config::from_toml_str(text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{text}\n→ {e}\nwanted {want}");
    }
}

#[test]
fn trunk_errors_name_file_line_and_nested_key() {
    let ok = "[trunks.carrier1]\nuri = \"sip:sip.carrier.example\"\nusername = \"pbx\"\npassword = \"s\"\nregister = true\ninbound = [\"203.0.113.0/24\"]\n";
    let c = Config::from_toml_str(ok, "t.toml").unwrap();
    assert!(c.trunks["carrier1"].register);
    assert_eq!(c.trunks["carrier1"].expires, 3600);
    assert_eq!(c.trunks["carrier1"].caller_id, "pai");
    for (text, want) in [
        (
            "[trunks.carrier1]\nmax_channels = 3\n",
            "t.toml:1: trunks.carrier1.uri: a trunk needs",
        ),
        (
            "[trunks.carrier1]\nuri = \"sip:c.example\"\ninbound = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/99\",\n]\n",
            "t.toml:5: trunks.carrier1.inbound: \"10.0.0.0/99\" is not an IP",
        ),
        (
            "[trunks.carrier1]\nuri = \"sip:c.example\"\nregister = true\n",
            "t.toml:3: trunks.carrier1.register: a registering trunk needs",
        ),
        (
            "[trunks.carrier1]\nuri = \"sip:c.example\"\ncaller_id = \"rpid\"\n",
            "t.toml:3: trunks.carrier1.caller_id:",
        ),
        (
            "[trunks.Carrier]\nuri = \"sip:c.example\"\n",
            "trunks.Carrier: a trunk name is",
        ),
        (
            "[trunks.carrier1]\nurl = \"sip:c.example\"\n",
            "t.toml:2: trunks.carrier1.url: unknown key",
        ),
    ] {
        let e = Config::from_toml_str(text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{text}\n→ {e}\nwanted {want}");
    }
}

#[test]
fn each_section_names_file_line_and_key() {
    // One bad value per section, each after a first line that is fine, so the line
    // number is the key's own and not the section header's.
    for (text, want) in [
        (
            "[sip]\ndomain = \"x\"\ntcp_idle_timeout_s = 0\n",
            "t.toml:3: sip.tcp_idle_timeout_s: must be at least 1",
        ),
        (
            "[sip.timers]\nt1_ms = 500\nt4_ms = 0\n",
            "t.toml:3: sip.timers.t4_ms: must be at least 1",
        ),
        (
            "[http]\ntoken = \"\"\nlisten = \"nowhere\"\n",
            "t.toml:3: http.listen: \"nowhere\" is not IP:PORT",
        ),
        (
            "[log]\nformat = \"json\"\nlevel = \"loud\"\n",
            "t.toml:3: log.level: unknown level",
        ),
        (
            "[script]\npath = \"x.lua\"\ninstruction_limit = 0\n",
            "t.toml:3: script.instruction_limit: must be at least 1",
        ),
        (
            "[call]\ntrace = true\nroutes = [\"pstn\",\n  \"no spaces\"]\n",
            "t.toml:4: call.routes: \"no spaces\": a route name",
        ),
        (
            "[registrar]\nmin_expires = 60\nunknown_aor_status = 500\n",
            "t.toml:3: registrar.unknown_aor_status: must be 404 or 403",
        ),
        (
            "[registrar]\nstore = \"disk\"\n",
            "t.toml:2: registrar.store: unknown variant `disk`",
        ),
        (
            "[storage]\ndir = \"\"\n",
            "t.toml:2: storage.dir: must not be empty",
        ),
        (
            "[redis]\nurl = \"http://x/\"\n",
            "t.toml:2: redis.url: \"http://x/\" is not a Redis URL",
        ),
        (
            "[auth]\nnonce_ttl_s = 60\nalgorithms = [\"MD5\", \"SHA-1\"]\n",
            "t.toml:3: auth.algorithms: unknown algorithm \"SHA-1\"",
        ),
        (
            "[shutdown]\n\ndrain_timeout_s = 86401\n",
            "t.toml:3: shutdown.drain_timeout_s: must be at most 86400",
        ),
        (
            "[presence]\nmin_expires = 60\nmax_expires = 30\n",
            "t.toml:3: presence.max_expires: must be at least 60",
        ),
    ] {
        let e = Config::from_toml_str(text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "{text}\n→ {e}\nwanted {want}");
    }
}

#[test]
fn unknown_keys_and_wrong_types_in_inline_tables_and_lists() {
    let e = err_of("[sip]\ntimers = { t1_ms = 100, t5_ms = 1 }\n", &[]);
    assert_eq!(
        (e.key.as_str(), e.line),
        ("sip.timers.t5_ms", Some(2)),
        "{e}"
    );
    assert!(e.message.starts_with("unknown key `t5_ms`"), "{e}");
    let e = err_of(
        "[sip]\ndomain = \"x\"\nlisten = [\n  \"udp:127.0.0.1:5060\",\n  5,\n]\n",
        &[],
    );
    assert_eq!((e.key.as_str(), e.line), ("sip.listen", Some(5)), "{e}");
    let e = err_of(
        "[huntgroups.sales]\nmembers = [\"1001\"]\n[huntgroups.sales.extra]\n",
        &[],
    );
    assert_eq!(e.key, "huntgroups.sales.extra", "{e}");
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn env_values_take_the_type_of_the_default() {
    let c = build(
        "t.toml",
        "",
        &env(&[
            ("STROWGER_CALL__TRACE", "false"),
            ("STROWGER_CALL__ROUTES", "pstn, sip"),
            ("STROWGER_AUTH__ALGORITHMS", "MD5"),
            ("STROWGER_HTTP__TOKEN", "123"),
        ]),
    )
    .unwrap();
    assert!(!c.call.trace);
    assert_eq!(c.call.routes, vec!["pstn", "sip"]);
    assert_eq!(c.auth.algorithms, vec!["MD5"]);
    assert_eq!(c.http.token, "123");
    // An env value over a file value: the error names the variable, not the file.
    let e = err_of(
        "[call]\ntrace = true\n",
        &[("STROWGER_CALL__TRACE", "maybe")],
    );
    assert_eq!(e.file, "environment variable STROWGER_CALL__TRACE", "{e}");
    assert_eq!((e.key.as_str(), e.line), ("call.trace", None), "{e}");
    let e = err_of(
        "[call]\nroutes = [\"a\"]\n",
        &[("STROWGER_CALL__ROUTES", "ok,not ok")],
    );
    assert_eq!(
        e.to_string(),
        "environment variable STROWGER_CALL__ROUTES: call.routes: \"not ok\": a route \
         name is 1-64 letters, digits, '-' or '_'"
    );
    // Hunt groups are not settable from the environment.
    let e = err_of("", &[("STROWGER_HUNTGROUPS__SALES__MEMBERS", "1001")]);
    assert!(e.message.contains("unknown key"), "{e}");
}

#[test]
fn env_value_inside_a_file_table_names_the_variable() {
    // The file writes the table (inline here), the variable one key of it: a problem with
    // that key is the variable's, a problem with the table the file's.
    let e = err_of(
        "[sip]\ntimers = { t1_ms = 1000 }\n",
        &[("STROWGER_SIP__TIMERS__T2_MS", "999")],
    );
    assert_eq!(
        e.to_string(),
        "environment variable STROWGER_SIP__TIMERS__T2_MS: sip.timers.t2_ms: must be at \
         least t1_ms (1000) (got 999)"
    );
    let e = err_of(
        "[sip]\ntimers = 5\n",
        &[("STROWGER_SIP__TIMERS__T2_MS", "1")],
    );
    assert_eq!((e.file.as_str(), e.line), ("test.toml", Some(2)), "{e}");
    assert_eq!(e.key, "sip.timers", "{e}");
}

#[test]
fn tls_and_ws_sections_name_file_line_and_key() {
    let c = Config::default();
    assert_eq!(c.tls.handshake_timeout_ms, 10_000);
    assert_eq!(c.tls.max_handshakes, 256);
    assert_eq!(c.ws.ping_interval_s, 30);
    assert!(c.ws.allowed_origins.is_empty());
    let ok = "[sip]\nlisten = [\"udp:127.0.0.1:5060\", \"tls:127.0.0.1:5061\", \"wss:127.0.0.1:7443\"]\n\
              [tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n\
              [ws]\nallowed_origins = [\"https://phone.example.com\"]\nping_interval_s = 0\n";
    let c = Config::from_toml_str(ok, "t.toml").unwrap();
    assert_eq!(c.tls.files().cert, std::path::PathBuf::from("server.crt"));
    assert_eq!(c.ws.ping_interval_s, 0);
    for (text, want) in [
        // A TLS listener without a certificate: the entry's own line.
        (
            "[sip]\nlisten = [\n  \"udp:127.0.0.1:5060\",\n  \"tls:127.0.0.1:5061\",\n]\n",
            "t.toml:4: sip.listen: \"tls:127.0.0.1:5061\" needs a certificate: set tls.cert and tls.key",
        ),
        (
            "[sip]\nlisten = [\"wss:127.0.0.1:7443\"]\n",
            "t.toml:2: sip.listen: \"wss:127.0.0.1:7443\" needs a certificate",
        ),
        (
            "[tls]\nca = \"\"\ncert = \"server.crt\"\n",
            "t.toml:1: tls.key: tls.cert is set: tls.key must name",
        ),
        (
            "[tls]\ncert = \"\"\nkey = \"server.key\"\n",
            "t.toml:2: tls.cert: tls.key is set: tls.cert must name",
        ),
        (
            "[tls]\ncert = \"\"\nhandshake_timeout_ms = 0\n",
            "t.toml:3: tls.handshake_timeout_ms: must be at least 100",
        ),
        (
            "[tls]\ncert = \"\"\nmax_handshakes = 1000000\n",
            "t.toml:3: tls.max_handshakes: must be at most 100000",
        ),
        (
            "[tls]\ncertificate = \"x\"\n",
            "t.toml:2: tls.certificate: unknown key",
        ),
        (
            "[ws]\nping_interval_s = 30\nallowed_origins = [\n  \"https://a.example\",\n  \"https://b.example/app\",\n]\n",
            "t.toml:5: ws.allowed_origins: \"https://b.example/app\": scheme://host[:port] only",
        ),
        (
            "[ws]\nallowed_origins = []\nping_interval_s = 1\n",
            "t.toml:3: ws.ping_interval_s: must be at least 5",
        ),
        (
            "[trunks.carrier1]\nuri = \"sip:c.example\"\ntls_cert = \"pbx.crt\"\ntls_key = \"pbx.key\"\n",
            "t.toml:3: trunks.carrier1.tls_cert: a client certificate is presented over TLS only",
        ),
        (
            "[trunks.carrier1]\nuri = \"sips:c.example\"\ntls_cert = \"pbx.crt\"\n",
            "t.toml:1: trunks.carrier1.tls_key: tls_cert is set",
        ),
    ] {
        let e = Config::from_toml_str(text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "{text}\n→ {e}\nwanted {want}");
    }
    // From the environment: the variable is named.
    let e = err_of("", &[("STROWGER_SIP__LISTEN", "tls:127.0.0.1:5061")]);
    assert_eq!(e.key, "sip.listen", "{e}");
    assert!(e.file.contains("STROWGER_SIP__LISTEN"), "{e}");
    let c = build(
        "t.toml",
        "[sip]\nlisten = [\"tls:127.0.0.1:5061\"]\n",
        &env(&[
            ("STROWGER_TLS__CERT", "/etc/strowger/server.crt"),
            ("STROWGER_TLS__KEY", "/etc/strowger/server.key"),
            (
                "STROWGER_WS__ALLOWED_ORIGINS",
                "https://a.example,http://localhost:8080",
            ),
        ]),
    )
    .unwrap();
    assert_eq!(c.tls.cert, "/etc/strowger/server.crt");
    assert_eq!(c.ws.allowed_origins.len(), 2);
}

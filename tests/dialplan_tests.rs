//! `strowger test` (issue 19), run as operators run it, through the built binary: the
//! shipped tests pass on the shipped dial plan, in well under a second; a deliberately
//! broken copy of the plan is caught with the test file's line; JUnit XML is written; a
//! test file with a mistake is refused with its line.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_strowger");

/// `strowger VERB ARGS` in the repository root with no `STROWGER_*` variables inherited
/// but `extra`; its exit code and output.
fn strowger(verb: &str, args: &[&str], extra: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg(verb)
        .args(args);
    for (key, _) in std::env::vars_os() {
        if key
            .to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("STROWGER_")
        {
            cmd.env_remove(key);
        }
    }
    // Quiet: the engine's own log lines would bury the report.
    cmd.env("STROWGER_LOG__LEVEL", "error");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exited"), text)
}

fn strowger_test(args: &[&str], extra: &[(&str, &str)]) -> (i32, String) {
    strowger("test", args, extra)
}

fn route_test(args: &[&str]) -> (i32, String) {
    strowger("route-test", args, &[])
}

#[test]
fn the_shipped_tests_pass_on_the_shipped_plan_in_well_under_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("report.xml");
    let started = Instant::now();
    let (code, out) = strowger_test(&["--junit", junit.to_str().unwrap()], &[]);
    let wall = started.elapsed();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" 0 failed"), "{out}");
    assert!(out.contains("ok    scripts/tests/default_test.lua :: a phone that never answers rings for 20 seconds"), "{out}");
    // The process as a whole (start-up included); the suite's own time is in its summary.
    assert!(wall < Duration::from_secs(3), "took {wall:?}\n{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("<testsuite name=\"scripts/tests/default_test.lua\""),
        "{xml}"
    );
    assert!(xml.contains("failures=\"0\""), "{xml}");
}

#[test]
fn a_broken_dial_plan_is_caught_with_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua"))
            .unwrap();
    // The mistake: busy at the carrier now fails over to the backup as well.
    let broken = shipped.replace(
        "return result.status ~= 486 and result.status < 600",
        "return result.status < 600",
    );
    assert_ne!(
        broken, shipped,
        "the plan changed: update this test's mistake"
    );
    let plan = dir.path().join("broken.lua");
    std::fs::write(&plan, broken).unwrap();
    let (code, out) = strowger_test(&[], &[("STROWGER_SCRIPT__PATH", plan.to_str().unwrap())]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  scripts/tests/default_test.lua :: busy at the carrier is not tried again on the backup"),
        "{out}"
    );
    // Where the expectation is, and what happened instead, with the calls' ladder.
    assert!(
        out.contains("scripts/tests/default_test.lua:50: the caller's final status: expected 486"),
        "{out}"
    );
    assert!(out.contains("backup <-"), "{out}");
    assert!(out.contains(" 1 failed"), "{out}");
}

#[test]
fn a_mistake_in_a_test_file_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo_test.lua");
    std::fs::write(
        &file,
        "test(\"a\", function()\n  phone(\"1000\", { answer_aftr = 2 })\nend)\n",
    )
    .unwrap();
    let (code, out) = strowger_test(&[file.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("typo_test.lua:2: 1000: unknown option \"answer_aftr\""),
        "{out}"
    );
    // A file that does not compile: exit 2 with its line.
    std::fs::write(&file, "test(\"a\", function()\n  phone(\nend)\n").unwrap();
    let (code, out) = strowger_test(&[file.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("typo_test.lua:3:"), "{out}");
}

#[test]
fn route_test_shows_where_a_call_goes() {
    // The shipped plan sends extension 1001 (not registered) to its desk address.
    let (code, out) = route_test(&["--from", "sip:1000@localhost", "--to", "1001"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("dialled 1: sip:1001@127.0.0.1:5080 -> 200"),
        "{out}"
    );
    assert!(out.contains("the caller got: 200 OK"), "{out}");
    assert!(out.contains("caller -> "), "the ladder: {out}");
    // As the flags say: busy targets, and a header the plan could route on.
    let (code, out) = route_test(&[
        "--from",
        "sip:1000@localhost",
        "--to",
        "1001",
        "--busy",
        "--header",
        "X-Test: 1",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("-> 486"), "{out}");
    assert!(out.contains("the caller got: 486 Busy Here"), "{out}");
    // An unknown number: nothing dialled, 404.
    let (_, out) = route_test(&["--from", "sip:1000@localhost", "--to", "555"]);
    assert!(out.contains("the dial plan dialled nothing"), "{out}");
    assert!(out.contains("the caller got: 404"), "{out}");
    // A bad header is refused.
    let (code, out) = route_test(&[
        "--from",
        "sip:1000@localhost",
        "--to",
        "1",
        "--header",
        "nocolon",
    ]);
    assert_eq!(code, 2, "{out}");
}

/// Hunt groups and transfers run in the test world too: an operator's own configuration
/// (`--config`) with a hunt group, a plan that hunts, and phones that are busy, answer
/// late or transfer by REFER.
#[test]
fn hunt_groups_and_transfers_in_an_operators_own_suite() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.lua");
    std::fs::write(
        &plan,
        r#"
function on_invite(call)
  local u = call.ruri.user
  if u == "support" then
    call:set_route("support")
    return call:hunt("support", { max_wait = 60 })
  end
  local devices = registrar.lookup("sip:" .. u .. "@pbx.test")
  if #devices == 0 then return call:reject(404, "Not Found") end
  call:dial(devices, { timeout = 20 })
end
"#,
    )
    .unwrap();
    let config = dir.path().join("strowger.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\ndomain = \"pbx.test\"\n[script]\npath = \"{}\"\n[call]\nroutes = [\"support\"]\n\
             [huntgroups.support]\nstrategy = \"ring-all\"\nmembers = [\"201\", \"202\"]\n",
            plan.display()
        ),
    )
    .unwrap();
    let tests = dir.path().join("tests");
    std::fs::create_dir_all(&tests).unwrap();
    std::fs::write(
        tests.join("hunt_test.lua"),
        r#"
test("the support group rings its agents; the one free answers", function()
  phone("201", { busy = true })
  phone("202", { answer_after = 3 })
  phone("100")
  local r = call({ from = "100", to = "support" })
  expect_eq(r.status, 200)
  expect_eq(r.answered_by, "202")
  expect(r.seconds >= 3, "answered after " .. r.seconds .. " s")
  expect_eq(record().route, "support")
  expect_eq(metric('strowger_route_calls_total{result="answered",route="support"}'), 1)
end)

test("a transfer by REFER rings its target", function()
  phone("300", { refer = "301" })
  phone("301")
  phone("100")
  local r = call({ from = "100", to = "300", hold = 5 })
  expect_eq(r.answered_by, "300")
  expect_eq(r.rung, { "300", "301" })
end)
"#,
    )
    .unwrap();
    let (code, out) = strowger_test(
        &[
            "--config",
            config.to_str().unwrap(),
            tests.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 passed, 0 failed"), "{out}");
}

/// A call placed from a simulated carrier is the trunk's (`call.trunk` in the plan): the
/// trunk's `inbound` is its simulated address.
#[test]
fn a_call_from_a_simulated_carrier_is_the_trunks() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.lua");
    std::fs::write(
        &plan,
        r#"
function on_invite(call)
  if call.trunk ~= "carrier" then return call:reject(403, "Not From The Carrier") end
  local devices = registrar.lookup("sip:" .. call.ruri.user .. "@localhost")
  call:dial(devices, { timeout = 20 })
end
"#,
    )
    .unwrap();
    let tests = dir.path().join("inbound_test.lua");
    std::fs::write(
        &tests,
        r#"
test("the carrier's calls reach the phone they name", function()
  trunk("carrier")
  phone("1001")
  phone("1000")
  local r = call({ from = "carrier", to = "1001" })
  expect_eq(r.answered_by, "1001")
  expect_eq(r.rung, { "1001" })
  expect(r.invites["1001"][1].ruri:find("^sip:1001@"), "Request-URI " .. r.invites["1001"][1].ruri)
  expect(r.invites["1001"][1].from:find("carrier"), "From " .. r.invites["1001"][1].from)
  expect_eq(call({ from = "1000", to = "1001" }).status, 403, "a phone is not the carrier")
end)
"#,
    )
    .unwrap();
    let (code, out) = strowger_test(
        &[tests.to_str().unwrap()],
        &[("STROWGER_SCRIPT__PATH", plan.to_str().unwrap())],
    );
    assert_eq!(code, 0, "{out}");
}

/// The virtual clock is exact: registering phones (their bindings stored by SQLite on a
/// thread of its own) takes no simulated time; only what the test waits for does.
#[test]
fn registrations_take_no_simulated_time() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clock_test.lua");
    let mut text = String::from("test(\"twenty phones\", function()\n");
    for i in 0..20 {
        text.push_str(&format!("  phone(\"{}\")\n", 2000 + i));
    }
    text.push_str("  sleep(2.5)\nend)\n");
    std::fs::write(&file, text).unwrap();
    let (code, out) = strowger_test(&[file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}");
    let simulated: f64 = out
        .split(" ms, ")
        .nth(1)
        .and_then(|s| s.split(" s simulated").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no simulated time in {out}"));
    assert!(
        (2.5..2.7).contains(&simulated),
        "{simulated} s simulated\n{out}"
    );
}

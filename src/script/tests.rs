//! Tests of the scripting engine, against a fake [`CallControl`].

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::*;

// ---------------------------------------------------------------- helpers

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir.
fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "strowger-script-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `main.lua` (and returns its path) in a fresh directory.
fn write_script(src: &str) -> PathBuf {
    let path = temp_dir().join("main.lua");
    std::fs::write(&path, src).unwrap();
    path
}

fn opts(path: &Path, pool: usize) -> EngineOptions {
    EngineOptions {
        path: path.to_path_buf(),
        memory_limit: 8 * 1024 * 1024,
        instruction_limit: 1_000_000,
        time_limit: std::time::Duration::from_millis(1000),
        pool_size: pool,
        routes: vec!["local".into(), "pstn".into()],
    }
}

fn engine(src: &str) -> ScriptEngine {
    engine_pool(src, 2)
}

fn engine_pool(src: &str, pool: usize) -> ScriptEngine {
    let path = write_script(src);
    ScriptEngine::load(opts(&path, pool)).unwrap()
}

fn uri(user: Option<&str>, host: &str) -> UriInfo {
    UriInfo {
        uri: match user {
            Some(u) => format!("sip:{u}@{host}"),
            None => format!("sip:{host}"),
        },
        user: user.map(str::to_owned),
        host: host.to_owned(),
    }
}

fn call_to(number: &str) -> CallInfo {
    CallInfo {
        id: format!("call-{number}"),
        from: uri(Some("alice"), "example.com"),
        to: uri(Some(number), "pbx.example.com"),
        ruri: uri(Some(number), "10.0.0.1"),
        source: "udp:192.0.2.7:5060".into(),
        headers: vec![
            ("Subject".into(), "hello".into()),
            ("X-Tenant".into(), "acme".into()),
            ("X-Tenant".into(), "second".into()),
        ]
        .into(),
        trunk: None,
    }
}

fn record(answered: bool) -> CallRecord {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    CallRecord {
        start,
        answer: answered.then(|| start + Duration::from_secs(5)),
        end: start + Duration::from_secs(65),
        hangup_by: "callee".into(),
        final_status: if answered { 200 } else { 486 },
    }
}

fn answered() -> DialOutcome {
    DialOutcome {
        answered: true,
        status: 200,
        reason: "OK".into(),
        source: DialSource::Callee,
        target: Some(0),
    }
}

fn failed(status: u16, reason: &str) -> DialOutcome {
    DialOutcome {
        target: Some(0),
        ..DialOutcome::failed(status, reason, DialSource::Callee)
    }
}

/// A fake B2BUA: records dials and answers them from a script of outcomes (default:
/// answered), optionally after a delay or once a gate opens.
#[derive(Default)]
struct Fake {
    dials: Mutex<Vec<(Vec<String>, DialOptions)>>,
    outcomes: Mutex<VecDeque<DialOutcome>>,
    delay: Duration,
    gate: Option<Arc<Semaphore>>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Fake {
    fn new(outcomes: Vec<DialOutcome>) -> Arc<Fake> {
        Arc::new(Fake {
            outcomes: Mutex::new(outcomes.into()),
            ..Fake::default()
        })
    }

    fn targets(&self) -> Vec<Vec<String>> {
        self.dials.lock().iter().map(|(t, _)| t.clone()).collect()
    }
}

impl CallControl for Fake {
    fn dial(
        &self,
        targets: Vec<DialTarget>,
        opts: DialOptions,
    ) -> Pin<Box<dyn Future<Output = DialOutcome> + Send>> {
        let targets = targets.iter().map(ToString::to_string).collect();
        self.dials.lock().push((targets, opts));
        let outcome = self.outcomes.lock().pop_front().unwrap_or_else(answered);
        let (delay, gate) = (self.delay, self.gate.clone());
        let (in_flight, peak) = (self.in_flight.clone(), self.peak.clone());
        Box::pin(async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            tokio::time::sleep(delay).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            outcome
        })
    }
}

/// Captures this thread's tracing output (the tests run on a current-thread runtime).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

async fn invite(engine: &ScriptEngine, call: CallInfo, fake: &Arc<Fake>) -> InviteOutcome {
    engine.current().on_invite(call, fake.clone()).await
}

#[track_caller]
fn rejected(outcome: &InviteOutcome) -> (u16, &str) {
    match outcome {
        InviteOutcome::Rejected { status, reason, .. } => (*status, reason.as_str()),
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[track_caller]
fn failure(outcome: &InviteOutcome) -> &str {
    match outcome {
        InviteOutcome::Failed { error, .. } => error,
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn stat(engine: &ScriptEngine, f: impl Fn(&ScriptStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(engine.stats()).load(Ordering::Relaxed)
}

// ---------------------------------------------------------------- the call object

#[tokio::test]
async fn call_fields_are_visible_to_lua() {
    let e = engine(
        r#"
        function on_invite(call)
          local parts = {
            call.id, call.source,
            call.from.uri, call.from.user, call.from.host,
            call.to.user, call.ruri.user, call.ruri.host, call.ruri.uri,
            call:header("subject"), call:header("x-tenant"), call:header("s"),
            tostring(call:header("X-Missing")), type(call.vars), tostring(call),
          }
          call:reject(499, table.concat(parts, "|"))
        end
        "#,
    );
    let out = invite(&e, call_to("1000"), &Fake::new(vec![])).await;
    assert_eq!(
        rejected(&out),
        (
            499,
            "call-1000|udp:192.0.2.7:5060|sip:alice@example.com|alice|example.com|1000|1000|10.0.0.1|sip:1000@10.0.0.1|hello|acme|hello|nil|table|call call-1000"
        )
    );
}

#[tokio::test]
async fn lazily_built_fields_behave_like_plain_fields() {
    // The call's fields are built on first access: pairs must still see all of them, and
    // a field the script assigned (even nil) must not be rebuilt.
    let e = engine(
        r#"
        function on_invite(call)
          local keys = {}
          for k in pairs(call) do keys[#keys + 1] = k end
          table.sort(keys)
          call.vars = nil
          call.from = "mine"
          call:reject(499, table.concat(keys, ",") .. "|" .. tostring(call.vars) .. "|"
            .. call.from .. "|" .. call.to.user .. "|" .. type(call.dial))
        end
        "#,
    );
    let out = invite(&e, call_to("1000"), &Fake::new(vec![])).await;
    assert_eq!(
        rejected(&out),
        (499, "from,id,ruri,source,to,vars|nil|mine|1000|function")
    );
}

#[tokio::test]
async fn uri_without_user_is_nil() {
    let e = engine(
        r#"
        function on_invite(call)
          call:reject(499, tostring(call.ruri.user) .. " " .. call.ruri.host)
        end
        "#,
    );
    let mut call = call_to("x");
    call.ruri = uri(None, "10.0.0.1");
    let out = invite(&e, call, &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (499, "nil 10.0.0.1"));
}

#[tokio::test]
async fn sequential_failover_dials_each_target_in_turn() {
    let e = engine(
        r#"
        function on_invite(call)
          for _, target in ipairs({ "sip:a@one", "sip:a@two", "sip:a@three" }) do
            local r = call:dial(target, { timeout = 5, headers = { ["X-Try"] = target } })
            if r.answered then return end
            assert(r.status == 486 and r.reason == "Busy Here", "unexpected outcome")
          end
        end
        "#,
    );
    let fake = Fake::new(vec![failed(486, "Busy Here"), answered()]);
    let out = invite(&e, call_to("1000"), &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    assert_eq!(
        fake.targets(),
        vec![vec!["sip:a@one".to_string()], vec!["sip:a@two".to_string()]]
    );
    let dials = fake.dials.lock();
    assert_eq!(dials[0].1.timeout, Some(Duration::from_secs(5)));
    assert_eq!(
        dials[1].1.headers,
        vec![("X-Try".to_string(), "sip:a@two".to_string())]
    );
}

/// `outcome.source` and `outcome.target` say where a dial's status came from.
#[tokio::test]
async fn dial_outcome_says_where_its_status_came_from() {
    let e = engine(
        r#"
        function on_invite(call)
          local seen = {}
          local function note(r)
            seen[#seen + 1] = tostring(r.answered) .. " " .. r.status .. " " .. r.source
              .. " " .. tostring(r.target)
          end
          note(call:dial({ "sip:a@192.0.2.1", "sip:b@192.0.2.2" }))
          note(call:dial("sip:c@192.0.2.3"))
          note(call:dial("sip:c@192.0.2.3"))
          note(call:dial("sip:c@192.0.2.3"))
          note(call:dial({}))
          note(call:dial("sip:d@192.0.2.4"))
          call:reject(499, table.concat(seen, "|"))
        end
        "#,
    );
    let busy_b = DialOutcome {
        target: Some(1),
        ..failed(486, "Busy Here")
    };
    let fake = Fake::new(vec![
        busy_b,
        DialOutcome::failed(408, "Request Timeout", DialSource::Timeout),
        DialOutcome::failed(487, "Request Terminated", DialSource::Caller),
        DialOutcome::failed(491, "A dial is already in progress", DialSource::Local),
        failed(603, "Decline"),
    ]);
    let out = invite(&e, call_to("1"), &fake).await;
    assert_eq!(
        rejected(&out).1,
        "false 486 callee sip:b@192.0.2.2|false 408 timeout nil|false 487 caller nil\
         |false 491 local nil|false 480 local nil|false 603 callee sip:d@192.0.2.4"
    );
}

#[tokio::test]
async fn parallel_fork_and_all_dial_options() {
    let e = engine(
        r#"
        function on_invite(call)
          local r = call:dial({ "sip:desk@a", "sip:mobile@b" }, {
            timeout = 12.5, from = "sip:office@example.com", to = "sip:bob@example.com",
            max_duration = 3600, headers = { ["X-B"] = 2, ["X-A"] = "one" },
          })
          assert(r.answered == true and r.status == 200 and r.reason == "OK")
        end
        "#,
    );
    let fake = Fake::new(vec![]);
    let out = invite(&e, call_to("1000"), &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    let dials = fake.dials.lock();
    let (targets, opts) = &dials[0];
    assert_eq!(targets, &["sip:desk@a", "sip:mobile@b"]);
    assert_eq!(
        opts,
        &DialOptions {
            timeout: Some(Duration::from_millis(12_500)),
            headers: vec![("X-A".into(), "one".into()), ("X-B".into(), "2".into())],
            from: Some("sip:office@example.com".into()),
            to: Some("sip:bob@example.com".into()),
            max_duration: Some(Duration::from_secs(3600)),
            caller_id: None,
            privacy: None,
        }
    );
}

/// An options table with a metatable is read raw, as one without: what its `__index`
/// would give is not an option (the fast path reads fields only of tables without one).
/// Standard reason phrases and others both reach the outcome.
#[tokio::test]
async fn dial_options_are_read_raw_and_reasons_reach_the_outcome() {
    let e = engine(
        r#"
        function on_invite(call)
          local opts = setmetatable({ timeout = 7 }, { __index = { from = "sip:x@y" } })
          local r = call:dial("sip:a@b", opts)
          assert(r.status == 486 and r.reason == "Busy Here", r.status .. " " .. tostring(r.reason))
          r = call:dial("sip:a@b", { timeout = 8 })
          assert(r.status == 480 and r.reason == "Gone Fishing", r.status .. " " .. tostring(r.reason))
          r = call:dial("sip:a@b")
          assert(r.status == 200 and r.reason == "OK", r.status .. " " .. tostring(r.reason))
        end
        "#,
    );
    let fake = Fake::new(vec![
        DialOutcome::failed(486, "Busy Here", DialSource::Callee),
        DialOutcome::failed(480, "Gone Fishing", DialSource::Callee),
        answered(),
    ]);
    let out = invite(&e, call_to("1000"), &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    let dials = fake.dials.lock();
    assert_eq!(dials[0].1.timeout, Some(Duration::from_secs(7)));
    assert_eq!(dials[0].1.from, None);
    assert_eq!(dials[1].1.timeout, Some(Duration::from_secs(8)));
}

#[tokio::test]
async fn trunk_targets_caller_id_privacy_and_call_trunk() {
    let e = engine(
        r#"
        function on_invite(call)
          assert(call.trunk == "carrier2", tostring(call.trunk))
          local r = call:dial({ trunk = "carrier1", user = "+15551234" },
            { caller_id = "+15550000", privacy = "id" })
          assert(r.answered == false and r.status == 503 and r.source == "local",
            tostring(r.answered) .. " " .. r.status .. " " .. r.source)
          assert(r.target.trunk == "carrier1" and r.target.user == "+15551234")
          r = call:dial({ { trunk = "carrier1", user = 15551234 }, "sip:desk@a" },
            { privacy = false })
          assert(r.target == "sip:desk@a", tostring(r.target))
        end
        "#,
    );
    let fake = Fake::new(vec![
        DialOutcome {
            target: Some(0),
            ..DialOutcome::failed(503, "Trunk Down", DialSource::Local)
        },
        DialOutcome {
            target: Some(1),
            ..answered()
        },
    ]);
    let mut info = call_to("1000");
    info.trunk = Some("carrier2".into());
    let out = invite(&e, info, &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    let dials = fake.dials.lock();
    assert_eq!(dials[0].0, ["+15551234 via trunk carrier1"]);
    assert_eq!(dials[0].1.caller_id.as_deref(), Some("+15550000"));
    assert_eq!(dials[0].1.privacy, Some(true));
    assert_eq!(dials[1].0, ["15551234 via trunk carrier1", "sip:desk@a"]);
    assert_eq!(dials[1].1.privacy, Some(false));
}

#[tokio::test]
async fn bad_dial_arguments_are_lua_errors_with_position() {
    let cases = [
        (
            r#"call:dial("sip:a@b", { timout = 5 })"#,
            "unknown option 'timout'",
        ),
        (
            r#"call:dial({ trunk = "c1" })"#,
            "a trunk target's user: expected the number to call",
        ),
        (
            r#"call:dial({ trunk = "c1", user = "a b" })"#,
            "bad trunk user",
        ),
        (
            r#"call:dial({ trunk = "c1", user = "1", uri = "x" })"#,
            "a trunk target has only `trunk` and `user`",
        ),
        (r#"call:dial({ { user = "1" } })"#, "must be a trunk target"),
        (
            r#"call:dial("sip:a@b", { caller_id = "a b" })"#,
            "caller_id 'a b' must be a number",
        ),
        (
            r#"call:dial("sip:a@b", { privacy = "full" })"#,
            "privacy must be \"id\" or \"none\"",
        ),
        (r#"call:dial(42)"#, "expected a target string"),
        (
            r#"call:dial("sip:a@b", { timeout = -1 })"#,
            "positive number of seconds",
        ),
        (
            r#"call:dial("sip:a@b", { headers = { Via = "x" } })"#,
            "set by the server",
        ),
        (
            r#"call:dial("sip:a@b", { headers = { ["X-A"] = "a\r\nVia: x" } })"#,
            "line break",
        ),
        (r#"call:dial("sip:a b@c")"#, "no spaces"),
        (r#"call:dial("sip:a\tb@c")"#, "no spaces"),
        (r#"call:dial("sip:a\127b@c")"#, "no spaces"),
        (r#"call:dial("<sip:a@c>")"#, "no spaces"),
        (r#"call:dial("sip:\"a\"@c")"#, "no spaces"),
        (r#"call:dial("sip:jürgen\u{3000}x@c")"#, "no spaces"),
        (r#"call:dial("sip:jürgen\u{85}x@c")"#, "no spaces"),
        (r#"call.dial("sip:a@b")"#, "with a colon"),
    ];
    for (line, expected) in cases {
        let e = engine(&format!("function on_invite(call)\n  {line}\nend\n"));
        let fake = Fake::new(vec![]);
        let out = invite(&e, call_to("1"), &fake).await;
        let err = failure(&out);
        assert!(err.contains("main.lua:2:"), "{line}: {err}");
        assert!(err.contains(expected), "{line}: {err}");
        assert!(fake.targets().is_empty());
    }
    // An empty list (nobody registered) is a failed dial, not an error.
    let e = engine("function on_invite(call)\n  local r = call:dial({})\n  call:reject(r.status + 1, r.reason)\nend\n");
    let fake = Fake::new(vec![]);
    match invite(&e, call_to("1"), &fake).await {
        InviteOutcome::Rejected { status, reason, .. } => {
            assert_eq!((status, reason.as_str()), (481, "Temporarily Unavailable"));
        }
        other => panic!("expected the script's reject, got {other:?}"),
    }
    assert!(fake.targets().is_empty());
    // Non-ASCII text without spaces or controls is a target like any other.
    let e = engine("function on_invite(call)\n  call:dial(\"sip:jürgen@c\")\nend\n");
    let fake = Fake::new(vec![answered()]);
    let out = invite(&e, call_to("1"), &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    assert_eq!(fake.targets(), vec![vec!["sip:jürgen@c".to_owned()]]);
}

#[tokio::test]
async fn reject_gives_rejected_with_code_and_reason() {
    let e = engine(r#"function on_invite(call) call:reject(403, "Not on the list") end"#);
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (403, "Not on the list"));

    let e = engine(r#"function on_invite(call) call:reject(486) end"#);
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (486, "Busy Here"));
}

#[tokio::test]
async fn a_call_object_kept_past_its_call_cannot_act_on_a_later_call() {
    // The first call's object, kept in an upvalue, names a slot the second call may take
    // over: the second call must not be rejected through it. One VM, so both calls meet.
    let e = engine_pool(
        r#"
        local kept = {}
        function on_invite(call)
          local old = kept[1]
          kept[1] = call
          if old == nil then
            call:reject(404, "first")
            return
          end
          local ok, err = pcall(old.reject, old, 403, "through the old object")
          call:reject(499, tostring(ok) .. "|" .. (tostring(err):gsub("%s+", " ")))
        end
        "#,
        1,
    );
    let first = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&first), (404, "first"));
    drop(first);
    let second = invite(&e, call_to("2"), &Fake::new(vec![])).await;
    let (status, reason) = rejected(&second);
    assert_eq!(status, 499, "{reason}");
    assert!(
        reason.starts_with("false|") && reason.contains("this call is over"),
        "{reason}"
    );
}

#[tokio::test]
async fn reject_with_a_bad_code_is_an_error() {
    let e = engine("function on_invite(call)\n  call:reject(200, \"OK\")\nend\n");
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    let err = failure(&out);
    assert!(
        err.contains("main.lua:2:") && err.contains("400-699"),
        "{err}"
    );
}

#[tokio::test]
async fn reject_decides_at_once_and_later_actions_are_errors() {
    let e = engine(
        r#"
        function on_invite(call)
          call:reject(404, "Gone fishing")
          local ok, err = pcall(call.dial, call, "sip:a@b")
          assert(not ok and err:find("call already rejected"), err)
          assert(not pcall(call.reject, call, 500))
        end
        "#,
    );
    let fake = Fake::new(vec![]);
    let out = invite(&e, call_to("1"), &fake).await;
    assert_eq!(rejected(&out), (404, "Gone fishing"));
    assert!(fake.targets().is_empty());
}

#[tokio::test]
async fn redirect_gives_contacts() {
    let e = engine(r#"function on_invite(call) call:redirect({ "sip:a@one", "sip:a@two" }) end"#);
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    match out {
        InviteOutcome::Redirected { contacts, .. } => {
            assert_eq!(contacts, vec!["sip:a@one", "sip:a@two"])
        }
        other => panic!("{other:?}"),
    }
    let e = engine(r#"function on_invite(call) call:redirect("sip:x@y") end"#);
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert!(
        matches!(out, InviteOutcome::Redirected { ref contacts, .. } if contacts == &["sip:x@y"])
    );
}

#[tokio::test]
async fn after_an_answer_further_actions_are_errors_but_the_call_stays_bridged() {
    let e = engine(
        r#"
        function on_invite(call)
          assert(call:dial("sip:a@b").answered)
          local ok, err = pcall(call.dial, call, "sip:c@d")
          assert(not ok and err:find("call already answered"), err)
          call:reject(486)   -- raises: the hook fails, but the call is already up
        end
        "#,
    );
    let fake = Fake::new(vec![]);
    let out = invite(&e, call_to("1"), &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    assert_eq!(fake.targets().len(), 1);
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 1);
}

#[tokio::test]
async fn no_on_invite_rejects_404() {
    let e = engine("-- nothing here\n");
    assert!(!e.current().has_on_invite());
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (404, "Not Found"));
}

#[tokio::test]
async fn returning_without_a_decision_rejects_480_or_the_last_dial_status() {
    let e = engine("function on_invite(call) end");
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (480, "Temporarily Unavailable"));

    let e = engine(
        r#"
        function on_invite(call)
          call:dial("sip:a@b")
          call:dial("sip:c@d")
        end
        "#,
    );
    let fake = Fake::new(vec![
        failed(503, "Service Unavailable"),
        failed(486, "Busy Here"),
    ]);
    let out = invite(&e, call_to("1"), &fake).await;
    assert_eq!(rejected(&out), (486, "Busy Here"));
}

#[tokio::test]
async fn lua_error_fails_the_call_with_file_and_line() {
    let e = engine(
        r#"function on_invite(call)
  local missing = nil
  return missing.field
end
"#,
    );
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    let err = failure(&out);
    assert!(err.contains("main.lua:3:"), "{err}");
    assert!(err.contains("attempt to index"), "{err}");
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 1);
    assert_eq!(stat(&e, |s| &s.hook_timeouts), 0);
    assert_eq!(stat(&e, |s| &s.memory_errors), 0);

    // error() with level 0 carries no position: the engine adds one.
    let e = engine("function on_invite(call)\n  error(\"plain\", 0)\nend\n");
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    let err = failure(&out);
    assert!(
        err.contains("main.lua:2:") && err.contains("plain"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
}

#[tokio::test]
async fn runaway_loop_exhausts_the_budget_and_the_vm_survives() {
    let (logs, _guard) = Logs::capture();
    let e = engine_pool(
        r#"
        function on_invite(call)
          if call.ruri.user == "loop" then
            while true do end
          end
          call:reject(486, "fine")
        end
        "#,
        1,
    );
    let out = invite(&e, call_to("loop"), &Fake::new(vec![])).await;
    let err = failure(&out);
    assert!(err.contains("instruction limit exceeded"), "{err}");
    assert!(err.contains("main.lua:4:"), "{err}");
    assert_eq!(stat(&e, |s| &s.hook_timeouts), 1);
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 1);
    assert!(logs.text().contains("instruction limit exceeded"));

    let out = invite(&e, call_to("next"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (486, "fine"));
}

#[tokio::test]
async fn pcall_cannot_swallow_an_exhausted_budget() {
    let e = engine_pool(
        r#"
        function on_invite(call)
          while true do
            pcall(function() while true do end end)
            coroutine.resume(coroutine.create(function() while true do end end))
          end
        end
        "#,
        1,
    );
    let started = Instant::now();
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert!(failure(&out).contains("instruction limit exceeded"));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn waiting_in_dial_costs_no_budget() {
    let path = write_script(
        r#"
        function on_invite(call)
          for i = 1, 20 do
            local n = 0
            for j = 1, 300 do n = n + j end   -- ~1500 instructions per round
            call:dial("sip:a@b")
          end
          call:reject(486)
        end
        "#,
    );
    let mut o = opts(&path, 1);
    o.instruction_limit = 100_000;
    let e = ScriptEngine::load(o).unwrap();
    let fake = Arc::new(Fake {
        outcomes: Mutex::new((0..20).map(|_| failed(480, "No")).collect()),
        delay: Duration::from_millis(5),
        ..Fake::default()
    });
    let out = invite(&e, call_to("1"), &fake).await;
    assert_eq!(rejected(&out), (486, "Busy Here"));
}

#[tokio::test]
async fn memory_bomb_fails_the_call_and_the_vm_survives() {
    let e = engine_pool(
        r#"
        function on_invite(call)
          if call.ruri.user == "bomb" then
            local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 1000) end
          end
          call:reject(486, "fine")
        end
        "#,
        1,
    );
    let out = invite(&e, call_to("bomb"), &Fake::new(vec![])).await;
    let err = failure(&out);
    assert!(err.contains("not enough memory"), "{err}");
    assert!(err.contains("main.lua:"), "{err}");
    assert_eq!(stat(&e, |s| &s.memory_errors), 1);
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 1);

    for _ in 0..3 {
        let out = invite(&e, call_to("next"), &Fake::new(vec![])).await;
        assert_eq!(rejected(&out), (486, "fine"));
    }
}

// ---------------------------------------------------------------- sandbox and modules

#[tokio::test]
async fn sandbox_removes_dangerous_functions() {
    let e = engine(
        r#"
        function on_invite(call)
          local problems = {}
          local function bad(what) problems[#problems + 1] = what end
          if os.execute ~= nil then bad("os.execute") end
          if os.exit ~= nil then bad("os.exit") end
          if os.getenv ~= nil then bad("os.getenv") end
          if os.remove ~= nil then bad("os.remove") end
          if os.rename ~= nil then bad("os.rename") end
          if os.tmpname ~= nil then bad("os.tmpname") end
          if io ~= nil then bad("io") end
          if package ~= nil then bad("package") end
          if debug ~= nil then bad("debug") end
          if dofile ~= nil then bad("dofile") end
          if loadfile ~= nil then bad("loadfile") end
          if string.dump ~= nil then bad("string.dump") end
          if pcall(require, "os") then bad("require os") end
          if pcall(require, "io") then bad("require io") end
          if pcall(require, "debug") then bad("require debug") end
          if pcall(require, "../main") then bad("require ..") end
          if pcall(collectgarbage, "stop") then bad("collectgarbage stop") end
          local f, err = load("\27Lua\84\0")
          if f ~= nil or not tostring(err):find("binary") then bad("binary load") end
          local ok = pcall(function() return io.open("/etc/passwd") end)
          if ok then bad("io.open") end
          -- what stays
          if type(os.time()) ~= "number" or type(os.clock()) ~= "number" then bad("os.time") end
          if type(os.date("%Y")) ~= "string" then bad("os.date") end
          if not (string.format and table.concat and math.floor and utf8.char
                  and coroutine.wrap) then bad("stdlib") end
          if load("return 1 + 1")() ~= 2 then bad("text load") end
          if require("string") ~= string then bad("require string") end
          if #problems > 0 then call:reject(500, table.concat(problems, ",")) end
          call:reject(499, "clean")
        end
        "#,
    );
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (499, "clean"));
}

#[tokio::test]
async fn require_loads_modules_from_the_script_dir_only() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::write(
        dir.join("routes.lua"),
        "local M = {}\nfunction M.target(n) return \"sip:\" .. n .. \"@pbx\" end\nreturn M\n",
    )
    .unwrap();
    std::fs::write(dir.join("lib/util.lua"), "return { answer = 42 }\n").unwrap();
    std::fs::write(
        dir.join("main.lua"),
        r#"
        local routes = require "routes"
        local util = require "lib.util"
        assert(require("routes") == routes, "modules are cached")
        function on_invite(call)
          local ok, err = pcall(require, "nope")
          assert(not ok and err:find("not found"), err)
          call:reject(499, routes.target(call.ruri.user) .. " " .. util.answer)
        end
        "#,
    )
    .unwrap();
    let e = ScriptEngine::load(opts(&dir.join("main.lua"), 1)).unwrap();
    let out = invite(&e, call_to("1000"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (499, "sip:1000@pbx 42"));
}

/// Issue 15: a link in the script's directory to a file outside it does not load (and
/// its text, which a syntax error would quote, is never read); a link inside is fine.
#[tokio::test]
async fn require_refuses_links_out_of_the_script_dir() {
    let dir = temp_dir();
    let outside = temp_dir();
    std::fs::write(outside.join("secret.lua"), "root:x:0:0 not lua at all\n").unwrap();
    std::fs::write(dir.join("real.lua"), "return 7\n").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.lua"), dir.join("secret.lua")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("out")).unwrap();
    std::os::unix::fs::symlink(dir.join("real.lua"), dir.join("alias.lua")).unwrap();
    std::fs::write(
        dir.join("main.lua"),
        r#"
        function on_invite(call)
          for _, m in ipairs({"secret", "out.secret"}) do
            local ok, err = pcall(require, m)
            assert(not ok, m)
            assert(err:find("leads out of the script's directory"), err)
            assert(not err:find("root:x"), "file text echoed: " .. err)
          end
          call:reject(499, "alias " .. require("alias"))
        end
        "#,
    )
    .unwrap();
    let e = ScriptEngine::load(opts(&dir.join("main.lua"), 1)).unwrap();
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (499, "alias 7"));
}

#[tokio::test]
async fn compile_errors_carry_file_and_line() {
    let path = write_script("function on_invite(call)\n  local x = = 1\nend\n");
    match ScriptEngine::load(opts(&path, 1)) {
        Err(ScriptError::Compile {
            file,
            line,
            message,
        }) => {
            assert!(file.ends_with("main.lua"), "{file}");
            assert_eq!(line, 2);
            assert!(message.contains("unexpected symbol"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ScriptEngine::check(&EngineOptions::new(&path)),
        Err(ScriptError::Compile { line: 2, .. })
    ));

    // ... also in a required module.
    let dir = path.parent().unwrap();
    std::fs::write(dir.join("broken.lua"), "return {\n\n  oops oops\n}\n").unwrap();
    std::fs::write(&path, "local b = require \"broken\"\n").unwrap();
    match ScriptEngine::check(&EngineOptions::new(&path)) {
        Err(ScriptError::Compile { file, line, .. }) => {
            assert!(file.ends_with("broken.lua"), "{file}");
            assert_eq!(line, 3);
        }
        other => panic!("{other:?}"),
    }

    // A failing top level is refused too, with its position.
    std::fs::write(&path, "local x = 1\nerror(\"bad config\")\n").unwrap();
    match ScriptEngine::check(&EngineOptions::new(&path)) {
        Err(e @ ScriptError::Init { line: Some(2), .. }) => {
            assert!(e.to_string().contains("main.lua:2: bad config"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // and so is a hook that is not a function, a missing file, and a runaway top level.
    std::fs::write(&path, "on_invite = 42\n").unwrap();
    assert!(matches!(
        ScriptEngine::check(&EngineOptions::new(&path)),
        Err(ScriptError::Init { .. })
    ));
    assert!(matches!(
        ScriptEngine::check(&EngineOptions::new(dir.join("absent.lua"))),
        Err(ScriptError::Io { .. })
    ));
    std::fs::write(&path, "while true do end\n").unwrap();
    let err = ScriptEngine::load(opts(&path, 1)).unwrap_err();
    assert!(
        err.to_string().contains("instruction limit exceeded"),
        "{err}"
    );
}

// ---------------------------------------------------------------- concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_hooks_wait_in_dial_concurrently() {
    let e = engine(
        r#"
        function on_invite(call)
          local r = call:dial("sip:" .. call.ruri.user .. "@far")
          call.vars.done = r.answered
        end
        "#,
    );
    let fake = Arc::new(Fake {
        delay: Duration::from_millis(300),
        ..Fake::default()
    });
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..50 {
        let version = e.current();
        let fake: Arc<dyn CallControl> = fake.clone();
        set.spawn(async move { version.on_invite(call_to(&i.to_string()), fake).await });
    }
    let mut bridged = 0;
    while let Some(out) = set.join_next().await {
        if matches!(out.unwrap(), InviteOutcome::Bridged { .. }) {
            bridged += 1;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(bridged, 50);
    assert_eq!(
        fake.peak.load(Ordering::SeqCst),
        50,
        "all 50 dials were in flight at once"
    );
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}

// ---------------------------------------------------------------- on_call_end and reload

#[tokio::test]
async fn vars_survive_from_on_invite_to_on_call_end() {
    let (logs, _guard) = Logs::capture();
    let e = engine(
        r#"
        function on_invite(call)
          call.vars.route = "desk"
          call.vars.tries = 1
          call:dial("sip:desk@pbx")
        end
        function on_call_end(call, record)
          log.info("end", call.id, call.vars.route, call.vars.tries, record.hangup_by,
                   record.final_status, record.duration, record.ends - record.start,
                   tostring(record.answer ~= nil))
          local ok, err = pcall(call.dial, call, "sip:x@y")
          log.info("dial after end:", ok, err)
        end
        "#,
    );
    let fake = Fake::new(vec![]);
    let out = invite(&e, call_to("7"), &fake).await;
    let version = e.current();
    version.on_call_end(out.into_handle(), record(true)).await;
    let text = logs.text();
    assert!(
        text.contains("end\tcall-7\tdesk\t1\tcallee\t200\t60.0\t65.0\ttrue"),
        "{text}"
    );
    assert!(text.contains("the call has ended"), "{text}");
    assert!(
        text.contains("target=\"script\"") || text.contains("script:"),
        "{text}"
    );

    // Never answered: record.answer is nil, duration 0.
    let e = engine(
        r#"
        function on_invite(call) call:reject(486) end
        function on_call_end(call, record)
          log.warn("unanswered", tostring(record.answer), record.duration)
        end
        "#,
    );
    let out = invite(&e, call_to("8"), &fake).await;
    e.current()
        .on_call_end(out.into_handle(), record(false))
        .await;
    assert!(
        logs.text().contains("unanswered\tnil\t0.0"),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn on_call_end_is_optional_and_its_errors_are_counted() {
    let e = engine("function on_invite(call) call:reject(486) end");
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    e.current()
        .on_call_end(out.into_handle(), record(false))
        .await;
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 0);

    let e = engine(
        "function on_invite(call) call:reject(486) end\nfunction on_call_end(call, r)\n  error(\"cdr\")\nend\n",
    );
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    e.current()
        .on_call_end(out.into_handle(), record(false))
        .await;
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 1);
}

#[tokio::test]
async fn reload_swaps_new_calls_and_old_calls_finish_on_their_version() {
    let (logs, _guard) = Logs::capture();
    let path = write_script(
        r#"
        function on_invite(call)
          call.vars.v = "one"
          call:dial("sip:old@pbx")
        end
        function on_call_end(call) log.info("end on v1", call.id, call.vars.v) end
        "#,
    );
    let e = ScriptEngine::load(opts(&path, 2)).unwrap();
    assert_eq!(e.current().version(), 1);

    // Call A starts on v1 and waits in its dial.
    let gate = Arc::new(Semaphore::new(0));
    let slow = Arc::new(Fake {
        gate: Some(gate.clone()),
        ..Fake::default()
    });
    let v1 = e.current();
    let slow_ctl: Arc<dyn CallControl> = slow.clone();
    let a = tokio::spawn(async move { v1.on_invite(call_to("a"), slow_ctl).await });
    while slow.targets().is_empty() {
        tokio::task::yield_now().await;
    }

    std::fs::write(
        &path,
        r#"
        function on_invite(call) call:reject(486, "version two") end
        function on_call_end(call) log.info("end on v2", call.id) end
        "#,
    )
    .unwrap();
    e.reload().await.unwrap();
    assert_eq!(e.current().version(), 2);
    assert_eq!(stat(&e, |s| &s.reloads_ok), 1);

    // New calls see v2.
    let out = invite(&e, call_to("b"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (486, "version two"));
    assert_eq!(out.handle().version(), 2);
    e.current()
        .on_call_end(out.into_handle(), record(false))
        .await;

    // A finishes on v1, through the *current* version's on_call_end entry point.
    gate.add_permits(1);
    let out_a = a.await.unwrap();
    assert!(matches!(out_a, InviteOutcome::Bridged { .. }), "{out_a:?}");
    assert_eq!(out_a.handle().version(), 1);
    assert_eq!(slow.targets(), vec![vec!["sip:old@pbx".to_string()]]);
    e.current()
        .on_call_end(out_a.into_handle(), record(true))
        .await;

    let text = logs.text();
    assert!(text.contains("end on v1\tcall-a\tone"), "{text}");
    assert!(text.contains("end on v2\tcall-b"), "{text}");
}

#[tokio::test]
async fn reload_with_a_syntax_error_is_refused_and_the_old_version_serves() {
    let path = write_script(r#"function on_invite(call) call:reject(486, "v1") end"#);
    let e = ScriptEngine::load(opts(&path, 1)).unwrap();
    std::fs::write(
        &path,
        "function on_invite(call)\n\n  call:reject(486, \"v2\"\n",
    )
    .unwrap();
    match e.reload().await {
        Err(ScriptError::Compile { file, line, .. }) => {
            assert!(file.ends_with("main.lua"), "{file}");
            assert!(line >= 3, "{line}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stat(&e, |s| &s.reloads_failed), 1);
    assert_eq!(e.current().version(), 1);
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (486, "v1"));
}

/// Issue 15: an empty script (an editor's save caught half-way) or one without
/// `on_invite` is refused at reload while the running one has it; the old one serves.
#[tokio::test]
async fn reload_of_a_script_without_on_invite_is_refused() {
    let path = write_script(r#"function on_invite(call) call:reject(486, "v1") end"#);
    let e = ScriptEngine::load(opts(&path, 1)).unwrap();
    for text in ["", "function on_register(req) end\n"] {
        std::fs::write(&path, text).unwrap();
        match e.reload().await {
            Err(ScriptError::Init { message, .. }) => {
                assert!(message.contains("defines no on_invite"), "{message}")
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    assert_eq!(stat(&e, |s| &s.reloads_failed), 2);
    assert_eq!(e.current().version(), 1);
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (486, "v1"));
}

/// on_register's req: the plain fields, and each header's first value by any case of
/// its name.
#[tokio::test]
async fn on_register_sees_the_fields_and_first_header_values() {
    let e = engine(
        r#"
        function on_invite(call) end
        function on_register(req)
          req:reject(499, table.concat({ req.user, req.aor, req.source, tostring(req.user_agent),
            tostring(req.contact), req:header("X-Tag"), req:header("x-tag"),
            tostring(req:header("X-None")) }, " "))
        end
        "#,
    );
    let info = RegisterInfo {
        user: "1001".into(),
        aor: "sip:1001@example.com".into(),
        source: "udp:127.0.0.1:5070".into(),
        user_agent: Some("phone/1".into()),
        contact: None,
        headers: vec![
            ("x-tag".into(), "first".into()),
            ("via".into(), "SIP/2.0/UDP 127.0.0.1:5070".into()),
            ("x-tag".into(), "second".into()),
        ],
    };
    assert_eq!(
        e.current().on_register(&info).await,
        RegisterVerdict::Reject(
            499,
            "1001 sip:1001@example.com udp:127.0.0.1:5070 phone/1 nil first first nil".into()
        )
    );
}

// ---------------------------------------------------------------- the shipped dial plan

fn default_lua() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua")
}

#[tokio::test]
async fn default_lua_routes_extensions_trunks_and_unknown_numbers() {
    ScriptEngine::check(&EngineOptions::new(default_lua())).unwrap();
    let e = ScriptEngine::load(opts(&default_lua(), 2)).unwrap();

    // An extension.
    let fake = Fake::new(vec![]);
    let out = invite(&e, call_to("1000"), &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    assert_eq!(
        fake.targets(),
        vec![vec!["sip:1000@127.0.0.1:5080".to_string()]]
    );
    e.current()
        .on_call_end(out.into_handle(), record(true))
        .await;

    // An extension that is busy: the caller hears busy.
    let fake = Fake::new(vec![failed(486, "Busy Here")]);
    let out = invite(&e, call_to("1001"), &fake).await;
    assert_eq!(rejected(&out), (486, "Busy Here"));

    // 9 + number: the first trunk fails, the backup answers.
    let fake = Fake::new(vec![failed(503, "Service Unavailable"), answered()]);
    let out = invite(&e, call_to("9555"), &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    assert_eq!(
        fake.targets(),
        vec![
            vec!["555 via trunk carrier".to_string()],
            vec!["555 via trunk backup".to_string()]
        ]
    );
    e.current()
        .on_call_end(out.into_handle(), record(true))
        .await;

    // Busy on the first trunk: no failover.
    let fake = Fake::new(vec![failed(486, "Busy Here")]);
    let out = invite(&e, call_to("9555"), &fake).await;
    assert_eq!(rejected(&out), (486, "Busy Here"));
    assert_eq!(fake.targets().len(), 1);

    // The caller hangs up while the first trunk rings: no failover.
    let fake = Fake::new(vec![DialOutcome::failed(
        487,
        "Request Terminated",
        DialSource::Caller,
    )]);
    let out = invite(&e, call_to("9555"), &fake).await;
    assert_eq!(rejected(&out).0, 487);
    assert_eq!(fake.targets().len(), 1);

    // The first trunk's ring timeout: the backup is tried.
    let fake = Fake::new(vec![
        DialOutcome::failed(480, "No Answer", DialSource::Timeout),
        answered(),
    ]);
    let out = invite(&e, call_to("9555"), &fake).await;
    assert!(matches!(out, InviteOutcome::Bridged { .. }), "{out:?}");
    assert_eq!(fake.targets().len(), 2);
    e.current()
        .on_call_end(out.into_handle(), record(true))
        .await;

    // Both trunks fail: the caller gets the last status.
    let fake = Fake::new(vec![
        failed(503, "Service Unavailable"),
        failed(408, "Request Timeout"),
    ]);
    let out = invite(&e, call_to("9555"), &fake).await;
    assert_eq!(rejected(&out), (408, "Request Timeout"));

    // Unknown.
    let fake = Fake::new(vec![]);
    let out = invite(&e, call_to("7777"), &fake).await;
    assert_eq!(rejected(&out), (404, "No such extension"));
    assert!(fake.targets().is_empty());
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 0);
}

// ---------------------------------------------------------------- the documentation

/// The ```lua blocks of docs/lua-api.md: (first line, code).
fn api_md_blocks() -> Vec<String> {
    let md = include_str!("../../docs/lua-api.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        match &mut current {
            None if line.trim_start().starts_with("```lua") => current = Some(String::new()),
            Some(code) if line.trim_start().starts_with("```") => {
                blocks.push(std::mem::take(code));
                current = None;
            }
            Some(code) => {
                code.push_str(line);
                code.push('\n');
            }
            None => {}
        }
    }
    assert!(
        current.is_none(),
        "unterminated ```lua block in docs/lua-api.md"
    );
    blocks
}

#[test]
fn every_lua_example_in_api_md_loads() {
    let blocks = api_md_blocks();
    assert!(blocks.len() >= 5, "docs/lua-api.md should have examples");
    let dir = temp_dir();
    // Blocks starting with `-- file: name.lua` are modules the others may require.
    let (modules, scripts): (Vec<_>, Vec<_>) = blocks
        .iter()
        .partition(|b| b.trim_start().starts_with("-- file:"));
    for m in &modules {
        let name = m.trim_start()["-- file:".len()..]
            .lines()
            .next()
            .unwrap()
            .trim();
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, m).unwrap();
    }
    for (i, code) in scripts.iter().enumerate() {
        let path = dir.join(format!("example{i}.lua"));
        std::fs::write(&path, code).unwrap();
        if let Err(e) = ScriptEngine::check(&EngineOptions::new(&path)) {
            panic!("docs/lua-api.md example {i} does not load: {e}\n{code}");
        }
    }
}

#[tokio::test]
async fn coroutines_created_by_the_script_are_budgeted_too() {
    let e = engine_pool(
        "function on_invite(call)\n  local f = coroutine.wrap(function()\n    while true do end\n  end)\n  f()\nend\n",
        1,
    );
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    let err = failure(&out);
    assert!(
        err.contains("main.lua:3:") && err.contains("instruction limit exceeded"),
        "{err}"
    );
}

#[tokio::test]
async fn non_string_errors_are_one_line_with_a_position() {
    let e = engine("function on_invite(call)\n  local t = {}\n  error(t)\nend\n");
    let out = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    let err = failure(&out);
    assert!(!err.contains('\n'), "{err}");
    assert!(err.contains("main.lua:3:"), "{err}");
}

#[tokio::test]
async fn finished_calls_do_not_leak_lua_memory() {
    let e = engine_pool(
        r#"
        function on_invite(call)
          call.vars.blob = string.rep("x", 10000)
          collectgarbage()
          call:reject(499, tostring(collectgarbage("count")))
        end
        function on_call_end(call, record) end
        "#,
        1,
    );
    let fake = Fake::new(vec![]);
    let mut kib = Vec::new();
    for i in 0..500 {
        let out = invite(&e, call_to(&i.to_string()), &fake).await;
        kib.push(rejected(&out).1.parse::<f64>().unwrap());
        if i % 2 == 0 {
            e.current()
                .on_call_end(out.into_handle(), record(false))
                .await;
        } // else: the handle is just dropped
    }
    // 500 calls keeping 10 kB each would be 5 MB.
    assert!(
        kib[499] - kib[10] < 200.0,
        "grew from {} to {} KiB",
        kib[10],
        kib[499]
    );
}

#[tokio::test]
async fn dial_from_a_script_coroutine_is_refused() {
    let e = engine(
        "function on_invite(call)\n  local co = coroutine.wrap(function() return call:dial(\"sip:a@b\") end)\n  co()\nend\n",
    );
    let fake = Fake::new(vec![]);
    let out = invite(&e, call_to("1"), &fake).await;
    let err = failure(&out);
    assert!(
        err.contains("main.lua:") && err.contains("own hook"),
        "{err}"
    );
    assert!(fake.targets().is_empty());
}

#[tokio::test]
async fn a_hook_dropped_while_dialing_leaves_the_vm_usable() {
    let e = engine_pool(
        r#"
        local closed = 0
        function on_invite(call)
          if call.ruri.user == "slow" then
            local guard <close> = setmetatable({}, { __close = function() closed = closed + 1 end })
            call:dial("sip:a@b")
          end
          call:reject(486, "fine " .. closed)
        end
        "#,
        1,
    );
    let gate = Arc::new(Semaphore::new(0));
    let slow = Arc::new(Fake {
        gate: Some(gate.clone()),
        ..Fake::default()
    });
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        invite(&e, call_to("slow"), &slow),
    )
    .await;
    assert!(abandoned.is_err(), "the dial never completes");
    assert_eq!(slow.targets().len(), 1);
    assert_eq!(slow.in_flight.load(Ordering::SeqCst), 1);
    // The dial's future is dropped with the hook (on the VM's thread, so soon rather than
    // at once): the gate is then held only by this test and the fake.
    for _ in 0..200 {
        if Arc::strong_count(&gate) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(Arc::strong_count(&gate), 2, "the dial's future was dropped");
    gate.add_permits(1);
    tokio::task::yield_now().await;
    assert_eq!(gate.available_permits(), 1);
    // The hook's coroutine was closed, not left to the collector: its to-be-closed
    // variable ran.
    let out = invite(&e, call_to("next"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&out), (486, "fine 1"));
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 0);
}

#[tokio::test]
async fn a_hook_cannot_yield_its_own_coroutine() {
    let e = engine(
        "function on_invite(call)\n  coroutine.yield(1)\n  call:reject(486, \"never\")\nend\n",
    );
    let fake = Fake::new(vec![]);
    let out = invite(&e, call_to("1"), &fake).await;
    let err = failure(&out);
    assert!(
        err.contains("main.lua:") && err.contains("coroutine.yield"),
        "{err}"
    );
    assert_eq!(stat(&e, |s| &s.hook_errors_total), 1);
    // The VM goes on; a coroutine the script made may still yield.
    let e2 = engine(
        "function on_invite(call)\n  local co = coroutine.wrap(function() coroutine.yield(7) end)\n  call:reject(480 + co(), \"x\")\nend\n",
    );
    let out = invite(&e2, call_to("1"), &fake).await;
    assert_eq!(rejected(&out), (487, "x"));
}

#[tokio::test]
async fn calls_are_spread_over_the_pool_and_end_on_their_own_vm() {
    let (logs, _guard) = Logs::capture();
    let e = engine_pool(
        r#"
        local vm_id = tostring({})   -- different in every VM of the pool
        function on_invite(call)
          call.vars.vm = vm_id
          call:reject(499, vm_id)
        end
        function on_call_end(call)
          print("same vm:", call.vars.vm == vm_id)
        end
        "#,
        2,
    );
    let fake = Fake::new(vec![]);
    let mut outs = Vec::new();
    for i in 0..4 {
        outs.push(invite(&e, call_to(&i.to_string()), &fake).await);
    }
    let vms: std::collections::HashSet<_> = outs.iter().map(|o| rejected(o).1.to_owned()).collect();
    assert_eq!(vms.len(), 2, "round robin over both VMs");
    for out in outs.into_iter().rev() {
        e.current()
            .on_call_end(out.into_handle(), record(false))
            .await;
    }
    let text = logs.text();
    assert_eq!(text.matches("same vm:\ttrue").count(), 4, "{text}");
}

/// A `call` kept in a global past its hooks (issue 14: the userdata holds the call's state
/// weakly) gives a clear error when used from another call's hook, not the old call's state.
#[tokio::test]
async fn a_call_kept_past_its_hooks_is_over() {
    let e = engine_pool(
        r#"
        local kept
        function on_invite(call)
          if kept == nil then
            kept = call
            call:reject(486)
            return
          end
          local ok, err = pcall(kept.reject, kept, 404)
          assert(not ok and tostring(err):find("this call is over"), tostring(err))
          call:reject(403, "checked")
        end
        "#,
        1,
    );
    let first = invite(&e, call_to("1"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&first).0, 486);
    drop(first);
    let second = invite(&e, call_to("2"), &Fake::new(vec![])).await;
    assert_eq!(rejected(&second), (403, "checked"));
}

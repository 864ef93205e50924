//! The Lua side of presence and messaging: `on_message(req)` (page-mode MESSAGE, RFC
//! 3428) and `on_subscribe(req)` (SUBSCRIBE to presence, dialog or message-summary, RFC
//! 6665). Both run synchronously, like `on_register`: they have nothing to wait for.
//!
//! `req` is a plain table: `req.from`, `req.to`, `req.ruri` (URI strings), `req.user` (the
//! Request-URI's user or nil), `req.source` (`"udp:1.2.3.4:5060"`), `req:header(name)`,
//! `req:reject(code, reason)`; for MESSAGE also `req.content_type`, `req.body` and
//! `req:route(target_or_targets)` (deliver there instead of the registered contacts); for
//! SUBSCRIBE `req.package` (`"presence"`, `"dialog"`, `"message-summary"`), `req.resource`
//! (the watched `sip:user@domain`), `req.subscriber` (the From URI), `req.expires` (nil when
//! the SUBSCRIBE has none) and `req:route(uri)` (the subscription is served by that server,
//! relayed through us). Returning without a verdict accepts (default routing for
//! MESSAGE). An error, budget or memory failure answers 500, counted like every hook.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mlua::{Function, Lua, Table, Value};
use parking_lot::Mutex;

use super::call::{parse_reject, report, string_list};
use super::ScriptVersion;

/// What `on_message(req)` sees of a MESSAGE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageInfo {
    pub from: String,
    pub to: String,
    pub ruri: String,
    pub user: Option<String>,
    pub source: String,
    pub content_type: Option<String>,
    pub body: String,
    /// Headers (lower-case name, value) in order; `req:header` gives the first.
    pub headers: Vec<(String, String)>,
}

/// What `on_message` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageVerdict {
    /// No hook, or no verdict: to the recipient's registered contacts.
    Default,
    Reject(u16, String),
    /// `req:route(targets)`: to these URIs (all at once; the first 2xx wins).
    Route(Vec<String>),
    /// The hook failed: answer 500. Text with file:line.
    Failed(String),
}

/// What `on_subscribe(req)` sees of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscribeInfo {
    pub package: String,
    pub resource: String,
    pub subscriber: String,
    pub user: Option<String>,
    pub source: String,
    pub expires: Option<u32>,
    pub headers: Vec<(String, String)>,
}

/// What `on_subscribe` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeVerdict {
    /// No hook, or no verdict: the subscription is accepted.
    Default,
    Reject(u16, String),
    /// `req:route(uri)`: the subscription is served by that server (e.g. a voicemail
    /// server's message-summary); the server relays it as a B2BUA.
    Route(String),
    Failed(String),
}

/// A hook verdict set by `req:reject` / `req:route` (one target for a subscription).
enum Said {
    Reject(u16, String),
    Route(Vec<String>),
}

/// The common part of a `req` table: fields, `header`, `reject`.
fn base_req(
    lua: &Lua,
    headers: &[(String, String)],
    said: &Arc<Mutex<Option<Said>>>,
) -> mlua::Result<Table> {
    let req = lua.create_table()?;
    let mut first: HashMap<String, String> = HashMap::new();
    for (n, v) in headers {
        first.entry(n.clone()).or_insert_with(|| v.clone());
    }
    req.raw_set(
        "header",
        lua.create_function(move |_, (_this, name): (Value, String)| {
            Ok(first.get(&name.to_ascii_lowercase()).cloned())
        })?,
    )?;
    let s = said.clone();
    req.raw_set(
        "reject",
        lua.create_function(move |_, (_this, code, reason): (Value, Value, Value)| {
            let (code, reason) = parse_reject(&code, &reason)
                .map_err(|e| mlua::Error::runtime(e.replace("call:reject", "req:reject")))?;
            *s.lock() = Some(Said::Reject(code, reason));
            Ok(())
        })?,
    )?;
    Ok(req)
}

fn pick(version: &ScriptVersion) -> Arc<super::vm::Vm> {
    let idx = version.next.fetch_add(1, Ordering::Relaxed) % version.vms.len();
    version.vms[idx].clone()
}

/// Runs `hook(req)` with `req` built by `build`, under a fresh budget.
fn run(
    version: &ScriptVersion,
    vm: &super::vm::Vm,
    hook: &Function,
    name: &str,
    id: &str,
    pos: &str,
    build: impl FnOnce(&Lua) -> mlua::Result<Table>,
) -> Result<(), String> {
    let budget = vm.budget();
    let result = vm.enter(&budget, || -> mlua::Result<()> {
        let req = build(&vm.lua)?;
        hook.call::<()>(req)
    });
    result.map_err(|e| report(version, vm, name, id, &e, &budget, pos))
}

impl ScriptVersion {
    /// Whether the script defines `on_message`.
    pub fn has_on_message(&self) -> bool {
        self.vms[0].on_message.is_some()
    }

    /// Whether the script defines `on_subscribe`.
    pub fn has_on_subscribe(&self) -> bool {
        self.vms[0].on_subscribe.is_some()
    }

    /// Runs `on_message(req)` on the next VM.
    pub fn on_message(&self, info: &MessageInfo) -> MessageVerdict {
        let vm = pick(self);
        let Some(hook) = vm.on_message.clone() else {
            return MessageVerdict::Default;
        };
        let said = Arc::new(Mutex::new(None));
        let result = run(
            self,
            &vm,
            &hook,
            "on_message",
            &info.ruri,
            &vm.on_message_pos,
            |lua| {
                let req = base_req(lua, &info.headers, &said)?;
                req.raw_set("from", info.from.as_str())?;
                req.raw_set("to", info.to.as_str())?;
                req.raw_set("ruri", info.ruri.as_str())?;
                req.raw_set("user", info.user.as_deref())?;
                req.raw_set("source", info.source.as_str())?;
                req.raw_set("content_type", info.content_type.as_deref())?;
                req.raw_set("body", info.body.as_str())?;
                let s = said.clone();
                req.raw_set(
                    "route",
                    lua.create_function(move |_, (_this, targets): (Value, Value)| {
                        let list = string_list(&targets, "req:route", "target")
                            .map_err(mlua::Error::runtime)?;
                        *s.lock() = Some(Said::Route(list));
                        Ok(())
                    })?,
                )?;
                Ok(req)
            },
        );
        if let Err(msg) = result {
            return MessageVerdict::Failed(msg);
        }
        let verdict = said.lock().take();
        match verdict {
            None => MessageVerdict::Default,
            Some(Said::Reject(c, r)) => MessageVerdict::Reject(c, r),
            Some(Said::Route(t)) => MessageVerdict::Route(t),
        }
    }

    /// Runs `on_subscribe(req)` on the next VM.
    pub fn on_subscribe(&self, info: &SubscribeInfo) -> SubscribeVerdict {
        let vm = pick(self);
        let Some(hook) = vm.on_subscribe.clone() else {
            return SubscribeVerdict::Default;
        };
        let said = Arc::new(Mutex::new(None));
        let result = run(
            self,
            &vm,
            &hook,
            "on_subscribe",
            &info.resource,
            &vm.on_subscribe_pos,
            |lua| {
                let req = base_req(lua, &info.headers, &said)?;
                req.raw_set("package", info.package.as_str())?;
                req.raw_set("resource", info.resource.as_str())?;
                req.raw_set("subscriber", info.subscriber.as_str())?;
                req.raw_set("from", info.subscriber.as_str())?;
                req.raw_set("user", info.user.as_deref())?;
                req.raw_set("source", info.source.as_str())?;
                req.raw_set("expires", info.expires)?;
                let s = said.clone();
                req.raw_set(
                    "route",
                    lua.create_function(move |_, (_this, target): (Value, Value)| {
                        let mut list = string_list(&target, "req:route", "target")
                            .map_err(mlua::Error::runtime)?;
                        if list.len() != 1 {
                            return Err(mlua::Error::runtime(
                                "req:route: a subscription goes to one server (a string)",
                            ));
                        }
                        *s.lock() = Some(Said::Route(vec![list.remove(0)]));
                        Ok(())
                    })?,
                )?;
                Ok(req)
            },
        );
        if let Err(msg) = result {
            return SubscribeVerdict::Failed(msg);
        }
        let verdict = said.lock().take();
        match verdict {
            Some(Said::Reject(c, r)) => SubscribeVerdict::Reject(c, r),
            Some(Said::Route(mut t)) => match t.pop() {
                Some(target) => SubscribeVerdict::Route(target),
                None => SubscribeVerdict::Default,
            },
            None => SubscribeVerdict::Default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::{EngineOptions, ScriptEngine};

    fn engine(src: &str) -> ScriptEngine {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.lua");
        std::fs::write(&path, src).unwrap();
        let mut opts = EngineOptions::new(&path);
        opts.pool_size = 1;
        let e = ScriptEngine::load(opts).unwrap();
        std::mem::forget(dir);
        e
    }

    fn msg(user: &str, body: &str) -> MessageInfo {
        MessageInfo {
            from: "sip:alice@x".into(),
            to: format!("sip:{user}@x"),
            ruri: format!("sip:{user}@x"),
            user: Some(user.into()),
            source: "udp:127.0.0.1:5070".into(),
            content_type: Some("text/plain".into()),
            body: body.into(),
            headers: vec![("subject".into(), "hi".into())],
        }
    }

    #[test]
    fn on_message_rejects_routes_or_defaults() {
        let e = engine(
            r#"
function on_message(req)
  if req.body:find("spam") then return req:reject(403, "No spam") end
  if req.user == "vm" then return req:route({ "sip:vm@10.0.0.30", "sip:vm2@10.0.0.31" }) end
  assert(req:header("Subject") == "hi")
end
"#,
        );
        let v = e.current();
        assert!(v.has_on_message());
        assert!(!v.has_on_subscribe());
        assert_eq!(
            v.on_message(&msg("bob", "buy spam")),
            MessageVerdict::Reject(403, "No spam".into())
        );
        assert_eq!(
            v.on_message(&msg("vm", "x")),
            MessageVerdict::Route(vec!["sip:vm@10.0.0.30".into(), "sip:vm2@10.0.0.31".into()])
        );
        assert_eq!(v.on_message(&msg("bob", "hello")), MessageVerdict::Default);
    }

    #[test]
    fn on_subscribe_refuses_and_failures_are_500() {
        let e = engine(
            r#"
function on_subscribe(req)
  if req.package == "dialog" and req.subscriber ~= "sip:boss@x" then
    return req:reject(403, "Not your lamp")
  end
  if req.resource == "sip:broken@x" then error("boom") end
  if req.resource == "sip:bad@x" then req:reject(200) end
  if req.package == "message-summary" then return req:route("sip:vm@10.0.0.30") end
end
"#,
        );
        let v = e.current();
        let info = |package: &str, resource: &str, subscriber: &str| SubscribeInfo {
            package: package.into(),
            resource: resource.into(),
            subscriber: subscriber.into(),
            user: None,
            source: "udp:127.0.0.1:1".into(),
            expires: Some(60),
            headers: vec![],
        };
        assert_eq!(
            v.on_subscribe(&info("dialog", "sip:1001@x", "sip:eve@x")),
            SubscribeVerdict::Reject(403, "Not your lamp".into())
        );
        assert_eq!(
            v.on_subscribe(&info("dialog", "sip:1001@x", "sip:boss@x")),
            SubscribeVerdict::Default
        );
        assert!(matches!(
            v.on_subscribe(&info("presence", "sip:broken@x", "sip:a@x")),
            SubscribeVerdict::Failed(m) if m.contains("boom")
        ));
        assert_eq!(
            v.on_subscribe(&info("message-summary", "sip:1001@x", "sip:a@x")),
            SubscribeVerdict::Route("sip:vm@10.0.0.30".into())
        );
        assert!(matches!(
            v.on_subscribe(&info("presence", "sip:bad@x", "sip:a@x")),
            SubscribeVerdict::Failed(m) if m.contains("req:reject")
        ));
    }
}

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
use std::ffi::CStr;
use std::sync::Arc;

use mlua::{Lua, Table, Value};
use parking_lot::Mutex;

use super::call::{parse_reject, string_list};
use super::hooks::{self, Hook, HookFuture};
use super::record::{record, Field};
use super::{bounded, ScriptVersion};
use super::{MessageInfo, MessageVerdict, SubscribeInfo, SubscribeVerdict};

/// A hook verdict set by `req:reject` / `req:route` (one target for a subscription).
enum Said {
    Reject(u16, String),
    Route(Vec<String>),
}

/// The common part of a `req` table: fields, `header`, `reject`.
/// `req:route(...)` of `on_message` takes one target or several (forked); that of
/// `on_subscribe` one server.
#[derive(Clone, Copy)]
enum RouteTargets {
    Several,
    One,
}

fn base_req(
    lua: &Lua,
    fields: &[(&CStr, Option<Field<'_>>)],
    headers: &[(String, String)],
    said: &Arc<Mutex<Option<Said>>>,
    targets: RouteTargets,
) -> mlua::Result<Table> {
    // The plain fields in one protected call (`record`), not one or more each.
    let req = record(lua, fields)?;
    let mut first: HashMap<String, String> = HashMap::new();
    for (n, v) in headers {
        first
            .entry(n.clone())
            .or_insert_with(|| bounded(v).to_owned());
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
    let s = said.clone();
    req.raw_set(
        "route",
        lua.create_function(move |_, (_this, targets_given): (Value, Value)| {
            let list =
                string_list(&targets_given, "req:route", "target").map_err(mlua::Error::runtime)?;
            if matches!(targets, RouteTargets::One) && list.len() != 1 {
                return Err(mlua::Error::runtime(
                    "req:route: a subscription goes to one server (a string)",
                ));
            }
            *s.lock() = Some(Said::Route(list));
            Ok(())
        })?,
    )?;
    Ok(req)
}

/// Runs `hook(req)` with `req` built by `build` on the next VM; the verdict the hook
/// said with `req:reject` / `req:route`, or the failure text.
async fn run(
    version: &ScriptVersion,
    hook: Hook,
    id: &str,
    build: impl FnOnce(&Lua, &Arc<Mutex<Option<Said>>>) -> mlua::Result<Table> + Send + 'static,
) -> Result<Option<Said>, String> {
    let Some(vm) = version.pick() else {
        return Err(super::call::no_vm(hook, version));
    };
    hooks::run(&version.run, &vm, hook, id, move |vm, _| {
        let said = Arc::new(Mutex::new(None));
        let req = build(&vm.lua, &said)?;
        let runner = vm.runner(hook).expect("checked by the caller");
        runner.call::<()>(req)?;
        let verdict = said.lock().take();
        Ok(Box::pin(std::future::ready(Ok(verdict))) as HookFuture<Option<Said>>)
    })
    .await
}

impl ScriptVersion {
    /// Whether the script defines `on_message`.
    pub fn has_on_message(&self) -> bool {
        self.info.has(Hook::Message)
    }

    /// Whether the script defines `on_subscribe`.
    pub fn has_on_subscribe(&self) -> bool {
        self.info.has(Hook::Subscribe)
    }

    /// Runs `on_message(req)` on the next VM.
    pub async fn on_message(&self, info: &MessageInfo) -> MessageVerdict {
        if !self.has_on_message() {
            return MessageVerdict::Default;
        }
        let info2 = info.clone();
        let result = run(self, Hook::Message, &info.ruri, move |lua, said| {
            let info = info2;
            base_req(
                lua,
                &[
                    (c"from", Some(Field::Str(&info.from))),
                    (c"to", Some(Field::Str(&info.to))),
                    (c"ruri", Some(Field::Str(&info.ruri))),
                    (c"user", info.user.as_deref().map(Field::Str)),
                    (c"source", Some(Field::Str(&info.source))),
                    (
                        c"content_type",
                        info.content_type.as_deref().map(|c| Field::Str(bounded(c))),
                    ),
                    (c"body", Some(Field::Str(&info.body))),
                ],
                &info.headers,
                said,
                RouteTargets::Several,
            )
        })
        .await;
        match result {
            Err(msg) => MessageVerdict::Failed(msg),
            Ok(None) => MessageVerdict::Default,
            Ok(Some(Said::Reject(c, r))) => MessageVerdict::Reject(c, r),
            Ok(Some(Said::Route(t))) => MessageVerdict::Route(t),
        }
    }

    /// Runs `on_subscribe(req)` on the next VM.
    pub async fn on_subscribe(&self, info: &SubscribeInfo) -> SubscribeVerdict {
        if !self.has_on_subscribe() {
            return SubscribeVerdict::Default;
        }
        let info2 = info.clone();
        let result = run(self, Hook::Subscribe, &info.resource, move |lua, said| {
            let info = info2;
            base_req(
                lua,
                &[
                    (c"package", Some(Field::Str(&info.package))),
                    (c"resource", Some(Field::Str(&info.resource))),
                    (c"subscriber", Some(Field::Str(&info.subscriber))),
                    (c"from", Some(Field::Str(&info.subscriber))),
                    (c"user", info.user.as_deref().map(Field::Str)),
                    (c"source", Some(Field::Str(&info.source))),
                    (c"expires", info.expires.map(|e| Field::Int(i64::from(e)))),
                ],
                &info.headers,
                said,
                RouteTargets::One,
            )
        })
        .await;
        match result {
            Err(msg) => SubscribeVerdict::Failed(msg),
            Ok(Some(Said::Reject(c, r))) => SubscribeVerdict::Reject(c, r),
            Ok(Some(Said::Route(mut t))) => match t.pop() {
                Some(target) => SubscribeVerdict::Route(target),
                None => SubscribeVerdict::Default,
            },
            Ok(None) => SubscribeVerdict::Default,
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

    #[tokio::test]
    async fn on_message_rejects_routes_or_defaults() {
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
            v.on_message(&msg("bob", "buy spam")).await,
            MessageVerdict::Reject(403, "No spam".into())
        );
        assert_eq!(
            v.on_message(&msg("vm", "x")).await,
            MessageVerdict::Route(vec!["sip:vm@10.0.0.30".into(), "sip:vm2@10.0.0.31".into()])
        );
        assert_eq!(
            v.on_message(&msg("bob", "hello")).await,
            MessageVerdict::Default
        );
    }

    /// Every plain field of both requests reaches the script with its type, absent ones
    /// as nil, and the functions are there beside them.
    #[tokio::test]
    async fn the_request_tables_carry_every_field() {
        let e = engine(
            r#"
local function line(req, keys)
  local out = {}
  for _, k in ipairs(keys) do out[#out + 1] = k .. "=" .. tostring(req[k]) .. ":" .. type(req[k]) end
  return table.concat(out, " ")
end
function on_message(req)
  req:reject(499, line(req, { "from", "to", "ruri", "user", "source", "content_type", "body" })
    .. " " .. type(req.header) .. " " .. type(req.route))
end
function on_subscribe(req)
  req:reject(499, line(req, { "package", "resource", "subscriber", "from", "user", "source", "expires" }))
end
"#,
        );
        let v = e.current();
        assert_eq!(
            v.on_message(&msg("bob", "hello")).await,
            MessageVerdict::Reject(
                499,
                "from=sip:alice@x:string to=sip:bob@x:string ruri=sip:bob@x:string \
                 user=bob:string source=udp:127.0.0.1:5070:string \
                 content_type=text/plain:string body=hello:string function function"
                    .into()
            )
        );
        let info = SubscribeInfo {
            package: "dialog".into(),
            resource: "sip:1001@x".into(),
            subscriber: "sip:eve@x".into(),
            user: None,
            source: "udp:127.0.0.1:1".into(),
            expires: Some(60),
            headers: vec![],
        };
        assert_eq!(
            v.on_subscribe(&info).await,
            SubscribeVerdict::Reject(
                499,
                "package=dialog:string resource=sip:1001@x:string subscriber=sip:eve@x:string \
                 from=sip:eve@x:string user=nil:nil source=udp:127.0.0.1:1:string \
                 expires=60:number"
                    .into()
            )
        );
        let unbounded = SubscribeInfo {
            expires: None,
            ..info
        };
        assert!(matches!(
            v.on_subscribe(&unbounded).await,
            SubscribeVerdict::Reject(499, r) if r.ends_with("expires=nil:nil")
        ));
    }

    #[tokio::test]
    async fn on_subscribe_refuses_and_failures_are_500() {
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
            v.on_subscribe(&info("dialog", "sip:1001@x", "sip:eve@x"))
                .await,
            SubscribeVerdict::Reject(403, "Not your lamp".into())
        );
        assert_eq!(
            v.on_subscribe(&info("dialog", "sip:1001@x", "sip:boss@x"))
                .await,
            SubscribeVerdict::Default
        );
        assert!(matches!(
            v.on_subscribe(&info("presence", "sip:broken@x", "sip:a@x")).await,
            SubscribeVerdict::Failed(m) if m.contains("boom")
        ));
        assert_eq!(
            v.on_subscribe(&info("message-summary", "sip:1001@x", "sip:a@x"))
                .await,
            SubscribeVerdict::Route("sip:vm@10.0.0.30".into())
        );
        assert!(matches!(
            v.on_subscribe(&info("presence", "sip:bad@x", "sip:a@x")).await,
            SubscribeVerdict::Failed(m) if m.contains("req:reject")
        ));
    }
}

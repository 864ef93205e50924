//! `on_register(req)`: the script's say on a REGISTER (refuse, or name the credentials to
//! check). `req` is a plain table built by the sandbox's runner: `req.user`, `req.aor`,
//! `req.source`, `req.user_agent`, `req.contact`, `req:header(name)` (values cut to
//! [`super::MAX_HEADER_VALUE`] bytes), `req:reject(code, reason)`.

use mlua::Value;

use super::call::parse_reject;
use super::hooks::{self, Hook, HookFuture};
use super::record::first_values;
use super::vm::FailKind;
use super::{bounded, RegisterInfo, RegisterVerdict, ScriptVersion};

/// What the runner said, read on the VM thread.
enum Said {
    Default,
    Reject(Result<(u16, String), String>),
    Credentials(Option<String>, Option<String>, Option<String>),
}

pub(crate) async fn run_on_register(
    version: &ScriptVersion,
    info: &RegisterInfo,
) -> RegisterVerdict {
    if !version.info.has(Hook::Register) {
        return RegisterVerdict::Default;
    }
    let Some(vm) = version.pick() else {
        return RegisterVerdict::Failed(super::call::no_vm(Hook::Register, version));
    };
    let req = info.clone();
    let result = hooks::run(
        &version.run,
        &vm,
        Hook::Register,
        &info.aor,
        move |vm, _| {
            // One protected call for the table (`first_values`), not two or three a header.
            let headers = first_values(
                &vm.lua,
                req.headers.iter().map(|(n, v)| (n.as_str(), bounded(v))),
            )?;
            let runner = vm.runner(Hook::Register).expect("checked above");
            type Out = (Option<String>, Value, Value, Option<String>);
            let (kind, a, b, c) = runner.call::<Out>((
                req.user.as_str(),
                req.aor.as_str(),
                req.source.as_str(),
                req.user_agent.as_deref().map(bounded),
                req.contact.as_deref().map(bounded),
                headers,
            ))?;
            let text = |v: &Value| match v {
                Value::String(s) => s.to_str().ok().map(|s| s.to_owned()),
                _ => None,
            };
            let said = match kind.as_deref() {
                None => Said::Default,
                Some("reject") => Said::Reject(parse_reject(&a, &b)),
                Some(_) => Said::Credentials(text(&a), text(&b), c),
            };
            Ok(Box::pin(std::future::ready(Ok(said))) as HookFuture<Said>)
        },
    )
    .await;
    match result {
        Ok(Said::Default) => RegisterVerdict::Default,
        Ok(Said::Reject(Ok((code, reason)))) => RegisterVerdict::Reject(code, reason),
        Ok(Said::Reject(Err(e))) => {
            let msg = format!(
                "{}: {}",
                version.info.pos(Hook::Register),
                e.replace("call:reject", "req:reject")
            );
            hooks::fail(
                &version.run,
                Hook::Register,
                &info.aor,
                FailKind::Error,
                &msg,
            );
            RegisterVerdict::Failed(msg)
        }
        Ok(Said::Credentials(password, ha1_md5, ha1_sha256)) => RegisterVerdict::Credentials {
            password,
            ha1_md5,
            ha1_sha256,
        },
        Err(e) => RegisterVerdict::Failed(e),
    }
}

//! The hook table and the one runner every hook goes through.
//!
//! **Owns**: the list of hooks a script may define ([`Hook`]), what a loaded script
//! defines ([`HookInfo`], with the warnings of `strowger check`), and [`run`]: one hook run
//! on a VM thread under its budgets, timed (`strowger_script_hook_duration_seconds{hook}`),
//! its failures described, counted (`strowger_script_errors_total{hook}` via
//! [`ScriptStats`]) and logged the same way for every hook. **Must not touch**: what a
//! hook's arguments and verdicts mean; that is each hook's own file (`call.rs`,
//! `presence.rs`, `register.rs`).

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::pool::VmHandle;
use super::vm::{describe, Budget, FailKind, Vm};
use super::ScriptStats;

/// The hooks a script may define: global functions with these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `on_invite(call)`: a new call.
    Invite,
    /// `on_register(req)`: a REGISTER.
    Register,
    /// `on_call_end(call, record)`: a call is over.
    CallEnd,
    /// `on_message(req)`: a MESSAGE outside any call.
    Message,
    /// `on_subscribe(req)`: a SUBSCRIBE.
    Subscribe,
    /// `on_refer(call, refer)`: a transfer request in a call.
    Refer,
}

impl Hook {
    /// Number of hooks.
    pub const COUNT: usize = 6;
    /// Every hook, in the order of the metric labels.
    pub const ALL: [Hook; Hook::COUNT] = [
        Hook::Invite,
        Hook::Register,
        Hook::CallEnd,
        Hook::Message,
        Hook::Subscribe,
        Hook::Refer,
    ];

    /// The global function's name, also the `hook` label of the script metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Invite => "on_invite",
            Hook::Register => "on_register",
            Hook::CallEnd => "on_call_end",
            Hook::Message => "on_message",
            Hook::Subscribe => "on_subscribe",
            Hook::Refer => "on_refer",
        }
    }

    /// Index into per-hook arrays (and into the metric label set, see `metrics.rs`).
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// What one loaded script defines.
#[derive(Debug, Default, Clone)]
pub struct HookInfo {
    /// `file:line` of each defined hook, indexed by [`Hook::index`].
    pub(crate) pos: [Option<String>; Hook::COUNT],
    /// Every global function after the top-level code ran.
    pub(crate) functions: Vec<String>,
    /// The script as configured.
    pub(crate) file: String,
}

impl HookInfo {
    /// Whether the script defines `hook`.
    pub fn has(&self, hook: Hook) -> bool {
        self.pos[hook.index()].is_some()
    }

    /// Where `hook` is defined (or the file), the fallback position of its errors.
    pub(crate) fn pos(&self, hook: Hook) -> &str {
        self.pos[hook.index()].as_deref().unwrap_or(&self.file)
    }

    /// Warnings for the operator: no `on_invite`, and global functions whose names look
    /// like a misspelled hook (`on_invit`, `onInvite`, `On_Invite`).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.has(Hook::Invite) {
            out.push(format!(
                "{}: the script defines no on_invite: every call will be rejected 404",
                self.file
            ));
        }
        let mut names = self.functions.clone();
        names.sort();
        for name in names {
            if Hook::ALL.iter().any(|h| h.name() == name) {
                continue;
            }
            if let Some(hook) = misspelled_hook(&name) {
                out.push(format!(
                    "{}: global function `{name}` is not a hook and is never called: did you mean `{}`?",
                    self.file,
                    hook.name()
                ));
            }
        }
        out
    }
}

/// The hook `name` probably means, if it is close to one: equal ignoring case and
/// underscores, or within two edits of one (names starting with "on" only).
fn misspelled_hook(name: &str) -> Option<Hook> {
    let fold = |s: &str| s.to_ascii_lowercase().replace('_', "");
    let folded = fold(name);
    if let Some(h) = Hook::ALL.iter().find(|h| fold(h.name()) == folded) {
        return Some(*h);
    }
    let lower = name.to_ascii_lowercase();
    if !lower.starts_with("on") {
        return None;
    }
    Hook::ALL
        .iter()
        .map(|h| (strsim::levenshtein(&lower, h.name()), *h))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, h)| h)
}

/// The Lua side of a hook run as its body starts it: resolves when the hook returns.
pub(crate) type HookFuture<T> = Pin<Box<dyn Future<Output = mlua::Result<T>>>>;

/// Where a run's failures are counted and named.
#[derive(Clone)]
pub(crate) struct RunCtx {
    pub stats: Arc<ScriptStats>,
    pub version: u64,
}

/// Runs one hook on `vm`'s thread: `body` (on that thread, inside the run's budgets) sets up
/// the arguments and starts the Lua call; the runner awaits it, times it, and turns a
/// failure into its text (counted and logged). `id` names the call or request in logs.
/// If the VM is abandoned meanwhile (its watchdog found it stuck past the time limit),
/// the run fails at once.
pub(crate) async fn run<T, B>(
    ctx: &RunCtx,
    vm: &Arc<VmHandle>,
    hook: Hook,
    id: &str,
    body: B,
) -> Result<T, String>
where
    T: Send + 'static,
    B: FnOnce(&Rc<Vm>, &Arc<Budget>) -> mlua::Result<HookFuture<T>> + Send + 'static,
{
    let run_ctx = ctx.clone();
    let run_id = id.to_owned();
    let submitted = vm
        .submit(
            move |vm: &Rc<Vm>, reply: oneshot::Sender<Result<T, String>>| {
                let budget = vm.budget();
                let setup = vm.enter(&budget, || body(vm, &budget));
                let vm = vm.clone();
                let mut reply = reply;
                super::pool::run_local(async move {
                    let hook_run = async {
                        match setup {
                            // A run that overran its time inside one C call (where the
                            // count hook cannot stop it) fails when it returns.
                            Ok(fut) => match vm.guard(&budget, fut).await {
                                Ok(v) => vm.within_time(&budget).map(|()| v),
                                Err(e) => Err(e),
                            },
                            Err(e) => Err(e),
                        }
                    };
                    // The caller dropped its wait (e.g. the call was abandoned): the hook is
                    // dropped too, which closes its coroutine and cancels what it waits for.
                    let result = tokio::select! {
                        biased;
                        r = hook_run => r,
                        _ = reply.closed() => return,
                    };
                    run_ctx
                        .stats
                        .hook_duration
                        .observe(hook, budget.busy_secs());
                    // An abandoned run is counted by whoever tells the caller: here when the
                    // caller still waits for this reply, else the caller already failed it.
                    let waiting = !reply.is_closed();
                    let result = result
                        .map_err(|e| report(&run_ctx, &vm, hook, &run_id, &e, &budget, waiting));
                    let _ = reply.send(result);
                });
            },
        )
        .await;
    match submitted {
        Ok(result) => result,
        Err(_) => {
            let msg = format!(
                "{}: time limit exceeded: the hook was stuck where the instruction budget is not checked; its VM was abandoned",
                vm.info.pos(hook)
            );
            fail(ctx, hook, id, FailKind::Abandoned, &msg);
            Err(msg)
        }
    }
}

/// Counts and logs a failed hook run whose text is already made (e.g. a bad verdict).
pub(crate) fn fail(ctx: &RunCtx, hook: Hook, id: &str, kind: FailKind, msg: &str) {
    let stats = &ctx.stats;
    stats.hook_errors_total.fetch_add(1, Ordering::Relaxed);
    stats.hook_errors[hook.index()].fetch_add(1, Ordering::Relaxed);
    match kind {
        FailKind::Timeout => {
            stats.hook_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        FailKind::TimeLimit | FailKind::Abandoned => {
            stats.time_limits.fetch_add(1, Ordering::Relaxed);
        }
        FailKind::Memory => {
            stats.memory_errors.fetch_add(1, Ordering::Relaxed);
        }
        FailKind::Error => {}
    }
    tracing::warn!(
        target: "script",
        version = ctx.version,
        hook = hook.name(),
        call = %id,
        kind = kind.as_str(),
        "{msg}"
    );
}

/// Describes, counts and logs a failed hook run; returns the error text (`file:line`
/// first). After a memory error the VM gets a full GC so the next run has room.
fn report(
    ctx: &RunCtx,
    vm: &Vm,
    hook: Hook,
    id: &str,
    err: &mlua::Error,
    budget: &Budget,
    caller_waiting: bool,
) -> String {
    let (kind, msg) = describe(err, budget, vm.info.pos(hook), vm.memory_limit);
    if kind == FailKind::Abandoned && !caller_waiting {
        // The caller already failed (and counted) the run when the watchdog gave the VM up.
        return msg;
    }
    fail(ctx, hook, id, kind, &msg);
    if kind == FailKind::Memory {
        vm.full_gc(&vm.budget());
    }
    msg
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn hook_table_is_the_metric_label_set() {
        use crate::metrics::Label;
        assert_eq!(<Hook as Label>::ALL, &Hook::ALL[..]);
        for hook in Hook::ALL {
            assert_eq!(Label::as_str(hook), hook.name());
            assert_eq!(Label::index(hook), hook.index());
        }
    }

    #[test]
    fn misspelled_hooks_are_recognised() {
        for (name, hook) in [
            ("on_invit", Hook::Invite),
            ("onInvite", Hook::Invite),
            ("on_Invite", Hook::Invite),
            ("OnCallEnd", Hook::CallEnd),
            ("on_registr", Hook::Register),
            ("on_subscrib", Hook::Subscribe),
        ] {
            assert_eq!(misspelled_hook(name), Some(hook), "{name}");
        }
        for name in ["lookup", "dial_trunk", "on_hold_music", "route", "onward"] {
            assert_eq!(misspelled_hook(name), None, "{name}");
        }
    }

    #[test]
    fn warnings_name_the_missing_on_invite_and_the_misspelling() {
        let info = HookInfo {
            functions: vec!["onInvite".into(), "helper".into()],
            file: "plan.lua".into(),
            ..HookInfo::default()
        };
        let w = info.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("no on_invite"), "{w:?}");
        assert!(
            w[1].contains("`onInvite`") && w[1].contains("`on_invite`"),
            "{w:?}"
        );
    }
}

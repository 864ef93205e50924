//! How a hook run waits: the verbs that wait (`call:dial`, `call:hunt`, `call:transfer`,
//! `huntgroup.set_state`) hand a future to the run's driver and the sandbox yields the
//! hook's coroutine; the driver ([`HookThread`]) awaits the future and resumes the
//! coroutine with its two values.
//!
//! Written here rather than taken from mlua's async functions, which do the same with a
//! Lua loop around each verb, the future boxed into a userdata with a finalizer and two
//! C calls to poll it: replacing them saved 3% of an `on_invite` that dials at once
//! (callgrind of `benches/lua_hook.rs`) and 1.1% of the server's instructions per call,
//! where a dial waits; mlua offers no lighter way to wait.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use mlua::{FromLuaMulti, Function, IntoLuaMulti, LightUserData, MultiValue, Thread, Value};
use parking_lot::Mutex;

/// What a waiting verb's future resolves to: the two values its `yield` returns to the
/// sandbox (e.g. a dial's code and reason), or an error that fails the run.
pub(crate) type Waited = mlua::Result<(Value, Value)>;

/// A waiting verb's future. `Send` because mlua's functions must be (its `send` feature).
pub(crate) type WaitFuture = Pin<Box<dyn Future<Output = Waited> + Send>>;

/// The value a waiting verb returns to the sandbox when it has handed over a future: the
/// sandbox then yields (`WAIT` in the sandbox, from the helpers' `wait`).
pub(crate) fn wait_marker() -> Value {
    // Any unique address: only compared, never read.
    static MARKER: u8 = 0;
    Value::LightUserData(LightUserData(std::ptr::addr_of!(MARKER) as *mut _))
}

/// The hand-over point between the verbs (on the Lua side of a resume) and the driver
/// that resumed: one per VM, shared with its verbs.
#[derive(Clone, Default)]
pub(crate) struct Waits(Arc<Mutex<Handover>>);

#[derive(Default)]
struct Handover {
    /// The future of the verb that just ran, until the driver takes it.
    pending: Option<WaitFuture>,
    /// The Lua thread being resumed by a driver (its address), 0 when none.
    driven: usize,
}

impl Waits {
    /// Hands `fut` to the driver of the hook coroutine being resumed. Err when none is
    /// (a hook that cannot wait, e.g. `on_register`), or, given `thread` (the caller's
    /// running coroutine), when that is not it (a coroutine the script made). Verbs whose
    /// sandbox wrapper has already checked that they run in the call's own hook
    /// coroutine pass None.
    pub fn start(
        &self,
        thread: Option<*mut mlua::ffi::lua_State>,
        fut: WaitFuture,
    ) -> Result<(), ()> {
        let mut h = self.0.lock();
        let elsewhere = thread.is_some_and(|t| t as usize != h.driven);
        if h.driven == 0 || elsewhere || h.pending.is_some() {
            return Err(());
        }
        h.pending = Some(fut);
        Ok(())
    }

    /// Resumes `thread` with `args`: what it returned, or the future it now waits for.
    fn resume(&self, thread: &Thread, args: impl IntoLuaMulti) -> Step {
        let prev = {
            let mut h = self.0.lock();
            // A future left by a verb whose coroutine did not yield to us (cannot happen
            // through the sandbox's wrappers) is dropped, not handed to the wrong run.
            h.pending = None;
            std::mem::replace(&mut h.driven, thread.state() as usize)
        };
        let out = thread.resume::<MultiValue>(args);
        let pending = {
            let mut h = self.0.lock();
            h.driven = prev;
            h.pending.take()
        };
        match out {
            Err(e) => Step::Done(Err(e)),
            Ok(values) => match (thread.status(), pending) {
                (mlua::ThreadStatus::Resumable, Some(fut)) => Step::Waiting(fut),
                (mlua::ThreadStatus::Resumable, None) => Step::Done(Err(mlua::Error::runtime(
                    "coroutine.yield: a hook can only yield inside a coroutine it made",
                ))),
                _ => Step::Done(Ok(values)),
            },
        }
    }
}

enum Step {
    Waiting(WaitFuture),
    Done(mlua::Result<MultiValue>),
    Taken,
}

/// Finished hook coroutines kept for reuse, per VM.
pub(crate) struct ThreadPool {
    free: std::cell::RefCell<Vec<Thread>>,
    /// An empty function, which a coroutine that did not return is reset with.
    idle: Function,
}

impl ThreadPool {
    /// Kept at most: more may run at once; the extra ones are left to the GC.
    const SIZE: usize = 64;

    pub fn new(lua: &mlua::Lua) -> mlua::Result<ThreadPool> {
        Ok(ThreadPool {
            free: std::cell::RefCell::new(Vec::with_capacity(Self::SIZE)),
            idle: lua.create_function(|_, ()| Ok(()))?,
        })
    }

    fn take(&self, lua: &mlua::Lua, func: &Function) -> mlua::Result<Thread> {
        let reused = self.free.borrow_mut().pop();
        match reused {
            Some(thread) => {
                thread.reset(func.clone())?;
                Ok(thread)
            }
            None => lua.create_thread(func.clone()),
        }
    }

    fn give_back(&self, thread: Thread) {
        let mut free = self.free.borrow_mut();
        if free.len() < Self::SIZE {
            free.push(thread);
        }
    }
}

/// One hook run's coroutine and its driver: resolves to what the hook returned, after
/// every wait of its verbs.
pub(crate) struct HookThread<R> {
    waits: Waits,
    pool: Rc<ThreadPool>,
    lua: mlua::Lua,
    thread: Option<Thread>,
    step: Step,
    _returns: std::marker::PhantomData<fn() -> R>,
}

impl<R: FromLuaMulti> HookThread<R> {
    /// Starts `func(args)` in a coroutine (on the caller's stack, which must be inside
    /// the run's budget): it runs until it returns or first waits. `args` are made from
    /// the coroutine that will run them (a `call` object's private record names it).
    pub fn start<A: IntoLuaMulti>(
        lua: &mlua::Lua,
        waits: &Waits,
        pool: &Rc<ThreadPool>,
        func: &Function,
        args: impl FnOnce(&Thread) -> mlua::Result<A>,
    ) -> mlua::Result<HookThread<R>> {
        let thread = pool.take(lua, func)?;
        let args = args(&thread)?;
        let step = waits.resume(&thread, args);
        let mut run = HookThread {
            waits: waits.clone(),
            pool: pool.clone(),
            lua: lua.clone(),
            thread: Some(thread),
            step,
            _returns: std::marker::PhantomData,
        };
        run.recycle_if_done();
        Ok(run)
    }

    /// A coroutine that returned goes back to the pool; one that failed is reset first.
    fn recycle_if_done(&mut self) {
        match self.step {
            Step::Done(Ok(_)) => self.recycle(true),
            Step::Done(Err(_)) => self.recycle(false),
            _ => {}
        }
    }
}

impl<R> HookThread<R> {
    /// Gives the coroutine back to the pool. One that failed or still waits is reset
    /// first (Lua 5.4's `lua_closethread`: its to-be-closed variables are closed and its
    /// stack is emptied): its stack may hold much (a failed run's data), and the call's
    /// record in the sandbox keeps the coroutine itself alive as long as the call.
    fn recycle(&mut self, returned: bool) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if returned || thread.reset(self.pool.idle.clone()).is_ok() {
            self.pool.give_back(thread);
        }
    }
}

impl<R: FromLuaMulti> Future for HookThread<R> {
    type Output = mlua::Result<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<mlua::Result<R>> {
        let this = self.get_mut();
        loop {
            match &mut this.step {
                Step::Waiting(fut) => {
                    let Poll::Ready(waited) = fut.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    this.step = match (waited, &this.thread) {
                        (Ok(values), Some(thread)) => this.waits.resume(thread, values),
                        (Err(e), _) => Step::Done(Err(e)),
                        (Ok(_), None) => {
                            Step::Done(Err(mlua::Error::runtime("the hook's coroutine is gone")))
                        }
                    };
                    this.recycle_if_done();
                }
                Step::Done(_) => {
                    let Step::Done(out) = std::mem::replace(&mut this.step, Step::Taken) else {
                        unreachable!("matched above")
                    };
                    return Poll::Ready(out.and_then(|v| R::from_lua_multi(v, &this.lua)));
                }
                Step::Taken => {
                    return Poll::Ready(Err(mlua::Error::runtime(
                        "the hook's run was polled after it finished",
                    )))
                }
            }
        }
    }
}

impl<R> Drop for HookThread<R> {
    fn drop(&mut self) {
        // A run dropped while it waits (e.g. the call was abandoned): the verb's future is
        // dropped first (which cancels what it waited for), then the coroutine is reset
        // without running the rest of the hook.
        self.step = Step::Taken;
        self.recycle(false);
    }
}

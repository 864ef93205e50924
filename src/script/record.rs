//! Small Lua tables (a URI's parts, a hunt's outcome, an agent, a request's headers)
//! made in one protected call. Written against Lua's C API by hand: with a memory limit set, mlua's safe API
//! makes every key and every string value in a protected call of its own (~1,000
//! instructions each), so a table of eight fields cost ~20,000 instructions; this makes
//! it in one.
//!
//! **Owns**: nothing (a function). **Must not touch**: what the fields mean.

use std::ffi::CStr;

use mlua::{ffi, Lua, Table};

/// A field's value; `None` in [`record`]'s list leaves the field out (nil).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Num(f64),
}

/// A new table with `fields` set (those with `None` left out), made in one protected call.
/// A memory error while making it is the call's error (the script's run fails as for
/// any allocation past `script.memory_limit_kb`).
pub(crate) fn record(lua: &Lua, fields: &[(&CStr, Option<Field<'_>>)]) -> mlua::Result<Table> {
    // SAFETY: the closure runs inside the protected call `exec_raw` makes, so a memory
    // error Lua raises in it unwinds to that call; it holds only borrowed data, so no
    // destructor is skipped. Stack: as `push_record` says; the table is left as the one
    // result.
    unsafe { lua.exec_raw::<Table>((), |state| push_record(state, fields)) }
}

/// Sets `target[key]` (raw) to a new table with `fields`, in one protected call, and
/// returns that table: a lazily built field stored as it is made (the `call` table's
/// `ruri`, `from`, `to`), with no `rawset` call from Lua after it.
pub(crate) fn record_into(
    lua: &Lua,
    target: &Table,
    key: &CStr,
    fields: &[(&CStr, Option<Field<'_>>)],
) -> mlua::Result<Table> {
    // SAFETY: as in `record`: inside `exec_raw`'s protected call, borrowed data only.
    // Stack: `target` (the argument, index 1), the new table (`push_record`); then the
    // key and a copy of the table, both popped by `lua_rawset`; `target` is removed,
    // leaving the table as the one result.
    unsafe {
        lua.exec_raw::<Table>(target, |state| {
            push_record(state, fields);
            ffi::lua_pushstring(state, key.as_ptr());
            ffi::lua_pushvalue(state, -2);
            ffi::lua_rawset(state, 1);
            ffi::lua_remove(state, 1);
        })
    }
}

/// Sets `target[key]` (raw) to `value` (nil for `None`) in one protected call, and
/// returns the value.
pub(crate) fn store(
    lua: &Lua,
    target: &Table,
    key: &CStr,
    value: Option<Field<'_>>,
) -> mlua::Result<mlua::Value> {
    // SAFETY: as in `record_into`. Stack: `target` (index 1), the key, the value (or nil),
    // a copy of the value; `lua_rawset` pops the key and the copy; `target` is removed,
    // leaving the value as the one result.
    unsafe {
        lua.exec_raw::<mlua::Value>(target, |state| {
            ffi::lua_pushstring(state, key.as_ptr());
            match value {
                Some(v) => push_field(state, v),
                None => ffi::lua_pushnil(state),
            }
            ffi::lua_pushvalue(state, -1);
            ffi::lua_rotate(state, -3, 1);
            ffi::lua_rawset(state, 1);
            ffi::lua_remove(state, 1);
        })
    }
}

/// Pushes a new table with `fields` set (those with `None` left out).
///
/// # Safety
/// Inside a protected call (a memory error unwinds to it), with room for two more values:
/// the table, then one value at a time, each popped by the `lua_setfield` after it.
pub(crate) unsafe fn push_record(
    state: *mut ffi::lua_State,
    fields: &[(&CStr, Option<Field<'_>>)],
) {
    let size = i32::try_from(fields.len()).unwrap_or(i32::MAX);
    ffi::lua_createtable(state, 0, size);
    for (key, value) in fields {
        let Some(value) = value else { continue };
        push_field(state, *value);
        ffi::lua_setfield(state, -2, key.as_ptr());
    }
}

/// Pushes one field's value.
///
/// # Safety
/// `state` must have room for one more value (inside `exec_raw`, which checks for three).
unsafe fn push_field(state: *mut ffi::lua_State, value: Field<'_>) {
    match value {
        Field::Str(s) => {
            ffi::lua_pushlstring(state, s.as_ptr().cast(), s.len());
        }
        Field::Bool(b) => ffi::lua_pushboolean(state, i32::from(b)),
        Field::Int(i) => ffi::lua_pushinteger(state, i),
        Field::Num(n) => ffi::lua_pushnumber(state, n),
    }
}

/// A table of `name → value` with the first value given for each name (a request's
/// headers), made in one protected call.
pub(crate) fn first_values<'a>(
    lua: &Lua,
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> mlua::Result<Table> {
    // SAFETY: as in `record`: inside `exec_raw`'s protected call, borrowed data only. Stack:
    // the table, then at most a name and a value (or the value looked up), each use
    // popping what it pushed; the table is left as the one result.
    unsafe {
        lua.exec_raw::<Table>((), |state| {
            ffi::lua_createtable(state, 0, 0);
            for (name, value) in pairs {
                ffi::lua_pushlstring(state, name.as_ptr().cast(), name.len());
                let absent = ffi::lua_rawget(state, -2) == ffi::LUA_TNIL;
                ffi::lua_pop(state, 1);
                if absent {
                    ffi::lua_pushlstring(state, name.as_ptr().cast(), name.len());
                    ffi::lua_pushlstring(state, value.as_ptr().cast(), value.len());
                    ffi::lua_rawset(state, -3);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Value;

    /// Every kind of field lands as mlua would set it, `None` leaves it out, and a memory
    /// error inside is an error of the call, after which the state goes on.
    #[test]
    fn a_record_is_made_in_one_protected_call() {
        let lua = Lua::new();
        let t = record(
            &lua,
            &[
                (c"s", Some(Field::Str("text"))),
                (c"b", Some(Field::Bool(true))),
                (c"i", Some(Field::Int(486))),
                (c"n", Some(Field::Num(2.5))),
                (c"none", None),
            ],
        )
        .expect("table");
        assert_eq!(t.raw_get::<String>("s").unwrap(), "text");
        assert_eq!(t.raw_get::<Value>("b").unwrap(), Value::Boolean(true));
        assert_eq!(t.raw_get::<Value>("i").unwrap(), Value::Integer(486));
        assert_eq!(t.raw_get::<Value>("n").unwrap(), Value::Number(2.5));
        assert_eq!(t.raw_get::<Value>("none").unwrap(), Value::Nil);
        assert_eq!(t.pairs::<Value, Value>().count(), 4);

        lua.set_memory_limit(lua.used_memory() + 4096).unwrap();
        let big = "x".repeat(100_000);
        match record(&lua, &[(c"s", Some(Field::Str(&big)))]) {
            Err(mlua::Error::MemoryError(_)) => {}
            other => panic!("expected a memory error, got {other:?}"),
        }
        lua.set_memory_limit(0).unwrap();
        let t = record(&lua, &[(c"s", Some(Field::Str(&big)))]).expect("room again");
        assert_eq!(t.raw_get::<String>("s").unwrap().len(), 100_000);
    }

    /// The table or value lands in the target (raw: its `__newindex` is not called) and is
    /// returned; the target's other fields stay.
    #[test]
    fn a_field_is_stored_as_it_is_made() {
        let lua = Lua::new();
        let target: Table = lua
            .load("return setmetatable({ keep = 1 }, { __newindex = function() error('not raw') end })")
            .eval()
            .unwrap();
        let t = record_into(
            &lua,
            &target,
            c"ruri",
            &[(c"user", Some(Field::Str("1000")))],
        )
        .expect("table");
        assert_eq!(t.raw_get::<String>("user").unwrap(), "1000");
        let stored: Table = target.raw_get("ruri").unwrap();
        assert_eq!(stored, t);
        let v = store(&lua, &target, c"id", Some(Field::Str("abc"))).expect("value");
        assert_eq!(v, Value::String(lua.create_string("abc").unwrap()));
        assert_eq!(target.raw_get::<String>("id").unwrap(), "abc");
        assert_eq!(store(&lua, &target, c"trunk", None).unwrap(), Value::Nil);
        assert_eq!(target.raw_get::<Value>("trunk").unwrap(), Value::Nil);
        assert_eq!(target.raw_get::<i64>("keep").unwrap(), 1);
        assert_eq!(target.pairs::<Value, Value>().count(), 3);
    }

    /// The first value of a name stays; later ones are dropped.
    #[test]
    fn first_values_keep_the_first_of_each_name() {
        let lua = Lua::new();
        let pairs = [
            ("via", "a"),
            ("to", "<sip:b@x>"),
            ("via", "c"),
            ("", "empty name"),
        ];
        let t = first_values(&lua, pairs.into_iter()).expect("table");
        assert_eq!(t.raw_get::<String>("via").unwrap(), "a");
        assert_eq!(t.raw_get::<String>("to").unwrap(), "<sip:b@x>");
        assert_eq!(t.raw_get::<String>("").unwrap(), "empty name");
        assert_eq!(t.pairs::<Value, Value>().count(), 3);
    }
}

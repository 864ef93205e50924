//! Lua 5.4's pattern functions (`string.find`, `match`, `gmatch`, `gsub`) with a step budget.
//!
//! Lua's own matcher (lstrlib.c) backtracks inside one C call where no debug hook can stop it:
//! `("a"):rep(4000):find("(.-)(.-)(.-)x")` runs for minutes and would freeze the SIP thread.
//! No maintained crate offers Lua patterns with a step budget, so this is a port written by
//! hand of the matcher of Lua 5.4's lstrlib.c (MIT licence, Copyright © 1994–2024 Lua.org,
//! PUC-Rio; the vendored Lua is 5.4.8 and its error texts are the ones reproduced): same
//! algorithm, same semantics (Lua 5.4 manual §6.4.1), plus a call of the caller's check every
//! [`STEP_CHECK`] steps. Every loop whose length depends on the input counts steps.
//!
//! Pattern errors are raised as Lua strings blamed on the caller's line, as `luaL_error` does
//! (a small Lua wrapper raises them: mlua can only raise its own error userdata); the check's
//! error and errors of a `gsub` replacement function or `__index` pass through unchanged.

use memchr::{memchr, memmem};
use mlua::{Function, Lua, MultiValue, Table, Value};

/// Called every so many matcher steps; an Err stops the match and is raised in Lua.
pub(crate) type MatchCheck = std::sync::Arc<dyn Fn(&Lua) -> mlua::Result<()> + Send + Sync>;

/// Matcher steps between two calls of the check.
const STEP_CHECK: u32 = 1024;
/// lstrlib.c's MAXCCALLS: the recursion depth of `match` ("pattern too complex").
const MAXCCALLS: usize = 200;
/// luaconf.h's LUA_MAXCAPTURES.
const MAXCAPTURES: usize = 32;
const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;
/// lstrlib.c's SPECIALS: a pattern without any of these is searched for as plain text.
const SPECIALS: &[u8] = b"^$*+?.([%-";
/// gsub's output is moved into Lua strings every so many bytes, so the VM's memory limit
/// bounds it (lstrlib's buffer lives in Lua's allocator too).
const FLUSH: usize = 64 * 1024;

/// Raises `(false, message)` results as string errors at the caller's level (2 from the
/// tail-called `raise`), as `luaL_error` does. The chunk name starts with `strowger/` so the
/// budget hook does not blame this file for the script's position (vm.rs `is_internal`).
const WRAPPER: &str = r#"
local find, match, gmatch, gsub = ...
local error = error
local function raise(ok, ...)
  if ok == false then error((...), 2) end
  return ok, ...
end
return function(...) return raise(find(...)) end,
  function(...) return raise(match(...)) end,
  function(...)
    local it, err = gmatch(...)
    if it == false then error(err, 2) end
    return function() return raise(it()) end
  end,
  function(...) return raise(gsub(...)) end
"#;

/// Replaces `string.find`, `string.match`, `string.gmatch` and `string.gsub` of `lua`'s
/// global `string` table (and so the string methods `s:find(...)`, which go through it)
/// with budgeted equivalents.
pub(crate) fn install(lua: &Lua, check: MatchCheck) -> mlua::Result<()> {
    type Impl = fn(&Lua, &MultiValue, &MatchCheck) -> Res<MultiValue>;
    let make = |f: Impl| {
        let c = check.clone();
        lua.create_function(move |lua, a: MultiValue| finish(lua, f(lua, &a, &c)))
    };
    let find = make(|lua, a, c| find_aux(lua, a, c, true))?;
    let matchf = make(|lua, a, c| find_aux(lua, a, c, false))?;
    let (gmatchf, gsubf) = (make(gmatch)?, make(gsub)?);
    let (f, m, g, s): (Function, Function, Function, Function) = lua
        .load(WRAPPER)
        .set_name("=strowger/pattern")
        .call((find, matchf, gmatchf, gsubf))?;
    let string: Table = lua.globals().get("string")?;
    string.raw_set("find", f)?;
    string.raw_set("match", m)?;
    string.raw_set("gmatch", g)?;
    string.raw_set("gsub", s)
}

/// Why a call failed: a pattern or argument error (raised as a string by the wrapper), or
/// an error to pass through (the check's, a replacement function's, memory).
enum Fail {
    Msg(String),
    Lua(mlua::Error),
}

impl From<mlua::Error> for Fail {
    fn from(e: mlua::Error) -> Self {
        Fail::Lua(e)
    }
}

type Res<T> = Result<T, Fail>;

fn fail<T>(msg: impl Into<String>) -> Res<T> {
    Err(Fail::Msg(msg.into()))
}

fn finish(lua: &Lua, r: Res<MultiValue>) -> mlua::Result<MultiValue> {
    match r {
        Ok(v) => Ok(v),
        Err(Fail::Lua(e)) => Err(e),
        Err(Fail::Msg(m)) => Ok(MultiValue::from_vec(vec![
            Value::Boolean(false),
            Value::String(lua.create_string(m)?),
        ])),
    }
}

fn type_name(v: Option<&Value>) -> &'static str {
    match v {
        None => "no value",
        Some(Value::Integer(_) | Value::Number(_)) => "number",
        Some(Value::LightUserData(_)) => "userdata",
        Some(v) => v.type_name(),
    }
}

fn bad_arg<T>(i: usize, fname: &str, expected: &str, got: Option<&Value>) -> Res<T> {
    let got = type_name(got);
    fail(format!(
        "bad argument #{} to '{fname}' ({expected} expected, got {got})",
        i + 1
    ))
}

/// `luaL_checklstring`: a string, or a number converted as Lua converts it.
fn str_arg(lua: &Lua, args: &MultiValue, i: usize, fname: &str) -> Res<mlua::String> {
    match args.get(i) {
        Some(v @ (Value::String(_) | Value::Integer(_) | Value::Number(_))) => {
            match lua.coerce_string(v.clone())? {
                Some(s) => Ok(s),
                None => bad_arg(i, fname, "string", Some(v)),
            }
        }
        v => bad_arg(i, fname, "string", v),
    }
}

/// `luaL_optinteger`.
fn int_arg(lua: &Lua, args: &MultiValue, i: usize, fname: &str, default: i64) -> Res<i64> {
    match args.get(i) {
        None | Some(Value::Nil) => Ok(default),
        Some(v) => match lua.coerce_integer(v.clone())? {
            Some(n) => Ok(n),
            None if lua.coerce_number(v.clone())?.is_some() => fail(format!(
                "bad argument #{} to '{fname}' (number has no integer representation)",
                i + 1
            )),
            None => bad_arg(i, fname, "number", Some(v)),
        },
    }
}

/// lstrlib's `posrelatI`: a 1-based start position, negatives counting from the end.
fn posrelat_i(pos: i64, len: usize) -> usize {
    if pos > 0 {
        usize::try_from(pos).unwrap_or(usize::MAX)
    } else if pos == 0 || pos.unsigned_abs() > len as u64 {
        1
    } else {
        len - pos.unsigned_abs() as usize + 1
    }
}

/// C's ctype classes in the "C" locale (Lua never sets another): `match_class`.
fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t'..=b'\r'), // isspace includes \v, unlike Rust's
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0, // deprecated, still accepted
        _ => return cl == c,
    };
    res == cl.is_ascii_lowercase()
}

enum Cap {
    Str(usize, usize),
    Pos(usize),
}

/// lstrlib's `MatchState`. Positions are indices; reading at or past the end yields 0, as
/// the C code reads the strings' terminating NUL.
struct Matcher<'a> {
    lua: &'a Lua,
    src: &'a [u8],
    pat: &'a [u8],
    check: &'a (dyn Fn(&Lua) -> mlua::Result<()> + Send + Sync),
    depth: usize,
    level: usize,
    capture: [(usize, isize); MAXCAPTURES],
    steps: u32,
}

impl<'a> Matcher<'a> {
    fn new(lua: &'a Lua, src: &'a [u8], pat: &'a [u8], check: &'a MatchCheck) -> Self {
        let check = &**check;
        let capture = [(0, 0); MAXCAPTURES];
        Matcher {
            lua,
            src,
            pat,
            check,
            depth: MAXCCALLS,
            level: 0,
            capture,
            steps: 0,
        }
    }

    fn p(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    fn s(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn steps(&mut self, n: u32) -> Res<()> {
        self.steps += n;
        if self.steps >= STEP_CHECK {
            self.steps = 0;
            (self.check)(self.lua)?;
        }
        Ok(())
    }

    fn class_end(&self, mut p: usize) -> Res<usize> {
        let c = self.p(p);
        p += 1;
        match c {
            b'%' if p >= self.pat.len() => fail("malformed pattern (ends with '%')"),
            b'%' => Ok(p + 1),
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                loop {
                    // look for a ']'; the first character is taken literally ("[]]")
                    if p >= self.pat.len() {
                        return fail("malformed pattern (missing ']')");
                    }
                    p += 1;
                    if self.p(p - 1) == b'%' && p < self.pat.len() {
                        p += 1; // skip escapes (e.g. '%]')
                    }
                    if self.p(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    /// `p` is at the '[', `ec` at the closing ']'.
    fn bracket(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.p(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            if self.p(p) == b'%' {
                p += 1;
                if match_class(c, self.p(p)) {
                    return sig;
                }
            } else if self.p(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.p(p - 2) <= c && c <= self.p(p) {
                    return sig;
                }
            } else if self.p(p) == c {
                return sig;
            }
        }
    }

    fn single(&self, s: usize, p: usize, ep: usize) -> bool {
        if s >= self.src.len() {
            return false;
        }
        let c = self.src[s];
        match self.p(p) {
            b'.' => true,
            b'%' => match_class(c, self.p(p + 1)),
            b'[' => self.bracket(c, p, ep - 1),
            pc => pc == c,
        }
    }

    fn balance(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
        if p + 1 >= self.pat.len() {
            return fail("malformed pattern (missing arguments to '%b')");
        }
        if self.s(s) != self.p(p) {
            return Ok(None);
        }
        let (b, e) = (self.p(p), self.p(p + 1));
        let mut cont = 1;
        for i in s + 1..self.src.len() {
            self.steps(1)?;
            if self.src[i] == e {
                cont -= 1;
                if cont == 0 {
                    return Ok(Some(i + 1));
                }
            } else if self.src[i] == b {
                cont += 1;
            }
        }
        Ok(None)
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Res<Option<usize>> {
        let mut i = 0;
        while self.single(s + i, p, ep) {
            self.steps(1)?;
            i += 1;
        }
        // keep trying with the most repetitions, one fewer each time
        loop {
            if let Some(r) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(r));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Res<Option<usize>> {
        loop {
            if let Some(r) = self.do_match(s, ep + 1)? {
                return Ok(Some(r));
            } else if self.single(s, p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> Res<Option<usize>> {
        if self.level >= MAXCAPTURES {
            return fail("too many captures");
        }
        self.capture[self.level] = (s, what);
        self.level += 1;
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.level -= 1; // undo capture
        }
        Ok(r)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
        let Some(l) = (0..self.level)
            .rev()
            .find(|&l| self.capture[l].1 == CAP_UNFINISHED)
        else {
            return fail("invalid pattern capture");
        };
        self.capture[l].1 = (s - self.capture[l].0) as isize;
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.capture[l].1 = CAP_UNFINISHED; // undo capture
        }
        Ok(r)
    }

    /// A back-reference `%1`-`%9` (`%0` is an invalid index, as in C).
    fn match_capture(&mut self, s: usize, l: u8) -> Res<Option<usize>> {
        let l = i32::from(l) - i32::from(b'1');
        let Some(&(init, len)) = usize::try_from(l)
            .ok()
            .filter(|&l| l < self.level)
            .and_then(|l| self.capture.get(l))
            .filter(|c| c.1 != CAP_UNFINISHED)
        else {
            return fail(format!("invalid capture index %{}", l + 1));
        };
        let Ok(len) = usize::try_from(len) else {
            return Ok(None); // a position capture never matches (its length is negative)
        };
        self.steps((len / 64) as u32)?;
        let ok = self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len];
        Ok(ok.then_some(s + len))
    }

    /// lstrlib's `match`: the end of the match of `pat[p..]` at `s`, if any.
    fn do_match(&mut self, s: usize, p: usize) -> Res<Option<usize>> {
        if self.depth == 0 {
            return fail("pattern too complex");
        }
        self.depth -= 1;
        let r = self.match_body(s, p);
        self.depth += 1;
        r
    }

    fn match_body(&mut self, mut s: usize, mut p: usize) -> Res<Option<usize>> {
        loop {
            // each pass of this loop stands for a tail call of `match` in C
            self.steps(1)?;
            if p == self.pat.len() {
                return Ok(Some(s));
            }
            match (self.pat[p], self.p(p + 1)) {
                (b'(', b')') => return self.start_capture(s, p + 2, CAP_POSITION),
                (b'(', _) => return self.start_capture(s, p + 1, CAP_UNFINISHED),
                (b')', _) => return self.end_capture(s, p + 1),
                (b'$', _) if p + 1 == self.pat.len() => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                (b'%', b'b') => match self.balance(s, p + 2)? {
                    Some(e) => (s, p) = (e, p + 4),
                    None => return Ok(None),
                },
                (b'%', b'f') => {
                    p += 2;
                    if self.p(p) != b'[' {
                        return fail("missing '[' after '%f' in pattern");
                    }
                    let ep = self.class_end(p)?;
                    let prev = if s == 0 { 0 } else { self.src[s - 1] };
                    if self.bracket(prev, p, ep - 1) || !self.bracket(self.s(s), p, ep - 1) {
                        return Ok(None);
                    }
                    p = ep;
                }
                (b'%', d) if d.is_ascii_digit() => match self.match_capture(s, d)? {
                    Some(e) => (s, p) = (e, p + 2),
                    None => return Ok(None),
                },
                _ => {
                    let ep = self.class_end(p)?;
                    let suffix = self.p(ep);
                    if !self.single(s, p, ep) {
                        if !matches!(suffix, b'*' | b'?' | b'-') {
                            return Ok(None); // '+' or no suffix
                        }
                        p = ep + 1; // accept empty
                        continue;
                    }
                    match suffix {
                        b'?' => match self.do_match(s + 1, ep + 1)? {
                            Some(r) => return Ok(Some(r)),
                            None => p = ep + 1,
                        },
                        b'+' => return self.max_expand(s + 1, p, ep),
                        b'*' => return self.max_expand(s, p, ep),
                        b'-' => return self.min_expand(s, p, ep),
                        _ => (s, p) = (s + 1, ep),
                    }
                }
            }
        }
    }

    /// The first match starting at `from` or after (at `from` only if `anchor`) that does not
    /// end at `last` (gmatch's `lastmatch`): its start and end. Each try counts a step.
    fn scan(
        &mut self,
        from: usize,
        anchor: bool,
        last: Option<usize>,
    ) -> Res<Option<(usize, usize)>> {
        for at in from..=self.src.len() {
            self.level = 0;
            if let Some(e) = self.do_match(at, 0)?.filter(|&e| Some(e) != last) {
                return Ok(Some((at, e)));
            }
            if anchor {
                break;
            }
        }
        Ok(None)
    }

    /// lstrlib's `get_onecapture`: capture `i`, or the whole match `s..e` when there are
    /// no captures and `i` is 0.
    fn get_capture(&self, i: usize, s: usize, e: usize) -> Res<Cap> {
        if i >= self.level {
            if i != 0 {
                return fail(format!("invalid capture index %{}", i + 1));
            }
            return Ok(Cap::Str(s, e));
        }
        match self.capture[i] {
            (_, CAP_UNFINISHED) => fail("unfinished capture"),
            (init, CAP_POSITION) => Ok(Cap::Pos(init + 1)),
            (init, len) => Ok(Cap::Str(init, init + len as usize)),
        }
    }

    fn capture_value(&self, lua: &Lua, i: usize, s: usize, e: usize) -> Res<Value> {
        Ok(match self.get_capture(i, s, e)? {
            Cap::Str(a, b) => Value::String(lua.create_string(&self.src[a..b])?),
            Cap::Pos(p) => Value::Integer(p as i64),
        })
    }

    /// lstrlib's `push_captures`; `whole` is None for `find`, which returns no whole match.
    fn captures(&self, lua: &Lua, whole: Option<(usize, usize)>) -> Res<Vec<Value>> {
        let n = if self.level == 0 && whole.is_some() {
            1
        } else {
            self.level
        };
        let (s, e) = whole.unwrap_or((0, 0));
        (0..n).map(|i| self.capture_value(lua, i, s, e)).collect()
    }
}

fn nil() -> MultiValue {
    MultiValue::from_vec(vec![Value::Nil])
}

/// lstrlib's `str_find_aux`: `string.find` (`find`) and `string.match`.
fn find_aux(lua: &Lua, args: &MultiValue, check: &MatchCheck, find: bool) -> Res<MultiValue> {
    let name = if find { "find" } else { "match" };
    let (s, p) = (str_arg(lua, args, 0, name)?, str_arg(lua, args, 1, name)?);
    let (s, p) = (s.as_bytes(), p.as_bytes());
    let init = posrelat_i(int_arg(lua, args, 2, name, 1)?, s.len()) - 1;
    if init > s.len() {
        return Ok(nil()); // starts after the subject's end
    }
    let plain = args
        .get(3)
        .is_some_and(|v| !matches!(v, Value::Nil | Value::Boolean(false)));
    if find && (plain || !p.iter().any(|c| SPECIALS.contains(c))) {
        return Ok(match memmem::find(&s[init..], &p) {
            Some(i) => MultiValue::from_vec(vec![
                Value::Integer((init + i + 1) as i64),
                Value::Integer((init + i + p.len()) as i64),
            ]),
            None => nil(),
        });
    }
    let anchor = p.first() == Some(&b'^');
    let mut m = Matcher::new(lua, &s, &p[usize::from(anchor)..], check);
    let Some((s1, e)) = m.scan(init, anchor, None)? else {
        return Ok(nil());
    };
    let mut out = Vec::new();
    if find {
        out.push(Value::Integer(s1 as i64 + 1));
        out.push(Value::Integer(e as i64));
    }
    out.extend(m.captures(lua, (!find).then_some((s1, e)))?);
    Ok(MultiValue::from_vec(out))
}

/// lstrlib's `gmatch`: `^` is not an anchor here (5.4 matches it literally), and an empty
/// match at the end of the previous match is skipped (`lastmatch`).
fn gmatch(lua: &Lua, args: &MultiValue, check: &MatchCheck) -> Res<MultiValue> {
    let (s, p) = (
        str_arg(lua, args, 0, "gmatch")?,
        str_arg(lua, args, 1, "gmatch")?,
    );
    let len = s.as_bytes().len();
    let mut pos = posrelat_i(int_arg(lua, args, 2, "gmatch", 1)?, len) - 1;
    pos = pos.min(len + 1);
    let check = check.clone();
    let mut last = None;
    let next = move |lua: &Lua, _: MultiValue| {
        let (src, pat) = (s.as_bytes(), p.as_bytes());
        let mut m = Matcher::new(lua, &src, &pat, &check);
        let r = m.scan(pos, false, last).and_then(|found| match found {
            Some((at, e)) => {
                (pos, last) = (e, Some(e));
                Ok(MultiValue::from_vec(m.captures(lua, Some((at, e)))?))
            }
            None => Ok(MultiValue::new()),
        });
        finish(lua, r)
    };
    let f = Value::Function(lua.create_function_mut(next)?);
    Ok(MultiValue::from_vec(vec![f]))
}

enum Repl {
    Str(mlua::String),
    Table(Table),
    Func(Function),
}

/// gsub's output, moved into Lua strings every [`FLUSH`] bytes.
struct Out<'l> {
    lua: &'l Lua,
    buf: Vec<u8>,
    done: Vec<mlua::String>,
}

impl Out<'_> {
    fn add(&mut self, b: &[u8]) -> Res<()> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= FLUSH {
            self.done.push(self.lua.create_string(&self.buf)?);
            self.buf.clear();
        }
        Ok(())
    }

    fn finish(mut self) -> Res<mlua::String> {
        if !self.done.is_empty() {
            let mut all = Vec::new();
            for d in &self.done {
                all.extend_from_slice(&d.as_bytes());
            }
            all.extend_from_slice(&self.buf);
            self.buf = all;
        }
        Ok(self.lua.create_string(&self.buf)?)
    }
}

/// lstrlib's `add_s`: the replacement string with `%0`-`%9` and `%%`.
fn add_s(m: &Matcher, out: &mut Out, news: &[u8], s: usize, e: usize) -> Res<()> {
    let mut i = 0;
    while let Some(off) = memchr(b'%', &news[i..]) {
        out.add(&news[i..i + off])?;
        let p = i + off + 1;
        match news.get(p).copied().unwrap_or(0) {
            b'%' => out.add(b"%")?,
            b'0' => out.add(&m.src[s..e])?,
            d @ b'1'..=b'9' => match m.get_capture(usize::from(d - b'1'), s, e)? {
                Cap::Str(a, b) => out.add(&m.src[a..b])?,
                Cap::Pos(x) => out.add(x.to_string().as_bytes())?,
            },
            _ => return fail("invalid use of '%' in replacement string"),
        }
        i = p + 1;
    }
    out.add(&news[i..])
}

/// lstrlib's `add_value`: appends the replacement of the match `s..e`; true if it changed
/// the text (a nil or false from a table or function keeps the match).
fn add_value(lua: &Lua, m: &Matcher, out: &mut Out, s: usize, e: usize, r: &Repl) -> Res<bool> {
    let v: Value = match r {
        Repl::Str(news) => return add_s(m, out, &news.as_bytes(), s, e).map(|()| true),
        Repl::Table(t) => t.get(m.capture_value(lua, 0, s, e)?)?,
        Repl::Func(f) => f.call(MultiValue::from_vec(m.captures(lua, Some((s, e)))?))?,
    };
    match v {
        Value::Nil | Value::Boolean(false) => out.add(&m.src[s..e]).map(|()| false),
        Value::String(_) | Value::Integer(_) | Value::Number(_) => match lua.coerce_string(v)? {
            Some(t) => out.add(&t.as_bytes()).map(|()| true),
            None => fail("invalid replacement value (a number)"),
        },
        v => fail(format!(
            "invalid replacement value (a {})",
            type_name(Some(&v))
        )),
    }
}

/// lstrlib's `str_gsub`.
fn gsub(lua: &Lua, args: &MultiValue, check: &MatchCheck) -> Res<MultiValue> {
    let (subject, p) = (
        str_arg(lua, args, 0, "gsub")?,
        str_arg(lua, args, 1, "gsub")?,
    );
    let (src, p) = (subject.as_bytes(), p.as_bytes());
    let max_s = int_arg(lua, args, 3, "gsub", src.len() as i64 + 1)?;
    let repl = match args.get(2) {
        Some(Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
            Repl::Str(str_arg(lua, args, 2, "gsub")?)
        }
        Some(Value::Table(t)) => Repl::Table(t.clone()),
        Some(Value::Function(f)) => Repl::Func(f.clone()),
        v => return bad_arg(2, "gsub", "string/function/table", v),
    };
    let anchor = p.first() == Some(&b'^');
    let mut m = Matcher::new(lua, &src, &p[usize::from(anchor)..], check);
    let mut out = Out {
        lua,
        buf: Vec::new(),
        done: Vec::new(),
    };
    let (mut at, mut last, mut n, mut changed) = (0, None, 0, false);
    while n < max_s {
        m.level = 0;
        match m.do_match(at, 0)? {
            Some(e) if Some(e) != last => {
                n += 1;
                changed |= add_value(lua, &m, &mut out, at, e, &repl)?;
                (at, last) = (e, Some(e));
            }
            _ if at < src.len() => {
                out.add(&src[at..at + 1])?; // no match here: keep one byte and go on
                at += 1;
            }
            _ => break,
        }
        if anchor {
            break;
        }
    }
    let result = if changed {
        out.add(&src[at..])?;
        out.finish()?
    } else {
        subject.clone()
    };
    Ok(MultiValue::from_vec(vec![
        Value::String(result),
        Value::Integer(n),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Defines `compare(fname, ...)`: runs lstrlib's function (kept in `O`) and ours (now in
    /// `string`) on the same arguments; nil when both return the same values, or both raise
    /// the same message ("bad argument" texts name the function differently: only both
    /// raising is required there), else a description of the difference.
    const COMPARE: &str = r#"
local O, N = O, { find = string.find, match = string.match, gmatch = string.gmatch, gsub = string.gsub }
local function show(v)
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v) .. ":" .. (math.type(v) or type(v))
end
local function run(lib, fname, args)
  local r
  if fname == "gmatch" then
    r = table.pack(pcall(lib.gmatch, table.unpack(args, 1, args.n)))
    if r[1] then
      local it, seen = r[2], {}
      for _ = 1, 200 do
        local one = table.pack(pcall(it))
        if not one[1] then return "err:" .. tostring(one[2]) end
        if one[2] == nil then break end
        for i = 2, one.n do one[i] = show(one[i]) end
        seen[#seen + 1] = "(" .. table.concat(one, ",", 2, one.n) .. ")"
      end
      return "ok:" .. table.concat(seen, " ")
    end
  else
    r = table.pack(pcall(lib[fname], table.unpack(args, 1, args.n)))
  end
  if not r[1] then return "err:" .. tostring(r[2]) end
  for i = 2, r.n do r[i] = show(r[i]) end
  return "ok:" .. table.concat(r, ", ", 2, r.n)
end
function compare(fname, ...)
  local args = table.pack(...)
  local a, b = run(O, fname, args), run(N, fname, args)
  if a == b or (a:sub(1, 17) == "err:bad argument " and b:sub(1, 4) == "err:") then return nil end
  for i = 1, args.n do args[i] = show(args[i]) end
  return fname .. "(" .. table.concat(args, ", ", 1, args.n) .. "): lstrlib " .. a .. " / ours " .. b
end
"#;

    const CASES: &str = r#"
local bad = {}
local function T(...)
  local d = compare(...)
  if d then bad[#bad + 1] = d end
end
local tbl = { a = "A", b = false, c = 1.5, d = {}, [1] = "one", hello = 42 }
local function fn(a, b)
  if a == "b" then return nil end
  if a == "d" then return true end
  return tostring(a) .. "|" .. tostring(b)
end
local function ALL(s, p, init)
  T("find", s, p, init); T("match", s, p, init); T("gmatch", s, p, init)
  T("gsub", s, p, "<%0>"); T("gsub", s, p, "[%1]"); T("gsub", s, p, tbl); T("gsub", s, p, fn)
  T("gsub", s, p, "%%x", 2)
end
local subjects = { "", "hello world", "  key = value  ", "abc123ABC_x", "(foo(bar))baz", "THE (quick) fox",
  "a,b,,c", "\0a\0b\255\254", "x=1, y=22, z=333", "aaa", "[]^$%-", "sip:alice@example.com;transport=tcp",
  "\t\v\f\r\n \127", "abcd" }
local patterns = { ".", "%a+", "%A+", "%c", "%C+", "%d+", "%D", "%g+", "%G", "%l+", "%L+", "%p", "%P+", "%s+",
  "%S+", "%u+", "%U", "%w+", "%W", "%x+", "%X", "%z", "%Z+", "%q", "%.", "%%", "%-", "%]",
  "[aeiou]", "[^aeiou]+", "[a-f]+", "[%a_][%w_]*", "[]]", "[^]]+", "[]a-]+", "[a-]", "[-a]", "[%]]", "[%%]",
  "[\0-\31]", "[\128-\255]+", "[^%s%d]+", "[%w-]+", "[a-%%]", "[%a-z]", "[^]", "[]",
  "^h", "^", "$", "d$", "^$", "^hello", "a^", "$a", "x$y", "^(a)", "^.-$", "%$",
  "a*", "a+", "a-", "a?", "a-b", ".-", ".*", ".+", ".?", "(.-)%s", "%s*(.-)%s*$", "^%s*(.-)%s*$", "a-$", "[ab]*c",
  "(a)(b)", "((a)(b))", "()", "()a()", "(%w+)=(%w+)", "(%d)(%d)(%d)", "(h)(e)(l)(l)(o)", "(()a)",
  "(a)%1", "(%a)%1", "(.)%1", "((.)%2)", "()%1", "(a*)%1",
  "%b()", "%b((", "%bxy", "%b\0\255", "%f[%w]%w+", "%f[%W]", "%f[%a]", "%f[^%z]", "%f[%z]", "%f[^\0]", "%f[a]", "%f[]]",
  "\0", "%z+", "\255", "[\0]", "\0a\0", "%", "%1", "(", ")", "(()", "[a", "[^", "[%", "%b", "%ba", "%f", "%fa",
  "%2", "(a)%2", "((a)%1)", "%0", "a)", "[a%", "(a", "((a)", "hello", "o w", ",", ",,", "a.b", "x*", "", "e", "%s" }
for _, s in ipairs(subjects) do
  for _, p in ipairs(patterns) do ALL(s, p) end
end
for _, i in ipairs({ -100, -12, -3, -1, 0, 1, 2, 5, 11, 12, 13, 20, math.maxinteger, math.mininteger }) do
  for _, p in ipairs({ "o", "l+", "", "()", "^h", "^w", "%f[%w]", "x*", "$" }) do ALL("hello world", p, i) end
  ALL("", "", i)
end
-- plain find
T("find", "a.b*c", ".b*", 1, true); T("find", "a+b", "+", 1, 1); T("find", "abc", "", 10, true)
T("find", "abc", "", 4, true); T("find", "abc", "b", nil, false); T("find", "a\0b", "\0", 1, true)
T("find", "abc", "c", -1, true); T("find", "aXb", "%a", 1, true); T("find", "x[y", "[", 1, {})
-- arguments: numbers are strings, strings are integers, everything else is an error
T("find"); T("find", nil, "x"); T("find", "x"); T("find", {}, "x"); T("find", "x", "x", "a")
T("find", "x", "x", 1.5); T("find", "x", "x", "2"); T("find", "x", "x", 2.0); T("gsub", "x", "x")
T("gsub", "x", "x", true); T("gsub", "x", "x", "y", 1.5); T("gsub", "x", "x", "y", "z"); T("gmatch", nil, "x")
T("gmatch", "x"); T("gmatch", "x", "x", "y"); T("match", 12345, 3); T("gsub", 12345, 3, 9); T("gsub", 1.5, "%.", "+")
T("find", 2^53, "9"); T("gsub", "abc", "%w", 1.25); T("gsub", "abc", "%w", 7); T("match", "x", {})
T("find", "x", "x", 1e100)
-- gsub: limits, anchors, empty matches, replacement strings
for _, n in ipairs({ -1, 0, 1, 2, 3, 100, 2.0, "2" }) do
  T("gsub", "hello world", "o", "0", n); T("gsub", "abc", "", "-", n); T("gsub", "abc", "%w", fn, n)
end
T("gsub", "aaa", "^a", "b"); T("gsub", "hello hello", "^hello", "x"); T("gsub", "abc", "^", ">")
T("gsub", "abc", "", "-"); T("gsub", "abc", "x*", "-"); T("gsub", "abc", "b*", "-"); T("gsub", "", "", "x")
T("gsub", "abc", "%w", "%"); T("gsub", "abc", "%w", "%a"); T("gsub", "abc", "%w", "%%%0%%"); T("gsub", "abc", "(%w)", "%2")
T("gsub", "abc", "()", "%1"); T("gsub", "abc", "(b)()", "%2%1%0"); T("gsub", "abc", "%w", "%\0")
T("gsub", "abc", "%w", { a = 1, b = 2.5, c = math.maxinteger }); T("gsub", "abc", "%w", function() return {} end)
T("gsub", "abc", "%w", function() return 7 end); T("gsub", "abc", "%w", function() return false end)
T("gsub", "abc", "()", { [1] = "x", [3] = "y" }); T("gsub", "abc", "%w", setmetatable({}, { __index = function(_, k) return k:upper() end }))
-- gmatch: empty matches, init, '^' taken literally
T("gmatch", "abc", "x*"); T("gmatch", "^a^a", "^a"); T("gmatch", "abc", "()"); T("gmatch", "abc", ".-")
T("gmatch", "a,b,,c", "([^,]*)"); T("gmatch", "abc", "", 2); T("gmatch", "abc", "", 4); T("gmatch", "abc", "", 5)
T("gmatch", "abc", "%w", -1); T("gmatch", "hello world from Lua", "%a+", 3)
-- limits
T("find", ("a"):rep(40), ("(a)"):rep(32)); T("find", ("a"):rep(40), ("(a)"):rep(33))
T("match", ("a"):rep(300), ("a?"):rep(300)); T("match", ("a"):rep(300), ("a?"):rep(150))
T("match", ("a"):rep(300), ("(a)"):rep(20) .. ".-" .. ("%1"):rep(5))
T("find", ("x"):rep(5000), "x*y"); T("find", ("x"):rep(500), "%bxy")
return bad
"#;

    fn ok_check() -> MatchCheck {
        Arc::new(|_: &Lua| Ok(()))
    }

    /// A Lua with lstrlib's functions in `O` and ours in `string`, and `compare`.
    fn both(check: MatchCheck) -> Lua {
        let lua = Lua::new();
        let string: Table = lua.globals().get("string").unwrap();
        let orig = lua.create_table().unwrap();
        for f in ["find", "match", "gmatch", "gsub"] {
            orig.set(f, string.get::<Function>(f).unwrap()).unwrap();
        }
        lua.globals().set("O", orig).unwrap();
        install(&lua, check).unwrap();
        lua.load(COMPARE).exec().unwrap();
        lua
    }

    #[test]
    fn matches_lstrlib_on_a_table_of_cases() {
        let lua = both(ok_check());
        let bad: Vec<String> = lua.load(CASES).eval().unwrap();
        assert!(
            bad.is_empty(),
            "{} mismatches:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    #[test]
    fn matches_lstrlib_on_random_patterns() {
        let lua = both(ok_check());
        let compare: Function = lua.globals().get("compare").unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let pat_alphabet = b"ab()%.*+-?[]^$1bf";
        let subj_alphabet = b"aab()[]^$%.\0";
        let mut bad = Vec::new();
        for _ in 0..4000 {
            let p: Vec<u8> = (0..next(9))
                .map(|_| pat_alphabet[next(pat_alphabet.len())])
                .collect();
            let s: Vec<u8> = (0..next(12))
                .map(|_| subj_alphabet[next(subj_alphabet.len())])
                .collect();
            let init = next(16) as i64 - 4;
            let (ls, lp) = (
                lua.create_string(&s).unwrap(),
                lua.create_string(&p).unwrap(),
            );
            for (f, extra) in [
                ("find", Value::Integer(init)),
                ("match", Value::Nil),
                ("gmatch", Value::Nil),
            ] {
                let d: Option<String> = compare.call((f, &ls, &lp, extra)).unwrap();
                bad.extend(d);
            }
            let d: Option<String> = compare.call(("gsub", &ls, &lp, "<%0%1>")).unwrap();
            bad.extend(d);
        }
        assert!(
            bad.is_empty(),
            "{} mismatches:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }

    /// A check that fails from its `limit`-th call on, and the number of calls.
    fn failing_check(limit: usize) -> (MatchCheck, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let check: MatchCheck = Arc::new(move |_: &Lua| {
            if c.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
                return Err(mlua::Error::runtime("budget spent"));
            }
            Ok(())
        });
        (check, calls)
    }

    #[test]
    fn a_runaway_match_stops_at_the_check() {
        for code in [
            r#"return ("a"):rep(4000):find("(.-)(.-)(.-)x")"#,
            r#"return ("a"):rep(4000):match("(.-)(.-)(.-)x")"#,
            r#"for _ in ("a"):rep(4000):gmatch("(.-)(.-)(.-)x") do end"#,
            r#"return ("a"):rep(4000):gsub("(.-)(.-)(.-)x", "")"#,
            r#"return ("("):rep(4000):find("%b()")"#,
            r#"return ("a"):rep(100000):find(".-b")"#,
        ] {
            let lua = Lua::new();
            let (check, calls) = failing_check(10);
            install(&lua, check).unwrap();
            let start = Instant::now();
            let err = lua.load(code).exec().unwrap_err();
            assert!(start.elapsed() < Duration::from_secs(1), "{code}");
            assert!(err.to_string().contains("budget spent"), "{code}: {err}");
            assert_eq!(calls.load(Ordering::Relaxed), 10, "{code}");
            // pcall sees the check's own error, not a pattern error
            let (ok, msg): (bool, String) = lua
                .load(r#"local ok, e = pcall(string.find, ("a"):rep(4000), "(.-)(.-)x") return ok, tostring(e)"#)
                .eval()
                .unwrap();
            assert!(!ok && msg.contains("budget spent"), "{msg}");
        }
    }

    #[test]
    fn a_long_but_finite_match_checks_in_and_succeeds() {
        let (check, calls) = failing_check(usize::MAX);
        let lua = both(check);
        let d: Option<String> = lua
            .load(r#"return compare("find", ("a"):rep(300), "(.-)(.-)x")"#)
            .eval()
            .unwrap();
        assert_eq!(d, None);
        assert!(calls.load(Ordering::Relaxed) > 100);
    }

    #[test]
    fn errors_are_strings_blamed_on_the_caller() {
        for call in [
            "x:find('%')",
            "x:match('[a')",
            "x:gsub('x', '%2')",
            "x:find(nil)",
        ] {
            let lua = both(ok_check()); // the chunk below puts lstrlib's functions back
            let code = format!(
                "local x = 'x'\nlocal function f() local r = {call} return r end\n\
                 local _, e = pcall(f)\n\
                 string.find, string.match, string.gsub = O.find, O.match, O.gsub\n\
                 local _, o = pcall(f)\n\
                 return e, o"
            );
            let (ours, orig): (String, String) = lua.load(code).set_name("=t").eval().unwrap();
            assert!(ours.starts_with("t:2: "), "{ours}");
            if !orig.contains("bad argument") {
                assert_eq!(ours, orig);
            }
        }
        let lua = both(ok_check());
        let msg: String = lua
            .load("local ok, e = pcall(function()\n  for _ in ('x'):gmatch('(') do end\nend) return e")
            .set_name("=t")
            .eval()
            .unwrap();
        assert_eq!(msg, "t:2: unfinished capture");
    }

    #[test]
    fn gsub_output_counts_against_the_memory_limit() {
        let lua = Lua::new();
        install(&lua, ok_check()).unwrap();
        lua.set_memory_limit(8 << 20).unwrap();
        let err = lua
            .load(r#"return ("x"):rep(2000):gsub(".", ("y"):rep(100000))"#)
            .exec()
            .unwrap_err();
        assert!(err.to_string().contains("not enough memory"), "{err}");
    }
}

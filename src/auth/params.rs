//! The `Digest` header syntax: credentials (Authorization / Proxy-Authorization, RFC 3261
//! 25.1 `credentials`, RFC 7616 3.4) and challenges (WWW-Authenticate / Proxy-Authenticate,
//! RFC 7616 3.3), and the client side of the exchange (`answer_challenge`) that tests, the
//! bench and a future UAC use.

use super::hash::{self, Algorithm};
use crate::sip::quoted_end;
use std::borrow::Cow;

/// Splits `Digest <params>`; the scheme is case-insensitive (RFC 7235 2.1).
fn strip_digest(value: &str) -> Option<&str> {
    let v = value.trim_start_matches([' ', '\t']);
    let (scheme, rest) = v.split_at(v.find([' ', '\t']).unwrap_or(v.len()));
    scheme.eq_ignore_ascii_case("Digest").then_some(rest)
}

/// Walks `name=value` pairs separated by commas (RFC 3261 25.1 `digest-response` /
/// `digest-cln`); a value is a token or a quoted string (backslash escapes undone). `f`
/// gets each pair; names are as written (callers compare them case-insensitively).
fn walk_params<'a>(
    mut s: &'a str,
    mut f: impl FnMut(&'a str, Cow<'a, str>) -> Result<(), &'static str>,
) -> Result<(), &'static str> {
    let ws = |c: char| c == ' ' || c == '\t';
    loop {
        s = s.trim_start_matches(|c| ws(c) || c == ',');
        if s.is_empty() {
            return Ok(());
        }
        let eq = s.find('=').ok_or("parameter without value")?;
        let name = s[..eq].trim_matches(ws);
        if !crate::sip::is_token(name) {
            return Err("bad parameter name");
        }
        s = s[eq + 1..].trim_start_matches(ws);
        let value = if s.starts_with('"') {
            let end = quoted_end(s).ok_or("unterminated quoted string")?;
            let inner = &s[1..end - 1];
            s = &s[end..];
            if inner.contains('\\') {
                let mut out = String::with_capacity(inner.len());
                let mut chars = inner.chars();
                while let Some(c) = chars.next() {
                    out.push(if c == '\\' {
                        chars.next().unwrap_or('\\')
                    } else {
                        c
                    });
                }
                Cow::Owned(out)
            } else {
                Cow::Borrowed(inner)
            }
        } else {
            let end = s.find(|c| ws(c) || c == ',').unwrap_or(s.len());
            let v = &s[..end];
            s = &s[end..];
            if v.is_empty() {
                return Err("empty parameter value");
            }
            Cow::Borrowed(v)
        };
        s = s.trim_start_matches(ws);
        if !(s.is_empty() || s.starts_with(',')) {
            return Err("junk after parameter");
        }
        f(name, value)?;
    }
}

fn set<'a>(slot: &mut Option<Cow<'a, str>>, v: Cow<'a, str>) -> Result<(), &'static str> {
    // RFC 7616 3.4: each directive at most once; a duplicate makes the header ambiguous.
    if slot.is_some() {
        return Err("duplicate parameter");
    }
    *slot = Some(v);
    Ok(())
}

/// The parameters of one `Digest` credentials header that verification uses. Unknown
/// parameters are ignored (RFC 7616 3.4: "any unrecognized directive MUST be ignored").
#[derive(Debug, Default)]
pub(crate) struct Credentials<'a> {
    pub username: Option<Cow<'a, str>>,
    pub realm: Option<Cow<'a, str>>,
    pub nonce: Option<Cow<'a, str>>,
    pub uri: Option<Cow<'a, str>>,
    pub response: Option<Cow<'a, str>>,
    pub algorithm: Option<Cow<'a, str>>,
    pub cnonce: Option<Cow<'a, str>>,
    pub opaque: Option<Cow<'a, str>>,
    pub qop: Option<Cow<'a, str>>,
    pub nc: Option<Cow<'a, str>>,
    pub userhash: Option<Cow<'a, str>>,
}

impl<'a> Credentials<'a> {
    /// Parses a credentials value; `None` when it is not the Digest scheme at all.
    pub fn parse(value: &'a str) -> Option<Result<Credentials<'a>, &'static str>> {
        let rest = strip_digest(value)?;
        let mut c = Credentials::default();
        let r = walk_params(rest, |name, v| {
            // Names compare case-insensitively (RFC 7616 3.4) and without allocating:
            // this runs for every parameter of every authenticated request.
            let is = |n: &str| name.eq_ignore_ascii_case(n);
            let slot = if is("username") {
                &mut c.username
            } else if is("realm") {
                &mut c.realm
            } else if is("nonce") {
                &mut c.nonce
            } else if is("uri") {
                &mut c.uri
            } else if is("response") {
                &mut c.response
            } else if is("algorithm") {
                &mut c.algorithm
            } else if is("cnonce") {
                &mut c.cnonce
            } else if is("opaque") {
                &mut c.opaque
            } else if is("qop") {
                &mut c.qop
            } else if is("nc") {
                &mut c.nc
            } else if is("userhash") {
                &mut c.userhash
            } else {
                return Ok(());
            };
            set(slot, v)
        });
        Some(r.map(|()| c))
    }

    /// The algorithm named (RFC 7616 3.4: absent means MD5). `None`: one we do not speak.
    pub fn algorithm(&self) -> Option<Algorithm> {
        match &self.algorithm {
            None => Some(Algorithm::Md5),
            Some(a) => Algorithm::parse(a),
        }
    }
}

/// A parsed `Digest` challenge, as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    pub algorithm: Algorithm,
    /// The qop options offered (RFC 7616 3.3: a quoted, comma-separated list).
    pub qop: Vec<String>,
    pub stale: bool,
}

impl Challenge {
    /// Parses a WWW-Authenticate / Proxy-Authenticate value. Errors name the defect.
    pub fn parse(value: &str) -> Result<Challenge, &'static str> {
        let rest = strip_digest(value).ok_or("not a Digest challenge")?;
        let (mut realm, mut nonce, mut opaque, mut algorithm, mut qop, mut stale) =
            (None, None, None, None, None, None);
        walk_params(rest, |name, v| match name.to_ascii_lowercase().as_str() {
            "realm" => set(&mut realm, v),
            "nonce" => set(&mut nonce, v),
            "opaque" => set(&mut opaque, v),
            "algorithm" => set(&mut algorithm, v),
            "qop" => set(&mut qop, v),
            "stale" => set(&mut stale, v),
            _ => Ok(()),
        })?;
        let algorithm = match algorithm {
            None => Algorithm::Md5,
            Some(a) => Algorithm::parse(&a).ok_or("unsupported algorithm")?,
        };
        Ok(Challenge {
            realm: realm.ok_or("no realm")?.into_owned(),
            nonce: nonce.ok_or("no nonce")?.into_owned(),
            opaque: opaque.map(Cow::into_owned),
            algorithm,
            qop: qop
                .map(|q| {
                    q.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            stale: stale.is_some_and(|s| s.eq_ignore_ascii_case("true")),
        })
    }
}

/// Appends `s` as a quoted string (RFC 3261 25.1 `quoted-string`: `"` and `\` escaped).
pub(crate) fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// What a phone does with a challenge: the Authorization (or Proxy-Authorization) value
/// answering `challenge` for a request `method` to `uri`, with qop=auth, the given client
/// nonce and nonce count (RFC 7616 3.4). For tests, benches and an outgoing-auth UAC.
pub fn answer_challenge(
    challenge: &str,
    method: &str,
    uri: &str,
    user: &str,
    password: &str,
    cnonce: &str,
    nc: u32,
) -> Result<String, &'static str> {
    let ch = Challenge::parse(challenge)?;
    if !ch.qop.iter().any(|q| q.eq_ignore_ascii_case("auth")) {
        return Err("challenge does not offer qop=auth");
    }
    let ha1 = hash::ha1(user, &ch.realm, password, ch.algorithm);
    let nc = format!("{nc:08x}");
    let resp = hash::response(
        ch.algorithm,
        ha1.as_bytes(),
        ch.nonce.as_bytes(),
        nc.as_bytes(),
        cnonce.as_bytes(),
        b"auth",
        method.as_bytes(),
        uri.as_bytes(),
    )
    .hex();
    Ok(super::client::credentials_value(
        &ch,
        user,
        uri,
        resp.as_str(),
        Some((&nc, cnonce)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_credentials_with_quotes_escapes_and_case() {
        let v = r#"digest USERNAME="al\"ice", realm="example.com",nonce="abc", uri="sip:example.com", response="00", algorithm=SHA-256, cnonce="x y", qop=auth, nc=00000001, foo=bar"#;
        let c = Credentials::parse(v).unwrap().unwrap();
        assert_eq!(c.username.as_deref(), Some("al\"ice"));
        assert_eq!(c.realm.as_deref(), Some("example.com"));
        assert_eq!(c.cnonce.as_deref(), Some("x y"));
        assert_eq!(c.nc.as_deref(), Some("00000001"));
        assert_eq!(c.algorithm(), Some(Algorithm::Sha256));
    }

    #[test]
    fn rejects_malformed_credentials() {
        assert!(Credentials::parse("Basic YWxhZGRpbjpvcGVuc2VzYW1l").is_none());
        for bad in [
            r#"Digest username="alice"#,
            r#"Digest username="a", username="b""#,
            r#"Digest username"#,
            r#"Digest username=, realm="x""#,
            r#"Digest username="a" junk, realm="x""#,
            r#"Digest user name="a""#,
        ] {
            assert!(
                matches!(Credentials::parse(bad), Some(Err(_))),
                "accepted {bad}"
            );
        }
    }

    #[test]
    fn parses_challenge() {
        let ch = Challenge::parse(
            r#"Digest realm="example.com", nonce="n1", opaque="o", algorithm=SHA-256, qop="auth,auth-int", stale=TRUE"#,
        )
        .unwrap();
        assert_eq!(ch.algorithm, Algorithm::Sha256);
        assert_eq!(ch.qop, vec!["auth", "auth-int"]);
        assert!(ch.stale);
        assert_eq!(ch.opaque.as_deref(), Some("o"));
    }
}

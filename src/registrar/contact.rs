//! Reading what a REGISTER asks for: its Contact headers and expiry intervals
//! (RFC 3261 10.3 steps 6 and 7, 20.10, 20.19; RFC 5626 4.1-4.2 for `+sip.instance` and
//! `reg-id`). Pure functions, no state: everything here can be rejected before anything is
//! written.

use crate::sip::{split_commas, Headers, NameAddr, Uri};

/// What the Contact headers of a REGISTER ask for.
#[derive(Debug, Clone, PartialEq)]
pub enum ContactSet {
    /// No Contact: a query for the current bindings (RFC 3261 10.2.3).
    Query,
    /// `Contact: *` with `Expires: 0`: remove every binding (10.2.2).
    Wildcard,
    /// One or more contacts to add, refresh or remove.
    List(Vec<ContactSpec>),
}

/// One contact of a REGISTER.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactSpec {
    pub uri: Uri,
    /// The requested interval in seconds, before the registrar's limits; 0 removes.
    pub expires: u32,
    pub q: f32,
    pub instance: Option<String>,
    pub reg_id: Option<u32>,
}

/// What is wrong with a REGISTER; `Display` is the reason phrase of the 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContactError {
    #[error("Malformed Contact header ({0})")]
    Contact(String),
    #[error("Bad expires parameter in Contact")]
    ContactExpires,
    #[error("Bad q parameter in Contact")]
    Q,
    #[error("Bad +sip.instance parameter in Contact")]
    Instance,
    #[error("Bad reg-id parameter in Contact")]
    RegId,
    #[error("Malformed Expires header")]
    Expires,
    #[error("Multiple Expires headers")]
    MultipleExpires,
    #[error("Contact * must be the only Contact")]
    WildcardNotAlone,
    #[error("Contact * requires Expires: 0")]
    WildcardExpires,
}

/// delta-seconds (RFC 3261 25.1); a value beyond 2^32-1 is taken as 2^32-1 (20.19 / 10.2.1.1
/// ask to treat over-long values that way rather than reject them).
pub fn parse_delta_seconds(v: &str) -> Option<u32> {
    let v = v.trim_matches([' ', '\t']);
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits = v.trim_start_matches('0');
    if digits.len() > 10 {
        return Some(u32::MAX);
    }
    Some(digits.parse::<u64>().unwrap_or(0).min(u32::MAX as u64) as u32)
}

/// qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ) (RFC 3261 25.1).
pub fn parse_qvalue(v: &str) -> Option<f32> {
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, f),
        None => (v, ""),
    };
    if frac.len() > 3 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    match int {
        "0" => {
            let thousandths: u32 = format!("{frac:0<3}").parse().ok()?;
            Some(thousandths as f32 / 1000.0)
        }
        "1" if frac.bytes().all(|c| c == b'0') => Some(1.0),
        _ => None,
    }
}

/// Reads the Contact and Expires headers of a REGISTER. `default_expires` applies to a
/// contact with neither an `expires` parameter nor an Expires header (10.2.1.1).
pub fn parse_contacts(headers: &Headers, default_expires: u32) -> Result<ContactSet, ContactError> {
    let mut expires_headers = headers.get_all("Expires");
    let header_expires = match expires_headers.next() {
        None => None,
        Some(v) => Some(parse_delta_seconds(v).ok_or(ContactError::Expires)?),
    };
    if expires_headers.next().is_some() {
        return Err(ContactError::MultipleExpires);
    }

    let mut elements = Vec::new();
    for value in headers.get_all("Contact") {
        let parts = split_commas(value)
            .ok_or_else(|| ContactError::Contact("unterminated quoted string".into()))?;
        for p in parts {
            if p.is_empty() {
                return Err(ContactError::Contact("empty value".into()));
            }
            elements.push(p);
        }
    }
    if elements.is_empty() {
        return Ok(ContactSet::Query);
    }
    if elements.contains(&"*") {
        // 10.3 step 6: `*` only alone and only with Expires: 0.
        if elements.len() != 1 {
            return Err(ContactError::WildcardNotAlone);
        }
        if header_expires != Some(0) {
            return Err(ContactError::WildcardExpires);
        }
        return Ok(ContactSet::Wildcard);
    }

    let mut out = Vec::with_capacity(elements.len());
    for e in elements {
        let na = NameAddr::parse(e).map_err(|err| ContactError::Contact(err.to_string()))?;
        let expires = match na.params.get("expires") {
            Some(Some(v)) => parse_delta_seconds(v).ok_or(ContactError::ContactExpires)?,
            Some(None) => return Err(ContactError::ContactExpires),
            None => header_expires.unwrap_or(default_expires),
        };
        let q = match na.params.get("q") {
            Some(Some(v)) => parse_qvalue(v).ok_or(ContactError::Q)?,
            Some(None) => return Err(ContactError::Q),
            None => 1.0,
        };
        let instance = match na.params.get("+sip.instance") {
            Some(Some(v)) => {
                // A quoted string (RFC 5626 4.1: `"<urn:uuid:...>"`); keep the inside.
                let inner = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                if inner.is_empty() {
                    return Err(ContactError::Instance);
                }
                Some(inner.to_owned())
            }
            Some(None) => return Err(ContactError::Instance),
            None => None,
        };
        let reg_id = match na.params.get("reg-id") {
            // reg-id = 1*10DIGIT, 1 to 2^31-1 (RFC 5626 4.2).
            Some(Some(v)) => match parse_delta_seconds(v) {
                Some(n) if (1..1 << 31).contains(&n) => Some(n),
                _ => return Err(ContactError::RegId),
            },
            Some(None) => return Err(ContactError::RegId),
            None => None,
        };
        // RFC 5626 6: without an instance the Contact follows the plain RFC 3261 rules, so
        // a lone reg-id identifies nothing.
        let reg_id = if instance.is_some() { reg_id } else { None };
        out.push(ContactSpec {
            uri: na.uri,
            expires,
            q,
            instance,
            reg_id,
        });
    }
    Ok(ContactSet::List(out))
}

/// URI equality for bindings (RFC 3261 19.1.4, the parts that matter for a Contact):
/// scheme, user and password exact, host case-insensitive, port as written; a parameter
/// present in both must agree (case-insensitively), and `user`, `ttl`, `method`, `maddr`
/// and `transport` present in one must be in the other. URI headers are compared as text.
pub fn same_uri(a: &Uri, b: &Uri) -> bool {
    if a.opaque.is_some() || b.opaque.is_some() {
        return a.scheme == b.scheme && a.opaque == b.opaque;
    }
    if a.scheme != b.scheme
        || a.user != b.user
        || a.password != b.password
        || !a.host.matches(&b.host)
        || a.port != b.port
        || a.headers != b.headers
    {
        return false;
    }
    const MUST_MATCH: [&str; 5] = ["user", "ttl", "method", "maddr", "transport"];
    for (name, va) in a.params.iter() {
        match b.params.get(name) {
            Some(vb) => {
                let equal = match (va, vb) {
                    (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
                    (None, None) => true,
                    _ => false,
                };
                if !equal {
                    return false;
                }
            }
            None if MUST_MATCH.iter().any(|m| m.eq_ignore_ascii_case(name)) => return false,
            None => {}
        }
    }
    for (name, _) in b.params.iter() {
        if !a.params.has(name) && MUST_MATCH.iter().any(|m| m.eq_ignore_ascii_case(name)) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> Headers {
        let mut h = Headers::new();
        for (n, v) in list {
            h.push(n, *v);
        }
        h
    }

    fn list(set: ContactSet) -> Vec<ContactSpec> {
        match set {
            ContactSet::List(l) => l,
            other => panic!("expected a list, got {other:?}"),
        }
    }

    #[test]
    fn delta_seconds_and_qvalues() {
        assert_eq!(parse_delta_seconds("3600"), Some(3600));
        assert_eq!(parse_delta_seconds("0"), Some(0));
        assert_eq!(parse_delta_seconds("99999999999999"), Some(u32::MAX));
        assert_eq!(parse_delta_seconds("000000000000060"), Some(60));
        assert_eq!(parse_delta_seconds("-1"), None);
        assert_eq!(parse_delta_seconds("1h"), None);
        assert_eq!(parse_delta_seconds(""), None);
        assert_eq!(parse_qvalue("0.5"), Some(0.5));
        assert_eq!(parse_qvalue("0.125"), Some(0.125));
        assert_eq!(parse_qvalue("0"), Some(0.0));
        assert_eq!(parse_qvalue("1"), Some(1.0));
        assert_eq!(parse_qvalue("1.000"), Some(1.0));
        assert_eq!(parse_qvalue("1.5"), None);
        assert_eq!(parse_qvalue("0.1234"), None);
        assert_eq!(parse_qvalue(".5"), None);
        assert_eq!(parse_qvalue("2"), None);
    }

    #[test]
    fn no_contact_is_a_query() {
        assert_eq!(
            parse_contacts(&headers(&[("Expires", "60")]), 3600),
            Ok(ContactSet::Query)
        );
    }

    #[test]
    fn lists_params_and_defaults() {
        let h = headers(&[
            (
                "Contact",
                "<sip:a@1.2.3.4:5060>;q=0.5;expires=120, \"Bob\" <sip:b@h>",
            ),
            ("m", "sip:c@h;expires=30;q=1"),
            ("Expires", "300"),
        ]);
        let l = list(parse_contacts(&h, 3600).unwrap());
        assert_eq!(l.len(), 3);
        assert_eq!((l[0].expires, l[0].q), (120, 0.5));
        assert_eq!(l[0].uri.to_string(), "sip:a@1.2.3.4:5060");
        assert_eq!((l[1].expires, l[1].q), (300, 1.0));
        assert_eq!((l[2].expires, l[2].q), (30, 1.0));
        let l = list(parse_contacts(&headers(&[("Contact", "<sip:a@h>")]), 1800).unwrap());
        assert_eq!(l[0].expires, 1800);
    }

    #[test]
    fn instance_and_reg_id() {
        let h = headers(&[(
            "Contact",
            "<sip:a@h;transport=tcp>;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\";reg-id=1",
        )]);
        let l = list(parse_contacts(&h, 3600).unwrap());
        assert_eq!(
            l[0].instance.as_deref(),
            Some("<urn:uuid:00000000-0000-1000-8000-000A95A0E128>")
        );
        assert_eq!(l[0].reg_id, Some(1));
        // reg-id without an instance is plain RFC 3261.
        let h = headers(&[("Contact", "<sip:a@h>;reg-id=1")]);
        assert_eq!(list(parse_contacts(&h, 3600).unwrap())[0].reg_id, None);
        let h = headers(&[("Contact", "<sip:a@h>;+sip.instance=\"<x>\";reg-id=0")]);
        assert_eq!(parse_contacts(&h, 3600), Err(ContactError::RegId));
        let h = headers(&[("Contact", "<sip:a@h>;+sip.instance")]);
        assert_eq!(parse_contacts(&h, 3600), Err(ContactError::Instance));
    }

    #[test]
    fn wildcard_rules() {
        let ok = headers(&[("Contact", "*"), ("Expires", "0")]);
        assert_eq!(parse_contacts(&ok, 3600), Ok(ContactSet::Wildcard));
        let no_expires = headers(&[("Contact", "*")]);
        assert_eq!(
            parse_contacts(&no_expires, 3600),
            Err(ContactError::WildcardExpires)
        );
        let nonzero = headers(&[("Contact", "*"), ("Expires", "60")]);
        assert_eq!(
            parse_contacts(&nonzero, 3600),
            Err(ContactError::WildcardExpires)
        );
        let mixed = headers(&[("Contact", "*, <sip:a@h>"), ("Expires", "0")]);
        assert_eq!(
            parse_contacts(&mixed, 3600),
            Err(ContactError::WildcardNotAlone)
        );
        let two = headers(&[("Contact", "*"), ("Contact", "<sip:a@h>"), ("Expires", "0")]);
        assert_eq!(
            parse_contacts(&two, 3600),
            Err(ContactError::WildcardNotAlone)
        );
    }

    #[test]
    fn malformed_values_name_the_defect() {
        let cases: &[(&[(&str, &str)], ContactError)] = &[
            (
                &[("Contact", "<sip:a@h>;expires=soon")],
                ContactError::ContactExpires,
            ),
            (
                &[("Contact", "<sip:a@h>;expires")],
                ContactError::ContactExpires,
            ),
            (&[("Contact", "<sip:a@h>;q=2")], ContactError::Q),
            (
                &[("Contact", "<sip:a@h>"), ("Expires", "-5")],
                ContactError::Expires,
            ),
            (
                &[("Contact", "<sip:a@h>"), ("Expires", "5"), ("Expires", "6")],
                ContactError::MultipleExpires,
            ),
        ];
        for (h, want) in cases {
            assert_eq!(
                parse_contacts(&headers(h), 3600).as_ref(),
                Err(want),
                "{h:?}"
            );
        }
        let e = parse_contacts(&headers(&[("Contact", "<sip:a@h")]), 3600).unwrap_err();
        assert_eq!(e.to_string(), "Malformed Contact header (missing '>')");
        let e = parse_contacts(&headers(&[("Contact", "<sip:a@[::1>")]), 3600).unwrap_err();
        assert!(matches!(e, ContactError::Contact(_)), "{e:?}");
        let e = parse_contacts(&headers(&[("Contact", "<sip:a@h>, ,<sip:b@h>")]), 3600);
        assert!(matches!(e, Err(ContactError::Contact(_))), "{e:?}");
    }

    #[test]
    fn uri_comparison() {
        let u = |s| Uri::parse(s).unwrap();
        assert!(same_uri(&u("sip:a@HOST.example"), &u("sip:a@host.example")));
        assert!(!same_uri(&u("sip:A@host"), &u("sip:a@host")));
        assert!(!same_uri(&u("sip:a@host"), &u("sip:a@host:5060")));
        assert!(!same_uri(&u("sip:a@host;transport=tcp"), &u("sip:a@host")));
        assert!(same_uri(&u("sip:a@host;foo=1"), &u("sip:a@host")));
        assert!(!same_uri(&u("sip:a@host;foo=1"), &u("sip:a@host;foo=2")));
        assert!(same_uri(
            &u("sip:a@host;Transport=TCP"),
            &u("sip:a@host;transport=tcp")
        ));
    }
}

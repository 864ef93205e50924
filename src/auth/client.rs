//! Digest as a client (RFC 3261 22.2, RFC 7616, RFC 8760): what the server answers when a
//! trunk challenges one of its requests with 401 or 407.
//!
//! Owns: the credentials of one account (password or HA1s), the choice among the
//! challenges offered, and the nonce counts of the nonce in use. Must not touch: which
//! request is sent again (new CSeq, same Call-ID) or when to give up: the caller's; it
//! answers a challenge once, and a second challenge that is not `stale=true` is a failure
//! (RFC 3261 22.2: the credentials were refused), never a loop.

use parking_lot::Mutex;
use rand::Rng;

use super::hash::{self, Algorithm};
use super::params::{push_quoted, Challenge};

/// What the account proves its identity with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSecret {
    Password(String),
    /// H(username:realm:password) per algorithm, lower-case hex; bound to one realm.
    Ha1 {
        md5: Option<String>,
        sha256: Option<String>,
    },
}

/// One account at a trunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub username: String,
    pub secret: ClientSecret,
    /// Answer only this realm (`None`: any realm offered; required with HA1s).
    pub realm: Option<String>,
}

/// Why a challenge could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientAuthError {
    #[error("no Digest challenge we can answer ({0})")]
    Unusable(String),
    #[error("challenged for realm {offered:?}, credentials are for {ours:?}")]
    OtherRealm { offered: String, ours: String },
}

/// Answers challenges for one account, counting uses of each nonce.
#[derive(Debug)]
pub struct DigestClient {
    creds: ClientCredentials,
    /// The nonce answered last and how often (RFC 7616 3.4.5: nc counts requests with the
    /// same nonce, from 1).
    last: Mutex<Option<(String, u32)>>,
}

/// An Authorization (401) or Proxy-Authorization (407) value, and what was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `Authorization` or `Proxy-Authorization`.
    pub header: &'static str,
    pub value: String,
    /// The challenge said the previous nonce was stale (RFC 7616 3.3): a second challenge
    /// that says so is answered again, not treated as refused credentials.
    pub stale: bool,
}

impl DigestClient {
    pub fn new(creds: ClientCredentials) -> DigestClient {
        DigestClient {
            creds,
            last: Mutex::new(None),
        }
    }

    pub fn username(&self) -> &str {
        &self.creds.username
    }

    /// Answers the challenges of a 401 (`WWW-Authenticate` values) or a 407
    /// (`Proxy-Authenticate` values) to `method` sent to `uri`. Of several challenges the
    /// first one we can answer is used (RFC 7616 3.7: the server lists them in order of
    /// preference; RFC 8760 has SHA-256 offered before MD5).
    pub fn answer(
        &self,
        status: u16,
        challenges: &[&str],
        method: &str,
        uri: &str,
    ) -> Result<Answer, ClientAuthError> {
        let header = if status == 407 {
            "Proxy-Authorization"
        } else {
            "Authorization"
        };
        let mut why = String::from("none offered");
        for text in challenges {
            let ch = match Challenge::parse(text) {
                Ok(ch) => ch,
                Err(e) => {
                    why = e.to_string();
                    continue;
                }
            };
            if let Some(ours) = &self.creds.realm {
                if *ours != ch.realm {
                    why = ClientAuthError::OtherRealm {
                        offered: ch.realm.clone(),
                        ours: ours.clone(),
                    }
                    .to_string();
                    continue;
                }
            }
            let Some(ha1) = self.ha1(&ch) else {
                why = format!("no HA1 for {}", ch.algorithm.name());
                continue;
            };
            let qop_auth = ch.qop.iter().any(|q| q.eq_ignore_ascii_case("auth"));
            if !ch.qop.is_empty() && !qop_auth {
                why = "only qop=auth-int offered".into();
                continue;
            }
            let nc = self.next_count(&ch.nonce);
            let value = self.build(&ch, &ha1, qop_auth, nc, method, uri);
            return Ok(Answer {
                header,
                value,
                stale: ch.stale,
            });
        }
        Err(ClientAuthError::Unusable(why))
    }

    fn ha1(&self, ch: &Challenge) -> Option<String> {
        match &self.creds.secret {
            ClientSecret::Password(p) => {
                Some(hash::ha1(&self.creds.username, &ch.realm, p, ch.algorithm))
            }
            ClientSecret::Ha1 { md5, sha256 } => match ch.algorithm {
                Algorithm::Md5 => md5.clone(),
                Algorithm::Sha256 => sha256.clone(),
            },
        }
    }

    fn next_count(&self, nonce: &str) -> u32 {
        let mut last = self.last.lock();
        match last.as_mut() {
            Some((n, count)) if n == nonce => {
                *count = count.saturating_add(1);
                *count
            }
            _ => {
                *last = Some((nonce.to_string(), 1));
                1
            }
        }
    }

    fn build(
        &self,
        ch: &Challenge,
        ha1: &str,
        qop_auth: bool,
        nc: u32,
        method: &str,
        uri: &str,
    ) -> String {
        let cnonce = format!("{:016x}", rand::rng().random::<u64>());
        let nc = format!("{nc:08x}");
        let response = if qop_auth {
            hash::response(
                ch.algorithm,
                ha1.as_bytes(),
                ch.nonce.as_bytes(),
                nc.as_bytes(),
                cnonce.as_bytes(),
                b"auth",
                method.as_bytes(),
                uri.as_bytes(),
            )
        } else {
            // RFC 2069 compatibility (RFC 3261 22.4): H(HA1:nonce:HA2), no cnonce/nc.
            hash::response_without_qop(
                ch.algorithm,
                ha1.as_bytes(),
                ch.nonce.as_bytes(),
                method.as_bytes(),
                uri.as_bytes(),
            )
        };
        let qop = qop_auth.then_some((nc.as_str(), cnonce.as_str()));
        credentials_value(ch, &self.creds.username, uri, response.hex().as_str(), qop)
    }
}

/// The `Digest ...` credentials answering `ch` (RFC 7616 3.4): with `qop` (nc, cnonce)
/// the qop=auth form, else the RFC 2069 one.
pub(super) fn credentials_value(
    ch: &Challenge,
    user: &str,
    uri: &str,
    response: &str,
    qop: Option<(&str, &str)>,
) -> String {
    let mut out = String::with_capacity(320);
    out.push_str("Digest username=");
    push_quoted(&mut out, user);
    out.push_str(", realm=");
    push_quoted(&mut out, &ch.realm);
    out.push_str(", nonce=");
    push_quoted(&mut out, &ch.nonce);
    out.push_str(", uri=");
    push_quoted(&mut out, uri);
    out.push_str(", response=\"");
    out.push_str(response);
    out.push_str("\", algorithm=");
    out.push_str(ch.algorithm.name());
    if let Some(o) = &ch.opaque {
        out.push_str(", opaque=");
        push_quoted(&mut out, o);
    }
    if let Some((nc, cnonce)) = qop {
        out.push_str(", qop=auth, nc=");
        out.push_str(nc);
        out.push_str(", cnonce=");
        push_quoted(&mut out, cnonce);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(secret: ClientSecret, realm: Option<&str>) -> DigestClient {
        DigestClient::new(ClientCredentials {
            username: "pbx".into(),
            secret,
            realm: realm.map(str::to_string),
        })
    }

    fn param<'a>(value: &'a str, name: &str) -> &'a str {
        let at = value.find(&format!("{name}=")).unwrap() + name.len() + 1;
        let rest = value[at..].trim_start_matches('"');
        let end = rest.find(['"', ',']).unwrap_or(rest.len());
        &rest[..end]
    }

    #[test]
    fn answers_sha256_first_and_counts_nonce_uses() {
        let c = client(ClientSecret::Password("secret".into()), None);
        let sha = r#"Digest realm="carrier", nonce="n1", qop="auth", algorithm=SHA-256"#;
        let md5 = r#"Digest realm="carrier", nonce="n1", qop="auth", algorithm=MD5"#;
        let a = c.answer(407, &[sha, md5], "INVITE", "sip:+1555@c").unwrap();
        assert_eq!(a.header, "Proxy-Authorization");
        assert!(a.value.contains("algorithm=SHA-256"), "{}", a.value);
        assert_eq!(param(&a.value, "nc"), "00000001");
        let again = c.answer(401, &[sha], "REGISTER", "sip:c").unwrap();
        assert_eq!(again.header, "Authorization");
        assert_eq!(param(&again.value, "nc"), "00000002");
        let fresh = c
            .answer(401, &[&sha.replace("n1", "n2")], "REGISTER", "sip:c")
            .unwrap();
        assert_eq!(param(&fresh.value, "nc"), "00000001");
        // The expected response, computed independently.
        let ha1 = hash::ha1("pbx", "carrier", "secret", Algorithm::Sha256);
        let want = hash::response(
            Algorithm::Sha256,
            ha1.as_bytes(),
            b"n1",
            b"00000001",
            param(&a.value, "cnonce").as_bytes(),
            b"auth",
            b"INVITE",
            b"sip:+1555@c",
        );
        assert_eq!(param(&a.value, "response"), want.hex().as_str());
    }

    #[test]
    fn without_qop_answers_the_rfc2069_way() {
        let c = client(ClientSecret::Password("secret".into()), None);
        let a = c
            .answer(401, &[r#"Digest realm="r", nonce="abc""#], "BYE", "sip:x")
            .unwrap();
        assert!(!a.value.contains("qop") && !a.value.contains("cnonce"));
        let ha1 = hash::ha1("pbx", "r", "secret", Algorithm::Md5);
        let want =
            hash::response_without_qop(Algorithm::Md5, ha1.as_bytes(), b"abc", b"BYE", b"sip:x");
        assert_eq!(param(&a.value, "response"), want.hex().as_str());
    }

    #[test]
    fn ha1_secrets_answer_only_their_algorithm_and_realm() {
        let md5 = hash::ha1("pbx", "carrier", "secret", Algorithm::Md5);
        let c = client(
            ClientSecret::Ha1 {
                md5: Some(md5),
                sha256: None,
            },
            Some("carrier"),
        );
        let sha = r#"Digest realm="carrier", nonce="n", qop="auth", algorithm=SHA-256"#;
        let md5ch = r#"Digest realm="carrier", nonce="n", qop="auth""#;
        assert!(matches!(
            c.answer(401, &[sha], "REGISTER", "sip:c"),
            Err(ClientAuthError::Unusable(_))
        ));
        let a = c.answer(401, &[sha, md5ch], "REGISTER", "sip:c").unwrap();
        assert!(a.value.contains("algorithm=MD5"));
        let other = r#"Digest realm="elsewhere", nonce="n", qop="auth""#;
        let e = c.answer(401, &[other], "REGISTER", "sip:c").unwrap_err();
        assert!(e.to_string().contains("elsewhere"), "{e}");
        assert!(c
            .answer(
                401,
                &[r#"Digest realm="carrier", nonce="n", qop="auth-int""#],
                "X",
                "sip:c"
            )
            .is_err());
        assert!(c.answer(401, &["Basic realm=\"x\""], "X", "sip:c").is_err());
        let stale = c
            .answer(401, &[&format!("{md5ch}, stale=true")], "X", "sip:c")
            .unwrap();
        assert!(stale.stale);
    }
}

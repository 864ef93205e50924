//! The digest algorithms (RFC 7616 3.4.1 / RFC 8760 2.1) and the three hashes of a digest
//! exchange: HA1, HA2 and the response (RFC 7616 3.4.1-3.4.3 with qop=auth).
//!
//! Every hash is computed over parts fed one after another (no intermediate `format!`):
//! verification runs once per authenticated request and has to stay in the microseconds.

use md5::Md5;
use sha2::{Digest, Sha256};

/// A digest algorithm we speak. `-sess` variants are not offered, so they are not parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    /// The token of the `algorithm` parameter.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Parses an `algorithm` value (case-insensitive, RFC 7616 3.3: the token is case-
    /// insensitive like every digest parameter name).
    pub fn parse(s: &str) -> Option<Algorithm> {
        if s.eq_ignore_ascii_case("MD5") {
            Some(Algorithm::Md5)
        } else if s.eq_ignore_ascii_case("SHA-256") {
            Some(Algorithm::Sha256)
        } else {
            None
        }
    }

    /// Length of the raw digest in octets.
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha256 => 32,
        }
    }

    /// Length of the lower-case hex form (what travels in `response` and sits in the users
    /// file).
    pub fn hex_len(self) -> usize {
        self.digest_len() * 2
    }

    /// H(part0 part1 ...), the raw digest.
    pub(crate) fn digest(self, parts: &[&[u8]]) -> Raw {
        let mut out = Raw {
            buf: [0; 32],
            len: self.digest_len() as u8,
        };
        match self {
            Algorithm::Md5 => {
                let mut h = Md5::new();
                for p in parts {
                    h.update(p);
                }
                out.buf[..16].copy_from_slice(&h.finalize());
            }
            Algorithm::Sha256 => {
                let mut h = Sha256::new();
                for p in parts {
                    h.update(p);
                }
                out.buf.copy_from_slice(&h.finalize());
            }
        }
        out
    }
}

/// A raw digest of up to 32 octets, on the stack.
#[derive(Clone, Copy)]
pub(crate) struct Raw {
    buf: [u8; 32],
    len: u8,
}

impl Raw {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
    /// The lower-case hex form (RFC 7616 3.4.1: digests travel as 32 or 64 LHEX).
    pub(crate) fn hex(&self) -> Hex {
        let mut h = Hex {
            buf: [0; 64],
            len: self.len * 2,
        };
        // Cannot fail: the output slice is exactly twice the input.
        let _ = hex::encode_to_slice(self.as_bytes(), &mut h.buf[..h.len as usize]);
        h
    }
}

/// The lower-case hex form of a digest, on the stack.
pub(crate) struct Hex {
    buf: [u8; 64],
    len: u8,
}

impl Hex {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
    pub(crate) fn as_str(&self) -> &str {
        // Hex digits are ASCII.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

/// HA1 = H(username ":" realm ":" password) in lower-case hex (RFC 7616 3.4.2, RFC 3261
/// 22.4). This is what a users file stores instead of the password; operators can compute
/// it without Strowger: `printf '%s' 'alice:example.com:secret' | sha256sum` (or `md5sum`).
pub fn ha1(user: &str, realm: &str, password: &str, algorithm: Algorithm) -> String {
    algorithm
        .digest(&[
            user.as_bytes(),
            b":",
            realm.as_bytes(),
            b":",
            password.as_bytes(),
        ])
        .hex()
        .as_str()
        .to_owned()
}

/// The expected `response` for qop=auth (RFC 7616 3.4.1): H(HA1:nonce:nc:cnonce:qop:HA2)
/// with HA2 = H(method:uri) (RFC 7616 3.4.3). `ha1_hex` is lower-case hex, `uri` is the
/// `uri` parameter exactly as the client sent it (the client hashed that text).
#[allow(clippy::too_many_arguments)]
pub(crate) fn response(
    algorithm: Algorithm,
    ha1_hex: &[u8],
    nonce: &[u8],
    nc: &[u8],
    cnonce: &[u8],
    qop: &[u8],
    method: &[u8],
    uri: &[u8],
) -> Raw {
    let ha2 = algorithm.digest(&[method, b":", uri]).hex();
    algorithm.digest(&[
        ha1_hex,
        b":",
        nonce,
        b":",
        nc,
        b":",
        cnonce,
        b":",
        qop,
        b":",
        ha2.as_bytes(),
    ])
}

/// The `response` without qop (RFC 2069, kept by RFC 3261 22.4 for old servers):
/// H(HA1:nonce:HA2).
pub(crate) fn response_without_qop(
    algorithm: Algorithm,
    ha1_hex: &[u8],
    nonce: &[u8],
    method: &[u8],
    uri: &[u8],
) -> Raw {
    let ha2 = algorithm.digest(&[method, b":", uri]).hex();
    algorithm.digest(&[ha1_hex, b":", nonce, b":", ha2.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp_hex(alg: Algorithm, ha1: &str, nonce: &str, cnonce: &str, uri: &str) -> String {
        response(
            alg,
            ha1.as_bytes(),
            nonce.as_bytes(),
            b"00000001",
            cnonce.as_bytes(),
            b"auth",
            b"GET",
            uri.as_bytes(),
        )
        .hex()
        .as_str()
        .to_owned()
    }

    /// RFC 2617 3.5 example (MD5, qop=auth).
    #[test]
    fn rfc2617_md5_example() {
        let h = ha1(
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
            Algorithm::Md5,
        );
        let r = resp_hex(
            Algorithm::Md5,
            &h,
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            "0a4f113b",
            "/dir/index.html",
        );
        assert_eq!(r, "6629fae49393a05397450978507c4ef1");
    }

    /// RFC 7616 3.9.1 examples: the same exchange with MD5 and with SHA-256.
    #[test]
    fn rfc7616_examples() {
        let realm = "http-auth@example.org";
        let nonce = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
        let cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        let uri = "/dir/index.html";
        let md5 = ha1("Mufasa", realm, "Circle of Life", Algorithm::Md5);
        assert_eq!(
            resp_hex(Algorithm::Md5, &md5, nonce, cnonce, uri),
            "8ca523f5e9506fed4657c9700eebdbec"
        );
        let sha = ha1("Mufasa", realm, "Circle of Life", Algorithm::Sha256);
        assert_eq!(
            resp_hex(Algorithm::Sha256, &sha, nonce, cnonce, uri),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn ha1_matches_coreutils_form() {
        // printf '%s' 'alice:example.com:secret' | md5sum (and | sha256sum)
        assert_eq!(
            ha1("alice", "example.com", "secret", Algorithm::Md5),
            "b1726872c344b6dc8365b774f8fd6412"
        );
        assert_eq!(
            ha1("alice", "example.com", "secret", Algorithm::Sha256),
            "ed8925b20f9a77b8f8f8d5f8e4467fe32b866f7208ab9e4b20595e9821a0fdee"
        );
        assert_eq!(Algorithm::parse("sha-256"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::parse("MD5-sess"), None);
    }
}

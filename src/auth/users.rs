//! The users file (`registrar.users_file`): one TOML table per user,
//!
//! ```toml
//! [users.alice]
//! ha1_sha256 = "ed8925b20f9a77b8f8f8d5f8e4467fe32b866f7208ab9e4b20595e9821a0fdee"
//! ha1_md5 = "b1726872c344b6dc8365b774f8fd6412"
//!
//! [users.bob]          # development only: the HA1s are computed at load
//! password = "secret"
//! ```
//!
//! HA1 = H(user:realm:password) with realm = `sip.domain`, so the file need hold no
//! password. The table is walked by hand rather than through serde so that every error
//! names the file, the user and the key.

use super::hash::{ha1, Algorithm};
use super::AuthError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What we know about one user: the HA1 for each algorithm, lower-case hex. A missing one
/// means the user cannot authenticate with that algorithm.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSecrets {
    pub ha1_md5: Option<String>,
    pub ha1_sha256: Option<String>,
}

impl UserSecrets {
    /// Both HA1s from a password (development files, tests).
    pub fn from_password(user: &str, realm: &str, password: &str) -> UserSecrets {
        UserSecrets {
            ha1_md5: Some(ha1(user, realm, password, Algorithm::Md5)),
            ha1_sha256: Some(ha1(user, realm, password, Algorithm::Sha256)),
        }
    }

    /// The HA1 for `algorithm`, if known.
    pub fn ha1(&self, algorithm: Algorithm) -> Option<&str> {
        match algorithm {
            Algorithm::Md5 => self.ha1_md5.as_deref(),
            Algorithm::Sha256 => self.ha1_sha256.as_deref(),
        }
    }
}

/// The users of the realm, by name (user names compare exactly: RFC 7616 3.4.4 leaves
/// their comparison to the server, and the HA1 was computed over the exact text).
#[derive(Debug, Clone, Default)]
pub struct Users {
    map: HashMap<String, UserSecrets>,
}

impl Users {
    /// Reads and checks a users file; `realm` is `sip.domain` (used for `password`).
    pub fn load(path: &Path, realm: &str) -> Result<Users, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Users::parse(&text, realm, path)
    }

    /// Parses users-file text; `path` only names the origin in errors.
    pub fn parse(text: &str, realm: &str, path: &Path) -> Result<Users, AuthError> {
        let file = |detail: String| AuthError::File {
            path: path.to_owned(),
            detail,
        };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| AuthError::Toml {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        let mut map = HashMap::new();
        for (key, value) in table {
            if key != "users" {
                return Err(file(format!(
                    "unknown top-level key `{key}` (expected [users.<name>] tables)"
                )));
            }
            let toml::Value::Table(users) = value else {
                return Err(file(
                    "`users` must be a table of [users.<name>] tables".into(),
                ));
            };
            for (user, entry) in users {
                let secrets = parse_user(path, realm, &user, entry)?;
                map.insert(user, secrets);
            }
        }
        Ok(Users { map })
    }

    /// Users from ready secrets (tests, scripts).
    pub fn from_map(map: HashMap<String, UserSecrets>) -> Users {
        Users { map }
    }

    /// Users from (name, password) pairs (tests, development).
    pub fn from_passwords<'a>(
        realm: &str,
        users: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Users {
        Users {
            map: users
                .into_iter()
                .map(|(u, p)| (u.to_owned(), UserSecrets::from_password(u, realm, p)))
                .collect(),
        }
    }

    pub fn get(&self, user: &str) -> Option<&UserSecrets> {
        self.map.get(user)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn parse_user(
    path: &Path,
    realm: &str,
    user: &str,
    entry: toml::Value,
) -> Result<UserSecrets, AuthError> {
    let err = |key: &str, detail: &str| AuthError::User {
        path: PathBuf::from(path),
        user: user.to_owned(),
        key: key.to_owned(),
        detail: detail.to_owned(),
    };
    let toml::Value::Table(entry) = entry else {
        return Err(err("", "must be a table ([users.<name>])"));
    };
    let mut secrets = UserSecrets::default();
    let mut password = None;
    for (key, value) in entry {
        let toml::Value::String(s) = value else {
            return Err(err(&key, "must be a string"));
        };
        match key.as_str() {
            "ha1_md5" => {
                secrets.ha1_md5 = Some(check_hex(&s, Algorithm::Md5, || {
                    err(&key, "must be 32 hex digits (MD5 of user:realm:password)")
                })?)
            }
            "ha1_sha256" => {
                secrets.ha1_sha256 = Some(check_hex(&s, Algorithm::Sha256, || {
                    err(
                        &key,
                        "must be 64 hex digits (SHA-256 of user:realm:password)",
                    )
                })?)
            }
            "password" => password = Some(s),
            _ => {
                return Err(err(
                    &key,
                    "unknown key (expected ha1_md5, ha1_sha256 or password)",
                ))
            }
        }
    }
    match password {
        // Mixing a password with HA1s would leave two sources of truth that can disagree.
        Some(_) if secrets.ha1_md5.is_some() || secrets.ha1_sha256.is_some() => Err(err(
            "password",
            "give either password or ha1_md5/ha1_sha256, not both",
        )),
        Some(p) => Ok(UserSecrets::from_password(user, realm, &p)),
        None if secrets.ha1_md5.is_none() && secrets.ha1_sha256.is_none() => {
            Err(err("", "needs ha1_md5, ha1_sha256 or password"))
        }
        None => Ok(secrets),
    }
}

fn check_hex(s: &str, alg: Algorithm, err: impl Fn() -> AuthError) -> Result<String, AuthError> {
    if s.len() == alg.hex_len() && s.bytes().all(|c| c.is_ascii_hexdigit()) {
        // Stored lower case: the response hash is computed over the hex text (RFC 7616
        // 3.4.2 uses lower-case hex), so upper-case digits would give a different answer.
        Ok(s.to_ascii_lowercase())
    } else {
        Err(err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Users, AuthError> {
        Users::parse(text, "example.com", Path::new("/etc/strowger/users.toml"))
    }

    #[test]
    fn good_file() {
        let u = parse(
            r#"
            [users.alice]
            ha1_md5 = "B1726872C344B6DC8365B774F8FD6412"
            ha1_sha256 = "ed8925b20f9a77b8f8f8d5f8e4467fe32b866f7208ab9e4b20595e9821a0fdee"
            [users.bob]
            password = "secret"
            [users.carol]
            ha1_sha256 = "ed8925b20f9a77b8f8f8d5f8e4467fe32b866f7208ab9e4b20595e9821a0fdee"
            "#,
        )
        .unwrap();
        assert_eq!(u.len(), 3);
        let a = u.get("alice").unwrap();
        assert_eq!(
            a.ha1_md5.as_deref(),
            Some("b1726872c344b6dc8365b774f8fd6412")
        );
        let b = u.get("bob").unwrap();
        assert_eq!(
            b.ha1_sha256.as_deref(),
            Some(ha1("bob", "example.com", "secret", Algorithm::Sha256).as_str())
        );
        assert_eq!(
            b.ha1_md5.as_deref(),
            Some(ha1("bob", "example.com", "secret", Algorithm::Md5).as_str())
        );
        assert_eq!(u.get("carol").unwrap().ha1_md5, None);
        assert!(u.get("dave").is_none());
    }

    #[test]
    fn unknown_key_names_file_user_and_key() {
        let e = parse("[users.alice]\npasword = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("users.toml"), "{e}");
        assert!(e.contains("alice"), "{e}");
        assert!(e.contains("pasword"), "{e}");
    }

    #[test]
    fn bad_hex_and_missing_secret() {
        let e = parse("[users.alice]\nha1_md5 = \"xyz\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("alice") && e.contains("ha1_md5"), "{e}");
        // A SHA-256-length value in the MD5 slot is a mistake too.
        let long = "a".repeat(64);
        assert!(parse(&format!("[users.a]\nha1_md5 = \"{long}\"\n")).is_err());
        let e = parse("[users.alice]\n").unwrap_err().to_string();
        assert!(e.contains("alice") && e.contains("needs"), "{e}");
        assert!(parse(
            "[users.a]\npassword = \"p\"\nha1_md5 = \"b1726872c344b6dc8365b774f8fd6412\"\n"
        )
        .is_err());
        assert!(parse("[users.a]\npassword = 3\n").is_err());
        assert!(parse("[people.a]\npassword = \"p\"\n").is_err());
        assert!(parse("users = 1\n").is_err());
        assert!(matches!(parse("[users.a"), Err(AuthError::Toml { .. })));
    }

    #[test]
    fn load_reads_file() {
        let dir = std::env::temp_dir().join(format!("strowger-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("users.toml");
        std::fs::write(&p, "[users.alice]\npassword = \"secret\"\n").unwrap();
        let u = Users::load(&p, "example.com").unwrap();
        assert!(u.get("alice").is_some());
        let missing = Users::load(&dir.join("nope.toml"), "example.com").unwrap_err();
        assert!(missing.to_string().contains("nope.toml"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The spanned document: the file as `toml` parsed it (every key and value with its byte
//! range), the environment put into it, and the way back from a range to a file line or a
//! variable and a key.

use super::{Config, ConfigError, InvalidValue};
use std::borrow::Cow;
use std::ops::Range;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The text and variables a document was built from, to turn a byte range back into a
/// file line or a variable name.
pub(super) struct Sources<'a> {
    pub(super) origin: &'a str,
    pub(super) text: &'a str,
    pub(super) env: &'a [(String, String)],
}

impl Sources<'_> {
    /// The range given to everything variable `i` sets: past the end of the file, one
    /// byte per variable.
    pub(super) fn env_span(&self, i: usize) -> Range<usize> {
        let at = self.text.len() + 1 + i;
        at..at + 1
    }

    /// Where a byte offset points: `(file or variable, line)`.
    fn place(&self, offset: usize) -> (String, Option<usize>) {
        match offset.checked_sub(self.text.len() + 1) {
            Some(i) if i < self.env.len() => {
                (format!("environment variable {}", self.env[i].0), None)
            }
            _ => {
                let end = offset.min(self.text.len());
                let line = self.text.as_bytes()[..end]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1;
                (self.origin.to_string(), Some(line))
            }
        }
    }

    /// A parse or type error at `span`; the key is the innermost one whose key or value
    /// covers the span's start.
    pub(super) fn error_at(
        &self,
        doc: Option<&Spanned<DeTable<'_>>>,
        span: Option<Range<usize>>,
        message: &str,
    ) -> ConfigError {
        let message = friendly(message);
        let Some(span) = span else {
            return ConfigError {
                file: self.origin.to_string(),
                key: String::new(),
                line: None,
                message,
            };
        };
        let key = doc
            .and_then(|d| key_at(d.get_ref(), span.start))
            .unwrap_or_default();
        let (file, line) = self.place(span.start);
        ConfigError {
            file,
            key,
            line,
            message,
        }
    }

    /// A section's complaint, placed at the key (or list entry) it names; a key not written
    /// anywhere is placed at the nearest table that is.
    pub(super) fn invalid(&self, doc: &Spanned<DeTable<'_>>, e: InvalidValue) -> ConfigError {
        let (file, line) = match span_of(doc.get_ref(), &e.key, e.index) {
            Some(span) => self.place(span.start),
            None => (self.origin.to_string(), None),
        };
        ConfigError {
            file,
            key: e.key,
            line,
            message: e.message,
        }
    }
}

/// The dotted path of the innermost key whose name or value covers `offset`.
pub(super) fn key_at(table: &DeTable<'_>, offset: usize) -> Option<String> {
    for (k, v) in table {
        let inner = match v.get_ref() {
            DeValue::Table(t) => key_at(t, offset),
            _ => None,
        };
        if let Some(inner) = inner {
            return Some(format!("{}.{inner}", k.get_ref()));
        }
        if k.span().contains(&offset) || v.span().contains(&offset) {
            return Some(k.get_ref().to_string());
        }
    }
    None
}

/// The range to point at for `key` (dotted) and, for a list, its entry `index`: the entry,
/// else the key, else the deepest enclosing table that is written.
pub(super) fn span_of(
    table: &DeTable<'_>,
    key: &str,
    index: Option<usize>,
) -> Option<Range<usize>> {
    let mut table = table;
    let mut found = None;
    for part in key.split('.') {
        let Some((k, v)) = table.get_key_value(part) else {
            break;
        };
        found = Some(k.span());
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            // Only the last part can be a list or a value (the section's key names it).
            DeValue::Array(a) => {
                if let Some(entry) = index.and_then(|i| a.get(i)) {
                    found = Some(entry.span());
                }
                break;
            }
            _ => break,
        }
    }
    found
}

/// The defaults as a TOML table: the type of each key and the list of known keys.
pub(super) fn defaults_table() -> toml::Table {
    // Serialising the defaults cannot fail (plain strings, integers, lists, tables); if it
    // ever did, no key would be known and every override would be refused loudly.
    toml::Table::try_from(Config::default()).unwrap_or_default()
}

pub(super) fn lookup<'t>(table: &'t toml::Table, key: &str) -> Option<&'t toml::Value> {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let v = table.get(first)?;
    match (rest, v) {
        ("", _) => Some(v),
        (rest, toml::Value::Table(t)) => lookup(t, rest),
        _ => None,
    }
}

/// Every settable (leaf) key, dotted, e.g. `sip.timers.t1_ms`.
pub(super) fn known_keys(defaults: &toml::Table) -> Vec<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(t) => walk(&path, t, out),
                _ => out.push(path),
            }
        }
    }
    let mut out = Vec::new();
    walk("", defaults, &mut out);
    out
}

/// An environment value as the type of the key's default: a number, a boolean or a list
/// where the default is one (a list is comma-separated), else the text itself. A value
/// that does not read as that type stays text, and deserializing it then names the
/// variable and the type it should have. List entries get `span`.
pub(super) fn env_value<'i>(
    value: &'i str,
    default: &toml::Value,
    span: &Range<usize>,
) -> DeValue<'i> {
    let scalar = |value: &'i str, default: Option<&toml::Value>| {
        let want = default.map_or("string", toml::Value::type_str);
        match DeValue::parse(value.trim()).map(Spanned::into_inner) {
            Ok(v) if want != "string" && v.type_str() == want => v,
            _ => DeValue::String(Cow::Borrowed(value)),
        }
    };
    match default {
        toml::Value::Array(items) => DeValue::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                // Entries take the type of the default's entries (text when it is empty).
                .map(|item| Spanned::new(span.clone(), scalar(item, items.first())))
                .collect(),
        ),
        other => scalar(value, Some(other)),
    }
}

/// Sets `key` (dotted) in the document to `value`, creating the tables on the way; every
/// part it writes gets `span` (the variable's). A key under a value that is not a table is
/// left alone: the file's own type error is reported for it.
pub(super) fn override_value<'i>(
    table: &mut DeTable<'i>,
    key: &str,
    value: DeValue<'i>,
    span: Range<usize>,
) {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let name = || Spanned::new(span.clone(), Cow::Owned(first.to_string()));
    if rest.is_empty() {
        // Re-inserted, so the key's range too is the variable's.
        table.remove(first);
        table.insert(name(), Spanned::new(span, value));
        return;
    }
    if !table.contains_key(first) {
        table.insert(
            name(),
            Spanned::new(span.clone(), DeValue::Table(DeTable::new())),
        );
    }
    if let Some(DeValue::Table(inner)) = table.get_mut(first).map(Spanned::get_mut) {
        override_value(inner, rest, value, span);
    }
}

pub(super) fn unknown_key_message(key: &str, known: &[String]) -> String {
    let below = format!("{key}.");
    let children: Vec<&str> = known
        .iter()
        .filter(|k| k.starts_with(&below))
        .map(String::as_str)
        .collect();
    if !children.is_empty() {
        return format!(
            "is a section, not a value; set its keys instead: {}",
            children.join(", ")
        );
    }
    // Suggest the keys of the same section, or all keys if the section is unknown too.
    let section = key
        .rsplit_once('.')
        .map(|(s, _)| format!("{s}."))
        .unwrap_or_default();
    let siblings: Vec<&str> = known
        .iter()
        .filter(|k| !section.is_empty() && k.starts_with(&section))
        .map(String::as_str)
        .collect();
    let list = if siblings.is_empty() {
        known.join(", ")
    } else {
        siblings.join(", ")
    };
    format!(
        "unknown key (levels are separated by a double underscore, e.g. \
         STROWGER_SIP__DOMAIN; known keys: {list})"
    )
}

/// Rewords serde messages that name Rust types, which mean nothing to an operator, and
/// says "key" where serde says "field".
pub(super) fn friendly(message: &str) -> String {
    let mut m = message.trim().replacen("unknown field", "unknown key", 1);
    if let Some(at) = m.find("expected struct ") {
        m.truncate(at);
        m.push_str("expected a table ([section])");
    }
    for (rust, toml) in [
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number of 0 or more"),
        ("expected usize", "expected a whole number of 0 or more"),
        ("expected a map", "expected a table ([section])"),
        ("expected a sequence", "expected a list ([\"a\", \"b\"])"),
    ] {
        if let Some(rest) = m.strip_suffix(rust) {
            m = format!("{rest}{toml}");
        }
    }
    m
}

//! The bodies of NOTIFY: PIDF composed from published presence (RFC 3863, RFC 3903 as the
//! compositor), dialog-info built from the server's own calls (RFC 4235), and
//! message-summary (RFC 3842).
//!
//! Pure functions over text; no SIP, no state.

use super::Package;

/// Escapes text for an XML attribute or element (RFC 3863 and RFC 4235 bodies are XML).
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The elements named `name` (with their content) in a PIDF document, as written. A
/// lightweight scan, not a parser: PIDF from phones is small and flat, and anything we do
/// not find is simply not composed.
fn elements<'a>(doc: &'a str, name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = doc;
    // Elements may carry a namespace prefix (`<dm:person>`): match `<name` or `<x:name`.
    while let Some(start) = find_open(rest, name) {
        let after = &rest[start..];
        let Some(tag_end) = after.find('>') else {
            break;
        };
        let open = &after[..tag_end];
        let prefixed = open[1..].split_whitespace().next().unwrap_or("");
        if open.ends_with('/') {
            out.push(&after[..tag_end + 1]);
            rest = &after[tag_end + 1..];
            continue;
        }
        let close = format!("</{prefixed}>");
        match after.find(&close) {
            Some(end) => {
                out.push(&after[..end + close.len()]);
                rest = &after[end + close.len()..];
            }
            None => break,
        }
    }
    out
}

fn find_open(doc: &str, name: &str) -> Option<usize> {
    let bytes = doc.as_bytes();
    let mut i = 0;
    while let Some(off) = doc[i..].find('<') {
        let at = i + off;
        let tag: String = doc[at + 1..]
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '>' && *c != '/')
            .collect();
        let local = tag.rsplit(':').next().unwrap_or("");
        if local == name && bytes.get(at + 1) != Some(&b'/') {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

/// The namespace declarations (`xmlns...="..."`) of a document's root element, so that
/// composed elements keep their prefixes' meaning.
fn root_namespaces(doc: &str) -> Vec<String> {
    let Some(start) = find_open(doc, "presence") else {
        return Vec::new();
    };
    let Some(end) = doc[start..].find('>') else {
        return Vec::new();
    };
    let open = &doc[start..start + end];
    let mut out = Vec::new();
    let mut rest = open;
    while let Some(at) = rest.find("xmlns") {
        let decl = &rest[at..];
        let Some(q1) = decl.find('"') else { break };
        let Some(q2) = decl[q1 + 1..].find('"') else {
            break;
        };
        out.push(decl[..q1 + 1 + q2 + 1].to_owned());
        rest = &decl[q1 + 1 + q2 + 1..];
    }
    out
}

/// One PIDF document for `entity` composed from the published documents (RFC 3903 4:
/// the compositor merges the sources; here every source's `<tuple>`, `<person>`,
/// `<device>` and `<note>` elements, newest publication last). No publication: the
/// entity is offline, one tuple with basic status `closed` (RFC 3863 4.1.4).
pub fn compose_pidf(entity: &str, published: &[&str]) -> String {
    let mut namespaces = vec!["xmlns=\"urn:ietf:params:xml:ns:pidf\"".to_owned()];
    let mut parts = Vec::new();
    for doc in published {
        for ns in root_namespaces(doc) {
            if !namespaces.contains(&ns) {
                namespaces.push(ns);
            }
        }
        for name in ["tuple", "person", "device", "note"] {
            for e in elements(doc, name) {
                // Only direct children matter; a <note> inside a <tuple> came with it.
                if name == "note" && parts.iter().any(|p: &String| p.contains(e)) {
                    continue;
                }
                parts.push(e.to_owned());
            }
        }
    }
    if parts.is_empty() {
        parts.push(
            "<tuple id=\"offline\"><status><basic>closed</basic></status></tuple>".to_owned(),
        );
    }
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<presence {} entity=\"{}\">\n",
        namespaces.join(" "),
        xml_escape(entity)
    ));
    for p in parts {
        out.push_str(&p);
        out.push('\n');
    }
    out.push_str("</presence>\n");
    out
}

/// One `<dialog>` of a dialog-info document.
#[derive(Debug, Clone)]
pub struct DialogView {
    pub id: String,
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// "initiator" (the entity called) or "recipient" (the entity was called).
    pub direction: &'static str,
    pub state: &'static str,
    pub local_identity: String,
    pub remote_identity: String,
}

/// A full-state dialog-info document (RFC 4235 4.1): `version` counts the notifications
/// of this subscription.
pub fn dialog_info(entity: &str, version: u32, dialogs: &[DialogView]) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<dialog-info xmlns=\"urn:ietf:params:xml:ns:dialog-info\" version=\"{version}\" state=\"full\" entity=\"{}\">\n",
        xml_escape(entity)
    ));
    for d in dialogs {
        out.push_str(&format!(
            "  <dialog id=\"{}\" call-id=\"{}\" local-tag=\"{}\" remote-tag=\"{}\" direction=\"{}\">\n    <state>{}</state>\n    <local><identity>{}</identity></local>\n    <remote><identity>{}</identity></remote>\n  </dialog>\n",
            xml_escape(&d.id),
            xml_escape(&d.call_id),
            xml_escape(&d.local_tag),
            xml_escape(&d.remote_tag),
            d.direction,
            d.state,
            xml_escape(&d.local_identity),
            xml_escape(&d.remote_identity),
        ));
    }
    out.push_str("</dialog-info>\n");
    out
}

/// The message-summary body (RFC 3842 5.2): the last one published for the account, or
/// "no messages waiting" when there is none.
pub fn message_summary(account: &str, published: Option<&str>) -> String {
    match published {
        Some(body) => body.to_owned(),
        None => format!("Messages-Waiting: no\r\nMessage-Account: {account}\r\n"),
    }
}

/// The Content-Type of a package's NOTIFY bodies.
pub fn content_type(p: Package) -> &'static str {
    match p {
        Package::Presence => "application/pidf+xml",
        Package::Dialog => "application/dialog-info+xml",
        Package::MessageSummary => "application/simple-message-summary",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIDF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf" xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model" entity="sip:alice@example.com">
  <tuple id="t1"><status><basic>open</basic></status><note>desk</note></tuple>
  <dm:person id="p1"><note>in a meeting</note></dm:person>
</presence>"#;

    #[test]
    fn compose_keeps_tuples_persons_and_namespaces() {
        let other = r#"<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="x"><tuple id="t2"><status><basic>closed</basic></status></tuple><note>phone 2</note></presence>"#;
        let doc = compose_pidf("sip:alice@strowger.test", &[PIDF, other]);
        assert!(doc.contains("entity=\"sip:alice@strowger.test\""), "{doc}");
        assert!(doc.contains("<tuple id=\"t1\">"), "{doc}");
        assert!(doc.contains("<tuple id=\"t2\">"), "{doc}");
        assert!(doc.contains("<dm:person id=\"p1\">"), "{doc}");
        assert!(
            doc.contains("xmlns:dm=\"urn:ietf:params:xml:ns:pidf:data-model\""),
            "{doc}"
        );
        assert!(doc.contains("<note>phone 2</note>"), "{doc}");
        // The note inside t1 is not repeated on its own.
        assert_eq!(doc.matches("<note>desk</note>").count(), 1, "{doc}");
    }

    #[test]
    fn odd_documents_do_not_panic() {
        for doc in [
            "",
            "<",
            "<presence",
            "<presence xmlns=\"a",
            "<presence xmlns=\"é\"><tuple>",
            "<tuple/><tuple id='x'>ü</tuple><note>",
            "<<tuple>></tuple></x:tuple>",
            "<presence xmlns:é=\"ü\"><é:person>ä</é:person></presence>",
        ] {
            let out = compose_pidf("sip:a@x", &[doc]);
            assert!(out.ends_with("</presence>\n"), "{out}");
        }
    }

    #[test]
    fn nothing_published_is_closed() {
        let doc = compose_pidf("sip:bob@x", &[]);
        assert!(doc.contains("<basic>closed</basic>"), "{doc}");
    }

    #[test]
    fn dialog_info_escapes_and_counts() {
        let d = DialogView {
            id: "c1".into(),
            call_id: "a<b".into(),
            local_tag: "l".into(),
            remote_tag: "r".into(),
            direction: "recipient",
            state: "early",
            local_identity: "sip:1001@x".into(),
            remote_identity: "sip:1000@x".into(),
        };
        let doc = dialog_info("sip:1001@x", 3, &[d]);
        assert!(doc.contains("version=\"3\""));
        assert!(doc.contains("call-id=\"a&lt;b\""));
        assert!(doc.contains("<state>early</state>"));
        assert!(doc.contains("direction=\"recipient\""));
    }
}

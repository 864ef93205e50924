//! What `GET /calls` shows of a call in progress, as the B2BUA keeps it for every call:
//! the six addresses and identifiers in one text buffer, the route as its number (named
//! when listed), the state as the answer time. Issue 14: a `CallSnapshot` of seven
//! `String`s per call, in a map beside a second one for the call's event queue, was
//! ~0.7 KB of every held call; the listing builds `CallSnapshot`s only when asked.

use super::CallSnapshot;

/// A text field of the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    ACallId = 0,
    From,
    To,
    Source,
    BCallId,
    BTarget,
}

const FIELDS: usize = 6;

pub(super) struct CallSummary {
    /// The fields one after the other, in `Field` order.
    text: Box<str>,
    /// Where each field ends in `text`.
    ends: [u32; FIELDS],
    /// Unix seconds.
    started: f64,
    /// Unix seconds; set: the call is answered.
    answered: Option<f64>,
    /// `call:set_route`'s route number.
    pub route: Option<u16>,
    /// The B fields are set (a leg answered).
    has_b: bool,
}

impl CallSummary {
    pub fn new(a_call_id: &str, from: &str, to: &str, source: &str, started: f64) -> Self {
        let mut s = CallSummary {
            text: Box::from(""),
            ends: [0; FIELDS],
            started,
            answered: None,
            route: None,
            has_b: false,
        };
        s.set(&[
            (Field::ACallId, a_call_id),
            (Field::From, from),
            (Field::To, to),
            (Field::Source, source),
        ]);
        s
    }

    fn get(&self, f: Field) -> &str {
        let i = f as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize).unwrap_or("")
    }

    /// Replaces the given fields (rare: the answer, a transfer), the text rebuilt at its
    /// exact size.
    pub fn set(&mut self, changes: &[(Field, &str)]) {
        const ALL: [Field; FIELDS] = [
            Field::ACallId,
            Field::From,
            Field::To,
            Field::Source,
            Field::BCallId,
            Field::BTarget,
        ];
        let values = ALL.map(|f| match changes.iter().rev().find(|(c, _)| *c == f) {
            Some((_, v)) => *v,
            None => self.get(f),
        });
        let mut text = String::with_capacity(values.iter().map(|v| v.len()).sum());
        let mut ends = [0u32; FIELDS];
        for (end, v) in ends.iter_mut().zip(values) {
            text.push_str(v);
            // A message (and so any of its fields) is far below 4 GiB.
            *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        self.has_b |= changes
            .iter()
            .any(|(f, _)| matches!(f, Field::BCallId | Field::BTarget));
        self.text = text.into_boxed_str();
        self.ends = ends;
    }

    /// A leg answered: its Call-ID and where it goes.
    pub fn answered(&mut self, b_call_id: &str, b_target: &str, at: f64) {
        self.set(&[(Field::BCallId, b_call_id), (Field::BTarget, b_target)]);
        self.answered = Some(at);
    }

    /// The admin API's view; `route` is the route's name.
    pub fn snapshot(&self, id: &str, route: Option<String>) -> CallSnapshot {
        let b = |f| self.has_b.then(|| self.get(f).to_owned());
        CallSnapshot {
            id: id.to_owned(),
            state: if self.answered.is_some() {
                "answered"
            } else {
                "ringing"
            },
            a_call_id: self.get(Field::ACallId).to_owned(),
            from: self.get(Field::From).to_owned(),
            to: self.get(Field::To).to_owned(),
            source: self.get(Field::Source).to_owned(),
            b_call_id: b(Field::BCallId),
            b_target: b(Field::BTarget),
            started: self.started,
            answered: self.answered,
            route,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_change() {
        let mut s = CallSummary::new("a@h", "sip:alice@h", "sip:bob@h", "udp:1.2.3.4:5060", 1.5);
        let v = s.snapshot("c1", None);
        assert_eq!(
            (v.a_call_id.as_str(), v.from.as_str(), v.to.as_str()),
            ("a@h", "sip:alice@h", "sip:bob@h")
        );
        assert_eq!(v.source, "udp:1.2.3.4:5060");
        assert_eq!((v.state, v.b_call_id, v.b_target), ("ringing", None, None));
        s.answered("b@h", "udp:5.6.7.8:5060", 2.5);
        s.route = Some(3);
        let v = s.snapshot("c1", Some("r".into()));
        assert_eq!(v.state, "answered");
        assert_eq!(v.b_call_id.as_deref(), Some("b@h"));
        assert_eq!(v.b_target.as_deref(), Some("udp:5.6.7.8:5060"));
        assert_eq!((v.answered, v.route.as_deref()), (Some(2.5), Some("r")));
        // A transfer replaces the caller's side; the rest stays.
        s.set(&[(Field::From, "sip:carol@h"), (Field::ACallId, "")]);
        let v = s.snapshot("c1", None);
        assert_eq!((v.from.as_str(), v.a_call_id.as_str()), ("sip:carol@h", ""));
        assert_eq!(
            (v.to.as_str(), v.b_call_id.as_deref()),
            ("sip:bob@h", Some("b@h"))
        );
        assert_eq!(s.text.len(), s.ends[FIELDS - 1] as usize);
    }
}

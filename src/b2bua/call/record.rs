//! cluster: the call keeps its record (see `super::super::takeover`) in step with its
//! dialogs, from its own task: after each event, an established call compares the
//! fingerprint of what a BYE needs with the one last written, and queues a new record
//! when it moved (never a Redis round trip here: the cluster's writer task sends it).
//! Nothing runs without a cluster (one load of an empty `OnceLock` per event).

use super::Call;
use crate::b2bua::takeover::{encode, fingerprint, CallFacts};
use crate::dialog::DialogState;

impl Call {
    /// Writes the call's record when the call is established (the caller's ACK came:
    /// `a_tx` is gone) and what a BYE on either leg needs has changed since the last one.
    pub(super) fn sync_record(&mut self) {
        let Some(records) = self.inner.cluster.get() else {
            return;
        };
        if self.ended || self.a_tx.is_some() || self.bridge.a.state != DialogState::Confirmed {
            return;
        }
        let (Some(b), Some(answer)) = (&self.bridge.b, self.answer) else {
            return;
        };
        let print = fingerprint(&self.bridge.a, b);
        if print == self.record {
            return;
        }
        // Marked written even when it cannot be (a value with a line break): the next
        // change tries again, not every event.
        self.record = print;
        let a = &self.a_invite;
        let (from, to, ruri) = (
            a.from().uri.to_text(),
            a.to().uri.to_text(),
            a.uri().to_string(),
        );
        let source = crate::transport::peer_text(self.a_source.transport, &self.a_source.addr);
        let route = self
            .route
            .and_then(|r| self.inner.routes.name(usize::from(r)));
        let facts = CallFacts {
            id: &*self.id,
            a_call_id: a.call_id(),
            from: from.as_str(),
            to: to.as_str(),
            ruri: ruri.as_str(),
            source: source.as_str(),
            start: self.start,
            answer,
            route,
            script_version: self.version.version(),
        };
        let b_contact = self.inner.local.contact(&b.flow);
        match encode(
            &facts,
            (&self.bridge.a, &self.bridge.a_contact),
            (b, &b_contact),
        ) {
            Ok(bytes) => records.put(&self.id, bytes),
            Err(e) => {
                tracing::warn!(call = %self.id, error = %e, "call record not kept in the cluster: no other node could end this call")
            }
        }
    }

    /// The call ended here: its record goes.
    pub(super) fn drop_record(&mut self) {
        if self.record == 0 {
            return;
        }
        self.record = 0;
        if let Some(records) = self.inner.cluster.get() {
            records.remove(&self.id);
        }
    }
}

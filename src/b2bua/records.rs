//! The call-record file (`call.records_file`): one JSON object per line for every ended
//! call.
//!
//! Owns: the file and the task that writes it. Must not touch: what a call records (the
//! call builds a [`CallDetail`] in `finish`), nor the script's `on_call_end`, which gets its
//! own `CallRecord` independently of this file.
//!
//! The file is opened (created when missing, appended to) at start-up, so a path that
//! cannot be written stops the server rather than losing records silently. Calls hand
//! their record to [`RecordWriter::send`], which only queues it on an unbounded channel:
//! the call task never waits for the disk. One tokio task drains the channel, writes every
//! record queued so far as one batch, and flushes after each batch. The task ends when the
//! last handle is dropped.
//!
//! Line format (keys always present, in this order):
//! `call_id` (the B2BUA's own call id), `a_call_id` (the caller's Call-ID), `b_call_id`
//! (the answered callee leg's Call-ID, `null` when no leg answered), `from`, `to`, `ruri`
//! (the caller's URIs as text), `source` (`"udp:1.2.3.4:5060"`), `start`, `answer`
//! (`null` when never answered), `end` (times as RFC 3339 UTC strings with milliseconds,
//! `"2026-11-30T15:23:37.123Z"`), `duration_s` (answer to end in seconds, a float; 0 when
//! unanswered), `final_status`, `hangup_by` (`"caller"`, `"callee"`, `"system"`, `"session_timer"`, or `"takeover"`: ended
//! by another cluster node after the node carrying it died),
//! `script_version` (the version of the script the call ran on: 1 for the first load),
//! `route` (`call:set_route`, or null), `transfers` (`[{kind, by, target, status}]`).

use crate::trace::rfc3339_millis;
use anyhow::Context as _;
use serde::Serialize;
use std::path::Path;
use std::time::SystemTime;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;

/// One ended call, as written to the record file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallDetail {
    pub call_id: String,
    pub a_call_id: String,
    pub b_call_id: Option<String>,
    pub from: String,
    pub to: String,
    pub ruri: String,
    pub source: String,
    #[serde(serialize_with = "ser_time")]
    pub start: SystemTime,
    #[serde(serialize_with = "ser_opt_time")]
    pub answer: Option<SystemTime>,
    #[serde(serialize_with = "ser_time")]
    pub end: SystemTime,
    pub duration_s: f64,
    pub final_status: u16,
    pub hangup_by: String,
    pub script_version: u64,
    /// The route the script tagged the call with (`call:set_route`), if any.
    pub route: Option<String>,
    /// The call's transfers: kind, who asked, target, status (200 = done).
    pub transfers: Vec<super::call::TransferNote>,
    /// The cluster node that had the call when it died (`hangup_by` = "takeover"; absent
    /// otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken_over_from: Option<String>,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_millis(*t))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => ser_time(t, s),
        None => s.serialize_none(),
    }
}

/// Handle on the record file's writer task; cheap to clone.
#[derive(Clone, Debug)]
pub struct RecordWriter {
    tx: mpsc::UnboundedSender<CallDetail>,
}

impl RecordWriter {
    /// Opens `path` (create + append) and starts the writer task; needs a tokio runtime.
    /// The error names the file.
    pub fn open(path: &Path) -> anyhow::Result<RecordWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening call record file {}", path.display()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(
            tokio::fs::File::from_std(file),
            rx,
            path.display().to_string(),
        ));
        Ok(RecordWriter { tx })
    }

    /// Queues a record; never waits. Lost (with a warning) only when the writer has
    /// stopped.
    pub fn send(&self, record: CallDetail) {
        if self.tx.send(record).is_err() {
            tracing::warn!("call record writer has stopped; record dropped");
        }
    }
}

async fn write_loop(
    mut file: tokio::fs::File,
    mut rx: mpsc::UnboundedReceiver<CallDetail>,
    path: String,
) {
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(record) = next {
            // A CallDetail always serializes (strings, numbers, null).
            if serde_json::to_writer(&mut buf, &record).is_ok() {
                buf.push(b'\n');
            }
            next = rx.try_recv().ok();
        }
        let written = async {
            file.write_all(&buf).await?;
            file.flush().await
        }
        .await;
        if let Err(error) = written {
            tracing::error!(file = %path, %error, "writing call records failed");
        }
    }
}

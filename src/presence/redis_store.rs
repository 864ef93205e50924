//! The shared presence store: publications and subscriptions in Redis, so that several
//! nodes serve one domain's presence (selected with `registrar.store = "redis"`, at
//! `redis.url`), and the change channel that keeps every node's notifier in step.
//!
//! Layout (prefix `strowger:pres`):
//! - `<prefix>:pub:<etag>`, `<prefix>:sub:<key>`: one record as JSON each;
//! - `<prefix>:pubs`, `<prefix>:subs`: sets of the etags and keys (what `load` walks);
//! - `<prefix>:changed`: pub/sub; every write publishes `<origin> pub <etag>` or
//!   `<origin> sub <key>`, and a node's call changes go out as `<origin> calls <json
//!   array>`, those of 20 ms together (busy-lamp fields of calls on other nodes).
//!
//! A write is one MULTI/EXEC (SET or DEL, SADD or SREM, PUBLISH), so the notification goes
//! out exactly when the change is visible; a call change, which stores nothing, is one
//! PUBLISH. A node's own write of a subscription is a script instead, which first checks
//! that no other node has taken the subscription over (see `OWNED_PUT`). Writes are
//! queued to one writer task in call order (the `PresenceStore` contract). The
//! subscription is re-opened with backoff when it drops, and the notifier is then told to
//! re-read everything.

use super::store::{
    BoxFuture, PresenceEvent, PresenceEvents, PresenceStore, PresenceStoreError, RemoteCall,
    StoredPublication, StoredSubscription,
};
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Records read per round trip in `load`.
const CHUNK: usize = 500;
/// Call changes of this long are announced to the other nodes together.
const ANNOUNCE_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// A subscription's write by the node serving it (a NOTIFY's CSeq, a refresh): dropped,
/// with nothing published, when the stored record names another owner. Another node took
/// the subscription over while this write waited in our queue, and its record must stay:
/// written over, it would tell the new owner to let go, and nobody would notify. MULTI
/// cannot branch on what it reads; a script runs as atomically and can.
/// KEYS: record, set. ARGV: json, owner, member, channel, note.
const OWNED_PUT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and type(rec.owner) == 'string'
     and rec.owner ~= '' and rec.owner ~= ARGV[2] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"#;

/// A subscription's removal, with `OWNED_PUT`'s check, except that anyone may remove an
/// expired record (its owner may be gone for good).
/// KEYS: record, set. ARGV: owner, member, now (unix seconds), channel, note.
const OWNED_REMOVE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and type(rec.owner) == 'string'
     and rec.owner ~= '' and rec.owner ~= ARGV[1]
     and (tonumber(rec.expires_at) or 0) > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"#;

type Job = Box<
    dyn FnOnce(ConnectionManager) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send,
>;

/// Presence state in Redis.
pub struct RedisPresenceStore {
    client: redis::Client,
    con: ConnectionManager,
    prefix: String,
    /// Random per instance (one per node): our own notifications carry it.
    origin: String,
    owned_put: Arc<redis::Script>,
    owned_remove: Arc<redis::Script>,
    jobs: mpsc::UnboundedSender<Job>,
    /// Call-change notes waiting for the writer (see `announce_call`).
    announcements: Arc<Mutex<Vec<String>>>,
}

impl RedisPresenceStore {
    pub async fn connect(url: &str) -> Result<RedisPresenceStore, PresenceStoreError> {
        RedisPresenceStore::connect_with_prefix(url, "strowger:pres").await
    }

    pub async fn connect_with_prefix(
        url: &str,
        prefix: &str,
    ) -> Result<RedisPresenceStore, PresenceStoreError> {
        let client = redis::Client::open(url)?;
        let con = client.get_connection_manager().await?;
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let writer = con.clone();
        // One writer: jobs run one after the other, in the order they were queued. Ends
        // when the store is dropped.
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                job(writer.clone()).await;
            }
        });
        Ok(RedisPresenceStore {
            client,
            con,
            prefix: prefix.to_owned(),
            origin: format!("{:016x}", rand::random::<u64>()),
            owned_put: Arc::new(redis::Script::new(OWNED_PUT)),
            owned_remove: Arc::new(redis::Script::new(OWNED_REMOVE)),
            jobs,
            announcements: Arc::default(),
        })
    }

    fn channel(&self) -> String {
        format!("{}:changed", self.prefix)
    }

    /// A subscription's record and the set of all of them (the scripts' KEYS).
    fn sub_keys(&self, key: &str) -> [String; 2] {
        [
            format!("{}:sub:{key}", self.prefix),
            format!("{}:subs", self.prefix),
        ]
    }

    /// Queues one atomic write: `f` fills the MULTI, then PUBLISH `<origin> <what>`.
    fn write(
        &self,
        what: String,
        f: impl FnOnce(&mut redis::Pipeline) + Send + 'static,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        let (tx, rx) = oneshot::channel();
        let channel = self.channel();
        let note = format!("{} {what}", self.origin);
        let sent = self.jobs.send(Box::new(move |mut con| {
            Box::pin(async move {
                let mut pipe = redis::pipe();
                pipe.atomic();
                f(&mut pipe);
                pipe.cmd("PUBLISH").arg(channel).arg(note).ignore();
                let r = pipe.query_async::<()>(&mut con).await;
                let _ = tx.send(r.map_err(PresenceStoreError::from));
            })
        }));
        Box::pin(async move {
            sent.map_err(|_| PresenceStoreError::WorkerGone)?;
            rx.await.map_err(|_| PresenceStoreError::WorkerGone)?
        })
    }

    /// Queues one script (`OWNED_PUT` or `OWNED_REMOVE`), in the same order as `write`;
    /// its last two arguments are the channel and the note. A write the script refuses is
    /// not an error: the record is another node's now.
    fn write_script(
        &self,
        script: &Arc<redis::Script>,
        what: String,
        keys: [String; 2],
        mut args: Vec<String>,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        let (tx, rx) = oneshot::channel();
        let script = script.clone();
        args.push(self.channel());
        args.push(format!("{} {what}", self.origin));
        let sent = self.jobs.send(Box::new(move |mut con| {
            Box::pin(async move {
                let mut call = script.prepare_invoke();
                for k in keys {
                    call.key(k);
                }
                for a in args {
                    call.arg(a);
                }
                let r = call.invoke_async::<i64>(&mut con).await;
                let _ = tx.send(r.map(drop).map_err(PresenceStoreError::from));
            })
        }));
        Box::pin(async move {
            sent.map_err(|_| PresenceStoreError::WorkerGone)?;
            rx.await.map_err(|_| PresenceStoreError::WorkerGone)?
        })
    }

    async fn load_all<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<Vec<T>, PresenceStoreError> {
        let mut con = self.con.clone();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}:{kind}s", self.prefix))
            .query_async(&mut con)
            .await?;
        let mut out = Vec::with_capacity(members.len());
        for chunk in members.chunks(CHUNK) {
            let keys: Vec<String> = chunk
                .iter()
                .map(|m| format!("{}:{kind}:{m}", self.prefix))
                .collect();
            let values: Vec<Option<String>> =
                redis::cmd("MGET").arg(keys).query_async(&mut con).await?;
            for v in values.into_iter().flatten() {
                out.push(serde_json::from_str(&v)?);
            }
        }
        Ok(out)
    }

    async fn load_one<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        key: &str,
    ) -> Result<Option<T>, PresenceStoreError> {
        let mut con = self.con.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("{}:{kind}:{key}", self.prefix))
            .query_async(&mut con)
            .await?;
        Ok(match v {
            Some(v) => Some(serde_json::from_str(&v)?),
            None => None,
        })
    }

    fn put<T: serde::Serialize>(
        &self,
        kind: &'static str,
        key: &str,
        record: &T,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        let json = match serde_json::to_string(record) {
            Ok(j) => j,
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        let rkey = format!("{}:{kind}:{key}", self.prefix);
        let set = format!("{}:{kind}s", self.prefix);
        let member = key.to_owned();
        self.write(format!("{kind} {key}"), move |p| {
            p.cmd("SET").arg(rkey).arg(json).ignore();
            p.cmd("SADD").arg(set).arg(member).ignore();
        })
    }

    fn remove(
        &self,
        kind: &'static str,
        key: &str,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        let rkey = format!("{}:{kind}:{key}", self.prefix);
        let set = format!("{}:{kind}s", self.prefix);
        let member = key.to_owned();
        self.write(format!("{kind} {key}"), move |p| {
            p.cmd("DEL").arg(rkey).ignore();
            p.cmd("SREM").arg(set).arg(member).ignore();
        })
    }
}

impl PresenceStore for RedisPresenceStore {
    fn load(
        &self,
    ) -> BoxFuture<'_, Result<(Vec<StoredPublication>, Vec<StoredSubscription>), PresenceStoreError>>
    {
        Box::pin(async move { Ok((self.load_all("pub").await?, self.load_all("sub").await?)) })
    }

    fn put_publication(
        &self,
        p: &StoredPublication,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.put("pub", p.key(), p)
    }

    fn remove_publication(&self, id: &str) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.remove("pub", id)
    }

    fn put_subscription(
        &self,
        s: &StoredSubscription,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        let json = match serde_json::to_string(s) {
            Ok(j) => j,
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        self.write_script(
            &self.owned_put,
            format!("sub {}", s.key),
            self.sub_keys(&s.key),
            vec![json, s.owner.clone(), s.key.clone()],
        )
    }

    fn take_subscription(
        &self,
        s: &StoredSubscription,
    ) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.put("sub", &s.key, s)
    }

    fn remove_subscription(&self, key: &str) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.write_script(
            &self.owned_remove,
            format!("sub {key}"),
            self.sub_keys(key),
            vec![self.origin.clone(), key.to_owned(), now.to_string()],
        )
    }

    fn node(&self) -> &str {
        &self.origin
    }

    fn shared(&self) -> bool {
        true
    }

    fn load_publication<'a>(
        &'a self,
        etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredPublication>, PresenceStoreError>> {
        Box::pin(self.load_one("pub", etag))
    }

    fn load_subscription<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredSubscription>, PresenceStoreError>> {
        Box::pin(self.load_one("sub", key))
    }

    fn announce_call(&self, call: &RemoteCall) {
        let Ok(json) = serde_json::to_string(call) else {
            return;
        };
        // Nothing is stored, so nothing needs MULTI/EXEC or the writer's order. The
        // changes of ANNOUNCE_WINDOW go out together as one PUBLISH of a JSON array (it was
        // MULTI, PUBLISH, EXEC per change: 12 of a cluster call's 14 Redis commands, and a
        // message per change for every node to read back): a lamp on another node lights
        // that much later.
        let first = {
            let mut pending = self.announcements.lock();
            pending.push(json);
            pending.len() == 1
        };
        if !first {
            return;
        }
        let channel = self.channel();
        let origin = self.origin.clone();
        let pending = self.announcements.clone();
        let mut con = self.con.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ANNOUNCE_WINDOW).await;
            let notes = std::mem::take(&mut *pending.lock());
            let note = format!("{origin} calls [{}]", notes.join(","));
            let r = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(note)
                .query_async::<()>(&mut con)
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "presence: announcing call changes failed");
            }
        });
    }

    fn watch(&self) -> BoxFuture<'_, Option<PresenceEvents>> {
        Box::pin(async move {
            let rx = crate::storage::follow_changes(
                self.client.clone(),
                self.channel(),
                self.origin.clone(),
                "presence",
                parse_note,
                || PresenceEvent::Resync,
            )
            .await;
            Some(rx)
        })
    }
}

/// The note of another node (after its origin): `pub <etag>` | `sub <key>` |
/// `calls <json array>` | `call <json>`; `None` for anything else.
fn parse_note(note: &str) -> Option<PresenceEvent> {
    let (kind, what) = note.split_once(' ')?;
    match kind {
        "pub" => Some(PresenceEvent::Publication(what.to_owned())),
        "sub" => Some(PresenceEvent::Subscription(what.to_owned())),
        "calls" => serde_json::from_str(what).ok().map(PresenceEvent::Calls),
        // One change per message, as nodes before this one announce them (a rolling
        // upgrade has both for a while).
        "call" => serde_json::from_str(what)
            .ok()
            .map(|c| PresenceEvent::Calls(vec![c])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_parsed() {
        assert!(matches!(
            parse_note("pub e1"),
            Some(PresenceEvent::Publication(e)) if e == "e1"
        ));
        assert!(matches!(
            parse_note("sub c;t"),
            Some(PresenceEvent::Subscription(k)) if k == "c;t"
        ));
        assert!(parse_note("nonsense").is_none());
        let call = |id: &str| {
            format!(
                r#"{{"id":"{id}","phase":"early","call_id":"c","caller_tag":"t","our_tag":"o","caller":"sip:a@x","callee":"sip:b@x"}}"#
            )
        };
        let Some(PresenceEvent::Calls(calls)) =
            parse_note(&format!("calls [{},{}]", call("1"), call("2")))
        else {
            panic!("a batch of call changes parses")
        };
        assert_eq!(
            calls.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert!(matches!(
            parse_note(&format!("call {}", call("3"))),
            Some(PresenceEvent::Calls(c)) if c.len() == 1 && c[0].id == "3"
        ));
    }
}

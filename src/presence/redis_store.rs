//! The shared presence store: publications and subscriptions in Redis, so that several
//! nodes serve one domain's presence (selected with `registrar.store = "redis"`, at
//! `redis.url`), and the change channel that keeps every node's notifier in step.
//!
//! Layout (prefix `strowger:pres`):
//! - `<prefix>:pub:<etag>`, `<prefix>:sub:<key>`: one record as JSON each;
//! - `<prefix>:pubs`, `<prefix>:subs`: sets of the etags and keys (what `load` walks);
//! - `<prefix>:changed`: pub/sub; every write publishes `<origin> pub <etag>` or
//!   `<origin> sub <key>`, and a node's call changes go out as `<origin> call <json>`
//!   (busy-lamp fields of calls on other nodes).
//!
//! A write is one MULTI/EXEC (SET or DEL, SADD or SREM, PUBLISH), so the notification goes
//! out exactly when the change is visible. Writes are queued to one writer task in call
//! order (the `PresenceStore` contract). The subscription is re-opened with backoff when
//! it drops, and the notifier is then told to re-read everything.

use super::store::{
    BoxFuture, PresenceEvent, PresenceEvents, PresenceStore, PresenceStoreError, RemoteCall,
    StoredPublication, StoredSubscription,
};
use redis::aio::{ConnectionManager, PubSub};
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Records read per round trip in `load`.
const CHUNK: usize = 500;

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
    jobs: mpsc::UnboundedSender<Job>,
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
            jobs,
        })
    }

    fn channel(&self) -> String {
        format!("{}:changed", self.prefix)
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
        self.put("sub", &s.key, s)
    }

    fn remove_subscription(&self, key: &str) -> BoxFuture<'_, Result<(), PresenceStoreError>> {
        self.remove("sub", key)
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
        drop(self.write(format!("call {json}"), |_| {}));
    }

    fn watch(&self) -> BoxFuture<'_, Option<PresenceEvents>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let first = match subscribe(&self.client, &self.channel()).await {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "presence: redis subscription failed; retrying");
                    None
                }
            };
            tokio::spawn(follow(
                self.client.clone(),
                self.channel(),
                self.origin.clone(),
                tx,
                first,
            ));
            Some(rx)
        })
    }
}

async fn subscribe(client: &redis::Client, channel: &str) -> Result<PubSub, PresenceStoreError> {
    let attempt = async {
        let mut p = client.get_async_pubsub().await?;
        p.subscribe(channel).await?;
        Ok::<_, PresenceStoreError>(p)
    };
    tokio::time::timeout(SUBSCRIBE_TIMEOUT, attempt)
        .await
        .map_err(|_| PresenceStoreError::Timeout("redis subscribe"))?
}

/// Turns the change channel into events until the receiver is dropped; re-subscribes
/// with backoff (and asks for a full re-read) when the connection goes.
async fn follow(
    client: redis::Client,
    channel: String,
    origin: String,
    tx: mpsc::UnboundedSender<PresenceEvent>,
    mut current: Option<PubSub>,
) {
    use futures_core::Stream;
    let mut backoff = BACKOFF_MIN;
    loop {
        let pubsub = match current.take() {
            Some(p) => p,
            None => {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                match subscribe(&client, &channel).await {
                    Ok(p) => {
                        backoff = BACKOFF_MIN;
                        if tx.send(PresenceEvent::Resync).is_err() {
                            return;
                        }
                        p
                    }
                    Err(_) => continue,
                }
            }
        };
        let mut stream = Box::pin(pubsub.into_on_message());
        loop {
            let msg = tokio::select! {
                _ = tx.closed() => return,
                m = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)) => m,
            };
            let Some(msg) = msg else { break };
            if let Some(ev) = parse_note(msg.get_payload_bytes(), &origin) {
                if tx.send(ev).is_err() {
                    return;
                }
            }
        }
        tracing::warn!("presence: redis subscription lost; re-subscribing");
    }
}

/// `<origin> pub <etag>` | `<origin> sub <key>` | `<origin> call <json>` from another
/// node; `None` for our own and for anything else.
fn parse_note(payload: &[u8], me: &str) -> Option<PresenceEvent> {
    let text = std::str::from_utf8(payload).ok()?;
    let (origin, rest) = text.split_once(' ')?;
    if origin == me {
        return None;
    }
    let (kind, what) = rest.split_once(' ')?;
    match kind {
        "pub" => Some(PresenceEvent::Publication(what.to_owned())),
        "sub" => Some(PresenceEvent::Subscription(what.to_owned())),
        "call" => serde_json::from_str(what).ok().map(PresenceEvent::Call),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_from_others_only() {
        assert!(parse_note(b"me pub e1", "me").is_none());
        assert!(matches!(
            parse_note(b"other pub e1", "me"),
            Some(PresenceEvent::Publication(e)) if e == "e1"
        ));
        assert!(matches!(
            parse_note(b"other sub c;t", "me"),
            Some(PresenceEvent::Subscription(k)) if k == "c;t"
        ));
        assert!(parse_note(b"other nonsense", "me").is_none());
    }
}

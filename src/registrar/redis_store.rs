//! The shared store: bindings in Redis, so that several nodes use one location service.
//!
//! Layout (prefix `strowger:reg` by default):
//! - `<prefix>:aor:<aor>`: a hash, field = contact URI, value = the binding as JSON.
//! - `<prefix>:aors`: a sorted set of every AOR that has bindings, scored by its earliest
//!   `expires_at`. It is the index `load_all` walks, and `remove_expired` only visits the
//!   AORs whose score is due instead of scanning every binding.
//!
//! - `<prefix>:changed`: a pub/sub channel; every write publishes `<origin> <aor>` on it,
//!   `origin` naming the store instance (one per node) that wrote.
//!
//! A replace is one MULTI/EXEC (DEL, HSET, ZADD, PUBLISH), so readers and a crash see the
//! old set or the new set, and the notification goes out exactly when the change is
//! visible. Expiry runs as a Lua script per AOR so that it cannot race a REGISTER on
//! another node: the script deletes only the fields that are due at the moment it runs,
//! and publishes only when it deleted something.
//!
//! `watch` holds a dedicated pub/sub connection (a subscribed connection can carry nothing
//! else). When it drops, or stops answering PING, it is re-opened with backoff, and the
//! watcher is told to re-read everything, since whatever was published meanwhile is lost.

use super::store::{Binding, BindingStore, BoxFuture, StoreError, StoreEvent, StoreEvents};
use redis::aio::ConnectionManager;

/// Bindings in Redis.
pub struct RedisStore {
    client: redis::Client,
    con: ConnectionManager,
    prefix: String,
    /// Random per instance: our own notifications carry it, so our watcher can skip them
    /// (the registrar that wrote has its cache right already). Hence one registrar per
    /// `RedisStore`: two registrars on one instance would not hear each other.
    origin: String,
    expire: redis::Script,
}

/// KEYS[1] = the AOR's hash, KEYS[2] = the index; ARGV[1] = now, ARGV[2] = the AOR,
/// ARGV[3] = the change channel, ARGV[4] = the notification.
/// Decodes each binding only to read its expiry; never re-encodes (cjson would turn an
/// empty `path` array into an object).
const EXPIRE_SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local h = redis.call('HGETALL', KEYS[1])
local removed = 0
local min = nil
for i = 1, #h, 2 do
  local ok, b = pcall(cjson.decode, h[i + 1])
  local e = ok and tonumber(b.expires_at) or 0
  if e <= now then
    redis.call('HDEL', KEYS[1], h[i])
    removed = removed + 1
  elseif min == nil or e < min then
    min = e
  end
end
if min == nil then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
else
  redis.call('ZADD', KEYS[2], min, ARGV[2])
end
if removed > 0 then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return removed
"#;

/// AORs read per round trip in `load_all`.
const LOAD_CHUNK: usize = 500;

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) with the default key prefix.
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        RedisStore::connect_with_prefix(url, "strowger:reg").await
    }

    /// Connects with another key prefix (several deployments or tests on one server).
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url)?;
        // The manager reconnects by itself after a connection loss.
        let con = client.get_connection_manager().await?;
        Ok(RedisStore {
            client,
            con,
            prefix: prefix.to_owned(),
            origin: format!("{:016x}", rand::random::<u64>()),
            expire: redis::Script::new(EXPIRE_SCRIPT),
        })
    }

    fn channel(&self) -> String {
        format!("{}:changed", self.prefix)
    }

    /// What we publish after changing `aor`.
    fn notification(&self, aor: &str) -> String {
        format!("{} {}", self.origin, aor)
    }

    fn aor_key(&self, aor: &str) -> String {
        format!("{}:aor:{}", self.prefix, aor)
    }

    fn index_key(&self) -> String {
        format!("{}:aors", self.prefix)
    }
}

fn decode(values: Vec<String>, out: &mut Vec<Binding>) -> Result<(), StoreError> {
    for v in values {
        out.push(serde_json::from_str(&v)?);
    }
    Ok(())
}

impl BindingStore for RedisStore {
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Binding>, StoreError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let aors: Vec<String> = redis::cmd("ZRANGE")
                .arg(self.index_key())
                .arg(0)
                .arg(-1)
                .query_async(&mut con)
                .await?;
            let mut out = Vec::with_capacity(aors.len());
            for chunk in aors.chunks(LOAD_CHUNK) {
                let mut pipe = redis::pipe();
                for aor in chunk {
                    pipe.cmd("HVALS").arg(self.aor_key(aor));
                }
                let lists: Vec<Vec<String>> = pipe.query_async(&mut con).await?;
                for values in lists {
                    decode(values, &mut out)?;
                }
            }
            Ok(out)
        })
    }

    fn load_aor<'a>(&'a self, aor: &'a str) -> BoxFuture<'a, Result<Vec<Binding>, StoreError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let values: Vec<String> = redis::cmd("HVALS")
                .arg(self.aor_key(aor))
                .query_async(&mut con)
                .await?;
            let mut out = Vec::with_capacity(values.len());
            decode(values, &mut out)?;
            Ok(out)
        })
    }

    fn replace_aor<'a>(
        &'a self,
        aor: &'a str,
        bindings: &'a [Binding],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // Encode first: a binding that cannot be encoded must not leave a half-done
            // MULTI behind.
            let mut fields = Vec::with_capacity(bindings.len());
            for b in bindings {
                fields.push((b.contact.as_str(), serde_json::to_string(b)?));
            }
            let key = self.aor_key(aor);
            let mut pipe = redis::pipe();
            pipe.atomic().cmd("DEL").arg(&key).ignore();
            match bindings.iter().map(|b| b.expires_at).min() {
                Some(earliest) => {
                    pipe.cmd("HSET").arg(&key);
                    for (field, json) in &fields {
                        pipe.arg(*field).arg(json);
                    }
                    pipe.ignore();
                    pipe.cmd("ZADD")
                        .arg(self.index_key())
                        .arg(earliest)
                        .arg(aor)
                        .ignore();
                }
                None => {
                    pipe.cmd("ZREM").arg(self.index_key()).arg(aor).ignore();
                }
            }
            pipe.cmd("PUBLISH")
                .arg(self.channel())
                .arg(self.notification(aor))
                .ignore();
            let mut con = self.con.clone();
            pipe.query_async::<()>(&mut con).await?;
            Ok(())
        })
    }

    fn remove_expired(&self, now: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.index_key())
                .arg("-inf")
                .arg(now)
                .query_async(&mut con)
                .await?;
            let mut removed = 0u64;
            for aor in due {
                let n: u64 = self
                    .expire
                    .key(self.aor_key(&aor))
                    .key(self.index_key())
                    .arg(now)
                    .arg(&aor)
                    .arg(self.channel())
                    .arg(self.notification(&aor))
                    .invoke_async(&mut con)
                    .await?;
                removed += n;
            }
            Ok(removed)
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn watch(&self) -> BoxFuture<'_, Option<StoreEvents>> {
        Box::pin(async move {
            // Notes are `<origin> <aor>`: the bindings of that AOR changed.
            let rx = crate::storage::follow_changes(
                self.client.clone(),
                self.channel(),
                self.origin.clone(),
                "registrar",
                |aor| Some(StoreEvent::Changed(aor.to_owned())),
                || StoreEvent::Resync,
            )
            .await;
            Some(rx)
        })
    }
}

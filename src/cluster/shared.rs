//! State every node of a cluster agrees on that is not part of the log: tokens, the
//! checkpoint key, webhooks, retention's horizon. Each kind lives in a [`SharedMap`], a
//! JetStream key-value bucket behind an interface free of NATS types, so modules outside
//! `cluster` can share state without knowing NATS.
//!
//! Reads go to the bucket's stream leader (direct gets are off, docs/cluster.md gotcha
//! 2), so a read after an acknowledged write sees it. `create` and `update` are
//! compare-and-set: the way to elect one writer (a lease) or fence a stale one.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::ClusterError;

/// A failed call to the bucket (NATS unreachable, a timeout, a refused write).
#[derive(Debug, Clone, thiserror::Error)]
#[error("shared map {map}: {reason}")]
pub struct SharedError {
    map: String,
    reason: String,
}

/// One key's current value, or its deletion.
#[derive(Debug, Clone)]
pub struct SharedEntry {
    pub key: String,
    /// `None`: the key was deleted.
    pub value: Option<Bytes>,
    /// Increases with every write to the map (any key): pass it to `update`.
    pub revision: u64,
}

/// The outcome of a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written; the key's new revision.
    Done(u64),
    /// `create`: the key exists. `update`: the key changed since the given revision.
    Conflict,
}

/// A JetStream key-value bucket shared by every node.
#[derive(Clone)]
pub struct SharedMap {
    pub(super) kv: kv::Store,
    name: String,
    ttl: Duration,
}

/// Creates (or opens) the bucket `name`: one value per key, replicated like the log.
/// Entries older than `ttl` expire (a lease); `Duration::ZERO` keeps them.
///
/// The bucket's stream is created directly: async-nats's `create_key_value` reads
/// `$JS.API.INFO` fields nats-server 2.9 does not send (docs/cluster.md, gotcha 1).
pub(super) async fn open(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    ttl: Duration,
) -> Result<SharedMap, ClusterError> {
    let config = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        discard: stream::DiscardPolicy::New,
        max_age: ttl,
        num_replicas: replicas,
        allow_direct: false,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(config).await {
        // Created by another node (maybe with another ttl): use it as it is.
        tracing::debug!(error = %e, bucket = name, "the bucket exists");
    }
    let kv = js
        .get_key_value(name.to_string())
        .await
        .map_err(|e| ClusterError::JetStream(format!("the bucket {name}: {e}")))?;
    Ok(SharedMap {
        ttl: kv.stream.cached_info().config.max_age,
        kv,
        name: name.to_string(),
    })
}

/// Opens the bucket `name` if it exists; never creates it (for commands that only look
/// at a cluster's state).
pub(super) async fn open_existing(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<SharedMap>, ClusterError> {
    match js.get_stream(format!("KV_{name}")).await {
        Ok(_) => {}
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(ClusterError::JetStream(format!("the bucket {name}: {e}"))),
    }
    let kv = js
        .get_key_value(name.to_string())
        .await
        .map_err(|e| ClusterError::JetStream(format!("the bucket {name}: {e}")))?;
    Ok(Some(SharedMap {
        ttl: kv.stream.cached_info().config.max_age,
        kv,
        name: name.to_string(),
    }))
}

impl SharedMap {
    /// How long entries live: the bucket's own setting, which the node that created it
    /// chose (leases must be renewed within it, whatever this node was started with).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn error(&self, reason: impl std::fmt::Display) -> SharedError {
        SharedError {
            map: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// The key's current value, read from the bucket's leader.
    pub async fn get(&self, key: &str) -> Result<Option<SharedEntry>, SharedError> {
        let entry = self.kv.entry(key).await.map_err(|e| self.error(e))?;
        Ok(entry.and_then(|e| match e.operation {
            kv::Operation::Put => Some(SharedEntry {
                key: e.key,
                value: Some(e.value),
                revision: e.revision,
            }),
            kv::Operation::Delete | kv::Operation::Purge => None,
        }))
    }

    /// Writes `value` only if the key does not exist (or was deleted).
    pub async fn create(&self, key: &str, value: Vec<u8>) -> Result<Written, SharedError> {
        match self.kv.create(key, value.into()).await {
            Ok(revision) => Ok(Written::Done(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Written::Conflict),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Writes `value` only if the key's revision is still `revision`.
    pub async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<Written, SharedError> {
        match self.kv.update(key, value.into(), revision).await {
            Ok(revision) => Ok(Written::Done(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Written::Conflict),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Writes `value` whatever the key holds.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, SharedError> {
        self.kv
            .put(key, value.into())
            .await
            .map_err(|e| self.error(e))
    }

    /// Deletes the key (watchers see `value: None`).
    pub async fn delete(&self, key: &str) -> Result<(), SharedError> {
        self.kv.delete(key).await.map_err(|e| self.error(e))
    }

    /// Deletes the key only if its revision is still `revision` (a lease released by
    /// its holder, never by a node that lost it).
    pub async fn delete_at(&self, key: &str, revision: u64) -> Result<(), SharedError> {
        self.kv
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(|e| self.error(e))
    }

    /// Every key's current value (deleted keys left out), in revision order.
    pub async fn all(&self) -> Result<Vec<SharedEntry>, SharedError> {
        let mut keys = self.kv.keys().await.map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| self.error(e))?;
            if let Some(entry) = self.get(&key).await? {
                out.push(entry);
            }
        }
        out.sort_by_key(|e| e.revision);
        Ok(out)
    }

    /// Every change from now on, starting with every key's current value (deletions
    /// included), in revision order. `synced` turns true once the values that existed
    /// when this was called have been sent. A lost watch is re-established after the
    /// last revision seen, so no change is missed; the task ends with `shutdown` or when
    /// the receiver is dropped.
    pub fn follow(
        &self,
        shutdown: CancellationToken,
    ) -> (mpsc::Receiver<SharedEntry>, watch::Receiver<bool>) {
        let (changes_tx, changes) = mpsc::channel(256);
        let (synced_tx, synced) = watch::channel(false);
        let map = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = map.follow_until_closed(changes_tx, synced_tx) => {}
                () = shutdown.cancelled() => {}
            }
        });
        (changes, synced)
    }

    async fn follow_until_closed(
        &self,
        changes: mpsc::Sender<SharedEntry>,
        synced: watch::Sender<bool>,
    ) {
        let mut next_revision = 1;
        let mut target = None;
        loop {
            if target.is_none() {
                // The bucket's stream info, fresh from its leader (`kv::Store::status`
                // answers from a cache).
                let mut stream = self.kv.stream.clone();
                match stream.info().await {
                    Ok(info) => {
                        let last = info.state.last_sequence;
                        target = Some(last);
                        if last < next_revision {
                            synced.send_replace(true);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, map = %self.name, "cannot read the bucket");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            let mut watch = match self.kv.watch_all_from_revision(next_revision).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, map = %self.name, "cannot watch the bucket");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(entry) = watch.next().await {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::debug!(error = %e, map = %self.name, "the watch failed");
                        break;
                    }
                };
                next_revision = entry.revision + 1;
                let value = matches!(entry.operation, kv::Operation::Put).then_some(entry.value);
                let change = SharedEntry {
                    key: entry.key,
                    value,
                    revision: entry.revision,
                };
                if changes.send(change).await.is_err() {
                    return;
                }
                if target.is_some_and(|t| entry.revision >= t) {
                    synced.send_replace(true);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

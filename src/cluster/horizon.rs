//! A node that starts empty after retention trimmed the log stream copies from the
//! cluster's horizon (docs/retention.md, "Cluster mode", step 5).
//!
//! The stream then begins after the horizon, so the events below it are gone; what the
//! new copy needs of them is small and kept apart: the horizon itself (the retention
//! `target`: last pruned seq, id and hash, and the stream message holding it) and the
//! Merkle tree's leaf hashes below it (32 B per event, what every cluster node keeps of
//! pruned events). The leaf hashes travel in a second stream, `<stream>_TREE`, that is
//! never purged: the sequencer appends the leaf hashes up to a new horizon there
//! *before* it writes that horizon as the target, so any target a node reads is covered.
//! The copy then builds the tree's stored hashes from them itself
//! ([`crate::merkle::catch_up`]), so they cannot disagree with the leaves.
//!
//! A message of `<stream>_TREE` is `first leaf (8 B, big-endian) ‖ leaf hashes (32 B
//! each)`. Messages continue one another; two sequencers at once may publish overlapping
//! ranges (of the one chain, so the same hashes), never a gap.

use std::sync::Arc;

use async_nats::jetstream::{self, stream};

use super::{ClusterError, GroupMessage, Names, SharedMap};
use crate::chain::Verifier;
use crate::store::Store;

/// Leaves per message: 128 KiB of hashes, well under NATS's default 1 MiB payload even
/// base64-encoded in a JetStream get's answer.
const LEAVES_PER_MESSAGE: u64 = 4096;

/// How often seeding starts again when the horizon moved while it read.
const SEED_ATTEMPTS: usize = 5;

/// The stream of leaf hashes below the horizon.
#[derive(Clone)]
pub(super) struct TreeLog {
    js: jetstream::Context,
    stream: stream::Stream,
    subject: String,
}

/// Its settings: the log's (file storage, replicated like it, no limits), except that
/// nothing is ever removed (purges denied too) and reads go to the leader, so a read
/// after the sequencer's acknowledged publish sees it.
fn tree_stream_config(names: &Names, replicas: usize) -> stream::Config {
    stream::Config {
        name: names.tree_stream.clone(),
        subjects: vec![names.tree.clone()],
        deny_purge: true,
        allow_direct: false,
        ..super::log_stream_config(names, replicas)
    }
}

impl TreeLog {
    /// Creates (or opens) `<stream>_TREE`.
    pub(super) async fn open(
        js: &jetstream::Context,
        names: &Names,
        replicas: usize,
    ) -> Result<TreeLog, ClusterError> {
        if let Err(e) = js.create_stream(tree_stream_config(names, replicas)).await {
            // Created by another node: use it as it is.
            tracing::debug!(error = %e, stream = %names.tree_stream, "the tree stream exists");
        }
        let stream = js.get_stream(&names.tree_stream).await.map_err(|e| {
            ClusterError::JetStream(format!("the stream {}: {e}", names.tree_stream))
        })?;
        Ok(TreeLog {
            js: js.clone(),
            stream,
            subject: names.tree.clone(),
        })
    }

    /// How many leaves, from leaf 0, the stream covers: the end of its last message.
    async fn published_end(&self) -> Result<u64, String> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject)
            .await
        {
            Ok(message) => {
                decode(&message.payload).map(|(first, hashes)| first + hashes.len() as u64)
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(format!("reading the tree stream: {e}")),
        }
    }

    /// The sequencer, before it writes a horizon `through`: appends the leaf hashes the
    /// stream lacks below it, read from this node's copy (which keeps every leaf hash).
    pub(super) async fn publish_through(
        &self,
        store: &Arc<Store>,
        through: u64,
    ) -> Result<(), String> {
        let mut end = self.published_end().await?;
        while end < through {
            let count = (through - end).min(LEAVES_PER_MESSAGE);
            let copy = store.clone();
            let hashes = tokio::task::spawn_blocking(move || copy.event_hashes(end + 1, count))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading leaf hashes {end}..: {e}"))?;
            let mut payload = Vec::with_capacity(8 + hashes.len() * 32);
            payload.extend_from_slice(&end.to_be_bytes());
            for hash in &hashes {
                payload.extend_from_slice(hash);
            }
            self.js
                .publish(self.subject.clone(), payload.into())
                .await
                .map_err(|e| format!("publishing leaf hashes: {e}"))?
                .await
                .map_err(|e| format!("publishing leaf hashes: {e}"))?;
            end += count;
        }
        Ok(())
    }

    /// Copies the leaf hashes of leaves `0..through` into `store` (as kept hashes);
    /// `false` when the stream does not cover them.
    async fn copy_into(&self, store: &Store, through: u64) -> Result<bool, String> {
        let mut stream = self.stream.clone();
        let state = stream
            .info()
            .await
            .map_err(|e| format!("reading the tree stream: {e}"))?
            .state
            .clone();
        let mut covered = 0;
        let mut seq = state.first_sequence.max(1);
        while covered < through && seq <= state.last_sequence {
            let message = self
                .stream
                .get_raw_message(seq)
                .await
                .map_err(|e| format!("reading tree stream message {seq}: {e}"))?;
            seq += 1;
            let (first, hashes) = decode(&message.payload)?;
            if first > covered {
                tracing::warn!(
                    covered,
                    next = first,
                    "the tree stream has a gap; cannot start from the horizon"
                );
                return Ok(false);
            }
            let end = (first + hashes.len() as u64).min(through);
            if end <= covered {
                continue;
            }
            let new = &hashes[(covered - first) as usize..(end - first) as usize];
            store
                .seed_leaf_hashes(covered, new)
                .map_err(|e| e.to_string())?;
            covered = end;
        }
        Ok(covered >= through)
    }
}

/// A tree stream message: its first leaf and its leaf hashes.
fn decode(payload: &[u8]) -> Result<(u64, Vec<[u8; 32]>), String> {
    let malformed = || "a malformed tree stream message".to_string();
    let (first, rest) = payload.split_first_chunk::<8>().ok_or_else(malformed)?;
    let (hashes, tail) = rest.as_chunks::<32>();
    if !tail.is_empty() {
        return Err(malformed());
    }
    Ok((u64::from_be_bytes(*first), hashes.to_vec()))
}

/// Why a copy could not start from the horizon (the node then refuses to start).
enum NotSeeded {
    /// Retry: the horizon moved, or the stream was trimmed, while seeding read.
    Moved(String),
    /// What the cluster holds cannot start this copy.
    Refused(String),
}

/// Cluster mode, at start, before the writer runs: an empty copy of a log whose stream
/// was trimmed starts at the cluster's horizon. Registers the node in the retention map
/// first (at the horizon's stream message), which holds the stream's trim back while it
/// copies. Does nothing when the copy is not empty or the stream begins at its start.
pub(super) async fn seed_if_empty(
    log: &stream::Stream,
    tree: &TreeLog,
    names: &Names,
    retention: &SharedMap,
    node: &str,
    store: &Arc<Store>,
) -> Result<(), ClusterError> {
    if store.head().seq != 0 || store.horizon().pruned_through != 0 {
        return Ok(());
    }
    let refused = |reason: String| ClusterError::NoHorizon {
        stream: names.stream.clone(),
        reason,
    };
    let jetstream = |e: String| ClusterError::JetStream(e);
    for _ in 0..SEED_ATTEMPTS {
        let first = first_sequence(log).await.map_err(jetstream)?;
        if first <= 1 {
            return Ok(());
        }
        match seed_once(log, tree, retention, node, store).await {
            Ok(()) => return Ok(()),
            Err(NotSeeded::Moved(why)) => {
                tracing::info!(%why, "the horizon moved while this node copied it; again");
            }
            Err(NotSeeded::Refused(why)) => {
                let _ = retention.delete(&super::retention::applied_key(node)).await;
                return Err(refused(why));
            }
        }
    }
    let _ = retention.delete(&super::retention::applied_key(node)).await;
    Err(refused(format!(
        "the horizon kept moving ({SEED_ATTEMPTS} attempts)"
    )))
}

async fn first_sequence(log: &stream::Stream) -> Result<u64, String> {
    super::stream_state(log)
        .await
        .map(|state| state.first_sequence)
        .map_err(|e| e.to_string())
}

async fn seed_once(
    log: &stream::Stream,
    tree: &TreeLog,
    retention: &SharedMap,
    node: &str,
    store: &Arc<Store>,
) -> Result<(), NotSeeded> {
    let moved = |e: String| NotSeeded::Moved(e);
    let target = super::retention::read_target(retention)
        .await
        .map_err(moved)?
        .map(|(t, _)| t)
        .ok_or_else(|| {
            NotSeeded::Refused("the stream was trimmed but no retention horizon is recorded".into())
        })?;
    let horizon = target.horizon().map_err(NotSeeded::Refused)?;
    // From here the stream is not trimmed past the message after the horizon.
    retention
        .put(
            &super::retention::applied_key(node),
            target.stream_seq.to_string().into_bytes(),
        )
        .await
        .map_err(|e| moved(e.to_string()))?;
    let next = target.stream_seq + 1;
    let first = first_sequence(log).await.map_err(moved)?;
    if first > next {
        return Err(moved(format!(
            "the stream begins at {first}, after the horizon's message {next}"
        )));
    }
    let message = log
        .get_raw_message(next)
        .await
        .map_err(|e| moved(format!("reading stream message {next}: {e}")))?;
    let group = GroupMessage::decode(&message.payload).map_err(NotSeeded::Refused)?;
    let events = crate::store::decode_chunk(&group.events)
        .map_err(|e| NotSeeded::Refused(format!("stream message {next}: {e}")))?;
    let mut chain = Verifier::after(
        horizon.pruned_through,
        horizon.last_pruned_id.unwrap_or_default(),
        horizon.last_pruned_hash,
    );
    for event in &events {
        chain.push(event.line.as_bytes()).map_err(|e| {
            NotSeeded::Refused(format!(
                "stream message {next} does not continue the horizon: {e}"
            ))
        })?;
    }
    if !tree
        .copy_into(store, horizon.pruned_through)
        .await
        .map_err(moved)?
    {
        return Err(NotSeeded::Refused(format!(
            "the tree stream does not hold the leaf hashes below the horizon (seq {}); \
             it is written from this version on, when the horizon next moves",
            horizon.pruned_through
        )));
    }
    let copy = store.clone();
    tokio::task::spawn_blocking(move || -> Result<u64, String> {
        copy.seed_at_horizon(horizon, &events, &group.events, next, &group.idempotency)
            .map_err(|e| e.to_string())?;
        crate::merkle::catch_up(&copy).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| NotSeeded::Refused(e.to_string()))?
    .map_err(NotSeeded::Refused)?;
    tracing::info!(
        pruned_through = horizon.pruned_through,
        stream_seq = next,
        "cluster mode: this empty node starts at the cluster's horizon"
    );
    Ok(())
}

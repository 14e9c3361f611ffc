//! Retention in cluster mode (SPEC §6 + §8): one horizon for the whole cluster, and the
//! stream trimmed only behind what every node has pruned. docs/retention.md, "Cluster
//! mode", has the design and the decisions.
//!
//! The shared map `retention` holds:
//! - `target`: the cluster's horizon ([`Target`], JSON). Only the sequencer writes it,
//!   compare-and-set by revision and only ever forward, so a stale sequencer cannot move
//!   it back. It is always the last event of a stream group and covered by a signed
//!   checkpoint.
//! - `applied.<node, hex>`: the stream sequence of the last message the node has pruned
//!   entirely (0: none). The sequencer purges the stream below the smallest of them, so a
//!   node that is down holds the trim back.
//!
//! Every node (the sequencer too) prunes through exactly `target` once its copy holds a
//! later event: the writer stores each stream group as its own chunks, so the same
//! whole-chunk prune stops at the same seq on every node.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use super::{ClusterError, SharedMap, Status, Written};
use crate::checkpoint::Checkpointer;
use crate::retention::Policy;
use crate::store::{Horizon, Store, StoreError};

/// How often the bounds, the target and the purge are looked at.
const TICK: Duration = Duration::from_secs(1);
const TARGET_KEY: &str = "target";

/// The cluster's horizon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Target {
    /// The last event pruned everywhere: the last event of a stream group.
    pub(super) pruned_through: u64,
    pub(super) last_pruned_id: Ulid,
    /// Hex of its hash: the next event's `prev_hash`.
    pub(super) last_pruned_hash: String,
    /// The stream sequence of the message holding `pruned_through`.
    pub(super) stream_seq: u64,
}

impl Target {
    /// The store's horizon record for this target.
    pub(super) fn horizon(&self) -> Result<Horizon, String> {
        let hash = hex::decode(&self.last_pruned_hash)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or("the retention target's hash is not 32 bytes of hex")?;
        Ok(Horizon {
            pruned_through: self.pruned_through,
            last_pruned_id: Some(self.last_pruned_id),
            last_pruned_hash: hash,
        })
    }
}

/// `applied.<node>`: node names (the default is the listen address) in hex, one KV key
/// token.
pub(super) fn applied_key(node: &str) -> String {
    let hex: String = node.bytes().map(|b| format!("{b:02x}")).collect();
    format!("applied.{hex}")
}

/// The node name an `applied.<hex>` key stands for.
fn node_of(key: &str) -> Option<String> {
    let hex = key.strip_prefix("applied.")?;
    let bytes = hex::decode(hex).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// What `cairn cluster forget` removed, and who still holds the trim.
#[derive(Debug)]
pub struct Forgotten {
    /// The bucket it was removed from.
    pub bucket: String,
    /// The stream sequence the node had reported pruned through.
    pub applied: String,
    /// The registrations left: (node, stream sequence it has pruned through).
    pub remaining: Vec<(String, String)>,
}

/// Removes `node`'s registration (`applied.<node, hex>`) from the retention map of the
/// cluster of `stream`, so the stream is trimmed behind the other nodes only: for a node
/// that is gone for good, which would otherwise hold the trim back forever. Refused when
/// the node has no registration, or holds the sequencer lease (it is running). Creates
/// nothing: a mistyped stream name finds no bucket.
pub async fn forget(urls: &[String], stream: &str, node: &str) -> Result<Forgotten, String> {
    let (_client, js) = super::nats_connect(urls, "cairn cluster forget")
        .await
        .map_err(|e| e.to_string())?;
    let names = super::Names::new(stream);
    let bucket = format!("{stream}_retention");
    let Some(map) = super::shared::open_existing(&js, &bucket)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err(format!(
            "no node of the stream {stream} has registered for retention (there is no bucket \
             {bucket}); check --nats-stream and --nats"
        ));
    };
    let registered: Vec<(String, String)> = map
        .all()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|e| {
            let value = String::from_utf8_lossy(e.value.as_deref()?).into_owned();
            Some((node_of(&e.key)?, value))
        })
        .collect();
    let key = applied_key(node);
    let Some(entry) = map.get(&key).await.map_err(|e| e.to_string())? else {
        let list: Vec<String> = registered.iter().map(|(n, _)| format!("{n:?}")).collect();
        return Err(format!(
            "node {node:?} has no trim registration in {bucket} (registered: {}); nothing was \
             removed. A node's name is its --node (default: its listen address)",
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        ));
    };
    // The lease's value is its holder's name: that node is running.
    if let Some(lease) = super::shared::open_existing(&js, &names.lease_bucket)
        .await
        .map_err(|e| e.to_string())?
        && let Some(holder) = lease
            .get(super::sequencer::LEASE_KEY)
            .await
            .map_err(|e| e.to_string())?
        && holder.value.as_deref() == Some(node.as_bytes())
    {
        return Err(format!(
            "node {node:?} holds the sequencer lease, so it is running; stop it for good \
             first (a running node registers again)"
        ));
    }
    // Only the revision read: a node that registered again meanwhile is running.
    map.delete_at(&key, entry.revision).await.map_err(|e| {
        format!(
            "node {node:?}'s registration changed while it was being removed (is it running?): {e}"
        )
    })?;
    let applied = entry
        .value
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    Ok(Forgotten {
        bucket,
        applied,
        remaining: registered.into_iter().filter(|(n, _)| n != node).collect(),
    })
}

/// The stream sequence of the last message this node's copy has pruned entirely.
fn pruned_stream_seq(store: &Store) -> Result<u64, StoreError> {
    let horizon = store.horizon().pruned_through;
    if horizon == 0 {
        return Ok(0);
    }
    // The group after the horizon begins at horizon + 1 (the horizon is a group's end).
    Ok(match store.group_at_or_before(horizon + 1)? {
        Some((first, stream_seq)) if first == horizon + 1 => stream_seq.saturating_sub(1),
        _ => 0,
    })
}

/// Registers this node in `applied` (holding the stream's trim back from now on), checks
/// that its copy is not behind the stream's first message, and starts the task.
pub async fn start(
    status: Arc<Status>,
    map: SharedMap,
    checkpoints: Arc<Checkpointer>,
    policy: Policy,
    shutdown: CancellationToken,
) -> Result<(), ClusterError> {
    let store = status.store.clone();
    let key = applied_key(&status.node);
    let mine = pruned_stream_seq(&store).map_err(|e| ClusterError::JetStream(e.to_string()))?;
    // What this data directory has pruned, whatever an earlier life of this node name
    // reported: the entry must never claim more than the copy holds. (A failed put is
    // NATS's side: the caller retries the whole start.)
    map.put(&key, mine.to_string().into_bytes())
        .await
        .map_err(|e| ClusterError::JetStream(format!("registering for retention: {e}")))?;
    // A purge decided before the entry existed may have passed this copy meanwhile.
    let position = *status.writer.applied_stream().borrow();
    if let Err(e) = super::check_not_behind(&status.log, &status.names, position).await {
        let _ = map.delete(&key).await;
        return Err(e);
    }
    tokio::spawn(run(status, map, checkpoints, policy, key, mine, shutdown));
    Ok(())
}

async fn run(
    status: Arc<Status>,
    map: SharedMap,
    checkpoints: Arc<Checkpointer>,
    policy: Policy,
    key: String,
    mut reported: u64,
    shutdown: CancellationToken,
) {
    let policy = Arc::new(policy);
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if status.sequencer.load(Ordering::Relaxed) {
            if policy.is_bounded()
                && let Err(e) = decide(&status, &map, &checkpoints, &policy).await
            {
                failed(&status, "the cluster's horizon was not moved", &e);
            }
            if let Err(e) = purge(&status, &map).await {
                failed(&status, "the stream was not trimmed", &e);
            }
        }
        match follow(&status, &map, &policy, &key, reported).await {
            Ok(Some(now)) => reported = now,
            Ok(None) => {}
            Err(e) => failed(&status, "not pruned to the cluster's horizon", &e),
        }
    }
}

/// A tick's failure, retried next tick: a warning while NATS answers; while this node
/// cannot reach it (reported by `/healthz` and the cluster's own logs), only at debug,
/// rather than three warnings a second for the whole outage.
fn failed(status: &Status, what: &str, error: &str) {
    if status.reachable.load(Ordering::Relaxed) {
        tracing::warn!(error, "retention: {what}");
    } else {
        tracing::debug!(error, "retention: {what}");
    }
}

/// The target's value and revision (`None`: no horizon yet).
pub(super) async fn read_target(map: &SharedMap) -> Result<Option<(Target, u64)>, String> {
    let Some(entry) = map.get(TARGET_KEY).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let Some(value) = entry.value else {
        return Ok(None);
    };
    let target = serde_json::from_slice(&value)
        .map_err(|e| format!("the shared retention target does not parse: {e}"))?;
    Ok(Some((target, entry.revision)))
}

/// The sequencer: evaluates the bounds on its copy and moves `target` forward.
async fn decide(
    status: &Status,
    map: &SharedMap,
    checkpoints: &Checkpointer,
    policy: &Arc<Policy>,
) -> Result<(), String> {
    let current = read_target(map).await?;
    let through = current.as_ref().map_or(0, |(t, _)| t.pruned_through);
    let covered = checkpoints.latest().size;
    let (store, policy) = (status.store.clone(), policy.clone());
    let proposal = tokio::task::spawn_blocking(move || propose(&store, &policy, covered, through))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let Some(target) = proposal else {
        return Ok(());
    };
    // Before the horizon exists, the leaf hashes below it are where a node that starts
    // empty reads them (the stream is trimmed only behind a written horizon).
    status
        .tree
        .publish_through(&status.store, target.pruned_through)
        .await?;
    let value = serde_json::to_vec(&target).map_err(|e| e.to_string())?;
    let written = match current {
        None => map.create(TARGET_KEY, value).await,
        Some((_, revision)) => map.update(TARGET_KEY, value, revision).await,
    }
    .map_err(|e| e.to_string())?;
    match written {
        Written::Done(_) => tracing::info!(
            pruned_through = target.pruned_through,
            stream_seq = target.stream_seq,
            "retention: moved the cluster's horizon"
        ),
        // Another sequencer wrote meanwhile: look again next tick.
        Written::Conflict => tracing::info!("retention: the horizon changed meanwhile"),
    }
    Ok(())
}

/// The horizon the bounds ask for now, capped at the signed checkpoint (`covered`) and
/// below the head, rounded down to a stream group's end; `None` unless it passes
/// `through`.
fn propose(
    store: &Store,
    policy: &Policy,
    covered: u64,
    through: u64,
) -> Result<Option<Target>, StoreError> {
    let wanted = policy
        .target_seq(store, crate::retention::now_ms())?
        .min(covered)
        .min(store.head().seq.saturating_sub(1));
    if wanted <= through {
        return Ok(None);
    }
    let Some((group_first, group_stream_seq)) = store.group_at_or_before(wanted + 1)? else {
        return Ok(None);
    };
    let pruned_through = group_first - 1;
    if pruned_through <= through {
        return Ok(None);
    }
    let event = store
        .get_by_seq(pruned_through)?
        .ok_or_else(|| StoreError::Corrupt(format!("event {pruned_through} is missing")))?;
    let hash = crate::chain::stated_hash(event.line.as_bytes()).map_err(StoreError::Corrupt)?;
    Ok(Some(Target {
        pruned_through,
        last_pruned_id: event.id,
        last_pruned_hash: hex::encode(hash),
        stream_seq: group_stream_seq - 1,
    }))
}

/// The sequencer: trims the stream below what every registered node has pruned.
async fn purge(status: &Status, map: &SharedMap) -> Result<(), String> {
    let entries = map.all().await.map_err(|e| e.to_string())?;
    let mut lowest: Option<u64> = None;
    for entry in &entries {
        if !entry.key.starts_with("applied.") {
            continue;
        }
        let Some(value) = &entry.value else { continue };
        let seq = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("{} holds no stream sequence", entry.key))?;
        lowest = Some(lowest.map_or(seq, |l| l.min(seq)));
    }
    let Some(lowest) = lowest.filter(|&l| l > 0) else {
        return Ok(());
    };
    let first = super::stream_state(&status.log)
        .await
        .map_err(|e| e.to_string())?
        .first_sequence;
    if first > lowest {
        return Ok(());
    }
    // "Up to but not including": messages ≤ lowest go.
    let purged = status
        .log
        .purge()
        .sequence(lowest + 1)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        below = lowest + 1,
        messages = purged.purged,
        "retention: trimmed the stream"
    );
    Ok(())
}

/// Every node: prunes through the target once its copy holds a later event, then
/// reports it. Returns the newly reported value.
async fn follow(
    status: &Status,
    map: &SharedMap,
    policy: &Policy,
    key: &str,
    reported: u64,
) -> Result<Option<u64>, String> {
    let Some((target, _)) = read_target(map).await? else {
        return Ok(None);
    };
    let store = status.store.clone();
    let through = store.horizon().pruned_through;
    if target.pruned_through > through && store.head().seq > target.pruned_through {
        let archive = policy.archive.clone();
        let s = target.pruned_through;
        let store = store.clone();
        // The target is covered by a checkpoint the sequencer signed (one key, one log).
        tokio::task::spawn_blocking(move || {
            crate::retention::prune_to(&store, s, Ulid(u128::MAX), s, archive.as_deref())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    }
    let through = store.horizon().pruned_through;
    if through != target.pruned_through || reported >= target.stream_seq {
        if through > target.pruned_through
            || (through < target.pruned_through && store.head().seq > target.pruned_through)
        {
            // Chunks written before groups were stored apart can straddle the target.
            tracing::warn!(
                horizon = through,
                target = target.pruned_through,
                "retention: this copy's horizon differs from the cluster's"
            );
        }
        return Ok(None);
    }
    map.put(key, target.stream_seq.to_string().into_bytes())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        pruned_through = through,
        stream_seq = target.stream_seq,
        "retention: pruned to the cluster's horizon"
    );
    Ok(Some(target.stream_seq))
}

//! The single writer: the only code that appends to the log.
//!
//! Requests queue on a channel. The writer thread owns the head (seq, id, hash), the
//! ULID generator and the idempotency check. It takes every request that is waiting,
//! gives each event its id, seq and hash (`chain::seal`), packs the events into chunks,
//! computes the Merkle tree's new nodes (`merkle`), applies them all as one atomic sled batch, makes them durable with one flush, marks them
//! committed in the store, answers every request of the group and hands the events to
//! the publisher thread, which broadcasts them to live subscribers. Requests that arrive during the flush form the next group:
//! that is the group commit.
//!
//! A separate syncer thread (pipelining the next group's CPU work with this group's
//! flush) was measured and dropped: on 2 cores the extra thread hand-offs cost more than
//! the overlap saved, and the groups it flushed were smaller (≈1.2 requests per fsync
//! against ≈3 here under W1).
//!
//! Nothing is answered or published before it is durable (unless `--sync none`), and
//! the order of acknowledgements and broadcasts is the log order. If a flush fails, the
//! writer refuses all further appends: after a failed fsync the kernel may have dropped
//! the dirty pages, so nothing written since can be trusted until a restart re-reads
//! the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};
use ulid::Ulid;

use crate::chain::{self, RecordParts};
use crate::event::{Event, NewEvent};
use crate::merkle;
use crate::rfc3339;
use crate::store::{CommitBatch, Head, IdempotencyRecord, Store};
use crate::subscription::Committed;
use crate::telemetry;

/// How long idempotency keys are kept (SPEC: at least 24 h).
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Most events taken into one group commit; the rest wait for the next.
const MAX_GROUP_EVENTS: usize = 50_000;
/// Group commits the broadcast channel buffers for slow subscribers.
const BROADCAST_CAPACITY: usize = 4096;

/// Whether acknowledgements wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncMode {
    /// fsync before acknowledging (default).
    Fsync,
    /// Acknowledge once written; the OS flushes later. Can lose the last
    /// acknowledged writes on power loss.
    None,
}

/// An `Idempotency-Key` and what it guards.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub token_id: String,
    pub key: String,
    /// SHA-256 of the request body: the same key with another body is refused.
    pub body_hash: [u8; 32],
}

/// What an append produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Newly appended events.
    New {
        first_seq: u64,
        last_seq: u64,
        ids: Vec<Ulid>,
        head: Head,
    },
    /// A retry of an earlier request with the same idempotency key: nothing was
    /// appended; the first request produced `first_seq..=last_seq`.
    Replayed { first_seq: u64, last_seq: u64 },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    #[error("this Idempotency-Key was already used with a different request body")]
    KeyReused,
    #[error("the log is not writable: {0}")]
    Unavailable(String),
}

type Reply = oneshot::Sender<Result<Appended, AppendError>>;

struct Request {
    events: Vec<NewEvent>,
    idempotency: Option<IdempotencyKey>,
    reply: Reply,
}

/// The handle request handlers use; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
    events: broadcast::Sender<Arc<Committed>>,
    failed: Failure,
}

/// Joins the writer (and publisher) threads once every [`Writer`] handle is dropped.
pub struct WriterThread {
    writer: JoinHandle<()>,
    publisher: JoinHandle<()>,
}

impl WriterThread {
    /// Waits until every queued request is applied, flushed, answered and published.
    pub fn join(self) {
        let _ = self.writer.join();
        let _ = self.publisher.join();
    }
}

impl Writer {
    /// Starts the writer thread on a store whose head is loaded.
    pub fn start(store: Arc<Store>, sync: SyncMode) -> std::io::Result<(Writer, WriterThread)> {
        let (tx, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let failed = Failure::default();
        let (publish, to_publish) = std::sync::mpsc::channel();
        let state = WriterState {
            head: store.head(),
            store,
            sync,
            rx,
            publish,
            failed: failed.clone(),
            last_prune: None,
            frontier: merkle::Frontier::default(),
        };
        let writer = std::thread::Builder::new()
            .name("cairn-writer".into())
            .spawn(move || state.run())?;
        let live = events.clone();
        let publisher = std::thread::Builder::new()
            .name("cairn-publisher".into())
            .spawn(move || publish_committed(to_publish, live))?;
        Ok((
            Writer { tx, events, failed },
            WriterThread { writer, publisher },
        ))
    }

    /// Appends `events` atomically, in order; resolves once they are durable.
    pub async fn append(
        &self,
        events: Vec<NewEvent>,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Appended, AppendError> {
        if self.failed.get().is_some() {
            return Err(unavailable(&self.failed));
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request {
                events,
                idempotency,
                reply,
            })
            .await
            .map_err(|_| AppendError::Unavailable("the server is shutting down".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(AppendError::Unavailable("the writer stopped".into())))
    }

    /// Live feed of committed events, one message per group commit, in log order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.events.subscribe()
    }
}

/// Why the log stopped taking appends: set once, by the first failed flush.
type Failure = Arc<OnceLock<String>>;

fn unavailable(failure: &Failure) -> AppendError {
    AppendError::Unavailable(format!(
        "flushing the log to disk failed ({}); restart the server to re-check the log",
        failure.get().map_or("unknown cause", String::as_str)
    ))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One group commit, applied and waiting to be made durable.
struct Group {
    head: Head,
    events: Vec<Event>,
    replies: Vec<(Reply, Result<Appended, AppendError>)>,
}

struct WriterState {
    store: Arc<Store>,
    head: Head,
    sync: SyncMode,
    rx: mpsc::Receiver<Request>,
    /// Committed groups, in log order, for the publisher thread.
    publish: std::sync::mpsc::Sender<Vec<Event>>,
    failed: Failure,
    last_prune: Option<Instant>,
    /// The Merkle tree's right edge, so appending never reads the store (reset by its
    /// size check if a group fails).
    frontier: merkle::Frontier,
}

/// Most events merged into one broadcast message.
const MAX_PUBLISH_EVENTS: usize = 10_000;

/// Broadcasts committed groups to the live subscribers. `send` wakes every waiting
/// subscriber, which with a thousand of them costs about a millisecond: done here, off
/// the writer thread, and with every group that queued up meanwhile merged into one
/// message, so the cost per event falls as the load rises instead of capping ingest.
fn publish_committed(
    groups: std::sync::mpsc::Receiver<Vec<Event>>,
    live: broadcast::Sender<Arc<Committed>>,
) {
    while let Ok(mut merged) = groups.recv() {
        while merged.len() < MAX_PUBLISH_EVENTS {
            match groups.try_recv() {
                Ok(more) => merged.extend(more),
                Err(_) => break,
            }
        }
        // No subscribers is fine: send only fails when nobody listens.
        let _ = live.send(Arc::new(Committed::new(merged)));
    }
}

/// Next ULID: the current time with fresh randomness, or one more than the previous id
/// when the clock has not moved on (or stepped back), so ids strictly increase.
fn next_id(previous: Option<Ulid>, now_ms: u64) -> Ulid {
    let fresh = Ulid::from_parts(now_ms, rand::random::<u128>());
    match previous {
        Some(prev) if fresh <= prev => prev
            .increment()
            .unwrap_or_else(|| Ulid::from_parts(prev.timestamp_ms() + 1, 0)),
        _ => fresh,
    }
}

impl WriterState {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut requests = vec![first];
            let mut taken = requests[0].events.len();
            while taken < MAX_GROUP_EVENTS {
                match self.rx.try_recv() {
                    Ok(r) => {
                        taken += r.events.len();
                        requests.push(r);
                    }
                    Err(_) => break,
                }
            }
            if self.failed.get().is_some() {
                for r in requests {
                    let _ = r.reply.send(Err(unavailable(&self.failed)));
                }
                continue;
            }
            let group = self.apply(requests);
            self.finish(group);
            self.prune_idempotency_keys();
        }
    }

    /// Assigns ids, seqs and hashes and writes the group to the store (not yet durable).
    fn apply(&mut self, requests: Vec<Request>) -> Group {
        let start_head = self.head.clone();
        let mut batch = CommitBatch::default();
        let mut all_events: Vec<Event> = Vec::new();
        let mut event_hashes: Vec<[u8; 32]> = Vec::new();
        let mut replies = Vec::with_capacity(requests.len());
        // Keys used earlier in this same group (not yet in the store).
        let mut group_keys: HashMap<(String, String), IdempotencyRecord> = HashMap::new();

        for request in requests {
            if let Some(key) = &request.idempotency {
                let earlier = match group_keys.get(&(key.token_id.clone(), key.key.clone())) {
                    Some(r) => Ok(Some(r.clone())),
                    None => self.store.idempotency(&key.token_id, &key.key),
                };
                match earlier {
                    Ok(Some(record)) => {
                        let outcome = if record.body_hash == key.body_hash {
                            Ok(Appended::Replayed {
                                first_seq: record.first_seq,
                                last_seq: record.last_seq,
                            })
                        } else {
                            Err(AppendError::KeyReused)
                        };
                        replies.push((request.reply, outcome));
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        replies.push((request.reply, Err(AppendError::Unavailable(e.to_string()))));
                        continue;
                    }
                }
            }

            let now_ms = now_unix_ms();
            let first_seq = self.head.seq + 1;
            let mut ids = Vec::with_capacity(request.events.len());
            for new in request.events {
                let id = next_id(self.head.id, now_ms);
                let seq = self.head.seq + 1;
                let timestamp = new
                    .timestamp
                    .unwrap_or_else(|| rfc3339::format_unix_ms(id.timestamp_ms()));
                let (line, hash) = chain::seal(&RecordParts {
                    data_jcs: &new.data_jcs,
                    id,
                    prev_hash: &self.head.hash,
                    seq,
                    source_jcs: new.source_jcs.as_deref(),
                    timestamp: &timestamp,
                    event_type: &new.event_type,
                });
                all_events.push(Event {
                    id,
                    seq,
                    event_type: new.event_type,
                    source: new.source,
                    line: line.into(),
                });
                event_hashes.push(hash);
                self.head = Head {
                    seq,
                    id: Some(id),
                    hash,
                    timestamp: Some(timestamp),
                };
                ids.push(id);
            }
            if let Some(key) = request.idempotency {
                let record = IdempotencyRecord {
                    body_hash: key.body_hash,
                    first_seq,
                    last_seq: self.head.seq,
                    created_unix_ms: now_ms,
                };
                batch.add_idempotency(&key.token_id, &key.key, &record);
                group_keys.insert((key.token_id, key.key), record);
            }
            replies.push((
                request.reply,
                Ok(Appended::New {
                    first_seq,
                    last_seq: self.head.seq,
                    ids,
                    head: self.head.clone(),
                }),
            ));
        }
        batch.add_events(&all_events);
        // The tree's new hashes go in the same atomic batch as the events they cover.
        let applied = merkle::hashes_for_leaves(
            &*self.store,
            &mut self.frontier,
            start_head.seq,
            &event_hashes,
        )
        .and_then(|tree| {
            batch.add_tree_hashes(start_head.seq, event_hashes.len() as u64, &tree);
            self.store.apply(batch)
        });
        if let Err(e) = applied {
            // Nothing of this group reached the store: roll the head back, and fail every
            // request that appended or that replays a key first used in this group.
            tracing::error!(error = %e, "appending a group commit failed");
            for (_, outcome) in &mut replies {
                let lost = match outcome {
                    Ok(Appended::New { .. }) => true,
                    Ok(Appended::Replayed { first_seq, .. }) => *first_seq > start_head.seq,
                    Err(_) => false,
                };
                if lost {
                    *outcome = Err(AppendError::Unavailable(e.to_string()));
                }
            }
            self.head = start_head;
            all_events.clear();
        }
        Group {
            head: self.head.clone(),
            events: all_events,
            replies,
        }
    }

    /// Makes the group durable, then answers its requests and publishes its events.
    fn finish(&self, group: Group) {
        let started = Instant::now();
        if self.sync == SyncMode::Fsync
            && let Err(e) = self.store.sync().inspect(|()| {
                metrics::histogram!(telemetry::FSYNC_DURATION).record(started.elapsed());
            })
        {
            tracing::error!(error = %e, "flushing the log to disk failed; refusing further appends");
            let _ = self.failed.set(e.to_string());
        }
        let durable = self.failed.get().is_none();
        if durable {
            self.store.set_committed(group.head);
        }
        for (reply, outcome) in group.replies {
            let outcome = if durable {
                outcome
            } else {
                outcome.and(Err(unavailable(&self.failed)))
            };
            let _ = reply.send(outcome);
        }
        if durable {
            metrics::counter!(telemetry::EVENTS_INGESTED).increment(group.events.len() as u64);
        }
        if durable && !group.events.is_empty() {
            // Committed (above) before published: subscriptions rely on that order.
            let _ = self.publish.send(group.events);
        }
    }

    fn prune_idempotency_keys(&mut self) {
        if self.last_prune.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return;
        }
        self.last_prune = Some(Instant::now());
        let cutoff = now_unix_ms().saturating_sub(IDEMPOTENCY_TTL.as_millis() as u64);
        match self.store.expired_idempotency_keys(cutoff) {
            Ok(keys) if keys.is_empty() => {}
            Ok(keys) => {
                let count = keys.len();
                let mut batch = CommitBatch::default();
                for k in keys {
                    batch.remove_idempotency(k);
                }
                match self.store.apply(batch) {
                    Ok(()) => tracing::info!(count, "pruned expired idempotency keys"),
                    Err(e) => tracing::warn!(error = %e, "pruning idempotency keys failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "scanning idempotency keys failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_when_the_clock_steps_back() {
        let a = next_id(None, 10_000);
        let b = next_id(Some(a), 5_000);
        let c = next_id(Some(b), 5_000);
        assert!(a < b && b < c);
        let max = Ulid::from_parts(10_000, u128::MAX);
        let d = next_id(Some(max), 10_000);
        assert!(d > max);
        assert_eq!(d.timestamp_ms(), 10_001);
    }
}

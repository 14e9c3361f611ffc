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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Cluster mode: the log of record (NATS JetStream) cannot be reached or has no
    /// sequencer right now; nothing was appended, or (when said) possibly was.
    #[error("{0}")]
    ClusterUnavailable(String),
    /// Cluster mode: the request does not fit in one stream message.
    #[error("{0}")]
    TooLarge(String),
}

type Reply = oneshot::Sender<Result<Appended, AppendError>>;

struct Request {
    events: Vec<NewEvent>,
    idempotency: Option<IdempotencyKey>,
    reply: Reply,
}

/// A group sealed by the cluster's sequencer, read back from the stream (cluster mode):
/// the writer checks it continues the chain and stores it as it is.
pub struct StreamGroup {
    /// The stream sequence of the message that carried it.
    pub stream_seq: u64,
    pub events: Vec<Event>,
    /// The events as the message carried them: `store::encode_chunk(&events)`, stored
    /// as it is when it fits one chunk (no second compression).
    pub chunk: Vec<u8>,
    pub idempotency: Vec<SealedKey>,
}

/// A webhook's record (its cursor) to store, answered once a group commit has made it
/// durable.
struct RecordWrite {
    id: String,
    value: Vec<u8>,
    reply: RecordReply,
}

/// How long a webhook record waits for a group commit to make it durable before its
/// caller asks the writer to flush for it alone (ingest stopped just after it came).
const RECORD_FLUSH_DELAY: Duration = Duration::from_millis(5);

/// Ingest counts as under way for this long after a round that committed: records then
/// wait for its next group commit; later, the writer flushes them at once (a webhook
/// catching up on an idle log must not wait [`RECORD_FLUSH_DELAY`] per request).
const INGEST_ACTIVE_FOR: Duration = RECORD_FLUSH_DELAY;

type RecordReply = oneshot::Sender<Result<(), AppendError>>;

/// What the writer thread takes: a request to seal here, a group sealed elsewhere, a
/// webhook record to make durable along with them, or a call to flush the records
/// still waiting because no group came.
enum Input {
    Append(Request),
    Apply(StreamGroup),
    Record(RecordWrite),
    FlushRecords,
}

impl Input {
    fn len(&self) -> usize {
        match self {
            Input::Append(r) => r.events.len(),
            Input::Apply(g) => g.events.len(),
            Input::Record(_) | Input::FlushRecords => 0,
        }
    }
}

/// The handle request handlers use; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Input>,
    events: broadcast::Sender<Arc<Committed>>,
    failed: Failure,
    /// The newest stream sequence applied and durable (cluster mode; 0 otherwise).
    applied_stream: tokio::sync::watch::Receiver<u64>,
    /// Cluster mode: appends go to the sequencer instead of being sealed here.
    forward: Option<Arc<crate::cluster::Forwarder>>,
    store: Arc<Store>,
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
        Writer::start_with(store, sync, INGEST_ACTIVE_FOR)
    }

    /// [`Writer::start`] with how long ingest counts as under way after a commit (tests
    /// lengthen it to keep records waiting).
    fn start_with(
        store: Arc<Store>,
        sync: SyncMode,
        ingest_active_for: Duration,
    ) -> std::io::Result<(Writer, WriterThread)> {
        let (tx, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let failed = Failure::default();
        let (publish, to_publish) = std::sync::mpsc::channel();
        let (stream_position, applied_stream) =
            tokio::sync::watch::channel(store.stream_position().unwrap_or(0));
        let store_handle = store.clone();
        let state = WriterState {
            head: store.head(),
            stream_position,
            store,
            sync,
            rx,
            publish,
            failed: failed.clone(),
            last_prune: None,
            frontier: merkle::Frontier::default(),
            unflushed_records: Vec::new(),
            last_commit: None,
            ingest_active_for,
        };
        let writer = std::thread::Builder::new()
            .name("cairn-writer".into())
            .spawn(move || state.run())?;
        let live = events.clone();
        let publisher = std::thread::Builder::new()
            .name("cairn-publisher".into())
            .spawn(move || publish_committed(to_publish, live))?;
        Ok((
            Writer {
                tx,
                events,
                failed,
                applied_stream,
                forward: None,
                store: store_handle,
            },
            WriterThread { writer, publisher },
        ))
    }

    /// Cluster mode: appends through this handle go to the cluster's sequencer.
    pub fn forward_to(&mut self, forwarder: Arc<crate::cluster::Forwarder>) {
        self.forward = Some(forwarder);
    }

    /// Stores a group read from the cluster's stream; resolves once it is queued (its
    /// effect shows in [`Writer::applied_stream`] once durable).
    pub async fn apply(&self, group: StreamGroup) -> Result<(), AppendError> {
        self.tx
            .send(Input::Apply(group))
            .await
            .map_err(|_| AppendError::Unavailable("the server is shutting down".into()))
    }

    /// The newest stream sequence this node has applied and made durable.
    pub fn applied_stream(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_stream.clone()
    }

    /// Waits (up to `limit`) until the store's committed head reaches `seq`.
    pub async fn wait_for_seq(&self, seq: u64, limit: Duration) -> bool {
        let mut applied = self.applied_stream.clone();
        let reached = async {
            while self.store.head().seq < seq {
                if applied.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(limit, reached).await.unwrap_or(false)
    }

    /// Stops this node's log for good (cluster mode: its copy cannot follow the stream).
    pub fn halt(&self, reason: String) {
        tracing::error!("{reason}");
        let _ = self.failed.set(reason);
    }

    /// Why the log stopped taking appends, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.get().cloned()
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
        if let Some(forward) = &self.forward {
            return forward.append(events, idempotency).await;
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Input::Append(Request {
                events,
                idempotency,
                reply,
            }))
            .await
            .map_err(|_| AppendError::Unavailable("the server is shutting down".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(AppendError::Unavailable("the writer stopped".into())))
    }

    /// Stores a webhook's record (cursor and counters); resolves once it is durable
    /// (unless `--sync none`). Records are written in the order they are sent; while
    /// ingest is under way they are made durable by its next group commit, on an idle
    /// log at once, and when ingest stops just after one came, the task asks for a flush
    /// after [`RECORD_FLUSH_DELAY`]. Ten webhooks storing cursors from their own
    /// threads, or with flushes of their own between ingest's group commits, cost W1 a
    /// fifth to a quarter of its throughput (docs/webhooks.md, "Ingest cost").
    pub async fn store_webhook_record(
        &self,
        id: String,
        value: Vec<u8>,
    ) -> Result<(), AppendError> {
        let (reply, mut answer) = oneshot::channel();
        let gone = || AppendError::Unavailable("the server is shutting down".into());
        self.tx
            .send(Input::Record(RecordWrite { id, value, reply }))
            .await
            .map_err(|_| gone())?;
        let stopped = |_| Err(AppendError::Unavailable("the writer stopped".into()));
        match tokio::time::timeout(RECORD_FLUSH_DELAY, &mut answer).await {
            Ok(answered) => return answered.unwrap_or_else(stopped),
            Err(_) => self
                .tx
                .send(Input::FlushRecords)
                .await
                .map_err(|_| gone())?,
        }
        answer.await.unwrap_or_else(stopped)
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
        "{}; restart the server to re-check the log",
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
    rx: mpsc::Receiver<Input>,
    /// The newest stream sequence stored and durable (cluster mode).
    stream_position: tokio::sync::watch::Sender<u64>,
    /// Committed groups, in log order, for the publisher thread.
    publish: std::sync::mpsc::Sender<Vec<Event>>,
    failed: Failure,
    last_prune: Option<Instant>,
    /// The Merkle tree's right edge, so appending never reads the store (reset by its
    /// size check if a group fails).
    frontier: merkle::Frontier,
    /// Webhook records written, waiting for a flush to answer them.
    unflushed_records: Vec<(RecordReply, Result<(), AppendError>)>,
    /// When a round last committed events (ingest or the cluster's stream).
    last_commit: Option<Instant>,
    ingest_active_for: Duration,
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

/// An idempotency record as sealed: token id, key, record.
pub type SealedKey = (String, String, IdempotencyRecord);

/// A group of requests sealed on a head: what to store and what to answer.
pub struct Sealed {
    pub events: Vec<Event>,
    /// Each event's hash, for the Merkle tree.
    pub hashes: Vec<[u8; 32]>,
    pub idempotency: Vec<SealedKey>,
    /// One per request, in order.
    pub outcomes: Vec<Result<Appended, AppendError>>,
}

/// Idempotency keys sealed but not yet in the store, by (token id, key): the requests
/// before this one in the group, and in cluster mode also the groups the stream
/// acknowledged that this node has not applied yet.
pub type UnstoredKeys = HashMap<(String, String), IdempotencyRecord>;

/// Gives each event its id, seq and hash after `head` (advanced over them) and decides
/// each idempotency key against `unstored`, then the store; each new key is added to
/// `unstored`. The single node's writer and the cluster's sequencer both seal this way.
pub fn seal_group(
    head: &mut Head,
    store: &Store,
    unstored: &mut UnstoredKeys,
    requests: Vec<(Vec<NewEvent>, Option<IdempotencyKey>)>,
) -> Sealed {
    let mut sealed = Sealed {
        events: Vec::new(),
        hashes: Vec::new(),
        idempotency: Vec::new(),
        outcomes: Vec::with_capacity(requests.len()),
    };
    for (events, idempotency) in requests {
        if let Some(key) = &idempotency {
            let earlier = match unstored.get(&(key.token_id.clone(), key.key.clone())) {
                Some(r) => Ok(Some(r.clone())),
                None => store.idempotency(&key.token_id, &key.key),
            };
            match earlier {
                Ok(Some(record)) => {
                    sealed.outcomes.push(if record.body_hash == key.body_hash {
                        Ok(Appended::Replayed {
                            first_seq: record.first_seq,
                            last_seq: record.last_seq,
                        })
                    } else {
                        Err(AppendError::KeyReused)
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    sealed
                        .outcomes
                        .push(Err(AppendError::Unavailable(e.to_string())));
                    continue;
                }
            }
        }

        let now_ms = now_unix_ms();
        let first_seq = head.seq + 1;
        let mut ids = Vec::with_capacity(events.len());
        for new in events {
            let id = next_id(head.id, now_ms);
            let seq = head.seq + 1;
            let timestamp = new
                .timestamp
                .unwrap_or_else(|| rfc3339::format_unix_ms(id.timestamp_ms()));
            let prefix = new
                .data_prefix
                .0
                .unwrap_or_else(|| chain::data_prefix_hash(&new.data_jcs));
            let (line, hash) = chain::seal_after(
                &RecordParts {
                    data_jcs: &new.data_jcs,
                    id,
                    prev_hash: &head.hash,
                    seq,
                    source_jcs: new.source_jcs.as_deref(),
                    timestamp: &timestamp,
                    event_type: &new.event_type,
                },
                prefix,
            );
            sealed.events.push(Event {
                id,
                seq,
                event_type: new.event_type,
                source: new.source,
                line: line.into(),
            });
            sealed.hashes.push(hash);
            *head = Head {
                seq,
                id: Some(id),
                hash,
                timestamp: Some(timestamp),
            };
            ids.push(id);
        }
        if let Some(key) = idempotency {
            let record = IdempotencyRecord {
                body_hash: key.body_hash,
                first_seq,
                last_seq: head.seq,
                created_unix_ms: now_ms,
            };
            unstored.insert((key.token_id.clone(), key.key.clone()), record.clone());
            sealed.idempotency.push((key.token_id, key.key, record));
        }
        sealed.outcomes.push(Ok(Appended::New {
            first_seq,
            last_seq: head.seq,
            ids,
            head: head.clone(),
        }));
    }
    sealed
}

/// Cluster mode: where a batch of stream groups brings the copy, and its groups.
struct StreamBatch {
    position: u64,
    groups: Vec<StoredGroup>,
}

/// One stream group of a [`StreamBatch`]: its first seq, stream sequence, event count
/// and its events' encoded chunk.
struct StoredGroup {
    first_seq: u64,
    stream_seq: u64,
    len: usize,
    chunk: Vec<u8>,
}

impl WriterState {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut inputs = vec![first];
            let mut taken = inputs[0].len();
            while taken < MAX_GROUP_EVENTS {
                match self.rx.try_recv() {
                    Ok(input) => {
                        taken += input.len();
                        inputs.push(input);
                    }
                    Err(_) => break,
                }
            }
            let mut requests = Vec::new();
            let mut stream_groups = Vec::new();
            let mut records = Vec::new();
            let mut flush_records = false;
            for input in inputs {
                match input {
                    Input::Append(r) => requests.push(r),
                    Input::Apply(g) => stream_groups.push(g),
                    Input::Record(r) => records.push(r),
                    Input::FlushRecords => flush_records = true,
                }
            }
            if self.failed.get().is_some() {
                for r in requests {
                    let _ = r.reply.send(Err(unavailable(&self.failed)));
                }
                for r in records {
                    let _ = r.reply.send(Err(unavailable(&self.failed)));
                }
                // Records written before the log stopped are never flushed: refused too.
                self.answer_records(true);
                continue;
            }
            // Written first, so the flush of whatever this round commits covers them.
            self.write_records(records);
            let commits = !stream_groups.is_empty() || !requests.is_empty();
            let ingest_idle = self
                .last_commit
                .is_none_or(|at| at.elapsed() >= self.ingest_active_for);
            if !stream_groups.is_empty() {
                self.apply_stream_groups(stream_groups);
            }
            if !requests.is_empty() {
                let group = self.apply(requests);
                self.finish(group);
            }
            // While ingest is under way, records alone wait for its next round (a flush
            // of their own between two of ingest's would delay the second); on an idle
            // log, or when asked, they are flushed at once.
            if commits || flush_records || ingest_idle {
                self.answer_records(commits);
            }
            if commits {
                self.last_commit = Some(Instant::now());
            }
            self.prune_idempotency_keys();
        }
        // Every handle is gone (shutdown): the records still waiting.
        self.answer_records(false);
    }

    /// Writes webhook records to the store (not yet durable), in the order received.
    fn write_records(&mut self, records: Vec<RecordWrite>) {
        for r in records {
            let written = self
                .store
                .put_webhook_record(&r.id, &r.value, false)
                .map_err(|e| AppendError::Unavailable(e.to_string()));
            self.unflushed_records.push((r.reply, written));
        }
    }

    /// Answers the records written so far once a flush has made them durable: this
    /// round's (`flushed`: a round that commits flushes, or stops the log), else one of
    /// their own.
    fn answer_records(&mut self, flushed: bool) {
        if self.unflushed_records.is_empty() {
            return;
        }
        // A stopped log flushes nothing more: the records are refused below.
        if !flushed && self.failed.get().is_none() {
            self.finish(Group {
                head: self.head.clone(),
                events: Vec::new(),
                replies: Vec::new(),
            });
        }
        for (reply, written) in self.unflushed_records.drain(..) {
            let outcome = match written {
                Ok(()) if self.failed.get().is_some() => Err(unavailable(&self.failed)),
                other => other,
            };
            let _ = reply.send(outcome);
        }
    }

    /// Assigns ids, seqs and hashes and writes the group to the store (not yet durable).
    fn apply(&mut self, requests: Vec<Request>) -> Group {
        let start_head = self.head.clone();
        let (replies, bodies): (Vec<Reply>, Vec<_>) = requests
            .into_iter()
            .map(|r| (r.reply, (r.events, r.idempotency)))
            .unzip();
        let sealed = seal_group(
            &mut self.head,
            &self.store,
            &mut UnstoredKeys::new(),
            bodies,
        );
        let mut replies: Vec<_> = replies.into_iter().zip(sealed.outcomes).collect();
        let mut all_events = sealed.events;
        if let Err(e) = self.store_events(
            &start_head,
            &all_events,
            &sealed.hashes,
            &sealed.idempotency,
            None,
        ) {
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

    /// Writes sealed events after `start_head`, their Merkle hashes, their idempotency
    /// records and (cluster mode) the stream position as one batch (not yet durable).
    fn store_events(
        &mut self,
        start_head: &Head,
        events: &[Event],
        hashes: &[[u8; 32]],
        idempotency: &[SealedKey],
        stream: Option<&StreamBatch>,
    ) -> Result<(), crate::store::StoreError> {
        let mut batch = CommitBatch::default();
        match stream {
            None => batch.add_events(events),
            Some(stream) => {
                // Each group its own chunks: group ends are chunk ends on every node, so
                // a cluster-wide horizon (always a group's end) prunes the same everywhere.
                let mut rest = events;
                for group in &stream.groups {
                    let (events, after) = rest.split_at(group.len.min(rest.len()));
                    batch.add_encoded_events(events, &group.chunk);
                    batch.add_group_start(group.first_seq, group.stream_seq);
                    rest = after;
                }
                batch.set_stream_position(stream.position);
            }
        }
        for (token_id, key, record) in idempotency {
            batch.add_idempotency(token_id, key, record);
        }
        // The tree's new hashes go in the same atomic batch as the events they cover.
        let tree =
            merkle::hashes_for_leaves(&*self.store, &mut self.frontier, start_head.seq, hashes)?;
        batch.add_tree_hashes(start_head.seq, hashes.len() as u64, &tree);
        self.store.apply(batch)
    }

    /// Stores groups the cluster's sequencer sealed, after checking that each continues
    /// this node's chain exactly. A group that does not stops this node for good: it
    /// must never serve a second history.
    fn apply_stream_groups(&mut self, groups: Vec<StreamGroup>) {
        let start_head = self.head.clone();
        let mut events = Vec::new();
        let mut hashes = Vec::new();
        let mut idempotency = Vec::new();
        let mut position = None;
        let mut layout = Vec::new();
        for group in groups {
            if let Err(reason) = self.continue_chain(&group.events, &mut hashes) {
                let message = format!(
                    "this node's copy of the log disagrees with the cluster's stream at \
                     stream sequence {}: {reason}; it stopped serving",
                    group.stream_seq
                );
                tracing::error!("{message}");
                let _ = self.failed.set(message);
                self.head = start_head;
                return;
            }
            if let Some(first) = group.events.first() {
                layout.push(StoredGroup {
                    first_seq: first.seq,
                    stream_seq: group.stream_seq,
                    len: group.events.len(),
                    chunk: group.chunk,
                });
            }
            events.extend(group.events);
            idempotency.extend(group.idempotency);
            position = Some(group.stream_seq);
        }
        let stream = position.map(|position| StreamBatch {
            position,
            groups: layout,
        });
        if let Err(e) =
            self.store_events(&start_head, &events, &hashes, &idempotency, stream.as_ref())
        {
            tracing::error!(error = %e, "storing groups from the stream failed");
            let _ = self
                .failed
                .set(format!("storing groups from the stream failed ({e})"));
            self.head = start_head;
            return;
        }
        self.finish(Group {
            head: self.head.clone(),
            events,
            replies: Vec::new(),
        });
        if let Some(position) = position
            && self.failed.get().is_none()
        {
            self.stream_position.send_replace(position);
        }
    }

    /// Checks that `events` follow the head (seq, id order, `prev_hash`, each hash
    /// recomputed) and advances the head over them.
    fn continue_chain(
        &mut self,
        events: &[Event],
        hashes: &mut Vec<[u8; 32]>,
    ) -> Result<(), String> {
        for event in events {
            let info = chain::inspect_line(event.line.as_bytes())
                .map_err(|e| format!("event seq {}: {e}", event.seq))?;
            let expected = self.head.seq + 1;
            if info.seq != expected || event.seq != expected {
                return Err(format!("expected seq {expected}, found {}", info.seq));
            }
            if info.id != event.id || self.head.id.is_some_and(|prev| event.id <= prev) {
                return Err(format!("event seq {expected} has an id out of order"));
            }
            if info.prev_hash != self.head.hash {
                return Err(format!(
                    "event seq {expected} does not link to the previous hash"
                ));
            }
            if info.stated_hash != info.computed_hash {
                return Err(format!("event seq {expected} has a wrong hash"));
            }
            hashes.push(info.stated_hash);
            // Only the last event's timestamp is needed: read it once, below.
            self.head.seq = expected;
            self.head.id = Some(event.id);
            self.head.hash = info.stated_hash;
        }
        if let (Some(last), Some(&hash)) = (events.last(), hashes.last()) {
            self.head = Head::after(last, hash).map_err(|e| e.to_string())?;
        }
        Ok(())
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
            let _ = self
                .failed
                .set(format!("flushing the log to disk failed ({e})"));
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

    fn started(dir: &std::path::Path) -> (Arc<Store>, Writer, WriterThread) {
        let store =
            Arc::new(Store::open(crate::store::DataDir::lock(dir).expect("lock")).expect("open"));
        let (writer, thread) = Writer::start(store.clone(), SyncMode::Fsync).expect("start");
        (store, writer, thread)
    }

    /// A writer for which ingest stays "under way" after its first commit, with one
    /// event committed: records sent to it wait for a flush (none comes by itself).
    async fn started_with_ingest(dir: &std::path::Path) -> (Arc<Store>, Writer, WriterThread) {
        let store =
            Arc::new(Store::open(crate::store::DataDir::lock(dir).expect("lock")).expect("open"));
        let (writer, thread) =
            Writer::start_with(store.clone(), SyncMode::Fsync, Duration::from_secs(3600))
                .expect("start");
        let events = crate::event::parse_request(
            br#"{"type":"t","data":1}"#,
            crate::event::BodyFormat::Json,
            1,
        )
        .expect("event");
        writer.append(events, None).await.expect("appended");
        (store, writer, thread)
    }

    /// Sends webhook `w`'s record without asking for a flush (as a task does before its
    /// wait runs out); the answer comes once one has made it durable.
    async fn send_record(
        writer: &Writer,
        value: &[u8],
    ) -> oneshot::Receiver<Result<(), AppendError>> {
        let (reply, answer) = oneshot::channel();
        let record = RecordWrite {
            id: "w".into(),
            value: value.to_vec(),
            reply,
        };
        writer.tx.send(Input::Record(record)).await.expect("sent");
        answer
    }

    /// With no group commit to ride on (ingest idle), a record is flushed on its own.
    #[tokio::test]
    async fn a_record_is_stored_without_ingest() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, writer, _thread) = started(tmp.path());
        let stored = writer.store_webhook_record("w".into(), b"cursor".to_vec());
        tokio::time::timeout(Duration::from_secs(10), stored)
            .await
            .expect("the record was never answered")
            .expect("stored");
        assert_eq!(
            store.webhook_records().expect("records"),
            vec![b"cursor".to_vec()]
        );
    }

    /// On an idle log the writer flushes a record at once, without the flush request a
    /// task sends after waiting (a webhook catching up would otherwise wait that long
    /// for every request it delivers).
    #[tokio::test]
    async fn on_an_idle_log_a_record_needs_no_flush_request() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, writer, _thread) = started(tmp.path());
        for value in [&b"first"[..], b"second"] {
            let answer = send_record(&writer, value).await;
            tokio::time::timeout(Duration::from_secs(10), answer)
                .await
                .expect("the record was never answered")
                .expect("answered")
                .expect("stored");
            assert_eq!(
                store.webhook_records().expect("records"),
                vec![value.to_vec()]
            );
        }
    }

    /// While ingest is under way, a record waits for its next group commit.
    #[tokio::test]
    async fn during_ingest_a_record_waits_for_the_next_commit() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, writer, _thread) = started_with_ingest(tmp.path()).await;
        let written = |value: &[u8]| {
            let records = store.webhook_records().expect("records");
            records.iter().any(|r| r == value)
        };
        let mut answer = send_record(&writer, b"cursor").await;
        wait_for(|| written(b"cursor")).await;
        // Sent once the first is written, so handled in a later round: when it is
        // written, the first record's round is over, answered or not.
        let (reply, _second) = oneshot::channel();
        let second = RecordWrite {
            id: "other".into(),
            value: b"x".to_vec(),
            reply,
        };
        writer.tx.send(Input::Record(second)).await.expect("sent");
        wait_for(|| written(b"x")).await;
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "a record was answered with no commit to make it durable"
        );
        let events = crate::event::parse_request(
            br#"{"type":"t","data":2}"#,
            crate::event::BodyFormat::Json,
            1,
        )
        .expect("event");
        writer.append(events, None).await.expect("appended");
        answer.await.expect("answered").expect("stored");
    }

    async fn wait_for(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "the record was never written");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A record still waiting for a flush when the writer stops is flushed and answered.
    #[tokio::test]
    async fn a_waiting_record_is_stored_at_shutdown() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, writer, thread) = started_with_ingest(tmp.path()).await;
        let answer = send_record(&writer, b"last").await;
        drop(writer);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join");
        answer.await.expect("answered").expect("stored");
        assert_eq!(
            store.webhook_records().expect("records"),
            vec![b"last".to_vec()]
        );
    }

    /// A record waiting for a flush when the log stops is refused, not left unanswered.
    #[tokio::test]
    async fn a_waiting_record_is_refused_when_the_log_stops() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, writer, _thread) = started_with_ingest(tmp.path()).await;
        let answer = send_record(&writer, b"cursor").await;
        // Written (and waiting for a flush) once the store shows it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.webhook_records().expect("records").is_empty() {
            assert!(Instant::now() < deadline, "the record was never written");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        writer.halt("stopped by the test".into());
        writer.tx.send(Input::FlushRecords).await.expect("sent");
        let answered = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("the waiting record was never answered")
            .expect("answered");
        assert!(
            answered.is_err(),
            "a record the log never flushed was acknowledged"
        );
    }
}

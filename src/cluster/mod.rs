//! Cluster mode (SPEC §6): several nodes share one log whose record is a NATS JetStream
//! stream. This module is the only code that knows NATS.
//!
//! # How a group travels
//!
//! ```text
//! POST /v1/events (any node) ─► Writer::append ─► forward::Forwarder ─► NATS request
//!     `cairn.<S>.ingest.<holder>` ─► sequencer (the node holding the lease):
//!     writer::seal_group on the head the stream last acknowledged (kept in memory)
//!     ─► one fenced publish per group (Nats-Expected-Last-Sequence, Nats-Msg-Id)
//!     ─► JetStream ack ─► reply
//! every node: applier (pull consumer from its stream position + 1) ─► Writer::apply
//!     ─► chain checked, stored with the stream position, broadcast ─► every read path
//! ```
//!
//! The writer stays the only code that writes the store; in cluster mode it takes its
//! groups from the stream ([`applier`]) instead of sealing them itself. The store, the
//! subscription and every read path do not know about NATS.
//!
//! Correctness does not rest on the lease ([`sequencer`]): every append is fenced on the
//! stream sequence of the message before it, so an append built on a stale head is
//! refused by the stream, and two histories can never both be acknowledged.
//! docs/cluster.md has the design, what was verified against nats-server 2.9, and why.

mod applier;
mod forward;
mod horizon;
mod retention;
mod sequencer;
mod shared;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use crate::store::{Store, bincode_config};
use crate::writer::{SealedKey, Writer};

pub use forward::Forwarder;
pub use retention::{Forgotten, forget, start as start_retention};
pub use shared::{SharedEntry, SharedError, SharedMap, Written};

/// How a node joins the cluster (`cairn serve --nats …`).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Every NATS server's URL, so the client reconnects elsewhere.
    pub urls: Vec<String>,
    /// The JetStream stream holding the log.
    pub stream: String,
    pub replicas: usize,
    /// This node's name (in `/healthz` and the lease).
    pub node: String,
    /// How long a silent sequencer keeps the lease.
    pub lease: Duration,
    /// How long a node that stopped renewing keeps a webhook's lease.
    pub webhook_lease: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error(
        "refusing to start: the JetStream stream {stream} exists with other settings \
         ({differences}); cairn needs {expected}"
    )]
    StreamSettings {
        stream: String,
        differences: String,
        expected: String,
    },
    #[error("NATS JetStream: {0}")]
    JetStream(String),
    #[error(
        "refusing to start: this node's copy ends at stream message {position}, but retention \
         has trimmed the stream {stream} to begin at {first}; the messages in between are gone. \
         Start it on an empty data directory (it then starts at the cluster's horizon), or \
         seed this node with a copy of another node's data directory (stopped, or copied \
         while it is stopped) and start it again (docs/retention.md, \"Cluster mode\")"
    )]
    Behind {
        stream: String,
        position: u64,
        first: u64,
    },
    #[error(
        "refusing to start: this node's copy does not match the stream {stream}: {reason}. \
         It was appended to outside the cluster (or belongs to another cluster); as sequencer \
         it would seal on events no other node has and stop them all. Start this node on a \
         new data directory, or on a copy of another node's (docs/cluster.md)"
    )]
    Diverged { stream: String, reason: String },
    #[error(
        "refusing to start: retention has trimmed the stream {stream}, and this empty node \
         cannot start at the cluster's horizon: {reason}. Seed this node with a copy of \
         another node's data directory (stopped, or copied while it is stopped) and start \
         it again (docs/retention.md, \"Cluster mode\")"
    )]
    NoHorizon { stream: String, reason: String },
}

/// Subjects and bucket names derived from the stream name.
#[derive(Debug, Clone)]
struct Names {
    stream: String,
    /// The one subject of the log stream: one message per group commit.
    log: String,
    /// Forwarded ingest requests (not a stream subject): `<ingest>.<node, hex>`.
    ingest: String,
    lease_bucket: String,
    /// The stream of Merkle leaf hashes below retention's horizon, never purged.
    tree_stream: String,
    tree: String,
}

impl Names {
    fn new(stream: &str) -> Names {
        Names {
            stream: stream.to_string(),
            log: format!("cairn.{stream}.log"),
            ingest: format!("cairn.{stream}.ingest"),
            lease_bucket: format!("{stream}_lease"),
            tree_stream: format!("{stream}_TREE"),
            tree: format!("cairn.{stream}.tree"),
        }
    }

    /// The subject the sequencer `node` takes ingest requests on. Hex keeps any node
    /// name (the default is the listen address) one subject token.
    fn ingest_for(&self, node: &str) -> String {
        let hex: String = node.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}.{hex}", self.ingest)
    }
}

/// One stream message: a group commit as the sequencer sealed it.
#[derive(Serialize, Deserialize)]
struct GroupMessage {
    /// The events as one stored chunk (`store::encode_chunk`: bincode, LZ4).
    events: Vec<u8>,
    idempotency: Vec<SealedKey>,
}

impl GroupMessage {
    fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode_config()).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<GroupMessage, String> {
        bincode::serde::decode_from_slice(bytes, bincode_config())
            .map(|(m, _)| m)
            .map_err(|e| format!("a stream message does not decode: {e}"))
    }
}

/// What `/healthz` and `/metrics` report, and what streams wait on.
pub struct Status {
    pub node: String,
    sequencer: AtomicBool,
    /// Caught up to the stream's head as it was at start.
    ready: AtomicBool,
    /// NATS answered the last head read.
    reachable: AtomicBool,
    /// The log seq of the stream's newest event, as last read.
    stream_seq: AtomicU64,
    store: Arc<Store>,
    writer: Writer,
    log: stream::Stream,
    names: Names,
    /// Where the sequencer publishes the leaf hashes below a new horizon.
    tree: horizon::TreeLog,
}

/// The `cluster` member of `/healthz`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterView {
    pub node: String,
    pub role: Role,
    /// The newest event this node has applied.
    pub applied_seq: u64,
    /// The newest event in the stream (as last read).
    pub stream_seq: u64,
    pub ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Starting,
    Unavailable,
}

/// A node's part in the cluster (named apart from the tokens' `Role` in the document).
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = ClusterRole)]
pub enum Role {
    Sequencer,
    Follower,
}

/// How long start-up waits for JetStream to answer (a NATS cluster starting too).
const START_WAIT: Duration = Duration::from_secs(30);

/// How long a stream waits for this node's copy to reach its cursor (SPEC §6).
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

impl Status {
    pub fn view(&self) -> ClusterView {
        let applied_seq = self.store.head().seq;
        ClusterView {
            node: self.node.clone(),
            role: if self.sequencer.load(Ordering::Relaxed) {
                Role::Sequencer
            } else {
                Role::Follower
            },
            applied_seq,
            stream_seq: self.stream_seq.load(Ordering::Relaxed).max(applied_seq),
            ready: self.readiness() == Readiness::Ready,
        }
    }

    /// What `/healthz` reports: a node that cannot reach NATS, or whose copy disagreed
    /// with the stream, is unavailable; one still applying the stream as it was at start
    /// is starting.
    pub fn readiness(&self) -> Readiness {
        if self.writer.failure().is_some() || !self.reachable.load(Ordering::Relaxed) {
            Readiness::Unavailable
        } else if !self.ready.load(Ordering::Relaxed) {
            Readiness::Starting
        } else {
            Readiness::Ready
        }
    }

    /// Streams may start: caught up with the stream as it was at start, and the copy
    /// never disagreed with it. NATS need not be reachable: a node keeps serving what it
    /// has (SPEC §6).
    pub fn serves_streams(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.writer.failure().is_none()
    }

    /// Waits until this node's copy holds `cursor`, if the cluster has it: a stream that
    /// resumes here must never skip what another node already served (SPEC §6).
    pub async fn catch_up(&self, cursor: Ulid) -> Result<(), String> {
        if self.store.head().id.is_some_and(|id| id >= cursor) {
            return Ok(());
        }
        let (stream_seq, newest) = self
            .stream_head()
            .await
            .map_err(|e| format!("cannot read the cluster's head: {e}"))?;
        let Some(newest) = newest else {
            return Ok(());
        };
        if cursor > newest.id {
            // Newer than every event in the cluster: as on a single node.
            return Ok(());
        }
        let mut applied = self.writer.applied_stream();
        let reached = tokio::time::timeout(CATCH_UP_WAIT, applied.wait_for(|&p| p >= stream_seq));
        match reached.await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(format!(
                "this node has not yet applied the cluster's log up to {cursor}; retry, \
                 here or on another node"
            )),
        }
    }

    /// The stream's last message (read from the stream leader): its stream sequence and
    /// its newest event (`None` for an empty stream).
    async fn stream_head(&self) -> Result<(u64, Option<EventRef>), String> {
        let head = read_stream_head(&self.log, &self.names).await;
        self.reachable.store(head.is_ok(), Ordering::Relaxed);
        let (stream_seq, newest) = head?;
        if let Some(e) = &newest {
            self.stream_seq.fetch_max(e.seq, Ordering::Relaxed);
        }
        Ok((stream_seq, newest))
    }
}

/// An event's place in the log.
#[derive(Debug, Clone, Copy)]
struct EventRef {
    seq: u64,
    id: Ulid,
}

async fn read_stream_head(
    log: &stream::Stream,
    names: &Names,
) -> Result<(u64, Option<EventRef>), String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    match log.get_last_raw_message_by_subject(&names.log).await {
        Ok(message) => {
            let group = GroupMessage::decode(&message.payload)?;
            let events = crate::store::decode_chunk(&group.events).map_err(|e| e.to_string())?;
            let newest = events.last().map(|e| EventRef {
                seq: e.seq,
                id: e.id,
            });
            Ok((message.sequence, newest))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok((0, None)),
        Err(e) => Err(e.to_string()),
    }
}

/// What `start` hands the server.
pub struct Cluster {
    pub status: Arc<Status>,
    pub forwarder: Arc<Forwarder>,
    pub shared: Shared,
}

/// Opens the [`SharedMap`]s other modules keep their cluster-wide state in.
#[derive(Clone)]
pub struct Shared {
    js: jetstream::Context,
    stream: String,
    replicas: usize,
}

impl Shared {
    /// The map `name` of this cluster (bucket `<stream>_<name>`), created if absent.
    /// `name`: letters, digits, `-` and `_`.
    pub async fn map(&self, name: &str) -> Result<SharedMap, ClusterError> {
        self.map_with_ttl(name, Duration::ZERO).await
    }

    /// Like [`Shared::map`], with entries that expire `ttl` after their last write
    /// (leases: the holder renews well within `ttl`).
    pub async fn map_with_ttl(&self, name: &str, ttl: Duration) -> Result<SharedMap, ClusterError> {
        let bucket = format!("{}_{name}", self.stream);
        shared::open(&self.js, &bucket, self.replicas, ttl).await
    }
}

/// A node connected to the cluster, before its tasks run: what start-up needs from the
/// cluster before the writer exists (the checkpoint key, tokens).
pub struct Connection {
    client: async_nats::Client,
    js: jetstream::Context,
    log: stream::Stream,
    names: Names,
    tree: horizon::TreeLog,
    pub shared: Shared,
}

impl Connection {
    /// An empty copy of a log whose stream retention has trimmed starts at the cluster's
    /// horizon (docs/retention.md, "Cluster mode", step 5); any other copy is left as it
    /// is. Call before the writer starts.
    pub async fn start_from_horizon(
        &self,
        store: &Arc<Store>,
        node: &str,
    ) -> Result<(), ClusterError> {
        let retention = self.shared.map("retention").await?;
        horizon::seed_if_empty(&self.log, &self.tree, &self.names, &retention, node, store).await
    }
}

/// Connects, and checks (or creates) the stream. A NATS cluster that is starting too
/// gets up to 30 s to elect its JetStream leaders.
pub async fn connect(opts: &ClusterOptions) -> Result<Connection, ClusterError> {
    let names = Names::new(&opts.stream);
    let (client, js) = nats_connect(&opts.urls, &format!("cairn {}", opts.node)).await?;
    let deadline = std::time::Instant::now() + START_WAIT;
    let log = loop {
        match create_log_stream(&js, &names, opts.replicas).await {
            Err(ClusterError::JetStream(reason)) if std::time::Instant::now() < deadline => {
                tracing::info!(%reason, "JetStream not ready; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other?,
        }
    };
    let tree = horizon::TreeLog::open(&js, &names, opts.replicas).await?;
    let shared = Shared {
        js: js.clone(),
        stream: names.stream.clone(),
        replicas: opts.replicas,
    };
    Ok(Connection {
        client,
        js,
        log,
        names,
        tree,
        shared,
    })
}

/// A NATS client (named `name` in the servers' monitoring) and its JetStream context.
async fn nats_connect(
    urls: &[String],
    name: &str,
) -> Result<(async_nats::Client, jetstream::Context), ClusterError> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(urls.to_vec())
        .await
        .map_err(|e| ClusterError::Connect {
            urls: urls.join(","),
            reason: e.to_string(),
        })?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    Ok((client, js))
}

/// Starts the applier, the sequencer candidate and the head watcher. Tasks end when
/// `shutdown` is cancelled.
pub async fn start(
    connection: Connection,
    opts: &ClusterOptions,
    store: Arc<Store>,
    writer: Writer,
    shutdown: CancellationToken,
) -> Result<Cluster, ClusterError> {
    let Connection {
        client,
        js,
        log,
        names,
        tree,
        shared,
    } = connection;
    let lease = sequencer::lease_bucket(&js, &names, opts.replicas, opts.lease).await?;
    let (start_target, _) = read_stream_head(&log, &names)
        .await
        .map_err(ClusterError::JetStream)?;
    let position = *writer.applied_stream().borrow();
    check_not_behind(&log, &names, position).await?;
    check_copy_matches_stream(&log, &names, &store, position).await?;

    let status = Arc::new(Status {
        node: opts.node.clone(),
        sequencer: AtomicBool::new(false),
        ready: AtomicBool::new(false),
        reachable: AtomicBool::new(true),
        stream_seq: AtomicU64::new(0),
        store: store.clone(),
        writer: writer.clone(),
        log: log.clone(),
        names: names.clone(),
        tree,
    });
    tracing::info!(
        node = %opts.node,
        stream = %names.stream,
        applied = *writer.applied_stream().borrow(),
        target = start_target,
        "cluster mode: catching up with the stream"
    );
    let holder = forward::LeaseHolder::follow(lease.clone(), shutdown.clone());
    tokio::spawn(applier::run(log.clone(), writer.clone(), shutdown.clone()));
    tokio::spawn(mark_ready(status.clone(), start_target, shutdown.clone()));
    tokio::spawn(watch_stream_head(status.clone(), shutdown.clone()));
    tokio::spawn(
        sequencer::Sequencer {
            client: client.clone(),
            js,
            log,
            lease: lease.kv.clone(),
            // The bucket's: another node may have created it with another --nats-lease.
            lease_time: Some(lease.ttl())
                .filter(|ttl| !ttl.is_zero())
                .unwrap_or(opts.lease),
            names: names.clone(),
            store,
            writer: writer.clone(),
            status: status.clone(),
        }
        .run(shutdown),
    );
    let forwarder = Arc::new(Forwarder::new(client, names, holder, writer));
    Ok(Cluster {
        status,
        forwarder,
        shared,
    })
}

/// The log stream's settings (SPEC §6): file storage, no limits, single deletes denied,
/// purges allowed (retention trims behind the horizon), a duplicate window that absorbs
/// retried publishes.
fn log_stream_config(names: &Names, replicas: usize) -> stream::Config {
    stream::Config {
        name: names.stream.clone(),
        subjects: vec![names.log.clone()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        retention: stream::RetentionPolicy::Limits,
        max_messages: -1,
        max_bytes: -1,
        max_age: Duration::ZERO,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

async fn create_log_stream(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<stream::Stream, ClusterError> {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    let config = log_stream_config(names, replicas);
    match js.create_stream(config.clone()).await {
        Ok(s) => Ok(s),
        Err(e) if matches!(e.kind(), CreateStreamErrorKind::JetStream(ref j) if j.error_code().0 == 10058) =>
        {
            // 10058: a stream with this name and other settings. `get_or_create_stream`
            // would not compare, so say what differs.
            let existing = js
                .get_stream(&names.stream)
                .await
                .map_err(|e| ClusterError::JetStream(e.to_string()))?;
            let found = existing.cached_info().config.clone();
            Err(ClusterError::StreamSettings {
                stream: names.stream.clone(),
                differences: describe_differences(&found, &config),
                expected: format!(
                    "subject {}, file storage, {} replicas, no limits, deny_delete",
                    names.log, replicas
                ),
            })
        }
        Err(e) => Err(ClusterError::JetStream(format!(
            "creating the stream {} failed: {e}",
            names.stream
        ))),
    }
}

fn describe_differences(found: &stream::Config, wanted: &stream::Config) -> String {
    let mut out = Vec::new();
    if found.subjects != wanted.subjects {
        out.push(format!("subjects {:?}", found.subjects));
    }
    if found.num_replicas != wanted.num_replicas {
        out.push(format!("{} replicas", found.num_replicas));
    }
    if found.storage != wanted.storage {
        out.push(format!("storage {:?}", found.storage));
    }
    if found.max_messages > 0 || found.max_bytes > 0 || !found.max_age.is_zero() {
        out.push("limits on messages, bytes or age".into());
    }
    if !found.deny_delete {
        out.push("deletes allowed".into());
    }
    if out.is_empty() {
        out.push("other settings".into());
    }
    out.join(", ")
}

/// The stream's state (first and last sequence) as its leader reports it.
pub(super) async fn stream_state(log: &stream::Stream) -> Result<stream::State, ClusterError> {
    Ok(log
        .get_info()
        .await
        .map_err(|e| ClusterError::JetStream(e.to_string()))?
        .state)
}

/// Refuses a copy that ends before the stream's first message: retention purged what it
/// would need next, so it could never catch up.
async fn check_not_behind(
    log: &stream::Stream,
    names: &Names,
    position: u64,
) -> Result<(), ClusterError> {
    let first = stream_state(log).await?.first_sequence;
    if first > position + 1 {
        return Err(ClusterError::Behind {
            stream: names.stream.clone(),
            position,
            first,
        });
    }
    Ok(())
}

/// Refuses a copy whose head is not the last event of the stream message it says it
/// applied last (`position`): events appended to the directory without the cluster, or
/// a copy that applied more than the stream holds (the stream was deleted and created
/// again, or lost what it acknowledged). A copy whose last applied message was trimmed
/// away cannot be compared; retention only trims what every node applied, so that copy
/// was a node's in step with the stream.
async fn check_copy_matches_stream(
    log: &stream::Stream,
    names: &Names,
    store: &Store,
    position: u64,
) -> Result<(), ClusterError> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let head = store.head();
    let diverged = |reason: String| ClusterError::Diverged {
        stream: names.stream.clone(),
        reason,
    };
    let state = stream_state(log).await?;
    if position > state.last_sequence {
        return Err(diverged(format!(
            "it applied stream message {position} but the stream ends at {}",
            state.last_sequence
        )));
    }
    if position == 0 && head.seq > 0 {
        return Err(diverged(format!(
            "it holds {} events but none came from the stream",
            head.seq
        )));
    }
    if position == 0 || position < state.first_sequence {
        return Ok(());
    }
    let message = match log.get_raw_message(position).await {
        Ok(message) => message,
        // Trimmed since the state was read.
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(()),
        Err(e) => return Err(ClusterError::JetStream(e.to_string())),
    };
    let newest = GroupMessage::decode(&message.payload)
        .and_then(|g| crate::store::decode_chunk(&g.events).map_err(|e| e.to_string()))
        .map_err(ClusterError::JetStream)?
        .pop();
    let newest_hash = newest
        .as_ref()
        .and_then(|e| crate::chain::inspect_line(e.line.as_bytes()).ok())
        .map(|info| info.stated_hash);
    match (newest, newest_hash) {
        (Some(e), Some(hash)) if e.seq == head.seq && hash == head.hash => Ok(()),
        (Some(e), _) if e.seq == head.seq => Err(diverged(format!(
            "its event {} differs from the one in stream message {position}",
            e.seq
        ))),
        (Some(e), _) => Err(diverged(format!(
            "its head is event {} but stream message {position}, the last it applied, ends \
             at event {}",
            head.seq, e.seq
        ))),
        (None, _) => Err(diverged(format!(
            "stream message {position} holds no events"
        ))),
    }
}

/// Marks the node ready once it has applied the stream as it was at start.
async fn mark_ready(status: Arc<Status>, target: u64, shutdown: CancellationToken) {
    let mut applied = status.writer.applied_stream();
    tokio::select! {
        reached = applied.wait_for(|&p| p >= target) => {
            if reached.is_ok() {
                status.ready.store(true, Ordering::Relaxed);
                tracing::info!(seq = status.store.head().seq, "cluster mode: caught up; serving");
            }
        }
        () = shutdown.cancelled() => {}
    }
}

/// How often the stream's head is read (for `stream_seq` and reachability).
const HEAD_POLL: Duration = Duration::from_secs(1);

async fn watch_stream_head(status: Arc<Status>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(HEAD_POLL) => {}
            () = shutdown.cancelled() => return,
        }
        let head = tokio::time::timeout(Duration::from_secs(3), status.stream_head()).await;
        if !matches!(head, Ok(Ok(_))) {
            status.reachable.store(false, Ordering::Relaxed);
        }
        crate::telemetry::record_cluster(&status.view());
    }
}

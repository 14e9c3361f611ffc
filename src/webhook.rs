//! Webhooks (SPEC §7): every matching event pushed to a URL, in log order, never dropped.
//!
//! A webhook is a stored record ([`WebhookRecord`]: definition, secret, durable cursor)
//! and, while it is not paused, one delivery task. The task reads the log through the
//! same [`Subscription`] the streams use (replay from the cursor, then live), so it sees
//! only committed events, in log order, without a gap. It keeps one request in flight:
//! the next request is built only after the previous one got a 2xx, and the cursor is
//! stored (fsync'd unless `--sync none`) after each 2xx, so a restart or a crash resends
//! at most the last request. Any other outcome is retried with the same first event
//! after a backoff, forever; a 410 pauses the webhook.
//!
//! Who changes what: the task owns the cursor and counters while it runs; `PATCH` and
//! `DELETE` first stop the task and wait for it (a task never stops in the middle of
//! storing its cursor), so an administrator's change can never be overwritten by a
//! delivery that was in flight.
//!
//! In cluster mode ([`cluster`]) the records live in a map every node shares, and one
//! node at a time (the holder of the webhook's lease) runs its task; the task is the
//! same, only where it keeps its record after each 2xx differs ([`Keeper`]).

mod cluster;
mod signing;

pub use cluster::{ClusterSettings, join_cluster};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ulid::Ulid;

use crate::cursor::{self, Filter, TypeFilter};
use crate::event::{Event, Problem};
use crate::store::{Store, StoreError};
use crate::subscription::{Item, Selector, StreamStats, Subscription};
use crate::writer::Writer;

/// Largest `batch`.
pub const MAX_BATCH: u64 = 1000;
/// Longest webhook URL accepted.
const MAX_URL_CHARS: usize = 2048;
/// Response bodies are read (so the connection can be reused) up to this much, then the
/// connection is dropped; their content is never used.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long shutdown waits for delivery tasks to stop (each drops its request at once).
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("webhook record is unreadable: {0}")]
    Corrupt(String),
    #[error("cannot create the webhook HTTP client: {0}")]
    Client(String),
    #[error("a webhook task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Shared(#[from] crate::cluster::SharedError),
}

/// A stored webhook. The secret is kept as given to the owner (`whsec_…`), because the
/// server must sign with it; it never leaves the server again after creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub name: Option<String>,
    pub types: Option<Vec<String>>,
    pub source: Option<String>,
    pub batch: u32,
    pub secret: String,
    /// Delivery continues after this id.
    pub cursor: u128,
    pub paused: bool,
    /// Why the server paused it (a 410), shown as `last_error` until resumed.
    pub pause_reason: Option<String>,
    /// Events delivered so far (2xx received).
    pub delivered: u64,
    pub created_at: String,
    /// The seq of `cursor` (of the event it names or the last one before it) when
    /// known: what lets a task count exactly what retention removed before it read it,
    /// even after a restart. `None` after an administrator moved the cursor.
    pub position: Option<u64>,
    /// Events passed over because retention removed them before delivery (SPEC §8),
    /// stored in the same write that moves the cursor past them.
    pub skipped: u64,
    /// The last such skip, shown as `last_error` while nothing newer failed.
    pub skip_note: Option<String>,
}

/// The record as the first webhook build stored it (before `position`, `skipped` and
/// `skip_note`), still read so that stored webhooks survive the upgrade.
#[derive(Deserialize)]
struct RecordV1 {
    id: String,
    url: String,
    name: Option<String>,
    types: Option<Vec<String>>,
    source: Option<String>,
    batch: u32,
    secret: String,
    cursor: u128,
    paused: bool,
    pause_reason: Option<String>,
    delivered: u64,
    created_at: String,
}

impl From<RecordV1> for WebhookRecord {
    fn from(v: RecordV1) -> WebhookRecord {
        WebhookRecord {
            id: v.id,
            url: v.url,
            name: v.name,
            types: v.types,
            source: v.source,
            batch: v.batch,
            secret: v.secret,
            cursor: v.cursor,
            paused: v.paused,
            pause_reason: v.pause_reason,
            delivered: v.delivered,
            created_at: v.created_at,
            position: None,
            skipped: 0,
            skip_note: None,
        }
    }
}

impl WebhookRecord {
    pub fn cursor(&self) -> Ulid {
        Ulid(self.cursor)
    }

    fn filter(&self) -> Filter {
        Filter {
            types: self
                .types
                .as_ref()
                .and_then(|t| TypeFilter::from_entries(t.iter().map(String::as_str)).ok()),
            source: self.source.clone(),
        }
    }
}

fn encode(record: &WebhookRecord) -> Vec<u8> {
    bincode::serde::encode_to_vec(record, bincode::config::standard()).unwrap_or_default()
}

fn decode(raw: &[u8]) -> Result<WebhookRecord, WebhookError> {
    let config = bincode::config::standard();
    match bincode::serde::decode_from_slice::<WebhookRecord, _>(raw, config) {
        Ok((record, _)) => Ok(record),
        Err(e) => match bincode::serde::decode_from_slice::<RecordV1, _>(raw, config) {
            Ok((old, read)) if read == raw.len() => Ok(old.into()),
            _ => Err(WebhookError::Corrupt(e.to_string())),
        },
    }
}

/// Every stored webhook, oldest first.
pub fn load_all(store: &Store) -> Result<Vec<WebhookRecord>, WebhookError> {
    let mut all = Vec::new();
    for raw in store.webhook_records()? {
        all.push(decode(&raw)?);
    }
    all.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    Ok(all)
}

pub fn save(store: &Store, record: &WebhookRecord, durable: bool) -> Result<(), WebhookError> {
    Ok(store.put_webhook_record(&record.id, &encode(record), durable)?)
}

/// A validated `POST /v1/webhooks` body (or `cairn webhook create`).
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: String,
    pub name: Option<String>,
    pub types: Option<Vec<String>>,
    pub source: Option<String>,
    /// Where delivery starts; `None`: the head at creation.
    pub since: Option<Ulid>,
    pub batch: u32,
}

/// A validated `PATCH /v1/webhooks/{id}` body.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    pub paused: Option<bool>,
    pub cursor: Option<Ulid>,
}

fn problem(field: &str, message: impl Into<String>) -> Problem {
    Problem {
        index: None,
        field: Some(field.to_string()),
        message: message.into(),
    }
}

fn check_url(url: &str) -> Result<(), String> {
    if url.chars().count() > MAX_URL_CHARS {
        return Err(format!("must be at most {MAX_URL_CHARS} characters"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http or https URL (not {}:)",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // Credentials in a URL would be shown by GET; use a secret path or a token
        // in the query instead, which the receiver checks alongside the signature.
        return Err("must not contain a user name or password".into());
    }
    Ok(())
}

fn take_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Problem> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Problem {
        index: None,
        field: None,
        message: crate::ijson::syntax_error(body, &e).to_string(),
    })?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(Problem {
            index: None,
            field: None,
            message: "the body must be a JSON object".into(),
        }),
    }
}

fn parse_cursor(field: &str, value: Option<Value>, problems: &mut Vec<Problem>) -> Option<Ulid> {
    match value {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match cursor::parse_since(&s) {
            Ok(id) => Some(id),
            Err(m) => {
                problems.push(problem(field, m));
                None
            }
        },
        Some(_) => {
            problems.push(problem(
                field,
                "must be a string: a ULID, an RFC 3339 time or \"earliest\"",
            ));
            None
        }
    }
}

/// Parses a creation body; every problem is listed (field paths as `types[1]`).
pub fn parse_new(body: &[u8]) -> Result<NewWebhook, Vec<Problem>> {
    let mut object = take_object(body).map_err(|p| vec![p])?;
    let mut problems = Vec::new();
    let url = match object.remove("url") {
        Some(Value::String(u)) => {
            if let Err(m) = check_url(&u) {
                problems.push(problem("url", m));
            }
            Some(u)
        }
        Some(_) => {
            problems.push(problem("url", "must be a string (an http or https URL)"));
            None
        }
        None => {
            problems.push(problem("url", "required (an http or https URL)"));
            None
        }
    };
    let name = match object.remove("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => {
            let chars = n.chars().count();
            if chars == 0 || chars > 128 || n.chars().any(char::is_control) {
                problems.push(problem(
                    "name",
                    "must be 1–128 characters without control characters",
                ));
            }
            Some(n)
        }
        Some(_) => {
            problems.push(problem("name", "must be a string"));
            None
        }
    };
    let types = match object.remove("types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if items.is_empty() => {
            problems.push(problem(
                "types",
                "must not be empty (leave it out, or null, for every type)",
            ));
            None
        }
        Some(Value::Array(items)) => {
            let mut types = Vec::with_capacity(items.len());
            if items.len() > cursor::MAX_TYPE_FILTER_ENTRIES {
                problems.push(problem(
                    "types",
                    format!("has more than {} entries", cursor::MAX_TYPE_FILTER_ENTRIES),
                ));
            }
            for (i, item) in items.into_iter().enumerate() {
                let field = format!("types[{i}]");
                match item {
                    Value::String(t) => {
                        let checked = if t.contains(',') {
                            Err("must be one type or prefix* pattern".to_string())
                        } else {
                            TypeFilter::parse(&t).map(|_| ())
                        };
                        if let Err(m) = checked {
                            problems.push(problem(&field, m));
                        }
                        types.push(t);
                    }
                    _ => problems.push(problem(&field, "must be a string")),
                }
            }
            Some(types)
        }
        Some(_) => {
            problems.push(problem("types", "must be an array of strings, or null"));
            None
        }
    };
    let source = match object.remove("source") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if let Err(m) = crate::event::check_source(&s) {
                problems.push(problem("source", m));
            }
            Some(s)
        }
        Some(_) => {
            problems.push(problem("source", "must be a string"));
            None
        }
    };
    let since = parse_cursor("since", object.remove("since"), &mut problems);
    let batch = match object.remove("batch") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(b) if (1..=MAX_BATCH).contains(&b) => b as u32,
            _ => {
                problems.push(problem(
                    "batch",
                    format!("must be an integer from 1 to {MAX_BATCH}"),
                ));
                1
            }
        },
        Some(_) => {
            problems.push(problem(
                "batch",
                format!("must be an integer from 1 to {MAX_BATCH}"),
            ));
            1
        }
    };
    for unknown in object.keys() {
        problems.push(problem(
            unknown,
            "unknown member (allowed: url, name, types, source, since, batch)",
        ));
    }
    match url {
        Some(url) if problems.is_empty() => Ok(NewWebhook {
            url,
            name,
            types,
            source,
            since,
            batch,
        }),
        _ => Err(problems),
    }
}

/// Parses a `PATCH` body; every problem is listed.
pub fn parse_patch(body: &[u8]) -> Result<Patch, Vec<Problem>> {
    let mut object = take_object(body).map_err(|p| vec![p])?;
    let mut problems = Vec::new();
    let paused = match object.remove("paused") {
        None => None,
        Some(Value::Bool(b)) => Some(b),
        Some(_) => {
            problems.push(problem("paused", "must be true or false"));
            None
        }
    };
    let cursor = match object.remove("cursor") {
        Some(Value::Null) => {
            problems.push(problem(
                "cursor",
                "must be a ULID, an RFC 3339 time or \"earliest\"",
            ));
            None
        }
        other => parse_cursor("cursor", other, &mut problems),
    };
    for unknown in object.keys() {
        problems.push(problem(unknown, "unknown member (allowed: paused, cursor)"));
    }
    if problems.is_empty() && paused.is_none() && cursor.is_none() {
        problems.push(Problem {
            index: None,
            field: None,
            message: "nothing to change: give paused, cursor or both".into(),
        });
    }
    if problems.is_empty() {
        Ok(Patch { paused, cursor })
    } else {
        Err(problems)
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `whsec_` + base64 of 24 random bytes (the Standard Webhooks secret format).
fn new_secret() -> String {
    let mut key = [0u8; 24];
    rand::fill(&mut key[..]);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// A new record: validated input, a fresh id and secret, the cursor resolved
/// (`since`, or the head now).
pub fn new_record(new: NewWebhook, head: Option<Ulid>) -> WebhookRecord {
    let mut id = [0u8; 8];
    rand::fill(&mut id[..]);
    WebhookRecord {
        id: hex::encode(id),
        url: new.url,
        name: new.name,
        types: new.types,
        source: new.source,
        batch: new.batch,
        secret: new_secret(),
        cursor: new.since.or(head).unwrap_or(cursor::ZERO).0,
        paused: false,
        pause_reason: None,
        delivered: 0,
        created_at: crate::rfc3339::format_unix_ms(now_unix_ms()),
        position: None,
        skipped: 0,
        skip_note: None,
    }
}

/// Applies a patch to a stored record (what `PATCH` and the offline CLI do).
pub fn apply_patch(record: &mut WebhookRecord, patch: &Patch) {
    if let Some(paused) = patch.paused {
        record.paused = paused;
        if !paused {
            record.pause_reason = None;
        }
    }
    if let Some(cursor) = patch.cursor {
        record.cursor = cursor.0;
        record.position = None;
        record.skip_note = None;
    }
}

/// `active`, `retrying` or `paused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Active,
    Retrying,
    Paused,
}

/// A webhook as `GET` shows it: the record without its secret, and its delivery state.
#[derive(Debug, Clone)]
pub struct View {
    pub record: WebhookRecord,
    pub state: DeliveryState,
    pub failures: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<String>,
}

impl View {
    /// The state of a record no task is running for (offline, or just stored).
    pub fn of_record(record: WebhookRecord) -> View {
        View {
            state: if record.paused {
                DeliveryState::Paused
            } else {
                DeliveryState::Active
            },
            failures: 0,
            last_error: record.pause_reason.clone().or(record.skip_note.clone()),
            next_attempt_at: None,
            record,
        }
    }
}

/// What a delivery task shares with readers of its state.
#[derive(Debug)]
struct Live {
    record: WebhookRecord,
    failures: u32,
    /// Why the last attempt failed (the record's pause reason and skip note show when
    /// this is empty).
    last_error: Option<String>,
    next_attempt_at: Option<String>,
}

impl Live {
    fn view(&self) -> View {
        let state = if self.record.paused {
            DeliveryState::Paused
        } else if self.failures > 0 {
            DeliveryState::Retrying
        } else {
            DeliveryState::Active
        };
        View {
            record: self.record.clone(),
            state,
            failures: self.failures,
            last_error: self
                .last_error
                .clone()
                .or_else(|| self.record.pause_reason.clone())
                .or_else(|| self.record.skip_note.clone()),
            next_attempt_at: self.next_attempt_at.clone(),
        }
    }
}

type SharedLive = Arc<Mutex<Live>>;

fn lock(live: &SharedLive) -> std::sync::MutexGuard<'_, Live> {
    live.lock().unwrap_or_else(|p| p.into_inner())
}

/// Settings of the delivery tasks.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// `--webhook-timeout`: the whole request, connection to response body.
    pub timeout: Duration,
    /// The first retry delay (doubling up to five minutes).
    pub backoff_min: Duration,
}

struct Shared {
    store: Arc<Store>,
    writer: Writer,
    client: reqwest::Client,
    config: DeliveryConfig,
    /// Webhooks read the log like streams, but are not counted as streams.
    stats: Arc<StreamStats>,
}

struct Running {
    live: SharedLive,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Every webhook of a server and its delivery task.
pub struct Webhooks {
    shared: Arc<Shared>,
    hooks: Mutex<HashMap<String, Running>>,
    /// Serialises changes (create, patch, delete), which stop and start tasks.
    changes: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The runtime the delivery tasks run on (see [`delivery_runtime`]).
    runtime: tokio::runtime::Handle,
    /// Cluster mode: the shared records and the leases ([`join_cluster`]).
    cluster: std::sync::OnceLock<Arc<cluster::ClusterHooks>>,
}

/// Where a delivery task keeps its record (cursor, counters) after each 2xx.
#[derive(Clone)]
enum Keeper {
    /// This node's store.
    Local,
    /// The cluster's shared map, written only if nobody else wrote it since this
    /// node's last write (fencing).
    Shared(Arc<cluster::Held>),
}

impl Keeper {
    /// Stores the record; false when the task must stop (someone else changed the
    /// record since: it is reloaded and the task restarted, or not, by its lease).
    async fn keep(&self, shared: &Shared, record: WebhookRecord) -> bool {
        match self {
            Keeper::Local => {
                store_record(shared, record).await;
                true
            }
            Keeper::Shared(held) => held.write(&record).await,
        }
    }
}

/// Delivery runs on its own single-threaded runtime whose thread (and the blocking
/// threads it starts, which inherit it) has a lower CPU priority (nice +10): on a busy
/// machine ingest and streams go first, and webhooks catch up in the time left over.
/// They lose nothing by waiting (they deliver from the log). The runtime ends when
/// `shutdown` is cancelled.
fn delivery_runtime(shutdown: CancellationToken) -> Result<tokio::runtime::Handle, WebhookError> {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("cairn-webhooks".into())
        .spawn(move || {
            // Ten below the server's own priority (nice is relative, so a server run at
            // nice -5 delivers at 5). On Linux the nice value is the calling thread's;
            // failing leaves the server's priority, which is only less polite.
            // SAFETY: a plain system call without pointers.
            let _ = unsafe { libc::nice(10) };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name("cairn-webhooks-io")
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = handle_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = handle_tx.send(Ok(runtime.handle().clone()));
            runtime.block_on(shutdown.cancelled());
            // Tasks have been told to stop; give them the grace period to finish.
            runtime.shutdown_timeout(STOP_GRACE);
        })
        .map_err(|e| WebhookError::Task(e.to_string()))?;
    handle_rx
        .recv()
        .map_err(|e| WebhookError::Task(e.to_string()))?
        .map_err(WebhookError::Task)
}

impl Webhooks {
    /// Loads every stored webhook and starts a task for each one not paused (unless
    /// `clustered`: a cluster node's webhooks are the cluster's, see [`join_cluster`]).
    pub fn start(
        store: Arc<Store>,
        writer: Writer,
        config: DeliveryConfig,
        shutdown: CancellationToken,
        clustered: bool,
    ) -> Result<Webhooks, WebhookError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .user_agent(concat!("cairn-webhooks/", env!("CARGO_PKG_VERSION")))
            .use_rustls_tls()
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        let records = if clustered {
            Vec::new()
        } else {
            load_all(&store)?
        };
        let webhooks = Webhooks {
            shared: Arc::new(Shared {
                store,
                writer,
                client,
                config,
                stats: Default::default(),
            }),
            hooks: Mutex::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
            tasks: TaskTracker::new(),
            runtime: delivery_runtime(shutdown.clone())?,
            shutdown,
            cluster: std::sync::OnceLock::new(),
        };
        for record in records {
            webhooks.launch(record);
        }
        Ok(webhooks)
    }

    fn hooks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a record and starts its task unless it is paused.
    fn launch(&self, record: WebhookRecord) {
        let run = (!record.paused).then_some(Keeper::Local);
        self.install(record, run);
    }

    /// Registers a record, with a task that keeps it with `keeper` (none: shown only).
    fn install(&self, record: WebhookRecord, keeper: Option<Keeper>) {
        let id = record.id.clone();
        let live = Arc::new(Mutex::new(Live {
            last_error: None,
            record,
            failures: 0,
            next_attempt_at: None,
        }));
        let stop = self.shutdown.child_token();
        let task = keeper.map(|keeper| {
            self.tasks.spawn_on(
                deliver(self.shared.clone(), live.clone(), stop.clone(), keeper),
                &self.runtime,
            )
        });
        self.hooks().insert(id, Running { live, stop, task });
    }

    /// Stops a webhook's task and waits until it has; returns its latest record.
    async fn halt(&self, id: &str) -> Option<WebhookRecord> {
        let running = self.hooks().remove(id)?;
        running.stop.cancel();
        if let Some(task) = running.task
            && let Err(e) = task.await
        {
            tracing::error!(webhook = id, error = %e, "webhook task failed");
        }
        Some(lock(&running.live).record.clone())
    }

    pub async fn create(&self, new: NewWebhook) -> Result<WebhookRecord, WebhookError> {
        let record = new_record(new, self.shared.store.head().id);
        if let Some(cluster) = self.cluster.get() {
            return cluster.create(record).await;
        }
        let _change = self.changes.lock().await;
        let store = self.shared.store.clone();
        let stored = record.clone();
        tokio::task::spawn_blocking(move || save(&store, &stored, true))
            .await
            .map_err(|e| WebhookError::Task(e.to_string()))??;
        // Not the URL: receivers may carry a token of their own in it.
        tracing::info!(id = %record.id, cursor = %record.cursor(), "webhook created");
        self.launch(record.clone());
        Ok(record)
    }

    pub fn list(&self) -> Vec<View> {
        let mut views: Vec<View> = self
            .hooks()
            .values()
            .map(|r| lock(&r.live).view())
            .collect();
        views.sort_by(|a, b| {
            (&a.record.created_at, &a.record.id).cmp(&(&b.record.created_at, &b.record.id))
        });
        views
    }

    /// `GET /v1/webhooks/{id}`: in cluster mode, a webhook delivered by another node
    /// shows that node's failures (from its lease).
    pub async fn view(&self, id: &str) -> Option<View> {
        let (view, here) = {
            let hooks = self.hooks();
            let running = hooks.get(id)?;
            (lock(&running.live).view(), running.task.is_some())
        };
        match self.cluster.get() {
            Some(cluster) if !here => Some(cluster.show_remote(view).await),
            _ => Some(view),
        }
    }

    pub fn get(&self, id: &str) -> Option<View> {
        self.hooks().get(id).map(|r| lock(&r.live).view())
    }

    /// Pauses, resumes or moves a webhook; `None` if there is no such webhook.
    pub async fn patch(&self, id: &str, patch: Patch) -> Result<Option<View>, WebhookError> {
        if let Some(cluster) = self.cluster.get() {
            return cluster.patch(id, &patch).await;
        }
        let _change = self.changes.lock().await;
        let Some(mut record) = self.halt(id).await else {
            return Ok(None);
        };
        apply_patch(&mut record, &patch);
        let store = self.shared.store.clone();
        let stored = record.clone();
        let saved = tokio::task::spawn_blocking(move || save(&store, &stored, true))
            .await
            .map_err(|e| WebhookError::Task(e.to_string()));
        // Whatever happened to the write, the webhook keeps running (as stored or as
        // patched in memory): a failed PATCH must not stop deliveries.
        self.launch(record);
        saved??;
        tracing::info!(%id, paused = ?patch.paused, cursor = ?patch.cursor.map(|c| c.to_string()), "webhook changed");
        Ok(self.get(id))
    }

    /// Deletes a webhook; its task is stopped first. `false` if there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, WebhookError> {
        if let Some(cluster) = self.cluster.get() {
            return cluster.delete(id).await;
        }
        let _change = self.changes.lock().await;
        if self.halt(id).await.is_none() {
            return Ok(false);
        }
        let store = self.shared.store.clone();
        let target = id.to_string();
        tokio::task::spawn_blocking(move || store.remove_webhook_record(&target))
            .await
            .map_err(|e| WebhookError::Task(e.to_string()))??;
        crate::telemetry::set_webhook_lag(id, 0);
        tracing::info!(%id, "webhook deleted");
        Ok(true)
    }

    /// Stops every task (after the shutdown token was cancelled) and waits for them.
    pub async fn stopped(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(STOP_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("webhook tasks still running {STOP_GRACE:?} after shutdown began");
        }
        // Cluster mode: leases are released once their tasks have stopped, so that
        // another node takes over at once.
        if let Some(cluster) = self.cluster.get() {
            cluster.stopped().await;
        }
    }

    /// Per webhook, committed events after its cursor (for `cairn_webhook_lag_events`):
    /// one chunk read each, so a scrape stays cheap however far behind a webhook is.
    /// In cluster mode only the holder reports a webhook's lag; other nodes report 0.
    pub fn lags(&self) -> Vec<(String, u64)> {
        let clustered = self.cluster.get().is_some();
        let cursors: Vec<(String, Option<Ulid>)> = self
            .hooks()
            .iter()
            .map(|(id, r)| {
                let held = !clustered || r.task.is_some();
                (id.clone(), held.then(|| lock(&r.live).record.cursor()))
            })
            .collect();
        let store = &self.shared.store;
        let head = store.head().seq;
        cursors
            .into_iter()
            .filter_map(|(id, cursor)| {
                let Some(cursor) = cursor else {
                    return Some((id, 0));
                };
                let position = match position_of(store, cursor, head) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(webhook = %id, error = %e, "cannot compute a webhook's lag");
                        return None;
                    }
                };
                Some((id, head.saturating_sub(position)))
            })
            .collect()
    }
}

/// A webhook's `types` and `source`.
struct Wanted(Filter);

impl Selector for Wanted {
    fn matches(&self, event: &Event) -> bool {
        self.0.matches(event)
    }

    fn is_filtered(&self) -> bool {
        self.0.types.is_some() || self.0.source.is_some()
    }
}

/// How one request ended.
enum Outcome {
    Delivered,
    /// 410: pause, keep the cursor.
    Gone,
    Failed {
        result: &'static str,
        error: String,
    },
}

/// The delivery task of one webhook; returns when `stop` is cancelled or on a 410.
async fn deliver(shared: Arc<Shared>, live: SharedLive, stop: CancellationToken, keeper: Keeper) {
    let record = lock(&live).record.clone();
    let id = record.id.clone();
    let signer = match signing::Signer::new(&record.secret) {
        Ok(signer) => signer,
        Err(e) => {
            tracing::error!(webhook = %id, error = %e, "webhook secret unusable; not delivering");
            lock(&live).last_error = Some(format!("the stored secret is unusable: {e}"));
            return;
        }
    };
    let batch = record.batch.max(1) as usize;
    let mut subscription = Subscription::new(
        shared.store.clone(),
        &shared.writer,
        record.cursor(),
        Arc::new(Wanted(record.filter())),
        shared.stats.clone(),
    );
    let store = shared.store.clone();
    let starting = record.clone();
    match tokio::task::spawn_blocking(move || start_position(&store, &starting)).await {
        Ok(Ok(Some(seq))) => subscription.set_position(seq),
        // Behind the horizon at an unknown seq: the skip is reported without a count.
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::warn!(webhook = %id, error = %e, "cannot find a webhook cursor's seq; a skip by retention would not be counted");
        }
        Err(e) => {
            tracing::warn!(webhook = %id, error = %e, "cannot find a webhook cursor's seq; a skip by retention would not be counted");
        }
    }
    let mut pending: VecDeque<Event> = VecDeque::new();
    // Skips read but not yet passed by the cursor (events read before the prune are
    // still delivered first): counted in the record write that moves the cursor past
    // them, so a crash in between counts them once, after the restart, never twice.
    let mut skips: Vec<Skip> = Vec::new();
    loop {
        if pending.is_empty() {
            let item = tokio::select! {
                () = stop.cancelled() => return,
                item = subscription.next() => item,
            };
            match item {
                None => return,
                Some(Ok(item)) => {
                    if take(&mut pending, item, &live, &subscription, &mut skips) {
                        let stored = lock(&live).record.clone();
                        if !keeper.keep(&shared, stored).await {
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(webhook = %id, error = %e, "reading the log for a webhook failed");
                    if pause_for(&stop, shared.config.backoff_min).await {
                        return;
                    }
                }
            }
            continue;
        }
        // Top up with what is ready now, never waiting: the request goes out with what
        // there is (a retry may thus carry more than the first try, from the same event).
        while pending.len() < batch {
            match subscription.next().now_or_never() {
                Some(Some(Ok(item))) => {
                    take(&mut pending, item, &live, &subscription, &mut skips);
                }
                _ => break,
            }
        }
        let count = batch.min(pending.len());
        let events: Vec<&Event> = pending.iter().take(count).collect();
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = post(&shared, &record.url, &signer, &events, batch == 1) => outcome,
        };
        match outcome {
            Outcome::Delivered => {
                metrics::counter!(crate::telemetry::WEBHOOK_DELIVERIES, "result" => "ok")
                    .increment(1);
                let (last, last_seq) = events.last().map_or((cursor::ZERO, 0), |e| (e.id, e.seq));
                let emptied = count == pending.len();
                let stored = {
                    let mut l = lock(&live);
                    l.record.cursor = last.0;
                    l.record.position = Some(last_seq);
                    pass_skips(&mut l.record, &mut skips, emptied);
                    l.record.delivered += count as u64;
                    l.failures = 0;
                    l.last_error = None;
                    l.next_attempt_at = None;
                    l.record.clone()
                };
                pending.drain(..count);
                // Not raced with `stop`: a task stops between requests, never while its
                // cursor is being written (PATCH and DELETE wait for it).
                if !keeper.keep(&shared, stored).await {
                    return;
                }
            }
            Outcome::Gone => {
                metrics::counter!(crate::telemetry::WEBHOOK_DELIVERIES, "result" => "error")
                    .increment(1);
                let reason =
                    "the receiver answered 410 Gone: paused (resume to send the same events again)";
                tracing::warn!(webhook = %id, "{reason}");
                let stored = {
                    let mut l = lock(&live);
                    l.failures += 1;
                    l.last_error = Some(reason.into());
                    l.next_attempt_at = None;
                    l.record.paused = true;
                    l.record.pause_reason = Some(reason.into());
                    l.record.clone()
                };
                keeper.keep(&shared, stored).await;
                return;
            }
            Outcome::Failed { result, error } => {
                metrics::counter!(crate::telemetry::WEBHOOK_DELIVERIES, "result" => result)
                    .increment(1);
                let delay = {
                    let mut l = lock(&live);
                    l.failures += 1;
                    let delay = backoff(shared.config.backoff_min, l.failures);
                    l.last_error = Some(error.clone());
                    l.next_attempt_at = Some(crate::rfc3339::format_unix_ms(
                        now_unix_ms() + delay.as_millis() as u64,
                    ));
                    delay
                };
                tracing::debug!(webhook = %id, %error, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed");
                if pause_for(&stop, delay).await {
                    return;
                }
                lock(&live).next_attempt_at = None;
            }
        }
    }
}

/// Adds a subscription item to what is to be sent; true when the record moved in a way
/// that must be stored now (past a skip while nothing was waiting).
fn take(
    pending: &mut VecDeque<Event>,
    item: Item,
    live: &SharedLive,
    subscription: &Subscription,
    skips: &mut Vec<Skip>,
) -> bool {
    match item {
        Item::Events(events) => pending.extend(events),
        Item::Batch(committed) => pending.extend(committed.events.iter().cloned()),
        // Nothing matched up to `id`: with nothing waiting, the cursor may pass it (in
        // memory; it is stored with the next delivery).
        Item::Skipped(id) => {
            if pending.is_empty() {
                let mut l = lock(live);
                if id.0 > l.record.cursor {
                    l.record.cursor = id.0;
                    l.record.position = subscription.position();
                    pass_skips(&mut l.record, skips, true);
                }
            }
        }
        // Retention removed events before they were delivered (SPEC §8): delivery
        // continues at the horizon, and the record says what was passed over.
        Item::Pruned {
            cursor, skipped, ..
        } => {
            skips.push(Skip {
                cursor,
                seq: subscription.position(),
                events: skipped,
            });
            if pending.is_empty() {
                pass_skips(&mut lock(live).record, skips, true);
                return true;
            }
        }
    }
    false
}

/// Events retention removed ahead of a task's cursor.
struct Skip {
    /// The last pruned id: delivery continues after it.
    cursor: Ulid,
    /// Its seq, when known.
    seq: Option<u64>,
    /// How many, when the cursor's seq was known.
    events: Option<u64>,
}

/// Counts the skips the record's cursor has passed, or all of them (`all`: nothing
/// delivered is waiting before them, so the cursor moves past the last one).
fn pass_skips(record: &mut WebhookRecord, skips: &mut Vec<Skip>, all: bool) {
    skips.retain(|skip| {
        if !all && skip.cursor.0 >= record.cursor {
            return true;
        }
        if skip.cursor.0 > record.cursor {
            record.cursor = skip.cursor.0;
            record.position = skip.seq;
        }
        record.skipped += skip.events.unwrap_or(0);
        let note = match skip.events {
            Some(n) => format!(
                "retention removed {n} events up to {} before they were delivered; delivery continued after them ({} skipped in all)",
                skip.cursor, record.skipped
            ),
            None => format!(
                "retention removed the events up to {} before they were delivered (how many is not known: the cursor was set before the horizon); delivery continued after them",
                skip.cursor
            ),
        };
        tracing::warn!(webhook = %record.id, "{note}");
        record.skip_note = Some(note);
        false
    });
}

/// Where a task's subscription starts counting from: the stored position, or the
/// cursor's seq found in the log. `None` when the cursor is behind the horizon and its
/// seq was never known (an administrator set it there): what was pruned after it cannot
/// be counted.
fn start_position(store: &Store, record: &WebhookRecord) -> Result<Option<u64>, StoreError> {
    if record.position.is_some() {
        return Ok(record.position);
    }
    let cursor = record.cursor();
    if cursor == cursor::ZERO {
        return Ok(Some(0));
    }
    let position = position_of(store, cursor, store.head().seq)?;
    // Checked after the read: a prune that hid the cursor's events is seen here.
    Ok((!store.horizon_after_reads().cuts(cursor)).then_some(position))
}

/// The seq just before the first committed event after `cursor` (`head` when there is
/// none): the cursor's seq, or the horizon's when retention removed it. One chunk read.
fn position_of(store: &Store, cursor: Ulid, head: u64) -> Result<u64, StoreError> {
    match store.scan_after(cursor)?.next() {
        Some(next) => Ok(next?.seq - 1),
        None => Ok(head),
    }
}

/// Sleeps `delay`; true if `stop` came first.
async fn pause_for(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// `min` doubling per consecutive failure up to five minutes, times a random factor in
/// 0.75–1.25 so that webhooks failing together do not retry together.
fn backoff(min: Duration, failures: u32) -> Duration {
    let doubled = min.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let capped = doubled.min(MAX_BACKOFF);
    capped.mul_f64(0.75 + rand::random::<f64>() * 0.5)
}

/// Stores a task's record (cursor and counters), durably unless `--sync none`, with
/// the writer's next group commit.
async fn store_record(shared: &Shared, record: WebhookRecord) {
    let result = shared
        .writer
        .store_webhook_record(record.id.clone(), encode(&record))
        .await;
    // The events were delivered; a cursor not stored only means they may be sent again
    // after a restart (at least once).
    if let Err(e) = result {
        tracing::error!(webhook = %record.id, error = %e, "storing a webhook cursor failed");
    }
}

/// The body: the event's line for batch 1, else `{"events":[…]}`.
fn body(events: &[&Event], single: bool) -> String {
    if single && let [event] = events {
        return event.line.to_string();
    }
    let mut body =
        String::with_capacity(16 + events.iter().map(|e| e.line.len() + 1).sum::<usize>());
    body.push_str("{\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&event.line);
    }
    body.push_str("]}");
    body
}

/// One signed request; its response body is read up to a bound and discarded.
async fn post(
    shared: &Shared,
    url: &str,
    signer: &signing::Signer,
    events: &[&Event],
    single: bool,
) -> Outcome {
    let Some(first) = events.first() else {
        return Outcome::Delivered;
    };
    let message_id = first.id.to_string();
    let body = body(events, single);
    let timestamp = (now_unix_ms() / 1000) as i64;
    let signature = signer.sign(&message_id, timestamp, body.as_bytes());
    let sent = shared
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &message_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => return failure(e),
    };
    let status = response.status();
    // Drain a little of the body so the connection can be reused; a body that errors
    // or times out does not undo the status the receiver already gave.
    let mut read = 0;
    while read < MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            _ => break,
        }
    }
    if status.is_success() {
        Outcome::Delivered
    } else if status == reqwest::StatusCode::GONE {
        Outcome::Gone
    } else if status.is_redirection() {
        let to = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("nowhere");
        Outcome::Failed {
            result: "error",
            error: format!("HTTP {status}: a redirect (to {to}), not followed"),
        }
    } else {
        Outcome::Failed {
            result: "error",
            error: format!("HTTP {status}"),
        }
    }
}

/// A failed request, described without its URL (which may hold a receiver's token).
fn failure(e: reqwest::Error) -> Outcome {
    let e = e.without_url();
    let mut cause: &dyn std::error::Error = &e;
    let mut text = e.to_string();
    while let Some(next) = cause.source() {
        cause = next;
        text = format!("{text}: {next}");
    }
    if e.is_timeout() {
        Outcome::Failed {
            result: "timeout",
            error: format!("no response within the timeout: {text}"),
        }
    } else {
        Outcome::Failed {
            result: "error",
            error: text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(body: &str) -> Vec<String> {
        match parse_new(body.as_bytes()) {
            Ok(_) => Vec::new(),
            Err(p) => p
                .into_iter()
                .map(|p| format!("{}: {}", p.field.unwrap_or_default(), p.message))
                .collect(),
        }
    }

    #[test]
    fn every_problem_of_a_body_is_listed() {
        let found = messages(
            r#"{"url":"ftp://x/","batch":0,"types":["ok","bad type",3],"since":"soon","colour":1}"#,
        );
        let fields: Vec<&str> = found
            .iter()
            .map(|m| m.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            fields,
            ["url", "types[1]", "types[2]", "since", "batch", "colour"],
            "{found:?}"
        );
        assert!(messages(r#"{"url":"https://siem.example/hook"}"#).is_empty());
        assert_eq!(messages(r#"{"batch":1001,"url":"http://h/"}"#).len(), 1);
        assert_eq!(messages(r#"{}"#), ["url: required (an http or https URL)"]);
        assert_eq!(messages(r#"{"url":"http://u:p@h/"}"#).len(), 1);
    }

    #[test]
    fn patch_needs_something_known() {
        assert!(parse_patch(br#"{}"#).is_err());
        assert!(parse_patch(br#"{"paused":1,"cursor":"x","z":0}"#).is_err_and(|p| p.len() == 3));
        let p = parse_patch(br#"{"cursor":"earliest"}"#).expect("valid");
        assert_eq!(p.cursor, Some(cursor::ZERO));
    }

    #[test]
    fn secrets_are_standard_webhooks_secrets() {
        let s = new_secret();
        let key = base64::engine::general_purpose::STANDARD
            .decode(s.strip_prefix("whsec_").expect("prefix"))
            .expect("base64");
        assert_eq!(key.len(), 24);
        assert!(standardwebhooks::Webhook::new(&s).is_ok());
    }

    #[test]
    fn backoff_doubles_to_five_minutes_with_jitter() {
        let min = Duration::from_secs(1);
        for (failures, nominal) in [
            (1, 1.0),
            (2, 2.0),
            (3, 4.0),
            (9, 256.0),
            (10, 300.0),
            (40, 300.0),
        ] {
            let d = backoff(min, failures).as_secs_f64();
            assert!(
                d >= nominal * 0.75 && d <= nominal * 1.25,
                "{failures}: {d}"
            );
        }
    }
}

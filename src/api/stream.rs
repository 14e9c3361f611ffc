//! `GET /v1/events/stream`: Server-Sent Events over a [`Subscription`]; also the stream
//! slots and the start cursor, which the WebSocket framing shares.
//!
//! The body is a stream driven by the connection itself (no task per client), so an
//! idle subscriber costs a receiver and a few buffers. A client that stops reading is
//! cut off by the connection's write timeout (see `server::TimeoutListener`); the
//! subscription then needs nothing from it to resume: `Last-Event-ID` does that.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ulid::Ulid;

use super::openapi;
use super::read::{Selection, head_json};
use super::{ApiError, AppState, ErrorCode};
use crate::auth::{Caller, Role};
use crate::cursor::{self, ZERO};
use crate::event::Event;
use crate::half_close::PeerShutdown;
use crate::store::{Head, Store};
use crate::subscription::{Item, Selector, Subscription};
use std::pin::Pin;
use tokio::time::Sleep;

/// Milliseconds an `EventSource` waits before reconnecting.
const RETRY_MS: u32 = 2000;
/// After the client shut down its sending side, the second probe's delay: long enough
/// for the reset of a client that has gone to come back from the first one.
const PROBE_DELAY: Duration = Duration::from_secs(1);

/// Open streams (SSE and WebSocket together) against `--max-connections`.
#[derive(Debug)]
pub struct StreamSlots {
    open: AtomicUsize,
    max: usize,
}

impl StreamSlots {
    pub fn new(max: usize) -> StreamSlots {
        StreamSlots {
            open: AtomicUsize::new(0),
            max,
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot, released when the guard drops; `None` when all are taken.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotGuard> {
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SlotGuard(self.clone()))
    }
}

pub struct SlotGuard(Arc<StreamSlots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Stream settings from `cairn serve`.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub heartbeat: Duration,
    /// A WebSocket client that answers no ping for this long is dropped (SSE relies on
    /// the socket's write timeout alone).
    pub write_timeout: Duration,
    pub shutdown: CancellationToken,
    /// Every connection, WebSockets included once upgraded: shutdown waits for them.
    pub connections: TaskTracker,
}

pub(super) fn too_many() -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::TooManyConnections,
        "the server has reached --max-connections open streams; retry later",
    )
    .into_response()
}

/// Cluster mode (SPEC §6): a stream starts only on a node that has caught up with the
/// cluster's log, and only once this node's copy holds the client's cursor (waiting up
/// to 10 s): a resume on another node must never skip what the first node served.
pub(super) async fn cluster_gate(
    cluster: Option<&crate::cluster::Status>,
    cursor: Ulid,
) -> Result<(), ApiError> {
    let Some(cluster) = cluster else {
        return Ok(());
    };
    if !cluster.serves_streams() {
        return Err(ApiError::unavailable(
            "this node has not caught up with the cluster's log; retry, here or on another node",
        ));
    }
    cluster
        .catch_up(cursor)
        .await
        .map_err(ApiError::unavailable)
}

/// What a stream delivers: a query's selection without `until` (a stream continues live).
pub(super) fn stream_selection(
    params: &HashMap<String, String>,
    caller: &Caller,
) -> Result<Selection, ApiError> {
    if params.contains_key("until") {
        return Err(ApiError::bad_param(
            "until",
            "is not supported on streams (a stream continues live); use /v1/export",
        ));
    }
    Selection::from_params(params, caller)
}

/// Where a stream from `cursor` starts: after the last pruned id when events after
/// `cursor` were pruned (SPEC §8), with the first retained id for the `connected`
/// frame's `pruned_before`; else at `cursor`. Starting the subscription past the pruned
/// range keeps it from reporting that range a second time, in band.
///
/// Only a cursor behind the horizon reads the store (on a blocking thread); the usual
/// case answers at once: a blocking task per new stream made 10,000 connections opened
/// at once grow the blocking pool by hundreds of threads and their stacks.
pub(super) async fn start_at_horizon(
    store: &Arc<Store>,
    cursor: Ulid,
) -> Result<(Ulid, Option<String>), ApiError> {
    let horizon = store.horizon();
    let Some(last) = horizon.last_pruned_id.filter(|_| horizon.cuts(cursor)) else {
        return Ok((cursor, None));
    };
    let store = store.clone();
    let pruned_before = tokio::task::spawn_blocking(move || {
        crate::retention::pruned_before(&horizon, &store, cursor)
    })
    .await
    .map_err(|e| ApiError::internal(format!("stream start task failed: {e}")))?;
    Ok((last, pruned_before))
}

/// A `connected` frame's data: the cursor delivery continues after, the head (the one a
/// live stream's cursor was taken from), and `pruned_before` when events after the
/// client's cursor were pruned.
pub(super) fn connected_json(
    head: &Head,
    cursor: Ulid,
    pruned_before: Option<String>,
) -> serde_json::Value {
    let mut connected = serde_json::json!({
        "type": "connected",
        "cursor": cursor.to_string(),
        "head": head_json(head),
    });
    if let Some(id) = pruned_before {
        connected["pruned_before"] = id.into();
    }
    connected
}

/// Where delivery starts: `Last-Event-ID` (non-empty) wins over `since`; else the head.
pub(super) fn start_cursor(
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    selection: &Selection,
    head_id: Option<Ulid>,
) -> Result<Ulid, ApiError> {
    if let Some(value) = headers.get("last-event-id")
        && let Some(id) = cursor::parse_last_event_id(value.as_bytes())
            .map_err(|m| ApiError::bad_param("Last-Event-ID", m))?
    {
        return Ok(id);
    }
    if params.contains_key("since") {
        return Ok(selection.after);
    }
    Ok(head_id.unwrap_or(ZERO))
}

/// Stream events as Server-Sent Events
///
/// Frames: first `retry: 2000`, `id: <start cursor>`, `event: connected`,
/// `data: {"type":"connected","cursor":…,"head":{…}}`; then for each event `id: <id>`,
/// `event: <type>`, `data: <the event, one JCS line>`; and after `--heartbeat` seconds of
/// silence a `: heartbeat` comment (or, on a filtered stream, an `id:`-only frame with
/// the newest id scanned). Every matching event after the start cursor is delivered
/// exactly once, in log order; resume with `Last-Event-ID`.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "streams",
    security(("bearer" = []), ("query_token" = [])),
    params(
        openapi::StreamParams,
        ("Last-Event-ID" = Option<String>, Header, nullable = false,
            description = "The last id received (a ULID); wins over `since` when not empty"),
    ),
    responses(
        (status = 200, description = "The stream, endless (Cache-Control: no-cache, \
            X-Accel-Buffering: no)", body = String, content_type = "text/event-stream"),
        (status = 400, description = "A malformed parameter or Last-Event-ID, named in \
            `details`, or `until` (not supported on streams)", body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 503, description = "`--max-connections` streams are open \
            (`too_many_connections`), or in cluster mode this node has not caught up with \
            the cluster's log or the cursor (`unavailable`)", body = openapi::Error,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    peer: Option<Extension<PeerShutdown>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let selection = stream_selection(&params, &caller)?;
    let Some(slot) = state.streams.try_acquire() else {
        return Ok(too_many());
    };
    let start = start_cursor(&headers, &params, &selection, state.store.head().id)?;
    cluster_gate(state.cluster.as_deref(), start).await?;
    // Read after the gate: the head the `connected` frame reports covers the cursor.
    let head = state.store.head();
    // `id:`-only frames tell a filtered client how far the scan went. A token with an
    // allow-list must not learn the ids of events it may not see, so it gets plain
    // heartbeats (and rescans what its filter passed over after a reconnect).
    let announce_skips = selection.is_filtered() && caller.allowed_types.is_none();
    let (after, pruned_before) = start_at_horizon(&state.store, start).await?;
    let subscription = Subscription::new(
        state.store.clone(),
        &state.writer,
        after,
        selection.into_selector(),
        state.stream_stats.clone(),
    );
    let connected = connected_json(&head, start, pruned_before);
    let first = Bytes::from(format!(
        "retry: {RETRY_MS}\nid: {start}\nevent: connected\ndata: {connected}\n\n"
    ));
    let body = SseBody {
        subscription,
        first: Some(Box::new(first)),
        heartbeat: state.stream.heartbeat,
        last_frame: Instant::now(),
        sent_id: start,
        announce_skips,
        shutdown: state.stream.shutdown.clone(),
        revoked: caller.revoked.clone(),
        frames: None,
        timer: Box::pin(tokio::time::sleep(state.stream.heartbeat)),
        peer: peer.map(|Extension(peer)| peer),
        probe_at: None,
        _slot: slot,
    };
    // The state is borrowed by each frame's future, not moved into it: an `async fn`
    // taking `self` by value holds it twice (argument and local), and this boxed stream
    // is most of what an idle subscriber costs.
    let stream = futures_util::stream::unfold(body, |mut body| async move {
        let frame = body.next_frame().await?;
        Some((frame, body))
    });
    let mut response = Response::new(Body::from_stream(stream));
    // Sized for the three headers: hyper keeps the map for the connection's life (to
    // reuse it), and the default first allocation holds six.
    let headers = response.headers_mut();
    *headers = HeaderMap::with_capacity(3);
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    headers.insert(
        header::HeaderName::from_static("x-accel-buffering"),
        header::HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// Held for each open stream, idle or not, so kept small: what only some streams need
/// (the first frame until it is sent, the frame buffer once events are filtered) is
/// boxed.
struct SseBody {
    subscription: Subscription,
    first: Option<Box<Bytes>>,
    heartbeat: Duration,
    last_frame: Instant,
    /// The newest id the client has been sent (as an event or an `id:`-only frame).
    sent_id: Ulid,
    /// Whether `id:`-only frames may tell the client how far a filtered scan went.
    announce_skips: bool,
    shutdown: CancellationToken,
    /// The caller's token was revoked: close at once.
    revoked: CancellationToken,
    /// Reused for each batch's frames: once hyper has written (and dropped) the last
    /// batch, its allocation is taken back instead of faulting in a fresh one.
    frames: Option<Box<BytesMut>>,
    /// Fires at most once per heartbeat interval (re-armed lazily from `last_frame`),
    /// instead of a timer per event.
    timer: Pin<Box<Sleep>>,
    /// The connection's read side; taken when the client shuts down its sending side
    /// (see `half_close`), which starts the probes.
    peer: Option<PeerShutdown>,
    /// When the second probe is due.
    probe_at: Option<Instant>,
    _slot: SlotGuard,
}

type Frame = Result<Bytes, std::io::Error>;

impl SseBody {
    async fn next_frame(&mut self) -> Option<Frame> {
        if let Some(first) = self.first.take() {
            return Some(Ok(*first));
        }
        loop {
            let next = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return None,
                () = self.revoked.cancelled() => return None,
                () = self.timer.as_mut() => None,
                () = peer_shutdown(&self.peer) => {
                    // Either still reading (and these are just heartbeats) or gone, in
                    // which case the write after its reset fails and ends the stream.
                    self.peer = None;
                    let probe_at = Instant::now() + PROBE_DELAY;
                    self.probe_at = Some(probe_at);
                    self.timer.as_mut().reset(probe_at.into());
                    self.last_frame = Instant::now();
                    return Some(Ok(self.heartbeat_frame()));
                }
                next = self.subscription.next() => Some(next?),
            };
            let frame = match next {
                None => {
                    let due = self.probe_at.unwrap_or(self.last_frame + self.heartbeat);
                    if Instant::now() < due {
                        self.timer.as_mut().reset(due.into());
                        continue;
                    }
                    self.probe_at = None;
                    self.timer
                        .as_mut()
                        .reset((Instant::now() + self.heartbeat).into());
                    self.heartbeat_frame()
                }
                Some(Ok(Item::Batch(batch))) => {
                    self.sent_id = batch.events.last().map_or(self.sent_id, |e| e.id);
                    batch.encoded(|events| event_frames(&mut BytesMut::new(), events))
                }
                Some(Ok(Item::Events(events))) => {
                    self.sent_id = events.last().map_or(self.sent_id, |e| e.id);
                    let frames = self.frames.get_or_insert_default();
                    event_frames(frames, &events)
                }
                Some(Ok(Item::Skipped(id))) => {
                    if !self.announce_skips || self.last_frame.elapsed() < self.heartbeat {
                        continue;
                    }
                    self.sent_id = id;
                    id_frame(id)
                }
                // Overtaken by retention: said in band, as a resume would say it.
                Some(Ok(Item::Pruned {
                    cursor, first_id, ..
                })) => {
                    self.sent_id = cursor;
                    let head = self.subscription.store().head();
                    let connected =
                        connected_json(&head, cursor, first_id.map(|id| id.to_string()));
                    Bytes::from(format!(
                        "id: {cursor}\nevent: connected\ndata: {connected}\n\n"
                    ))
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "stream aborted by a read error");
                    return Some(Err(std::io::Error::other(e.to_string())));
                }
            };
            self.last_frame = Instant::now();
            return Some(Ok(frame));
        }
    }

    /// `: heartbeat`, or on a filtered stream that scanned past events the client was
    /// not sent, an `id:`-only frame so a reconnect skips them.
    fn heartbeat_frame(&mut self) -> Bytes {
        let cursor = self.subscription.cursor();
        if self.announce_skips && cursor > self.sent_id {
            self.sent_id = cursor;
            id_frame(cursor)
        } else {
            Bytes::from_static(b": heartbeat\n\n")
        }
    }
}

async fn peer_shutdown(peer: &Option<PeerShutdown>) {
    match peer {
        Some(peer) => peer.closed().cancelled().await,
        None => std::future::pending().await,
    }
}

fn id_frame(id: Ulid) -> Bytes {
    Bytes::from(format!("id: {id}\n\n"))
}

/// `id:`, `event:` and `data:` lines for each event; types and JCS lines never hold
/// CR or LF (JCS escapes them inside strings), so no field can be injected.
fn event_frames(out: &mut BytesMut, events: &[Event]) -> Bytes {
    let size: usize = events
        .iter()
        .map(|e| e.line.len() + e.event_type.len() + 50)
        .sum();
    out.reserve(size);
    let mut id_buf = [0u8; ulid::ULID_LEN];
    for e in events {
        out.put_slice(b"id: ");
        out.put_slice(e.id.array_to_str(&mut id_buf).as_bytes());
        out.put_slice(b"\nevent: ");
        out.put_slice(e.event_type.as_bytes());
        out.put_slice(b"\ndata: ");
        out.put_slice(e.line.as_bytes());
        out.put_slice(b"\n\n");
    }
    out.split().freeze()
}

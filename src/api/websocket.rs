//! `GET /v1/events/ws`: the same [`Subscription`] as SSE, framed as WebSocket messages.
//!
//! The handler does everything that can answer in HTTP first (the 503 when every stream
//! slot is taken) and creates the subscription *before* the upgrade, so the position in
//! `connected` is exact. After the upgrade one task per connection serves four sources:
//!
//! - the subscription: one text message per event (its JCS line);
//! - the client: `subscribe` commands, pongs, close;
//! - a heartbeat tick: a ping. A client that leaves one unanswered for `--write-timeout`
//!   is dropped (one that stops reading stops answering; one that stops reading while
//!   events flow is also dropped by the socket's write timeout);
//! - shutdown and revocation: a close frame (1001, 4003).
//!
//! A `subscribe` repositions the same subscription ([`Subscription::reposition`]), so a
//! re-filter is as gap-free as a new connection. Errors the client can fix are messages
//! (`{"type":"error",…}`, the usual error body) and the connection stays open. Errors
//! that leave nothing to serve close it: 4003 for auth, 4000 for a bad query string, and
//! 1009 or 1007 for a message that cannot be read (too large, not UTF-8).
//! Memory per connection is bounded: commands are capped at [`MAX_COMMAND_BYTES`], the
//! subscription keeps one store read in flight (however often it is repositioned) and
//! reads in bounded batches, and the socket buffers one batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::SinkExt;
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior};
use ulid::Ulid;

use super::openapi;
use super::read::Selection;
use super::stream::{
    SlotGuard, StreamConfig, cluster_gate, connected_json, start_at_horizon, start_cursor,
    stream_selection, too_many,
};
use super::{ApiError, AppState, ErrorCode};
use crate::auth::{Caller, Role};
use crate::cursor::{self, Filter, TypeFilter};
use crate::event::Event;
use crate::store::Store;
use crate::subscription::{Item, Subscription};

/// Largest message a client may send (a `subscribe` is a few hundred bytes).
const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// The socket buffers about this much before writing; a batch larger than this waits
/// for the client to take it.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// How long a closing handshake may take before the connection is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Close codes (RFC 6455 leaves 4000–4999 to applications).
mod close {
    /// The query string was malformed (like an HTTP 400).
    pub const BAD_REQUEST: u16 = 4000;
    /// Bad or missing token, or the token was revoked (like an HTTP 403).
    pub const FORBIDDEN: u16 = 4003;
    /// The server is shutting down; resume elsewhere or later.
    pub const GOING_AWAY: u16 = 1001;
    /// The log could not be read.
    pub const INTERNAL: u16 = 1011;
    /// A text message was not UTF-8.
    pub const NOT_UTF8: u16 = 1007;
    /// A message exceeded [`super::MAX_COMMAND_BYTES`].
    pub const TOO_BIG: u16 = 1009;
}

/// Stream events over a WebSocket
///
/// After the handshake the server sends `{"type":"connected","cursor":…,"head":{…}}`,
/// then one text message per event (the event, one JCS line). The client may send
/// `{"action":"subscribe","event_types":[…],"since":"…"}` at any time to replace the
/// filter and, with `since`, the position; the server answers with a new `connected`.
/// Errors the client can fix are messages (`{"type":"error",…}` and the `Error` members).
/// Close codes: 4003 bad or missing token or revoked, 4000 malformed query string, 1001
/// server shutting down, 1009 message too large, 1007 message not UTF-8.
#[utoipa::path(
    get,
    path = "/v1/events/ws",
    tag = "streams",
    security(("bearer" = []), ("query_token" = [])),
    params(
        openapi::StreamParams,
        ("Last-Event-ID" = Option<String>, Header, nullable = false,
            description = "The last id received (a ULID); wins over `since` when not empty"),
        ("Connection" = String, Header, description = "Must include `upgrade`"),
        ("Upgrade" = String, Header, description = "Must include `websocket`"),
        ("Sec-WebSocket-Version" = String, Header, description = "Must be `13`"),
        ("Sec-WebSocket-Key" = String, Header, description = "The handshake nonce (RFC 6455)"),
    ),
    responses(
        (status = 101, description = "Switching protocols. A bad or missing token closes \
            the socket with 4003, a malformed query string or Last-Event-ID with 4000."),
        (status = 400, description = "Not a WebSocket handshake (`websocket_required`)",
            body = openapi::Error),
        (status = 401, description = "Not a WebSocket handshake, and no valid token",
            body = openapi::Error),
        (status = 405, description = "HEAD: the handshake is a GET", body = openapi::Error,
            headers(("Allow" = String, description = "GET"))),
        (status = 426, description = "The connection cannot be upgraded (HTTP/1.0)",
            body = openapi::Error),
        (status = 503, description = "`--max-connections` streams are open \
            (`too_many_connections`), or in cluster mode this node has not caught up with \
            the cluster's log or the cursor (`unavailable`)", body = openapi::Error,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    )
)]
pub async fn events_ws(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade
            .read_buffer_size(4 * 1024)
            .write_buffer_size(WRITE_BUFFER_BYTES)
            .max_message_size(MAX_COMMAND_BYTES)
            .max_frame_size(MAX_COMMAND_BYTES),
        // Not a WebSocket request: answer like any other route.
        Err(rejection) => {
            return match caller {
                Err(e) => e.into_response(),
                // HEAD reaches GET handlers; the handshake is GET only.
                Ok(_) if matches!(rejection, WebSocketUpgradeRejection::MethodNotGet(_)) => {
                    let mut response = ApiError::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        ErrorCode::MethodNotAllowed,
                        "the WebSocket handshake is a GET",
                    )
                    .into_response();
                    response
                        .headers_mut()
                        .insert(header::ALLOW, HeaderValue::from_static("GET"));
                    response
                }
                Ok(_) => ApiError::new(
                    rejection.status(),
                    ErrorCode::WebsocketRequired,
                    format!(
                        "this route speaks WebSocket only: {}",
                        rejection.body_text()
                    ),
                )
                .into_response(),
            };
        }
    };
    let caller = match caller.and_then(|c| c.require(Role::Read).map(|()| c)) {
        Ok(caller) => caller,
        Err(e) => return refuse(upgrade, state.stream, e, close::FORBIDDEN),
    };
    let start = params
        .map_err(|e| ApiError::bad_request(e.body_text()))
        .and_then(|Query(params)| {
            let selection = stream_selection(&params, &caller)?;
            let start = start_cursor(&headers, &params, &selection, state.store.head().id)?;
            Ok((start, selection))
        });
    let (start, selection) = match start {
        Ok(start) => start,
        Err(e) => return refuse(upgrade, state.stream, e, close::BAD_REQUEST),
    };
    let Some(slot) = state.streams.try_acquire() else {
        return too_many();
    };
    if let Err(e) = cluster_gate(state.cluster.as_deref(), start).await {
        return e.into_response();
    }
    // Read after the gate: the head the `connected` message reports covers the cursor.
    let head = state.store.head();
    let (after, pruned_before) = match start_at_horizon(&state.store, start).await {
        Ok(started) => started,
        Err(e) => return e.into_response(),
    };
    let subscription = Subscription::new(
        state.store.clone(),
        &state.writer,
        after,
        selection.into_selector(),
        state.stream_stats.clone(),
    );
    let connected = text_json(&connected_json(&head, start, pruned_before));
    let tracked = state.stream.connections.token();
    let connection = Connection {
        subscription,
        store: state.store.clone(),
        caller,
        delivered: start,
        cluster: state.cluster.clone(),
        settings: state.stream,
        _slot: slot,
    };
    upgrade.on_upgrade(move |socket| async move {
        let _tracked = tracked;
        connection.run(socket, connected).await;
    })
}

/// Upgrades only to say why the connection cannot be served: browsers see neither
/// the status nor the body of a refused handshake, but they do see a close frame.
fn refuse(
    upgrade: WebSocketUpgrade,
    settings: StreamConfig,
    error: ApiError,
    code: u16,
) -> Response {
    let tracked = settings.connections.token();
    upgrade.on_upgrade(move |mut socket| async move {
        let _tracked = tracked;
        let message = Message::Text(error.to_message().into());
        let sent = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(message)).await;
        if matches!(sent, Ok(Ok(()))) {
            close_socket(&mut socket, code, &error.message).await;
        }
    })
}

/// A client's command: `{"action":"subscribe","event_types":[…],"since":"…"}`. Unknown
/// fields are refused, so a misspelt filter is an error rather than "all types".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Command {
    action: String,
    event_types: Option<Vec<String>>,
    since: Option<String>,
    source: Option<String>,
}

/// Why a connection ended.
enum End {
    /// Send a close frame with this code and reason.
    Close(u16, &'static str),
    /// The client is gone or unresponsive: nothing more to send.
    Gone,
}

struct Connection {
    subscription: Subscription,
    store: Arc<Store>,
    caller: Caller,
    /// The newest event sent (or the start cursor): a `subscribe` without `since`
    /// continues after it.
    delivered: Ulid,
    /// Cluster mode: a `subscribe` with `since` waits for this node's copy as a resume does.
    cluster: Option<Arc<crate::cluster::Status>>,
    settings: StreamConfig,
    _slot: SlotGuard,
}

impl Connection {
    async fn run(mut self, mut socket: WebSocket, connected: Message) {
        if let End::Close(code, reason) = self.serve(&mut socket, connected).await {
            close_socket(&mut socket, code, reason).await;
        }
    }

    async fn serve(&mut self, socket: &mut WebSocket, connected: Message) -> End {
        // Registered once, not per message: each `cancelled()` takes the token's lock,
        // and every connection shares the shutdown token.
        let shutdown = self.settings.shutdown.clone().cancelled_owned();
        let revoked = self.caller.revoked.clone().cancelled_owned();
        tokio::pin!(shutdown, revoked);
        let heartbeat = self.settings.heartbeat;
        let mut ticks = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Fires once the oldest unanswered ping has waited `--write-timeout`: a client
        // that reads answers pings (its library does), one that stopped reading cannot.
        let answer_deadline = tokio::time::sleep(self.settings.write_timeout);
        tokio::pin!(answer_deadline);
        let mut awaiting_pong = false;
        let mut outgoing = vec![connected];
        loop {
            // Sending waits for a slow client, but never past a revocation or shutdown.
            tokio::select! {
                biased;
                () = &mut shutdown => return End::Close(close::GOING_AWAY, "the server is shutting down"),
                () = &mut revoked => return End::Close(close::FORBIDDEN, "the token was revoked"),
                sent = send_all(socket, &mut outgoing) => if sent.is_err() {
                    return End::Gone;
                },
            }
            outgoing = tokio::select! {
                biased;
                () = &mut shutdown => return End::Close(close::GOING_AWAY, "the server is shutting down"),
                () = &mut revoked => return End::Close(close::FORBIDDEN, "the token was revoked"),
                () = &mut answer_deadline, if awaiting_pong => {
                    tracing::debug!("WebSocket client left a ping unanswered; dropped");
                    return End::Gone;
                }
                incoming = socket.recv() => match incoming {
                    None => return End::Gone,
                    Some(Err(e)) => return unreadable(e),
                    Some(Ok(Message::Text(text))) => vec![self.command(&text).await],
                    Some(Ok(Message::Binary(_))) => vec![error_message(&ApiError::bad_request(
                        "commands are JSON text messages, not binary",
                    ))],
                    Some(Ok(Message::Pong(_))) => {
                        awaiting_pong = false;
                        continue;
                    }
                    // Pings are answered by the socket itself; a close is answered on
                    // the next read, which then ends the stream.
                    Some(Ok(Message::Ping(_) | Message::Close(_))) => continue,
                },
                _ = ticks.tick() => {
                    if !awaiting_pong {
                        awaiting_pong = true;
                        answer_deadline.as_mut().reset(Instant::now() + self.settings.write_timeout);
                    }
                    vec![Message::Ping(Bytes::new())]
                }
                next = self.subscription.next() => match next {
                    None => return End::Close(close::GOING_AWAY, "the server is shutting down"),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "WebSocket stream aborted by a read error");
                        return End::Close(close::INTERNAL, "the log could not be read");
                    }
                    Some(Ok(Item::Batch(batch))) => self.event_messages(&batch.events),
                    Some(Ok(Item::Events(events))) => self.event_messages(&events),
                    Some(Ok(Item::Skipped(_))) => continue,
                    // Overtaken by retention: said in band, as a resume would say it.
                    Some(Ok(Item::Pruned { cursor, first_id, .. })) => {
                        self.delivered = cursor;
                        let pruned_before = first_id.map(|id| id.to_string());
                        let head = self.store.head();
                        vec![text_json(&connected_json(&head, cursor, pruned_before))]
                    }
                },
            };
        }
    }

    fn event_messages(&mut self, events: &[Event]) -> Vec<Message> {
        if let Some(last) = events.last() {
            self.delivered = last.id;
        }
        events.iter().map(|e| text(e.line.as_bytes())).collect()
    }

    /// Applies a `subscribe` and answers `connected`, or answers an error and changes
    /// nothing.
    async fn command(&mut self, text: &str) -> Message {
        let parsed = match self.parse_command(text) {
            Ok((after, selection)) => cluster_gate(self.cluster.as_deref(), after)
                .await
                .map(|()| (after, selection)),
            Err(e) => Err(e),
        };
        match parsed {
            Ok((after, selection)) => {
                let (start, pruned_before) = match start_at_horizon(&self.store, after).await {
                    Ok(started) => started,
                    Err(e) => return error_message(&e),
                };
                self.subscription
                    .reposition(start, selection.into_selector());
                // The new position is where "continue after the last event sent" starts
                // from until an event is sent.
                self.delivered = after;
                text_json(&connected_json(&self.store.head(), after, pruned_before))
            }
            Err(e) => error_message(&e),
        }
    }

    fn parse_command(&self, text: &str) -> Result<(Ulid, Selection), ApiError> {
        let command: Command = serde_json::from_str(text).map_err(|e| {
            ApiError::bad_request(format!(
                "a command is {{\"action\":\"subscribe\",\"event_types\":[…],\"since\":\"…\"}}: {e}"
            ))
        })?;
        if command.action != "subscribe" {
            return Err(ApiError::bad_param(
                "action",
                format!(
                    "\"{}\" is unknown; the only action is \"subscribe\"",
                    command.action
                ),
            ));
        }
        let types = match &command.event_types {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(ApiError::bad_param(
                    "event_types",
                    "is empty; omit it for all types",
                ));
            }
            Some(list) => Some(
                TypeFilter::from_entries(list.iter().map(String::as_str))
                    .map_err(|m| ApiError::bad_param("event_types", m))?,
            ),
        };
        if command.source.as_deref() == Some("") {
            return Err(ApiError::bad_param("source", "must not be empty"));
        }
        let after = match &command.since {
            Some(since) => {
                cursor::parse_since(since).map_err(|m| ApiError::bad_param("since", m))?
            }
            None => self.delivered,
        };
        let filter = Filter {
            types,
            source: command.source,
        };
        Ok((after, Selection::new(after, filter, &self.caller)))
    }
}

/// How a connection ends when the client's data cannot be read as WebSocket messages:
/// the standard close codes for a message too large (1009) or a text message that is
/// not UTF-8 (1007); anything else means the connection itself failed.
fn unreadable(error: axum::Error) -> End {
    match error
        .into_inner()
        .downcast::<tungstenite::Error>()
        .map(|e| *e)
    {
        Ok(tungstenite::Error::Capacity(_)) => End::Close(
            close::TOO_BIG,
            "a message to the server may be at most 64 KiB",
        ),
        Ok(tungstenite::Error::Utf8(_)) => {
            End::Close(close::NOT_UTF8, "text messages must be UTF-8")
        }
        _ => End::Gone,
    }
}

/// Feeds every message, then flushes once: a batch of events costs one write.
async fn send_all(socket: &mut WebSocket, messages: &mut Vec<Message>) -> Result<(), axum::Error> {
    for message in messages.drain(..) {
        socket.feed(message).await?;
    }
    socket.flush().await
}

/// Sends a close frame and waits (briefly) for the client's, so it sees a clean close.
async fn close_socket(socket: &mut WebSocket, code: u16, reason: &str) {
    // A close reason is at most 123 bytes (cut at a character boundary).
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if socket.send(Message::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(_)) = socket.recv().await {}
        }
    })
    .await;
}

fn text_json(value: &serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

fn error_message(error: &ApiError) -> Message {
    Message::Text(error.to_message().into())
}

/// An event's JCS line as a text message, sharing the line's buffer.
fn text(line: &Bytes) -> Message {
    let text = Utf8Bytes::try_from(line.clone())
        .unwrap_or_else(|_| Utf8Bytes::from(String::from_utf8_lossy(line).as_ref()));
    Message::Text(text)
}

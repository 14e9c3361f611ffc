//! Reading the log: query with paging, one event, the head, the streamed export and the
//! server-side chain check. Every read stops at the committed head, so nothing a crash
//! could take back is ever served.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use ulid::Ulid;
use utoipa::ToSchema;

use super::openapi::{self, EventId, Hash, Timestamp, wire};
use super::{ApiError, AppState, Envelope};
use crate::auth::{Caller, Role};
use crate::chain::Verifier;
use crate::cursor::{self, Filter, TypeFilter};
use crate::event::Event;
use crate::store::{Head, Store};
use crate::subscription::Selector;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Export bodies are sent in pieces of about this size.
const EXPORT_PIECE_BYTES: usize = 64 * 1024;
/// On an export whose range starts before the horizon: the first retained id.
pub const PRUNED_BEFORE_HEADER: &str = "cairn-pruned-before";

/// The newest event of the log (or of a verified range). On an empty log `seq` is 0,
/// `id` and `timestamp` are null and `hash` is 64 zeros, so the next event's `prev_hash`
/// always equals the head's `hash`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Head)]
pub struct HeadJson {
    seq: u64,
    #[schema(value_type = Option<EventId>)]
    id: Option<String>,
    #[schema(value_type = Hash)]
    hash: String,
    #[schema(value_type = Option<Timestamp>)]
    timestamp: Option<String>,
}

/// `/v1/head`: the newest event, and the horizon (the first retained event: seq 1 and
/// the first id when nothing was pruned; 0 and null on an empty log).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogHead {
    seq: u64,
    #[schema(value_type = Option<EventId>)]
    id: Option<String>,
    #[schema(value_type = Hash)]
    hash: String,
    #[schema(value_type = Option<Timestamp>)]
    timestamp: Option<String>,
    /// The first retained seq.
    first_seq: u64,
    /// The first retained id.
    #[schema(value_type = Option<EventId>)]
    first_id: Option<String>,
}

/// A 410 for a read of pruned events.
fn gone(what: String, store: &Store) -> ApiError {
    let first = store.horizon().first_seq();
    ApiError::gone(format!(
        "{what} was pruned by retention; the log now starts at seq {first}"
    ))
}

pub fn head_json(head: &Head) -> HeadJson {
    HeadJson {
        seq: head.seq,
        id: head.id.map(|id| id.to_string()),
        hash: hex::encode(head.hash),
        timestamp: head.timestamp.clone(),
    }
}

/// `since`/`until`/`types`/`source`, parsed and intersected with the caller's allow-list.
pub struct Selection {
    pub after: Ulid,
    pub before: Option<Ulid>,
    pub filter: Filter,
    allowed: Option<std::sync::Arc<TypeFilter>>,
}

impl Selection {
    pub fn from_params(
        params: &HashMap<String, String>,
        caller: &Caller,
    ) -> Result<Selection, ApiError> {
        let after = match params.get("since") {
            Some(s) => cursor::parse_since(s).map_err(|m| ApiError::bad_param("since", m))?,
            None => cursor::ZERO,
        };
        let before = params
            .get("until")
            .map(|s| cursor::parse_until(s).map_err(|m| ApiError::bad_param("until", m)))
            .transpose()?;
        let types = params
            .get("types")
            .map(|s| TypeFilter::parse(s).map_err(|m| ApiError::bad_param("types", m)))
            .transpose()?;
        let source = match params.get("source") {
            Some(s) if s.is_empty() => {
                return Err(ApiError::bad_param("source", "must not be empty"));
            }
            other => other.cloned(),
        };
        Ok(Selection {
            after,
            before,
            filter: Filter { types, source },
            allowed: caller.allowed_types.clone(),
        })
    }

    /// Everything after `after` that passes `filter`, as `caller` may see it.
    pub fn new(after: Ulid, filter: Filter, caller: &Caller) -> Selection {
        Selection {
            after,
            before: None,
            filter,
            allowed: caller.allowed_types.clone(),
        }
    }
}

impl Selection {
    /// This selection as a subscription's selector; an unfiltered one (which matches
    /// every event) is the server's shared [`crate::subscription::everything`].
    pub fn into_selector(self) -> std::sync::Arc<dyn Selector> {
        if self.is_filtered() {
            std::sync::Arc::new(self)
        } else {
            crate::subscription::everything()
        }
    }
}

impl Selector for Selection {
    fn matches(&self, event: &Event) -> bool {
        self.filter.matches(event)
            && self
                .allowed
                .as_ref()
                .is_none_or(|a| a.matches(&event.event_type))
    }

    fn is_filtered(&self) -> bool {
        self.filter.types.is_some() || self.filter.source.is_some() || self.allowed.is_some()
    }
}

/// An optional unsigned decimal parameter (digits only: no sign, no spaces).
pub fn decimal_param(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<Option<u64>, ApiError> {
    let Some(value) = params.get(name) else {
        return Ok(None);
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_param(name, "must be a decimal number"));
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| ApiError::bad_param(name, "is too large"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Order {
    Asc,
    Desc,
}

/// Query the log, a page at a time
///
/// Pages never skip or repeat an event, even while events are appended.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    security(("bearer" = []), ("query_token" = [])),
    params(
        openapi::SelectionParams,
        ("limit" = Option<u16>, Query, minimum = 1, maximum = 1000,
            description = "Events per page, 1–1000 (default 100)"),
        ("order" = inline(Option<Order>), Query, description = "asc (default) or desc"),
    ),
    responses(
        (status = 200, description = "A page of events", body = wire::EventPage),
        (status = 400, description = "A malformed parameter, named in `details`",
            body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
    )
)]
pub async fn query(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let selection = Selection::from_params(&params, &caller)?;
    let limit = match decimal_param(&params, "limit") {
        Ok(None) => DEFAULT_LIMIT,
        Ok(Some(n)) if (1..=MAX_LIMIT as u64).contains(&n) => n as usize,
        _ => {
            return Err(ApiError::bad_param(
                "limit",
                format!("must be an integer from 1 to {MAX_LIMIT}"),
            ));
        }
    };
    let order = match params.get("order").map(String::as_str) {
        None | Some("asc") => Order::Asc,
        Some("desc") => Order::Desc,
        Some(_) => return Err(ApiError::bad_param("order", "must be asc or desc")),
    };
    let store = state.store.clone();
    let (page, pruned_before) = tokio::task::spawn_blocking(move || {
        let pruned_before =
            crate::retention::pruned_before(&store.horizon(), &store, selection.after);
        read_page(&store, &selection, limit, order).map(|page| (page, pruned_before))
    })
    .await
    .map_err(ApiError::internal)??;

    // Events are stored as JCS lines: the body is assembled around them, never re-encoded.
    let has_more = page.len() > limit;
    let page = &page[..page.len().min(limit)];
    let mut body = String::with_capacity(page.iter().map(|e| e.line.len() + 1).sum::<usize>() + 64);
    body.push_str("{\"data\":[");
    for (i, event) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&event.line);
    }
    body.push_str("],\"next\":");
    match page.last().filter(|_| has_more) {
        Some(last) => {
            body.push('"');
            body.push_str(&last.id.to_string());
            body.push('"');
        }
        None => body.push_str("null"),
    }
    if let Some(id) = pruned_before {
        body.push_str(",\"pruned_before\":\"");
        body.push_str(&id);
        body.push('"');
    }
    body.push('}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Up to `limit + 1` matching events (the extra one tells whether a next page exists).
fn read_page(
    store: &Store,
    sel: &Selection,
    limit: usize,
    order: Order,
) -> Result<Vec<Event>, ApiError> {
    let mut page = Vec::with_capacity(limit + 1);
    match order {
        Order::Asc => {
            for event in store.scan_after(sel.after).map_err(ApiError::internal)? {
                let event = event.map_err(ApiError::internal)?;
                if sel.before.is_some_and(|b| event.id >= b) {
                    break;
                }
                if sel.matches(&event) {
                    page.push(event);
                    if page.len() > limit {
                        break;
                    }
                }
            }
        }
        Order::Desc => {
            let before = sel.before.unwrap_or(Ulid(u128::MAX));
            for event in store.scan_before(before).map_err(ApiError::internal)? {
                let event = event.map_err(ApiError::internal)?;
                if event.id <= sel.after {
                    break;
                }
                if sel.matches(&event) {
                    page.push(event);
                    if page.len() > limit {
                        break;
                    }
                }
            }
        }
    }
    Ok(page)
}

/// One event by id
#[utoipa::path(
    get,
    path = "/v1/events/{id}",
    tag = "events",
    security(("bearer" = []), ("query_token" = [])),
    params(("id" = String, Path, description = "The event's id (a ULID)")),
    responses(
        (status = 200, description = "The event", body = wire::EventEnvelope),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 404, description = "No such event (also for a malformed id, and for an event \
            outside the token's types allow-list)", body = openapi::Error),
        (status = 410, description = "Pruned by retention (code `gone`)", body = openapi::Error),
    )
)]
pub async fn event_by_id(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    // A path that does not decode (invalid UTF-8) is a malformed id: 404 like any other.
    let Ok(Path(id)) = id else {
        return Err(ApiError::not_found("no such event"));
    };
    let not_found = || ApiError::not_found(format!("no event with id {id}"));
    let Some(ulid) = cursor::parse_ulid(&id) else {
        return Err(not_found());
    };
    let store = state.store.clone();
    let pruned = state
        .store
        .horizon()
        .last_pruned_id
        .is_some_and(|last| ulid <= last);
    if pruned {
        return Err(gone(format!("event {id}"), &state.store));
    }
    let event = tokio::task::spawn_blocking(move || store.get(ulid))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?
        // An event outside the caller's allow-list does not exist for it.
        .filter(|e| {
            caller
                .allowed_types
                .as_ref()
                .is_none_or(|a| a.matches(&e.event_type))
        })
        .ok_or_else(not_found)?;
    let body = format!("{{\"data\":{}}}", &*event.line);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The newest event's seq, id, hash and timestamp
#[utoipa::path(
    get,
    path = "/v1/head",
    tag = "events",
    security(("bearer" = []), ("query_token" = [])),
    responses(
        (status = 200, description = "The head and the horizon", body = Envelope<LogHead>),
        (status = 401, description = "No valid token", body = openapi::Error),
    )
)]
pub async fn head(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Envelope<LogHead>>, ApiError> {
    caller.require(Role::Read)?;
    let store = state.store.clone();
    let (head, first) = tokio::task::spawn_blocking(move || {
        let head = store.head();
        store.first_retained().map(|first| (head, first))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let h = head_json(&head);
    Ok(axum::Json(Envelope {
        data: LogHead {
            seq: h.seq,
            id: h.id,
            hash: h.hash,
            timestamp: h.timestamp,
            first_seq: first.map_or(0, |(seq, _)| seq),
            first_id: first.map(|(_, id)| id.to_string()),
        },
    }))
}

/// Export matching events as NDJSON
///
/// Every matching event, in log order, one JCS line each (the `Event` schema) ending in
/// `\n`; no limit. Split on `\n` only: JCS leaves U+2028 and U+2029 unescaped.
#[utoipa::path(
    get,
    path = "/v1/export",
    tag = "events",
    security(("bearer" = []), ("query_token" = [])),
    params(openapi::SelectionParams),
    responses(
        (status = 200, description = "One event per line", body = String,
            content_type = "application/x-ndjson",
            headers(("Cairn-Pruned-Before" = String, description = "Present when the range \
                starts before the horizon: the first retained id (the export starts there)"))),
        (status = 400, description = "A malformed parameter, named in `details`",
            body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
    )
)]
// Streamed in constant memory: a blocking reader fills pieces of ~64 KiB into a channel
// of 4, so at most a few pieces are in memory whatever the log's size.
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let selection = Selection::from_params(&params, &caller)?;
    let pruned_before =
        crate::retention::pruned_before(&state.store.horizon(), &state.store, selection.after);
    let scan = state
        .store
        .scan_after(selection.after)
        .map_err(ApiError::internal)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut piece = Vec::with_capacity(EXPORT_PIECE_BYTES + 4096);
        for event in scan {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    // Abort the body so the client sees a truncated transfer, not a short export.
                    tracing::error!(error = %e, "export aborted by a read error");
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
            if selection.before.is_some_and(|b| event.id >= b) {
                break;
            }
            if !selection.matches(&event) {
                continue;
            }
            piece.extend_from_slice(event.line.as_bytes());
            piece.push(b'\n');
            if piece.len() >= EXPORT_PIECE_BYTES {
                let full =
                    std::mem::replace(&mut piece, Vec::with_capacity(EXPORT_PIECE_BYTES + 4096));
                if tx.blocking_send(Ok(full.into())).is_err() {
                    return; // the client went away
                }
            }
        }
        if !piece.is_empty() {
            let _ = tx.blocking_send(Ok(piece.into()));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response();
    if let Some(id) = pruned_before
        && let Ok(value) = header::HeaderValue::from_str(&id)
    {
        response.headers_mut().insert(PRUNED_BEFORE_HEADER, value);
    }
    Ok(response)
}

/// The outcome of a server-side chain check: `ok` tells which form it has.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum VerifyResult {
    Ok(VerifyOk),
    Broken(VerifyBroken),
}

/// Every event in the range chains.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyOk {
    #[schema(value_type = openapi::True)]
    ok: bool,
    /// Events checked.
    checked: u64,
    /// The last event checked (the empty head when none was).
    head: HeadJson,
}

/// The first event in the range that does not chain.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyBroken {
    #[schema(value_type = openapi::False)]
    ok: bool,
    /// The first seq whose event does not chain.
    #[schema(minimum = 1)]
    first_bad_seq: u64,
    reason: String,
}

/// Re-derive the hash chain on the server
#[utoipa::path(
    get,
    path = "/v1/verify",
    tag = "events",
    security(("bearer" = []), ("query_token" = [])),
    params(
        ("from_seq" = Option<u64>, Query, minimum = 1,
            description = "First seq to check (inclusive; default the first retained seq), at most the head seq"),
        ("to_seq" = Option<u64>, Query, minimum = 1,
            description = "Last seq to check (inclusive; default the head seq), at most the head seq"),
    ),
    responses(
        (status = 200, description = "The result", body = Envelope<VerifyResult>),
        (status = 400, description = "A malformed or out-of-range parameter, named in `details`",
            body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token has a types allow-list (verify reads every \
            event; use inclusion proofs)", body = openapi::Error),
        (status = 410, description = "`from_seq` or `to_seq` was pruned (code `gone`)",
            body = openapi::Error),
    )
)]
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<axum::Json<Envelope<VerifyResult>>, ApiError> {
    caller.require(Role::Read)?;
    if caller.allowed_types.is_some() {
        return Err(ApiError::forbidden(
            "verify reads every event; a token with a types allow-list cannot use it (use inclusion proofs)",
        ));
    }
    let head = state.store.head();
    let first = state.store.horizon().first_seq();
    let seq_param = |name: &str, default: u64| -> Result<u64, ApiError> {
        match decimal_param(&params, name)? {
            None => Ok(default),
            Some(n) if (1..first).contains(&n) && n <= head.seq => {
                Err(gone(format!("seq {n}"), &state.store))
            }
            Some(n) if (1..=head.seq).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::bad_param(
                name,
                format!("must be an integer from 1 to the head seq ({})", head.seq),
            )),
        }
    };
    let from_seq = seq_param("from_seq", first)?;
    let to_seq = seq_param("to_seq", head.seq)?;
    if from_seq > to_seq && head.seq > 0 {
        return Err(ApiError::bad_param(
            "from_seq",
            "must not be greater than to_seq",
        ));
    }
    let store = state.store.clone();
    let result = tokio::task::spawn_blocking(move || verify_range(&store, from_seq, to_seq))
        .await
        .map_err(ApiError::internal)??;
    Ok(axum::Json(Envelope { data: result }))
}

fn verify_range(store: &Store, from_seq: u64, to_seq: u64) -> Result<VerifyResult, ApiError> {
    let horizon = store.horizon();
    let mut verifier = if from_seq > 1 && from_seq == horizon.first_seq() {
        // The horizon's prev_hash links to the last pruned event.
        let id = horizon
            .last_pruned_id
            .ok_or_else(|| ApiError::internal("the horizon has no id"))?;
        Verifier::after(horizon.pruned_through, id, horizon.last_pruned_hash)
    } else if from_seq > 1 {
        let before = store
            .get_by_seq(from_seq - 1)
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::internal(format!("event {} is missing", from_seq - 1)))?;
        let head = Head::of(&before).map_err(ApiError::internal)?;
        Verifier::after(before.seq, before.id, head.hash)
    } else {
        Verifier::new()
    };
    let mut last_event = None;
    for event in store.scan_from_seq(from_seq).map_err(ApiError::internal)? {
        let event = event.map_err(ApiError::internal)?;
        if event.seq > to_seq {
            break;
        }
        let broken = match crate::chain::inspect_line(event.line.as_bytes()) {
            Err(reason) => Some((event.seq, reason)),
            Ok(info) if info.seq != event.seq || info.id != event.id => Some((
                event.seq,
                "the stored index disagrees with the event's seq or id".into(),
            )),
            Ok(info) => verifier.push_info(&info).err().map(|b| (b.seq, b.reason)),
        };
        if let Some((first_bad_seq, reason)) = broken {
            return Ok(VerifyResult::Broken(VerifyBroken {
                ok: false,
                first_bad_seq,
                reason,
            }));
        }
        last_event = Some(event);
    }
    if verifier.checked() < to_seq.saturating_sub(from_seq) + u64::from(to_seq > 0) {
        return Ok(VerifyResult::Broken(VerifyBroken {
            ok: false,
            first_bad_seq: verifier.last().map_or(from_seq, |(s, _)| s + 1),
            reason: "events are missing from the log".into(),
        }));
    }
    let head = match &last_event {
        Some(e) => Head::of(e).map_err(ApiError::internal)?,
        None => Head::EMPTY,
    };
    Ok(VerifyResult::Ok(VerifyOk {
        ok: true,
        checked: verifier.checked(),
        head: head_json(&head),
    }))
}

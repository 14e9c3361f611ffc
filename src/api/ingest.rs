//! `POST /v1/events`: parse and validate on the request task (in parallel), then hand
//! the events to the single writer and answer once they are durable.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};
use ulid::Ulid;
use utoipa::ToSchema;

use super::openapi::{self, EventId, wire};
use super::read::{HeadJson, head_json};
use super::{ApiError, AppState, Envelope, ErrorCode};
use crate::auth::{Caller, Role};
use crate::event::{self, BodyFormat, NewEvent, RequestError};
use crate::store::Head;
use crate::writer::{AppendError, Appended, IdempotencyKey};

/// Bodies above this size are parsed on the blocking pool, off the async workers.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// What an append wrote (or, for a retried `Idempotency-Key`, what it wrote the first time).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Ingested {
    /// Events appended.
    #[schema(minimum = 1)]
    ingested: u64,
    #[schema(minimum = 1)]
    first_seq: u64,
    #[schema(minimum = 1)]
    last_seq: u64,
    /// The new events' ids, in order.
    #[schema(value_type = Vec<EventId>, min_items = 1)]
    ids: Vec<Ulid>,
    /// The head right after the last of them.
    head: HeadJson,
}

fn body_format(headers: &HeaderMap) -> Result<BodyFormat, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(BodyFormat::Json)
    } else if essence.eq_ignore_ascii_case("application/x-ndjson")
        || essence.eq_ignore_ascii_case("application/ndjson")
    {
        Ok(BodyFormat::Ndjson)
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "Content-Type must be application/json, application/x-ndjson or application/ndjson",
        ))
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::PayloadTooLarge,
        format!("the request body exceeds {limit} bytes"),
    )
}

pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let is_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if is_limit {
            too_large(limit)
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        }
    })
}

fn idempotency_key(
    headers: &HeaderMap,
    caller: &Caller,
    body: &[u8],
    format: BodyFormat,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request("Idempotency-Key must be 1–255 visible ASCII characters")
        })?;
    let mut hasher = Sha256::new();
    hasher.update([format as u8]);
    hasher.update(body);
    Ok(Some(IdempotencyKey {
        token_id: caller.token_id.clone(),
        key: key.to_string(),
        body_hash: hasher.finalize().into(),
    }))
}

fn parse(body: &[u8], format: BodyFormat, max_events: usize) -> Result<Vec<NewEvent>, ApiError> {
    event::parse_request(body, format, max_events).map_err(|e| match e {
        RequestError::Syntax(message) => ApiError::bad_request(message),
        RequestError::Invalid(problems) => ApiError::validation(problems),
        RequestError::TooMany { count, max } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("the request holds {count} events; at most {max} are allowed per request"),
        ),
    })
}

/// Append events
///
/// A request is atomic: every event in it is appended, in order, or none is and the
/// response lists every problem with its `index`. The answer comes once the events are
/// durable.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    security(("bearer" = []), ("query_token" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = "^[!-~]{1,255}$",
            description = "1–255 visible ASCII characters. A retry with the same key (per \
            token) and body returns the first response and appends nothing; the same key \
            with another body is a 422."),
    ),
    request_body(
        description = "One event object or `{\"events\": [...]}`; or NDJSON, one event object \
            per line (blank lines ignored). At most 10,000 events and 16 MiB by default.",
        content(
            (wire::IngestBody = "application/json"),
            (String = "application/x-ndjson"),
            (String = "application/ndjson"),
        )
    ),
    responses(
        (status = 201, description = "Appended and durable", body = Envelope<Ingested>),
        (status = 400, description = "Invalid JSON (`bad_request`, naming line and column), \
            invalid events (`validation_failed`, every problem in `details`), a malformed \
            Idempotency-Key, or no event", body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is read, or its types allow-list \
            excludes an event's type", body = openapi::Error),
        (status = 413, description = "Too many events or bytes for one request",
            body = openapi::Error),
        (status = 410, description = "Retried with an Idempotency-Key whose first \
            request's events retention has removed since; nothing appended",
            body = openapi::Error),
        (status = 415, description = "Content-Type is missing or not JSON or NDJSON",
            body = openapi::Error),
        (status = 422, description = "The Idempotency-Key was used with another body",
            body = openapi::Error),
    )
)]
pub async fn append(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let response = append_timed(state, caller, request).await;
    metrics::histogram!(crate::telemetry::INGEST_DURATION).record(started.elapsed());
    response
}

async fn append_timed(
    state: AppState,
    caller: Caller,
    request: Request,
) -> Result<Response, ApiError> {
    caller.require(Role::Ingest)?;
    let (parts, body) = request.into_parts();
    let format = body_format(&parts.headers)?;
    let body = read_body(body, &parts.headers, state.config.max_body_bytes).await?;
    let idempotency = idempotency_key(&parts.headers, &caller, &body, format)?;

    let max_events = state.config.max_events_per_request;
    let events = if body.len() <= INLINE_PARSE_BYTES {
        parse(&body, format, max_events)?
    } else {
        tokio::task::spawn_blocking(move || parse(&body, format, max_events))
            .await
            .map_err(ApiError::internal)??
    };
    if let Some(allowed) = &caller.allowed_types {
        let denied: Vec<_> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| !allowed.matches(&e.event_type))
            .map(|(i, e)| format!("event {i} has type \"{}\"", e.event_type))
            .collect();
        if !denied.is_empty() {
            return Err(ApiError::forbidden(format!(
                "this token may not append these types: {}",
                denied.join(", ")
            )));
        }
    }

    let appended = state
        .writer
        .append(events, idempotency)
        .await
        .map_err(|e| match e {
            AppendError::KeyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::IdempotencyKeyReused,
                e.to_string(),
            ),
            AppendError::Unavailable(_) => ApiError::internal(e),
            AppendError::ClusterUnavailable(_) => ApiError::unavailable(e.to_string()),
            AppendError::TooLarge(_) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                e.to_string(),
            ),
        })?;
    let ingested = match appended {
        Appended::New {
            first_seq,
            last_seq,
            ids,
            head,
        } => Ingested {
            ingested: ids.len() as u64,
            first_seq,
            last_seq,
            ids,
            head: head_json(&head),
        },
        Appended::Replayed {
            first_seq,
            last_seq,
        } => replayed(&state, first_seq, last_seq).await?,
    };
    Ok((StatusCode::CREATED, axum::Json(Envelope { data: ingested })).into_response())
}

/// Rebuilds the first response of an idempotent request from the log it wrote.
async fn replayed(state: &AppState, first_seq: u64, last_seq: u64) -> Result<Ingested, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let events = store
            .scan_from_seq(first_seq)
            .map_err(ApiError::internal)?
            .take_while(|e| e.as_ref().map_or(true, |e| e.seq <= last_seq))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::internal)?;
        let whole = events.first().is_some_and(|e| e.seq == first_seq)
            && events.last().is_some_and(|e| e.seq == last_seq);
        if !whole && store.horizon_after_reads().pruned_through >= first_seq {
            // Retention removed what the first request appended (keys outlive events
            // when the bounds keep less than a day): say so, append nothing.
            return Err(ApiError::gone(format!(
                "this Idempotency-Key's request was appended as seq {first_seq}..={last_seq}, \
                 and retention has removed those events since; nothing was appended"
            )));
        }
        let last = events
            .last()
            .filter(|_| whole)
            .ok_or_else(|| ApiError::internal("the events of an idempotent request are missing"))?;
        let head = Head::of(last).map_err(ApiError::internal)?;
        Ok(Ingested {
            ingested: events.len() as u64,
            first_seq,
            last_seq,
            ids: events.iter().map(|e| e.id).collect(),
            head: head_json(&head),
        })
    })
    .await
    .map_err(ApiError::internal)?
}

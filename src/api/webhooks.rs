//! `/v1/webhooks` (role `admin`, SPEC §7): create, list, show, change and delete
//! webhooks. Delivery itself is [`crate::webhook`]'s; the secret appears only in the
//! response to creation.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::ingest::read_body;
use super::openapi::{self, EventId, Timestamp, wire};
use super::{ApiError, AppState, Envelope};
use crate::auth::{Caller, Role};
use crate::webhook::{self, DeliveryState, View};

/// A webhook body is a few hundred bytes; this leaves room for long type lists.
const MAX_WEBHOOK_BODY_BYTES: usize = 64 * 1024;

/// A webhook and its delivery state. `secret` is present only in the response to its
/// creation.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Webhook)]
pub struct WebhookJson {
    #[schema(pattern = "^[0-9a-f]{16}$")]
    id: String,
    /// Where events are POSTed (http or https).
    url: String,
    #[schema(required = true)]
    name: Option<String>,
    /// Exact types and `prefix*` patterns; null for every type.
    #[schema(required = true)]
    types: Option<Vec<String>>,
    /// Only events with exactly this source; null for any.
    #[schema(required = true)]
    source: Option<String>,
    /// Most events per request.
    #[schema(minimum = 1, maximum = 1000)]
    batch: u32,
    /// `whsec_` + base64 of 24 random bytes: only in the response to creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^whsec_[A-Za-z0-9+/]{32}$", nullable = false)]
    secret: Option<String>,
    /// The id after which delivery continues (the zero ULID before the first event).
    #[schema(value_type = EventId)]
    cursor: String,
    state: DeliveryState,
    /// Events delivered so far (acknowledged with a 2xx).
    delivered: u64,
    /// Consecutive failed attempts.
    failures: u32,
    /// Why the last attempt failed, or why the webhook was paused; null otherwise.
    #[schema(required = true)]
    last_error: Option<String>,
    /// When the next retry is due; null when none is waiting.
    #[schema(value_type = Option<Timestamp>, required = true)]
    next_attempt_at: Option<String>,
    /// Events passed over because retention removed them first (SPEC §8).
    skipped: u64,
    #[schema(value_type = Timestamp)]
    created_at: String,
}

/// The JSON of a webhook (with its secret only when just created); also what
/// `cairn webhook show` prints offline.
pub fn webhook_json(view: View, secret: bool) -> WebhookJson {
    let r = view.record;
    WebhookJson {
        cursor: r.cursor().to_string(),
        secret: secret.then_some(r.secret),
        id: r.id,
        url: r.url,
        name: r.name,
        types: r.types,
        source: r.source,
        batch: r.batch,
        state: view.state,
        delivered: r.delivered,
        failures: view.failures,
        last_error: view.last_error,
        next_attempt_at: view.next_attempt_at,
        skipped: r.skipped,
        created_at: r.created_at,
    }
}

/// A body that is not a JSON object (one problem naming no member) is a `bad_request`;
/// invalid members are `validation_failed`, every one listed.
fn invalid(mut problems: Vec<crate::event::Problem>) -> ApiError {
    match problems.as_slice() {
        [only] if only.field.is_none() => ApiError::bad_request(problems.remove(0).message),
        _ => ApiError::validation(problems),
    }
}

/// The `{id}` of the path; one that does not decode (invalid UTF-8) names no webhook.
fn path_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|_| ApiError::not_found("no such webhook"))
}

/// Cluster mode: the shared map is out of reach (503, retry); anything else is ours.
fn webhook_error(e: webhook::WebhookError) -> ApiError {
    match e {
        webhook::WebhookError::Shared(e) => ApiError::unavailable(format!("{e}; retry")),
        other => ApiError::internal(other),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no webhook with id {id}"))
}

/// Create a webhook
///
/// Delivery starts at once, after `since` (default: the head now, so only new events).
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    tag = "webhooks",
    security(("bearer" = []), ("query_token" = [])),
    request_body(content = wire::NewWebhook, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; the secret is shown only here",
            body = Envelope<WebhookJson>),
        (status = 400, description = "Not a JSON object, or invalid members \
            (`validation_failed`, every problem in `details`)", body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is not admin", body = openapi::Error),
        (status = 413, description = "The body exceeds 64 KiB", body = openapi::Error),
        (status = 503, description = "Cluster mode: NATS is out of reach (`unavailable`); \
            retry", body = openapi::Error),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let (parts, body) = request.into_parts();
    let body = read_body(body, &parts.headers, MAX_WEBHOOK_BODY_BYTES).await?;
    let new = webhook::parse_new(&body).map_err(invalid)?;
    let record = state.webhooks.create(new).await.map_err(webhook_error)?;
    let data = webhook_json(View::of_record(record), true);
    Ok((StatusCode::CREATED, axum::Json(Envelope { data })).into_response())
}

/// List webhooks (never their secrets)
#[utoipa::path(
    get,
    path = "/v1/webhooks",
    tag = "webhooks",
    security(("bearer" = []), ("query_token" = [])),
    responses(
        (status = 200, description = "Every webhook, oldest first", body = Envelope<Vec<WebhookJson>>),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is not admin", body = openapi::Error),
    )
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let data: Vec<WebhookJson> = state
        .webhooks
        .list()
        .into_iter()
        .map(|v| webhook_json(v, false))
        .collect();
    Ok(axum::Json(Envelope { data }).into_response())
}

/// Show a webhook and its delivery state
#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    security(("bearer" = []), ("query_token" = [])),
    params(("id" = String, Path, description = "The webhook's id")),
    responses(
        (status = 200, description = "The webhook", body = Envelope<WebhookJson>),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is not admin", body = openapi::Error),
        (status = 404, description = "No such webhook", body = openapi::Error),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let id = path_id(id)?;
    let view = state
        .webhooks
        .view(&id)
        .await
        .ok_or_else(|| not_found(&id))?;
    Ok(axum::Json(Envelope {
        data: webhook_json(view, false),
    })
    .into_response())
}

/// Pause, resume or move a webhook
///
/// `paused: true` stops delivery after the request in flight; `false` resumes it (also
/// after a 410). `cursor` moves where delivery continues (any cursor of `since`), to
/// replay or to skip.
#[utoipa::path(
    patch,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    security(("bearer" = []), ("query_token" = [])),
    params(("id" = String, Path, description = "The webhook's id")),
    request_body(content = wire::WebhookPatch, content_type = "application/json"),
    responses(
        (status = 200, description = "Changed", body = Envelope<WebhookJson>),
        (status = 400, description = "Not a JSON object, or invalid members \
            (`validation_failed`, every problem in `details`)", body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is not admin", body = openapi::Error),
        (status = 404, description = "No such webhook", body = openapi::Error),
        (status = 413, description = "The body exceeds 64 KiB", body = openapi::Error),
        (status = 503, description = "Cluster mode: NATS is out of reach (`unavailable`); \
            retry", body = openapi::Error),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let id = path_id(id)?;
    let (parts, body) = request.into_parts();
    let body = read_body(body, &parts.headers, MAX_WEBHOOK_BODY_BYTES).await?;
    let patch = webhook::parse_patch(&body).map_err(invalid)?;
    let view = state
        .webhooks
        .patch(&id, patch)
        .await
        .map_err(webhook_error)?
        .ok_or_else(|| not_found(&id))?;
    Ok(axum::Json(Envelope {
        data: webhook_json(view, false),
    })
    .into_response())
}

/// Delete a webhook
///
/// Delivery stops at once (a request in flight is abandoned).
#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    security(("bearer" = []), ("query_token" = [])),
    params(("id" = String, Path, description = "The webhook's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is not admin", body = openapi::Error),
        (status = 404, description = "No such webhook", body = openapi::Error),
        (status = 503, description = "Cluster mode: NATS is out of reach (`unavailable`); \
            retry", body = openapi::Error),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let id = path_id(id)?;
    if !state.webhooks.delete(&id).await.map_err(webhook_error)? {
        return Err(not_found(&id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

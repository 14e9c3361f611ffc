//! `/v1/tokens` (role `admin`): create, list and revoke tokens. The secret appears only in
//! the response to its creation.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::ingest::read_body;
use super::openapi::{self, Timestamp, wire};
use super::{ApiError, AppState, Envelope};
use crate::auth::{AuthError, Caller, Role, TokenRecord, validate_new_token};
use crate::event::Problem;

/// A token creation body is a few hundred bytes; this leaves room for long allow-lists.
const MAX_TOKEN_BODY_BYTES: usize = 64 * 1024;

/// A token as listed: never its secret.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Token)]
pub struct TokenJson<'a> {
    /// Names the token (the middle part of the secret).
    #[schema(pattern = "^[0-9a-f]{16}$")]
    id: &'a str,
    name: &'a str,
    role: Role,
    /// The types allow-list; null for none.
    #[schema(required = true)]
    types: &'a Option<Vec<String>>,
    #[schema(value_type = Timestamp)]
    created_at: &'a str,
}

/// A token just created: the one response that holds its secret.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreatedToken)]
pub struct CreatedTokenJson<'a> {
    #[schema(pattern = "^[0-9a-f]{16}$")]
    id: &'a str,
    /// The secret, shown only here: `cairn_<id>_<48 hex digits>`.
    #[schema(pattern = "^cairn_[0-9a-f]{16}_[0-9a-f]{48}$")]
    token: &'a str,
    name: &'a str,
    role: Role,
    /// The types allow-list; null for none.
    #[schema(required = true)]
    types: &'a Option<Vec<String>>,
    #[schema(value_type = Timestamp)]
    created_at: &'a str,
}

fn token_json(record: &TokenRecord) -> TokenJson<'_> {
    TokenJson {
        id: &record.id,
        name: &record.name,
        role: record.role,
        types: &record.types,
        created_at: &record.created_at,
    }
}

fn problem(field: &str, message: impl Into<String>) -> Problem {
    Problem {
        index: None,
        field: Some(field.to_string()),
        message: message.into(),
    }
}

/// `{"role", "name", "types"}`, every problem listed.
fn parse_new_token(body: &[u8]) -> Result<(Role, String, Option<Vec<String>>), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(crate::ijson::syntax_error(body, &e).to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let mut problems = Vec::new();
    let role = match object.remove("role") {
        Some(Value::String(r)) => match r.as_str() {
            "read" => Some(Role::Read),
            "ingest" => Some(Role::Ingest),
            "admin" => Some(Role::Admin),
            _ => {
                problems.push(problem("role", "must be read, ingest or admin"));
                None
            }
        },
        _ => {
            problems.push(problem("role", "required: read, ingest or admin"));
            None
        }
    };
    let name = match object.remove("name") {
        Some(Value::String(n)) => Some(n),
        _ => {
            problems.push(problem("name", "required (a string)"));
            None
        }
    };
    let types = match object.remove("types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let strings: Option<Vec<String>> = items
                .into_iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect();
            if strings.is_none() {
                problems.push(problem("types", "must be an array of strings"));
            }
            strings
        }
        Some(_) => {
            problems.push(problem("types", "must be an array of strings, or null"));
            None
        }
    };
    for unknown in object.keys() {
        problems.push(problem(
            unknown,
            "unknown member (allowed: role, name, types)",
        ));
    }
    for e in validate_new_token(name.as_deref(), types.as_deref()) {
        problems.push(problem(e.field, e.message));
    }
    match (role, name) {
        (Some(role), Some(name)) if problems.is_empty() => Ok((role, name, types)),
        _ => Err(ApiError::validation(problems)),
    }
}

/// Create a token
#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "tokens",
    security(("bearer" = []), ("query_token" = [])),
    request_body(content = wire::NewToken, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; the secret is shown only here",
            body = Envelope<CreatedTokenJson>),
        (status = 400, description = "Not a JSON object (`bad_request`), or invalid members \
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
    let body = read_body(body, &parts.headers, MAX_TOKEN_BODY_BYTES).await?;
    let (role, name, types) = parse_new_token(&body)?;
    let (record, secret) = state
        .tokens
        .create_shared(role, &name, types)
        .await
        .map_err(token_error)?;
    tracing::info!(id = %record.id, role = record.role.as_str(), "token created");
    let created = CreatedTokenJson {
        id: &record.id,
        token: &secret,
        name: &record.name,
        role: record.role,
        types: &record.types,
        created_at: &record.created_at,
    };
    Ok((StatusCode::CREATED, axum::Json(Envelope { data: created })).into_response())
}

/// List tokens (never their secrets)
#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "tokens",
    security(("bearer" = []), ("query_token" = [])),
    responses(
        (status = 200, description = "Every token", body = Envelope<Vec<TokenJson>>),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is not admin", body = openapi::Error),
    )
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let records = state.tokens.list();
    let data: Vec<TokenJson<'_>> = records.iter().map(token_json).collect();
    Ok(axum::Json(Envelope { data }).into_response())
}

/// Revoke a token
///
/// Immediate: the next request with it gets 401 and its open streams close within a
/// second.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    tag = "tokens",
    security(("bearer" = []), ("query_token" = [])),
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is not admin", body = openapi::Error),
        (status = 404, description = "No such token", body = openapi::Error),
        (status = 503, description = "Cluster mode: NATS is out of reach (`unavailable`); \
            retry", body = openapi::Error),
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    // A path that does not decode (invalid UTF-8) names no token.
    let Ok(Path(id)) = id else {
        return Err(ApiError::not_found("no such token"));
    };
    let existed = state.tokens.revoke_shared(&id).await.map_err(token_error)?;
    if !existed {
        return Err(ApiError::not_found(format!("no token with id {id}")));
    }
    tracing::info!(%id, "token revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Cluster mode: the shared map is out of reach (503, retry); anything else is ours.
fn token_error(e: AuthError) -> ApiError {
    match e {
        AuthError::Shared(e) => ApiError::unavailable(format!("{e}; retry")),
        other => ApiError::internal(other),
    }
}

//! `/v1/tokens` (role `admin`): create, list and revoke tokens. The secret appears only in
//! the response to its creation.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use super::{ApiError, AppState};
use crate::auth::{Caller, Role, TokenRecord, validate_new_token};
use crate::event::Problem;

#[derive(Serialize)]
struct TokenJson<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
    name: &'a str,
    role: Role,
    types: &'a Option<Vec<String>>,
    created_at: &'a str,
}

fn token_json<'a>(record: &'a TokenRecord, secret: Option<&'a str>) -> TokenJson<'a> {
    TokenJson {
        id: &record.id,
        token: secret,
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

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let (role, name, types) = parse_new_token(&body)?;
    let tokens = state.tokens.clone();
    let (record, secret) = tokio::task::spawn_blocking(move || tokens.create(role, &name, types))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    tracing::info!(id = %record.id, role = record.role.as_str(), "token created");
    let body = serde_json::json!({ "data": token_json(&record, Some(&secret)) });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let records = state.tokens.list();
    let data: Vec<TokenJson<'_>> = records.iter().map(|r| token_json(r, None)).collect();
    Ok(axum::Json(serde_json::json!({ "data": data })).into_response())
}

pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let tokens = state.tokens.clone();
    let target = id.clone();
    let existed = tokio::task::spawn_blocking(move || tokens.revoke(&target))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    if !existed {
        return Err(ApiError::not_found(format!("no token with id {id}")));
    }
    tracing::info!(%id, "token revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

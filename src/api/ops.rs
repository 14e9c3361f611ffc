//! Operational routes and the 404/405 fallbacks.

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::json;

use super::read::head_json;
use super::{ApiError, AppState};

pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({
        "status": "ok",
        "head": head_json(&state.store.head()),
        "connections": state.streams.open(),
    }))
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    );
    e.allow = Some(if uri.path() == "/v1/events" {
        "GET, POST"
    } else {
        "GET"
    });
    e
}

//! Operational routes and the 404/405 fallbacks.

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
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

/// `GET /metrics`: Prometheus text, no token (SPEC §2).
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = crate::telemetry::render(
        &state.metrics,
        &state.store,
        state.streams.open(),
        &state.stream_stats,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// `GET /`: the dashboard, one self-contained page embedded in the binary (no token needed;
/// the page asks for one and sends it only to `/v1` routes).
pub async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../web/index.html"),
    )
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// The JSON body of a 405; axum adds the `Allow` header from the route itself.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

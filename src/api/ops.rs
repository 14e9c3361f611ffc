//! Operational routes and the 404/405 fallbacks.

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::read::{HeadJson, head_json};
use super::{ApiError, AppState, ErrorCode};

#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    status: HealthStatus,
    head: HeadJson,
    /// Open streams (SSE and WebSocket together).
    connections: usize,
}

/// Always `ok` while the server answers.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
}

/// Liveness and the chain head
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The server is up", body = Health))
)]
pub async fn healthz(State(state): State<AppState>) -> axum::Json<Health> {
    axum::Json(Health {
        status: HealthStatus::Ok,
        head: head_json(&state.store.head()),
        connections: state.streams.open(),
    })
}

/// Prometheus metrics
///
/// Prometheus text exposition format. No token needed.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text", body = String,
            content_type = "text/plain; version=0.0.4; charset=utf-8")
    )
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = crate::telemetry::render(
        &state.metrics,
        &state.store,
        state.streams.open(),
        &state.stream_stats,
        state.webhooks.lags(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// The dashboard
///
/// One self-contained page embedded in the binary (no token needed; the page takes one
/// from `?token=` or asks for it, and sends it only to `/v1` routes).
#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    responses(
        (status = 200, description = "The dashboard page", body = String,
            content_type = "text/html; charset=utf-8")
    )
)]
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
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

//! Operational routes and the 404/405 fallbacks.

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
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
    /// Cluster mode only (SPEC §6): this node's place in the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<crate::cluster::ClusterView>,
}

/// `ok` while the server answers; in cluster mode, `starting` until the node has
/// caught up with the cluster's log and `unavailable` while it cannot reach NATS; in any
/// mode `unavailable` once the log stopped taking appends (disk failure). Both with
/// HTTP 503.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
    Starting,
    Unavailable,
}

/// Liveness, readiness and the chain head
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "The server is up (and in cluster mode, ready)",
            body = Health),
        (status = 503, description = "Cluster mode: this node is catching up with the \
            cluster's log (`starting`) or cannot reach NATS (`unavailable`). Any mode: \
            the log stopped taking appends after a disk failure (`unavailable`). It still \
            serves what it has", body = Health,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Response {
    use crate::cluster::Readiness;
    // A log that stopped taking appends (its disk failed) is not healthy on a single
    // node either: a load balancer should send writers elsewhere.
    let readiness = match &state.cluster {
        Some(cluster) => Some(cluster.readiness()),
        None => state.writer.failure().map(|_| Readiness::Unavailable),
    };
    let status = match readiness {
        None | Some(Readiness::Ready) => HealthStatus::Ok,
        Some(Readiness::Starting) => HealthStatus::Starting,
        Some(Readiness::Unavailable) => HealthStatus::Unavailable,
    };
    let body = axum::Json(Health {
        status,
        head: head_json(&state.store.head()),
        connections: state.streams.open(),
        cluster: state.cluster.as_ref().map(|c| c.view()),
    });
    match readiness {
        None | Some(Readiness::Ready) => body.into_response(),
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            body,
        )
            .into_response(),
    }
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

//! The HTTP API (SPEC §2): an axum router over the store, the writer and the tokens.
//! Handlers never touch sled: they read through [`Store`] and append through
//! [`Writer`]. Blocking reads (sled is synchronous) run on the blocking pool.

mod auth;
mod error;
mod ingest;
mod openapi;
mod ops;
mod proofs;
mod read;
mod retention;
mod stream;
mod tokens;
mod webhooks;
mod websocket;

use std::sync::Arc;

use axum::Router;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorCode};
pub use read::PRUNED_BEFORE_HEADER;
pub use stream::{StreamConfig, StreamSlots};
pub use webhooks::{WebhookJson, webhook_json};

use crate::auth::Tokens;
use crate::checkpoint::Checkpointer;
use crate::store::Store;
use crate::subscription::StreamStats;
use crate::writer::Writer;

/// Limits and switches the API enforces.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub auth: bool,
    pub max_events_per_request: usize,
    pub max_body_bytes: usize,
    /// `--archive`: where pruned events are written first.
    pub archive: Option<std::path::PathBuf>,
}

/// Everything a handler may use.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub writer: Writer,
    /// Cluster mode (SPEC §6): readiness, role and the catch-up wait for streams.
    pub cluster: Option<Arc<crate::cluster::Status>>,
    pub tokens: Arc<Tokens>,
    pub config: Arc<ApiConfig>,
    /// Open streams (SSE and WebSocket), for `/healthz` and `--max-connections`.
    pub streams: Arc<StreamSlots>,
    pub stream: StreamConfig,
    pub stream_stats: Arc<StreamStats>,
    pub checkpoints: Arc<Checkpointer>,
    /// Webhooks and their delivery tasks.
    pub webhooks: Arc<crate::webhook::Webhooks>,
    /// Renders `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// `{"data": …}`: the body of every JSON success of a `/v1` route (SPEC §2).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope<T> {
    pub data: T,
}

pub fn router(state: AppState) -> Router {
    let (routes, _document) = routes().split_for_parts();
    routes
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// Every route. `routes!` takes each handler's path and methods from its
/// `#[utoipa::path]` and adds its operation to the OpenAPI document, so what is served
/// and what `GET /v1/openapi.json` describes are this one list (see [`openapi`]). Add
/// routes only this way: a plain `.route(...)` would be served undocumented.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(ops::dashboard))
        .routes(routes!(ingest::append, read::query))
        .routes(routes!(stream::stream))
        .routes(routes!(websocket::events_ws))
        .routes(routes!(read::event_by_id))
        .routes(routes!(read::head))
        .routes(routes!(read::export))
        .routes(routes!(read::verify))
        .routes(routes!(proofs::checkpoint))
        .routes(routes!(proofs::checkpoint_key))
        .routes(routes!(proofs::inclusion))
        .routes(routes!(proofs::consistency))
        .routes(routes!(tokens::create, tokens::list))
        .routes(routes!(tokens::revoke))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::show, webhooks::update, webhooks::delete))
        .routes(routes!(retention::prune))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::metrics))
        .routes(routes!(openapi::openapi_json))
}

/// Logs each request at debug level. Tokens never reach the log: a `?token=` in the URI
/// is replaced before it is written (and `Authorization` is never logged).
async fn log_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().clone();
    let uri = redact_token(request.uri());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    tracing::debug!(
        %method,
        uri,
        status = response.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}

/// The path and query with the value of every `token` parameter replaced.
pub fn redact_token(uri: &axum::http::Uri) -> String {
    let Some(query) = uri.query() else {
        return uri.path().to_string();
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| {
            // Decode the key as authentication does, so `tok%65n=` is caught too.
            let key = serde_urlencoded::from_str::<Vec<(String, String)>>(pair)
                .ok()
                .and_then(|pairs| pairs.into_iter().next())
                .map(|(key, _)| key);
            if key.as_deref() == Some("token") {
                "token=REDACTED".to_string()
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{}?{}", uri.path(), redacted.join("&"))
}

#[cfg(test)]
mod tests {
    use super::redact_token;

    #[test]
    fn token_values_are_redacted_from_logged_uris() {
        let uri: axum::http::Uri = "/v1/events/stream?since=earliest&token=cairn_ab_secret&tok%65n=cairn_cd_secret2&types=a"
            .parse()
            .expect("uri");
        let logged = redact_token(&uri);
        assert!(!logged.contains("secret"), "{logged}");
        assert_eq!(
            logged,
            "/v1/events/stream?since=earliest&token=REDACTED&token=REDACTED&types=a"
        );
    }
}

//! The HTTP API (SPEC §2): an axum router over the store, the writer and the tokens.
//! Handlers never touch sled: they read through [`Store`] and append through
//! [`Writer`]. Blocking reads (sled is synchronous) run on the blocking pool.

mod auth;
mod error;
mod ingest;
mod ops;
mod proofs;
mod read;
mod stream;
mod tokens;
mod websocket;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

pub use error::ApiError;
pub use stream::{StreamConfig, StreamSlots};

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
}

/// Everything a handler may use.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub writer: Writer,
    pub tokens: Arc<Tokens>,
    pub config: Arc<ApiConfig>,
    /// Open streams (SSE and WebSocket), for `/healthz` and `--max-connections`.
    pub streams: Arc<StreamSlots>,
    pub stream: StreamConfig,
    pub stream_stats: Arc<StreamStats>,
    pub checkpoints: Arc<Checkpointer>,
    /// Renders `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(ops::dashboard))
        .route("/v1/events", post(ingest::append).get(read::query))
        .route("/v1/events/stream", get(stream::stream))
        .route("/v1/events/ws", get(websocket::events_ws))
        .route("/v1/events/{id}", get(read::event_by_id))
        .route("/v1/head", get(read::head))
        .route("/v1/export", get(read::export))
        .route("/v1/verify", get(read::verify))
        .route("/v1/checkpoint", get(proofs::checkpoint))
        .route("/v1/checkpoint/key", get(proofs::checkpoint_key))
        .route("/v1/proof/inclusion", get(proofs::inclusion))
        .route("/v1/proof/consistency", get(proofs::consistency))
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
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

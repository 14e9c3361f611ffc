//! The HTTP API (SPEC §2): an axum router over the store, the writer and the tokens.
//! Handlers never touch sled: they read through [`Store`] and append through
//! [`Writer`]. Blocking reads (sled is synchronous) run on the blocking pool.

mod auth;
mod error;
mod ingest;
mod ops;
mod read;
mod stream;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

pub use error::ApiError;
pub use stream::{StreamConfig, StreamSlots};

use crate::auth::Tokens;
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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(ingest::append).get(read::query))
        .route("/v1/events/stream", get(stream::stream))
        .route("/v1/events/{id}", get(read::event_by_id))
        .route("/v1/head", get(read::head))
        .route("/v1/export", get(read::export))
        .route("/v1/verify", get(read::verify))
        .route("/healthz", get(ops::healthz))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state)
}

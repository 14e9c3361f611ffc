//! `POST /v1/admin/prune` (role `admin`): the manual prune of SPEC §8 on a running server.

use std::collections::HashMap;

use axum::extract::{Query, State};

use super::openapi;
use super::{ApiError, AppState, Envelope};
use crate::auth::{Caller, Role};
use crate::retention::{self, Outcome};

/// Prune by hand
///
/// Removes the events that `since=before` would exclude (a ULID: ids up to and including
/// it; an RFC 3339 time: events ingested before it), in whole storage chunks, except what
/// the rules keep (events not yet covered by a signed checkpoint, the last event, and the
/// rest of a chunk that holds newer events), which `kept` names. With `--archive` the
/// events are archived first.
#[utoipa::path(
    post,
    path = "/v1/admin/prune",
    tag = "admin",
    security(("bearer" = []), ("query_token" = [])),
    params(("before" = String, Query,
        description = "A ULID or an RFC 3339 time (`earliest` is refused)")),
    responses(
        (status = 200, description = "What was removed and what was kept",
            body = Envelope<Outcome>),
        (status = 400, description = "A missing or malformed `before`, or a cluster node \
            (in cluster mode the horizon is the cluster's decision, from the \
            --retain-* bounds)", body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 403, description = "The token's role is not admin", body = openapi::Error),
    )
)]
pub async fn prune(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<axum::Json<Envelope<Outcome>>, ApiError> {
    caller.require(Role::Admin)?;
    if state.cluster.is_some() {
        return Err(ApiError::bad_request(
            "a cluster node cannot be pruned by hand: in cluster mode retention is one decision \
             for the whole cluster, taken by the sequencer from its --retain-* bounds (SPEC §8)",
        ));
    }
    let before = params
        .get("before")
        .ok_or_else(|| ApiError::bad_param("before", "is required"))?
        .clone();
    let store = state.store.clone();
    let covered = state.checkpoints.latest().size;
    let archive = state.config.archive.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let (target, max_id) = retention::before_cursor(&store, &before)
            .map_err(|m| ApiError::bad_param("before", m.trim_start_matches("--before ")))?;
        retention::prune_to(&store, target, max_id, covered, archive.as_deref())
            .map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(axum::Json(Envelope { data: outcome }))
}

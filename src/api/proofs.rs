//! Checkpoints and Merkle proofs (SPEC §3): the newest signed checkpoint, its verifier
//! key, and inclusion and consistency proofs answered from stored tree hashes.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::openapi::{self, Hash};
use super::read::decimal_param;
use super::{ApiError, AppState, Envelope};
use crate::auth::{Caller, Role};
use crate::merkle::{self, ProofError};

const TEXT: &str = "text/plain; charset=utf-8";

/// The newest signed checkpoint
///
/// A C2SP `tlog-checkpoint` (origin line, tree size, base64 root hash) as a C2SP
/// `signed-note` with one Ed25519 signature line.
#[utoipa::path(
    get,
    path = "/v1/checkpoint",
    tag = "proofs",
    security(("bearer" = []), ("query_token" = [])),
    responses(
        (status = 200, description = "The signed note", body = String,
            content_type = "text/plain; charset=utf-8"),
        (status = 401, description = "No valid token", body = openapi::Error),
    )
)]
pub async fn checkpoint(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let latest = state.checkpoints.latest();
    Ok(([(header::CONTENT_TYPE, TEXT)], latest.note.clone()).into_response())
}

/// The checkpoint verifier key
///
/// In signed-note form, `name+keyid+base64`, and a newline.
#[utoipa::path(
    get,
    path = "/v1/checkpoint/key",
    tag = "proofs",
    security(("bearer" = []), ("query_token" = [])),
    responses(
        (status = 200, description = "The verifier key", body = String,
            content_type = "text/plain; charset=utf-8"),
        (status = 401, description = "No valid token", body = openapi::Error),
    )
)]
pub async fn checkpoint_key(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let key = format!("{}\n", state.checkpoints.verifier_key());
    Ok(([(header::CONTENT_TYPE, TEXT)], key).into_response())
}

/// An RFC 6962 inclusion proof (SPEC §3).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    /// `seq − 1`.
    leaf_index: u64,
    #[schema(minimum = 1)]
    tree_size: u64,
    /// The audit path, leaf to root (O(log n) hashes).
    #[schema(value_type = Vec<Hash>)]
    hashes: Vec<String>,
}

/// An RFC 6962 consistency proof (SPEC §3).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    #[schema(minimum = 1)]
    from: u64,
    #[schema(minimum = 1)]
    to: u64,
    /// Empty when `from` = `to`.
    #[schema(value_type = Vec<Hash>)]
    hashes: Vec<String>,
}

/// Proof that an event is in the tree
///
/// The proof that event `seq` is leaf `seq − 1` of the tree of `size` leaves.
#[utoipa::path(
    get,
    path = "/v1/proof/inclusion",
    tag = "proofs",
    security(("bearer" = []), ("query_token" = [])),
    params(
        ("seq" = u64, Query, minimum = 1, description = "The event's seq, at most `size`"),
        ("size" = Option<u64>, Query, minimum = 1,
            description = "The tree size, at most the head seq (default: the newest checkpoint's)"),
    ),
    responses(
        (status = 200, description = "The proof", body = Envelope<InclusionProof>),
        (status = 400, description = "A missing, malformed or out-of-range parameter, named \
            in `details`", body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 404, description = "The event is outside the token's types allow-list",
            body = openapi::Error),
        (status = 410, description = "The event was pruned by retention (code `gone`)",
            body = openapi::Error),
    )
)]
pub async fn inclusion(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<axum::Json<Envelope<InclusionProof>>, ApiError> {
    caller.require(Role::Read)?;
    let seq = required(&params, "seq")?;
    let head = state.store.head().seq;
    let size = match decimal_param(&params, "size")? {
        Some(size) => size,
        None => state.checkpoints.latest().size,
    };
    if seq == 0 || seq > size {
        return Err(ApiError::bad_param(
            "seq",
            format!(
                "must be in 1..=size ({size}); a newer event is covered by the next checkpoint"
            ),
        ));
    }
    if size > head {
        return Err(ApiError::bad_param(
            "size",
            format!("must not exceed the head ({head})"),
        ));
    }
    let horizon = state.store.horizon();
    if seq <= horizon.pruned_through {
        return Err(ApiError::gone(format!(
            "event seq {seq} was pruned by retention; the log now starts at seq {}",
            horizon.first_seq()
        )));
    }
    let store = state.store.clone();
    let allowed = caller.allowed_types.clone();
    let hashes = tokio::task::spawn_blocking(move || {
        // An event outside the caller's allow-list does not exist for it.
        if let Some(allowed) = allowed {
            let visible = store
                .get_by_seq(seq)
                .map_err(ApiError::internal)?
                .is_some_and(|e| allowed.matches(&e.event_type));
            if !visible {
                return Err(ApiError::not_found(format!("no event with seq {seq}")));
            }
        }
        merkle::inclusion_proof(&*store, seq - 1, size).map_err(proof_error)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(axum::Json(Envelope {
        data: InclusionProof {
            leaf_index: seq - 1,
            tree_size: size,
            hashes: hashes.iter().map(|h| hex::encode(h.0)).collect(),
        },
    }))
}

/// Proof that the log only grew
///
/// The proof that the tree of `from` leaves is a prefix of the tree of `to` leaves
/// (1 ≤ from ≤ to ≤ head).
#[utoipa::path(
    get,
    path = "/v1/proof/consistency",
    tag = "proofs",
    security(("bearer" = []), ("query_token" = [])),
    params(
        ("from" = u64, Query, minimum = 1, description = "The older tree size, at most `to`"),
        ("to" = u64, Query, minimum = 1, description = "The newer tree size, at most the head seq"),
    ),
    responses(
        (status = 200, description = "The proof", body = Envelope<ConsistencyProof>),
        (status = 400, description = "A missing, malformed or out-of-range parameter, named \
            in `details`", body = openapi::Error),
        (status = 401, description = "No valid token", body = openapi::Error),
        (status = 410, description = "`from` is not a signed checkpoint's size and the tree \
            nodes it needs were pruned (code `gone`)", body = openapi::Error),
    )
)]
pub async fn consistency(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<axum::Json<Envelope<ConsistencyProof>>, ApiError> {
    caller.require(Role::Read)?;
    let from = required(&params, "from")?;
    let to = required(&params, "to")?;
    let head = state.store.head().seq;
    if from == 0 || from > to {
        return Err(ApiError::bad_param(
            "from",
            format!("must be in 1..=to ({to})"),
        ));
    }
    if to > head {
        return Err(ApiError::bad_param(
            "to",
            format!("must not exceed the head ({head})"),
        ));
    }
    let store = state.store.clone();
    let hashes = tokio::task::spawn_blocking(move || merkle::consistency_proof(&*store, from, to))
        .await
        .map_err(ApiError::internal)?
        .map_err(proof_error)?;
    Ok(axum::Json(Envelope {
        data: ConsistencyProof {
            from,
            to,
            hashes: hashes.iter().map(|h| hex::encode(h.0)).collect(),
        },
    }))
}

/// A required decimal parameter.
fn required(params: &HashMap<String, String>, name: &str) -> Result<u64, ApiError> {
    decimal_param(params, name)?.ok_or_else(|| ApiError::bad_param(name, "is required"))
}

fn proof_error(e: ProofError) -> ApiError {
    match e {
        ProofError::OutOfRange(m) => ApiError::bad_request(m),
        ProofError::Store(crate::store::StoreError::Pruned(m)) => ApiError::gone(m),
        e => ApiError::internal(e),
    }
}

//! Checkpoints and Merkle proofs (SPEC §3): the newest signed checkpoint, its verifier
//! key, and inclusion and consistency proofs answered from stored tree hashes.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::read::decimal_param;
use super::{ApiError, AppState};
use crate::auth::{Caller, Role};
use crate::merkle::{self, ProofError};

const TEXT: &str = "text/plain; charset=utf-8";

pub async fn checkpoint(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let latest = state.checkpoints.latest();
    Ok(([(header::CONTENT_TYPE, TEXT)], latest.note.clone()).into_response())
}

pub async fn checkpoint_key(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let key = format!("{}\n", state.checkpoints.verifier_key());
    Ok(([(header::CONTENT_TYPE, TEXT)], key).into_response())
}

/// `?seq=N[&size=M]`: the proof that event N is leaf N − 1 of the tree of M leaves
/// (default: the newest checkpoint's size).
pub async fn inclusion(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
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
    Ok(axum::Json(json!({"data": {
        "leaf_index": seq - 1,
        "tree_size": size,
        "hashes": hashes.iter().map(|h| hex::encode(h.0)).collect::<Vec<_>>(),
    }}))
    .into_response())
}

/// `?from=M&to=N`: the proof that the tree of M leaves is a prefix of the tree of N.
pub async fn consistency(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
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
    Ok(axum::Json(json!({"data": {
        "from": from,
        "to": to,
        "hashes": hashes.iter().map(|h| hex::encode(h.0)).collect::<Vec<_>>(),
    }}))
    .into_response())
}

/// A required decimal parameter.
fn required(params: &HashMap<String, String>, name: &str) -> Result<u64, ApiError> {
    decimal_param(params, name)?.ok_or_else(|| ApiError::bad_param(name, "is required"))
}

fn proof_error(e: ProofError) -> ApiError {
    match e {
        ProofError::OutOfRange(m) => ApiError::bad_request(m),
        e => ApiError::internal(e),
    }
}

//! The `Caller` extractor: every `/v1` handler names the role it needs by taking one.
//! Authentication is an extractor rather than a middleware so that unknown routes (404)
//! and wrong methods (405) answer the same with or without a token.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::auth::{Caller, Role};

/// The token from `Authorization: Bearer …` (preferred) or `?token=…`.
fn presented_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    let query = parts.uri.query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !state.config.auth {
            return Ok(Caller::anonymous_admin());
        }
        presented_token(parts)
            .and_then(|t| state.tokens.authenticate(&t))
            .ok_or_else(ApiError::unauthorized)
    }
}

impl Caller {
    /// 403 unless this caller's role includes `needed`.
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this route needs a token with the {} role; this token has {}",
                needed.as_str(),
                self.role.as_str()
            )))
        }
    }
}

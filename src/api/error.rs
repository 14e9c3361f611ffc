//! The one error body every route returns (SPEC §2):
//! `{"error": "...", "code": "...", "details": [...]}` with the matching status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::event::Problem;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub details: Vec<Problem>,
}

/// Every error code the API sends, so the OpenAPI document lists them exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[cfg_attr(test, derive(serde::Deserialize))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    ValidationFailed,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    IdempotencyKeyReused,
    TooManyConnections,
    WebsocketRequired,
    Gone,
    /// Cluster mode (SPEC §6): the log cannot be reached or this node has not caught up.
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code as sent (and as the `code` label of `cairn_requests_rejected_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::WebsocketRequired => "websocket_required",
            ErrorCode::Gone => "gone",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    /// A malformed query parameter, named in the message and in `details`.
    pub fn bad_param(name: &str, message: impl std::fmt::Display) -> Self {
        let mut e = Self::bad_request(format!("parameter {name} {message}"));
        e.details.push(Problem {
            index: None,
            field: Some(name.to_string()),
            message: message.to_string(),
        });
        e
    }

    pub fn validation(details: Vec<Problem>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::ValidationFailed,
            "validation failed",
        );
        e.details = details;
        e
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "a valid token is required (Authorization: Bearer <token>, or ?token=<token>)",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// Pruned by retention (SPEC §8).
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, ErrorCode::Gone, message)
    }

    /// 503 with `Retry-After` (cluster mode: NATS unreachable, or not caught up).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            message,
        )
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!(error = %message, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("internal error: {message}"),
        )
    }
}

/// The body of every error response. No other member is ever sent.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Error)]
pub struct Body<'a> {
    /// `"error"` on a WebSocket, where errors share the connection with other messages
    /// (never in an HTTP response, so the document leaves it out).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    kind: Option<&'static str>,
    /// What went wrong, for people.
    error: &'a str,
    /// What went wrong, for programs.
    code: ErrorCode,
    /// Each problem found, where that helps (every invalid event of an ingest request,
    /// the malformed parameter); absent otherwise.
    #[serde(skip_serializing_if = "<[Problem]>::is_empty")]
    #[schema(min_items = 1)]
    details: &'a [Problem],
}

impl ApiError {
    fn body(&self, kind: Option<&'static str>) -> Body<'_> {
        metrics::counter!(crate::telemetry::REQUESTS_REJECTED, "code" => self.code.as_str())
            .increment(1);
        Body {
            kind,
            error: &self.message,
            code: self.code,
            details: &self.details,
        }
    }

    /// The error as a WebSocket text message: the usual body plus `"type":"error"`.
    pub fn to_message(&self) -> String {
        serde_json::to_string(&self.body(Some("error")))
            .unwrap_or_else(|_| r#"{"type":"error","error":"internal","code":"internal"}"#.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Every 503 says when to come back: the cluster's log is usually back (or this
        // node caught up) within a second; a stream slot takes longer to free.
        let retry_after = match self.code {
            ErrorCode::Unavailable => Some("1"),
            ErrorCode::TooManyConnections => Some("2"),
            _ => None,
        };
        let mut response = (self.status, axum::Json(self.body(None))).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(seconds),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use utoipa::PartialSchema;
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::Schema;

    use super::ErrorCode;

    /// The document's list of codes (from serde's names) is what is sent (`as_str`).
    #[test]
    fn documented_codes_are_the_codes_sent() {
        let RefOr::T(Schema::Object(schema)) = ErrorCode::schema() else {
            panic!("ErrorCode is not an inline string schema");
        };
        let names = schema.enum_values.expect("an enum of codes");
        for name in names {
            let code: ErrorCode = serde_json::from_value(name.clone()).expect("a code");
            assert_eq!(Some(code.as_str()), name.as_str());
            assert_eq!(serde_json::to_value(code).expect("serialize"), name);
        }
    }
}

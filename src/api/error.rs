//! The one error body every route returns (SPEC §2):
//! `{"error": "...", "code": "...", "details": [...]}` with the matching status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::event::Problem;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<Problem>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
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
            "validation_failed",
            "validation failed",
        );
        e.details = details;
        e
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid token is required (Authorization: Bearer <token>, or ?token=<token>)",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!(error = %message, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {message}"),
        )
    }
}

#[derive(Serialize)]
struct Body<'a> {
    /// `"error"` on a WebSocket, where errors share the connection with other messages.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    error: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "<[Problem]>::is_empty")]
    details: &'a [Problem],
}

impl ApiError {
    fn body(&self, kind: Option<&'static str>) -> Body<'_> {
        metrics::counter!(crate::telemetry::REQUESTS_REJECTED, "code" => self.code).increment(1);
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
        (self.status, axum::Json(self.body(None))).into_response()
    }
}

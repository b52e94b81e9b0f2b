//! What every API handler answers with when it fails: an HTTP status and a JSON
//! [`ApiError`] (`code`, `message`, `hint`), and the small helpers the handlers share. A
//! service's [`crate::service::Error`] becomes one here: its kind picks the status, its code
//! and message pass through.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_api::v1::ApiError;

/// The errors any API route may answer with, each a JSON [`ApiError`]; listed once here and
/// named in every route's `responses(...)`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description for the OpenAPI document, never constructed
pub enum ApiErrors {
    #[response(status = 400, description = "error")]
    BadRequest(ApiError),
    #[response(status = 401, description = "error")]
    Unauthorized(ApiError),
    #[response(status = 403, description = "error")]
    Forbidden(ApiError),
    #[response(status = 404, description = "error")]
    NotFound(ApiError),
}

pub struct Error(pub StatusCode, pub ApiError);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.1.message)?;
        match &self.1.hint {
            Some(h) => write!(f, " ({h})"),
            None => Ok(()),
        }
    }
}

impl Error {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>, hint: Option<&str>) -> Self {
        Error(status, ApiError { code: code.into(), message: message.into(), hint: hint.map(String::from) })
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<crate::service::Error> for Error {
    fn from(e: crate::service::Error) -> Self {
        use crate::service::Kind;
        let status = match e.kind {
            Kind::Invalid => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict | Kind::Unavailable => StatusCode::CONFLICT,
            Kind::Unacceptable => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::Internal => {
                tracing::error!(error = %e.message, "internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Error(status, ApiError { code: e.code.into(), message: e.message, hint: e.hint })
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = %format!("{e:#}"), "internal error");
        Error::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{e:#}"), None)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A JSON request body, or a 400 `bad_request` saying what was wrong with it (and how to send
/// it right).
pub fn json_body<T>(body: std::result::Result<Json<T>, JsonRejection>, hint: Option<&str>) -> Result<T> {
    body.map(|Json(t)| t).map_err(|e| Error::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text(), hint))
}

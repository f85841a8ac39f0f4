//! API errors: a bounded set of kinds, each mapped to one status code by an exhaustive match,
//! answered as `{"kind": "...", "message": "..."}`. Details of 5xx go to the log, not the client.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hiveseed_proto::api::{ApiError, ErrorKind};

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(ErrorKind::Internal, "internal error; see the seeder log")
    }
}

impl<E: Into<anyhow::Error>> From<E> for Error {
    fn from(e: E) -> Self {
        Error::internal(format!("{:#}", e.into()))
    }
}

pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::BadToken => StatusCode::UNAUTHORIZED,
        ErrorKind::BadCsr => StatusCode::BAD_REQUEST,
        ErrorKind::SourceMismatch => StatusCode::FORBIDDEN,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::Revoked => StatusCode::FORBIDDEN,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::AttestationFailed => StatusCode::FORBIDDEN,
        ErrorKind::AttestationUnavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = status_of(self.kind);
        let body = ApiError {
            kind: self.kind,
            message: self.message,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if matches!(
            self.kind,
            ErrorKind::RateLimited | ErrorKind::Busy | ErrorKind::AttestationUnavailable
        ) {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("2"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, Error>;

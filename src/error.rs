//! One error type for the whole API surface, rendered as a Matrix error body
//! (`{"errcode": "...", "error": "..."}`) with the status code the spec prescribes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// A Matrix API error. Build it with the constructors below; they encode the spec's pairing of
/// status codes and `errcode`s so that handlers cannot get it wrong.
#[derive(Debug)]
pub struct Error {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// Extra top-level fields (`soft_logout`, `retry_after_ms`, UIA `flows`...).
    pub extra: Map<String, Value>,
}

pub type ApiResult<T> = Result<T, Error>;

impl Error {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self { status, errcode, message: message.into(), extra: Map::new() }
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", msg)
    }
    pub fn bad_json(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", msg)
    }
    pub fn not_json(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", msg)
    }
    pub fn invalid_param(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", msg)
    }
    pub fn invalid_signature(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_SIGNATURE", msg)
    }
    pub fn missing_param(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", msg)
    }
    pub fn missing_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token")
    }
    pub fn unknown_token(soft_logout: bool) -> Self {
        let msg = if soft_logout { "Access token has expired" } else { "Unrecognised access token" };
        Self::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", msg).with("soft_logout", json!(soft_logout))
    }
    pub fn unrecognized(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", msg)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Method not allowed for this endpoint")
    }
    pub fn too_large(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", msg)
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", "Too many requests")
            .with("retry_after_ms", json!(retry_after_ms))
    }
    pub fn user_in_use() -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken")
    }
    pub fn invalid_username(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", msg)
    }
    pub fn user_deactivated() -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_USER_DEACTIVATED", "This account has been deactivated")
    }
    pub fn weak_password(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD", msg)
    }
    pub fn unknown(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", msg)
    }
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "Internal server error")
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.errcode, self.message)
    }
}

impl std::error::Error for Error {}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut body = self.extra;
        // A UIA challenge without a failure carries no errcode (spec: only flows/session/...).
        if !self.errcode.is_empty() {
            body.insert("errcode".into(), Value::String(self.errcode.into()));
            body.insert("error".into(), Value::String(self.message));
        }
        let retry = body.get("retry_after_ms").and_then(Value::as_u64);
        let mut resp = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(ms) = retry {
            // Round up: a client retrying after Retry-After seconds must not be refused again.
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Database failures are logged in full and shown to clients as an opaque 500.
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => {
                tracing::error!("database pool exhausted");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "Server is overloaded, try again")
            }
            e => {
                tracing::error!(error = %e, "database error");
                Self::internal()
            }
        }
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = format!("{e:#}"), "internal error");
        Self::internal()
    }
}

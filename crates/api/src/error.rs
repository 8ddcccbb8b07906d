//! The one place where errors become HTTP statuses and JSON bodies.
//!
//! Body: `{"error": message, "detail": message, "error_type": stable_tag, "field": name?}`
//! (`detail` is where FastAPI servers, Tinker's among them, put the message, and where the SDK's
//! CLI reads it); the tag is also the metric label. 5xx bodies carry no internals (details go to
//! the log).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraloom_engine::EngineError;
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// From the engine.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Missing or unknown API key.
    #[error("{0}")]
    Unauthorized(String),
    /// An access token that is not valid (altered, expired, or its key revoked): the client
    /// should exchange its key for a new one (a 401 marked `invalid_token`, RFC 6750).
    #[error("{0}")]
    InvalidToken(String),
    /// A body that could not be parsed; names the problem.
    #[error("{0}")]
    BadRequest(String),
    /// A body over the size limit.
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    /// Something the caller may not do: follow a download link that is not valid (forged,
    /// altered or expired), revoke an operator's API key.
    #[error("{0}")]
    Forbidden(String),
    /// A request against a session its client has finished.
    #[error("{0}")]
    SessionFinished(String),
    /// A body that did not arrive in time.
    #[error("request body was not received within {0} s (--body-timeout-secs)")]
    BodyTimeout(u64),
    /// A body in a `Content-Encoding` this server does not decode.
    #[error("Content-Encoding `{0}` is not supported (send zstd, identity or none)")]
    UnsupportedEncoding(String),
    /// A known route asked with a method it does not serve (`METHOD path`).
    #[error("route `{0}` does not take this method")]
    MethodNotAllowed(String),
}

impl ApiError {
    /// Shorthand for an invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::Engine(EngineError::invalid(field, reason))
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Engine(e) => match e {
                EngineError::NotFound { .. } => StatusCode::NOT_FOUND,
                EngineError::InvalidInput { .. } => StatusCode::BAD_REQUEST,
                EngineError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
                EngineError::LimitReached(_) => StatusCode::FORBIDDEN,
                EngineError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                EngineError::TimedOut { .. } | EngineError::RanTooLong { .. } => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                EngineError::Cancelled | EngineError::GradientsLost | EngineError::Conflict(_) => {
                    StatusCode::CONFLICT
                }
                EngineError::ServerRestarted | EngineError::Internal(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            ApiError::Unauthorized(_) | ApiError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::SessionFinished(_) => StatusCode::GONE,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    /// Stable tag of the error.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Engine(e) => e.kind(),
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::InvalidToken(_) => "invalid_token",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::SessionFinished(_) => "session_finished",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::UnsupportedEncoding(_) => "unsupported_encoding",
        }
    }

    /// The JSON body (also used for failed futures).
    pub fn body(&self) -> serde_json::Value {
        let message = match self {
            ApiError::Engine(EngineError::Internal(detail)) => {
                tracing::error!(%detail, "internal error");
                "internal error (details in the server log)".to_string()
            }
            other => other.to_string(),
        };
        let mut body =
            json!({"error": message.clone(), "detail": message, "error_type": self.error_type()});
        if let ApiError::Engine(EngineError::InvalidInput { field, .. }) = self {
            body["field"] = json!(field);
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let invalid_token = matches!(self, ApiError::InvalidToken(_));
        let mut response = (status, Json(self.body())).into_response();
        if invalid_token {
            // What the SDK looks for to exchange its key for a new token and send again.
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static(r#"Bearer error="invalid_token""#),
            );
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

/// An error answered in OpenAI's shape, by the OpenAI-compatible routes:
/// `{"error": {"message", "type", "param", "code"}}` (what the `openai` SDK reads `message`,
/// `param` and `code` from), with the status and message [`ApiError`] gives it. `param` names
/// the request's field as the OpenAI request names it.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<EngineError> for OpenAiError {
    fn from(e: EngineError) -> Self {
        OpenAiError(e.into())
    }
}

/// An engine field's name in an OpenAI request.
fn openai_param(field: &str) -> String {
    match field {
        "num_samples" => "n".into(),
        "topk_sample_logprobs" | "topk_prompt_logprobs" => "logprobs".into(),
        other => other
            .strip_prefix("sampling_params.")
            .unwrap_or(other)
            .to_string(),
    }
}

impl OpenAiError {
    /// The error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` (also what
    /// a stream sends when its request fails midway).
    pub fn body(&self) -> serde_json::Value {
        let inner = self.0.body();
        let param = match &self.0 {
            ApiError::Engine(EngineError::InvalidInput { field, .. }) => json!(openai_param(field)),
            _ => serde_json::Value::Null,
        };
        json!({"error": {
            "message": inner["error"],
            "type": self.0.error_type(),
            "param": param,
            "code": self.0.error_type(),
        }})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (self.0.status(), Json(body)).into_response();
        if self.0.status() == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Result alias of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

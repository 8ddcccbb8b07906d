//! Extractors: the caller's tenant and bodies whose every failure is a JSON 4xx naming the
//! problem (axum's own rejections answer plain text).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::state::AppState;

/// The authenticated tenant.
pub struct Tenant(pub String);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        state.auth.tenant(&parts.headers).map(Tenant)
    }
}

/// The raw body, within the size limit, read within the body timeout (a client that stops
/// sending mid-body gets a 408 and its connection is closed).
pub struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_body(req, state.max_body_bytes, state.body_timeout)
            .await
            .map(RawBody)
    }
}

/// How the layers that read a body before its handler (zstd decoding, the replay layer) read
/// it: whose (only callers with a valid key: a stranger gets the handler's 401, no body read),
/// how much, how fast (the limits the handlers apply).
#[derive(Clone)]
pub struct BodyRules {
    /// The API keys.
    pub auth: Arc<Auth>,
    /// Largest body read.
    pub max_bytes: usize,
    /// How long a body may take to arrive.
    pub timeout: Duration,
}

impl BodyRules {
    /// Reads the body of a request taken apart into `parts` and `body`. The parts' extensions
    /// go along: axum's body limit (`DefaultBodyLimit`) is one, and without it axum applies
    /// its own 2 MiB.
    pub async fn read(&self, parts: &Parts, body: Body) -> Result<Bytes, ApiError> {
        let mut reading = Request::new(body);
        *reading.extensions_mut() = parts.extensions.clone();
        read_body(reading, self.max_bytes, self.timeout).await
    }
}

/// Reads a request's body: at most `limit` bytes, within `deadline`.
pub async fn read_body(req: Request, limit: usize, deadline: Duration) -> Result<Bytes, ApiError> {
    let read = tokio::time::timeout(deadline, Bytes::from_request(req, &()));
    match read
        .await
        .map_err(|_| ApiError::BodyTimeout(deadline.as_secs()))?
    {
        Ok(b) => Ok(b),
        Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::TooLarge(limit))
        }
        Err(e) => Err(ApiError::BadRequest(format!("cannot read body: {e}"))),
    }
}

/// Most bytes a route that ignores its body ([`SmallBodyRead`]) reads of it.
pub const SMALL_BODY_BYTES: u64 = 64 * 1024;

/// The body of a route that ignores it and needs no key (the SDK's client configs), read and
/// dropped when it declares at most [`SMALL_BODY_BYTES`], within the body timeout: a body left
/// unread when the answer goes out has hyper close the kept-alive connection unless every byte
/// has already arrived, so the client's next request on it could fail (what the SDK sends is a
/// few hundred bytes). A larger or undeclared body is not read: a stranger's upload is never
/// waited for, and its connection closes after the answer.
pub struct SmallBodyRead;

impl FromRequest<AppState> for SmallBodyRead {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > 0 && n <= SMALL_BODY_BYTES) {
            // What arrives, or not, changes nothing in the answer.
            let _ = read_body(req, SMALL_BODY_BYTES as usize, state.body_timeout).await;
        }
        Ok(SmallBodyRead)
    }
}

/// A JSON body; malformed JSON, wrong types and missing fields name the path.
pub struct JsonBody<T>(pub T);

/// Parses JSON bytes, naming the offending path on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::BadRequest(format!("malformed JSON: {inner}"))
        } else if path.is_empty() || path == "." {
            ApiError::BadRequest(format!("invalid body: {inner}"))
        } else {
            ApiError::invalid(path, inner.to_string())
        }
    })
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A query string; a bad one is a JSON 400 naming the problem.
pub struct JsonQuery<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for JsonQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| JsonQuery(q.0))
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))
    }
}

//! Compressed request bodies. The client config asks the SDK to zstd-compress its protobuf
//! `forward_backward` bodies (`proto_compress_fwdbwd`): a client on another machine then sends a
//! batch in a fraction of the bytes. This layer decodes a `Content-Encoding: zstd` body of an
//! authenticated POST before anything reads it (the replay layer included), so every handler
//! sees plain bytes, and refuses encodings it does not know with a JSON 415. A caller without a
//! valid key, or a request that is not a POST, passes through untouched: its handler answers
//! 401, 404 or 405 without reading the body, so a stranger cannot make the server decode.

use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::extract::BodyRules;

/// Largest zstd window a body may use, as a power of two (16 MiB): what one decoder may
/// allocate. The SDK's compressor (level 3) uses at most 2 MiB; zstd's own default cap is
/// 128 MiB, which concurrent requests could multiply.
const MAX_WINDOW_LOG: u32 = 24;

/// Bodies decoded at once; more wait their turn. Each may hold its compressed bytes, a window
/// and up to `--max-body-bytes` of output, so this bounds what decoding can hold whatever the
/// number of connections.
const DECODES_AT_ONCE: usize = 4;

/// The decoding layer's state: how bodies are read, and the decodes in flight.
pub struct Decoder {
    bodies: BodyRules,
    permits: Semaphore,
}

impl Decoder {
    /// Decodes bodies read by `bodies`, at most [`DECODES_AT_ONCE`] at a time.
    pub fn new(bodies: BodyRules) -> Self {
        Decoder {
            bodies,
            permits: Semaphore::new(DECODES_AT_ONCE),
        }
    }
}

/// Decodes a zstd body in place (the request goes on without `Content-Encoding` and with its
/// decoded length); passes `identity` and unencoded bodies through; refuses other encodings.
pub async fn decode_request(
    State(decoder): State<Arc<Decoder>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(encoding) = request.headers().get(CONTENT_ENCODING) else {
        return next.run(request).await;
    };
    let known = decoder.bodies.auth.tenant(request.headers()).is_ok();
    if request.method() != Method::POST || !known {
        return next.run(request).await;
    }
    let encoding = encoding.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match encoding.as_str() {
        "identity" => next.run(request).await,
        "zstd" => match decode(&decoder, request).await {
            Ok(request) => next.run(request).await,
            Err(e) => e.into_response(),
        },
        _ => ApiError::UnsupportedEncoding(encoding.chars().take(64).collect()).into_response(),
    }
}

/// `request` with its zstd body decoded.
async fn decode(decoder: &Decoder, request: Request) -> Result<Request, ApiError> {
    let (mut parts, body) = request.into_parts();
    let compressed = decoder.bodies.read(&parts, body).await?;
    let max = decoder.bodies.max_bytes;
    let _permit = decoder
        .permits
        .acquire()
        .await
        .map_err(|e| internal(e.to_string()))?;
    let decoded = tokio::task::spawn_blocking(move || unzstd(&compressed, max))
        .await
        .map_err(|e| internal(e.to_string()))??;
    parts.headers.remove(CONTENT_ENCODING);
    parts.headers.insert(CONTENT_LENGTH, decoded.len().into());
    Ok(Request::from_parts(parts, Body::from(decoded)))
}

fn internal(detail: String) -> ApiError {
    ApiError::Engine(loraloom_engine::EngineError::Internal(format!(
        "decoding a zstd body: {detail}"
    )))
}

/// `compressed` decoded, when it is zstd of at most `max` bytes within [`MAX_WINDOW_LOG`].
fn unzstd(compressed: &[u8], max: usize) -> Result<Bytes, ApiError> {
    let invalid = |e: std::io::Error| ApiError::BadRequest(format!("body is not valid zstd: {e}"));
    let mut decoder = zstd::stream::read::Decoder::new(compressed).map_err(invalid)?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(invalid)?;
    // Room for what the frame says it holds (the SDK's frames say), never past the limit.
    let declared = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten()
        .unwrap_or(0);
    let mut decoded = Vec::with_capacity(declared.min(max as u64 + 1) as usize);
    // One byte past the limit tells an over-long body from one exactly at it.
    decoder
        .take(max as u64 + 1)
        .read_to_end(&mut decoded)
        .map_err(invalid)?;
    if decoded.len() > max {
        return Err(ApiError::TooLarge(max));
    }
    Ok(Bytes::from(decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_bodies_decode_within_the_limit_and_nothing_else_does() {
        let plain = b"loraloom ".repeat(1000);
        let packed = zstd::encode_all(&plain[..], 3).unwrap();
        assert!(packed.len() < plain.len() / 10);
        assert_eq!(unzstd(&packed, plain.len()).unwrap(), plain);
        // A body that decodes past the limit is refused, however small it was on the wire.
        assert!(matches!(
            unzstd(&packed, plain.len() - 1),
            Err(ApiError::TooLarge(_))
        ));
        assert!(matches!(
            unzstd(b"not zstd at all", 1 << 20),
            Err(ApiError::BadRequest(_))
        ));
        // A frame asking for a larger window than MAX_WINDOW_LOG is refused, not allocated.
        let mut wide = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        wide.set_parameter(zstd::zstd_safe::CParameter::WindowLog(MAX_WINDOW_LOG + 2))
            .unwrap();
        wide.set_parameter(zstd::zstd_safe::CParameter::EnableLongDistanceMatching(
            true,
        ))
        .unwrap();
        std::io::Write::write_all(&mut wide, &plain).unwrap();
        let wide = wide.finish().unwrap();
        assert!(matches!(
            unzstd(&wide, 1 << 30),
            Err(ApiError::BadRequest(_))
        ));
    }
}

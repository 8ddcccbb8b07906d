//! Compressed request bodies. The client config asks the SDK to zstd-compress its protobuf
//! `forward_backward` bodies (`proto_compress_fwdbwd`): a client on another machine then sends a
//! batch in a fraction of the bytes. This layer decodes a `Content-Encoding: zstd` body before
//! anything reads it (the replay layer included), so every handler sees plain bytes, and
//! refuses encodings it does not know with a JSON 415.

use std::io::Read;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::extract::read_body;

/// Largest zstd window a body may use, as a power of two (16 MiB): what one decoder may
/// allocate. The SDK's compressor (level 3) uses at most 2 MiB; zstd's own default cap is
/// 128 MiB, which concurrent requests could multiply.
const MAX_WINDOW_LOG: u32 = 24;

/// What the decoding layer needs: the body limit (of the compressed and of the decoded bytes)
/// and how long a body may take to arrive.
#[derive(Clone, Copy)]
pub struct BodyLimits {
    /// Largest body, compressed or decoded.
    pub max_bytes: usize,
    /// How long a body may take to arrive.
    pub timeout: Duration,
}

/// Decodes a zstd body in place (the request goes on without `Content-Encoding` and with its
/// decoded length); passes `identity` and unencoded bodies through; refuses other encodings.
pub async fn decode_request(
    State(limits): State<BodyLimits>,
    request: Request,
    next: Next,
) -> Response {
    let Some(encoding) = request.headers().get(CONTENT_ENCODING) else {
        return next.run(request).await;
    };
    let encoding = encoding.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match encoding.as_str() {
        "identity" => next.run(request).await,
        "zstd" => {
            let (mut parts, body) = request.into_parts();
            let compressed =
                match read_body(Request::new(body), limits.max_bytes, limits.timeout).await {
                    Ok(bytes) => bytes,
                    Err(e) => return e.into_response(),
                };
            let max = limits.max_bytes;
            let decoded = tokio::task::spawn_blocking(move || unzstd(&compressed, max)).await;
            let decoded = match decoded {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(e)) => return e.into_response(),
                Err(e) => {
                    return ApiError::Engine(loraloom_engine::EngineError::Internal(format!(
                        "decoding a zstd body: {e}"
                    )))
                    .into_response()
                }
            };
            parts.headers.remove(CONTENT_ENCODING);
            parts.headers.insert(CONTENT_LENGTH, decoded.len().into());
            next.run(Request::from_parts(parts, Body::from(decoded)))
                .await
        }
        _ => ApiError::UnsupportedEncoding(encoding.chars().take(64).collect()).into_response(),
    }
}

/// `compressed` decoded, when it is zstd of at most `max` bytes within [`MAX_WINDOW_LOG`].
fn unzstd(compressed: &[u8], max: usize) -> Result<Bytes, ApiError> {
    let invalid = |e: std::io::Error| ApiError::BadRequest(format!("body is not valid zstd: {e}"));
    let mut decoder = zstd::stream::read::Decoder::new(compressed).map_err(invalid)?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(invalid)?;
    let mut decoded = Vec::new();
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

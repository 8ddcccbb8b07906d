//! Replays of retried requests. The SDK sends an `X-Idempotency-Key` with every POST and keeps it
//! across its retries of that request, so a retry whose first attempt's response was lost gets
//! that response again instead of doing the work twice (a second optimizer step, a doubled
//! gradient, a `create_model` failing "already exists"). A retry that arrives while the first
//! attempt is still running waits for its response.
//!
//! Responses are remembered per (API key, method and path, idempotency key) for [`Replays`]'
//! time to live, in memory: a restart forgets them. Only responses a retry should see again are
//! kept: not 5xx, 408 or 429 (a retry of those runs again), and not those of routes that only
//! read (their retries are harmless and their answers can be large).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

/// The header the SDK sends its idempotency key in.
pub const KEY_HEADER: &str = "x-idempotency-key";
/// Set on a response that replays an earlier one.
pub const REPLAY_HEADER: &str = "x-idempotent-replay";
/// Routes that only read (or are harmless to repeat): never replayed.
const READ_ONLY: &[&str] = &[
    "/api/v1/retrieve_future",
    "/retrieve_future",
    "/api/v1/session_heartbeat",
    "/api/v1/telemetry",
    "/api/v1/get_info",
    "/api/v1/weights_info",
    "/api/v1/sample",
    "/api/v1/client/config",
    "/api/v1/client/dynamic_config",
    "/api/v1/cancel_future",
];
/// Longest idempotency key honoured (longer ones are served without replay).
const MAX_KEY_BYTES: usize = 256;
/// Most responses remembered; past it, new requests are served without replay until expired
/// entries are dropped.
const MAX_ENTRIES: usize = 100_000;
/// Expired entries are dropped every this many new entries.
const SWEEP_EVERY: u64 = 1024;

/// A response as first sent.
#[derive(Clone)]
struct Sent {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Sent {
    /// The response again, marked with [`REPLAY_HEADER`] when it answers a retry.
    fn response(&self, replayed: bool) -> Response {
        let mut response = Response::new(Body::from(self.body.clone()));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers.clone();
        if replayed {
            response
                .headers_mut()
                .insert(REPLAY_HEADER, HeaderValue::from_static("true"));
        }
        response
    }
}

/// (API key, method and path, idempotency key).
type Key = (String, String, String);

/// One remembered request: its response once sent (`None` while the first attempt runs).
struct Slot {
    created: Instant,
    response: watch::Receiver<Option<Sent>>,
}

/// Remembered responses of requests that carried an idempotency key.
pub struct Replays {
    ttl: Duration,
    slots: DashMap<Key, Slot>,
    inserted: AtomicU64,
}

impl Replays {
    /// Remembers each response for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Replays {
            ttl,
            slots: DashMap::new(),
            inserted: AtomicU64::new(0),
        }
    }

    /// The replay key of `request`, when it has one and may be replayed.
    fn key_of(request: &Request) -> Option<Key> {
        if request.method() == Method::GET || READ_ONLY.contains(&request.uri().path()) {
            return None;
        }
        let headers = request.headers();
        let key = headers.get(KEY_HEADER)?.to_str().ok()?;
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return None;
        }
        let api_key = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Some((
            api_key.to_string(),
            format!("{} {}", request.method(), request.uri().path()),
            key.to_string(),
        ))
    }

    /// Drops expired entries every [`SWEEP_EVERY`] insertions.
    fn sweep(&self) {
        if self
            .inserted
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
        {
            self.slots
                .retain(|_, slot| slot.created.elapsed() < self.ttl);
        }
    }
}

/// Who answers a request with a key.
enum Role {
    /// The first attempt: runs the request and publishes its response.
    First(watch::Sender<Option<Sent>>, watch::Receiver<Option<Sent>>),
    /// A retry: waits for the first attempt's response.
    Retry(watch::Receiver<Option<Sent>>),
    /// Served without replay (table full).
    Plain,
}

/// Removes a first attempt's slot unless its response was published (the attempt was dropped
/// or its response is not to be replayed), so that waiting and later retries run again.
struct Unpublished<'a> {
    replays: &'a Replays,
    key: &'a Key,
    response: watch::Receiver<Option<Sent>>,
}

impl Drop for Unpublished<'_> {
    fn drop(&mut self) {
        if self.response.borrow().is_none() {
            self.replays.slots.remove_if(self.key, |_, slot| {
                slot.response.same_channel(&self.response)
            });
        }
    }
}

/// The middleware: replays the response of an earlier attempt with the same key, waits for one
/// still running, or runs the request and remembers its response.
pub async fn replay(State(replays): State<Arc<Replays>>, request: Request, next: Next) -> Response {
    let Some(key) = Replays::key_of(&request) else {
        return next.run(request).await;
    };
    loop {
        // Before taking the entry: `len` locks every shard, the entry holds one.
        let full = replays.slots.len() >= MAX_ENTRIES;
        let role = match replays.slots.entry(key.clone()) {
            Entry::Occupied(slot) if slot.get().created.elapsed() >= replays.ttl => {
                let (tx, rx) = watch::channel(None);
                slot.replace_entry(Slot {
                    created: Instant::now(),
                    response: rx.clone(),
                });
                Role::First(tx, rx)
            }
            Entry::Occupied(slot) => Role::Retry(slot.get().response.clone()),
            Entry::Vacant(_) if full => Role::Plain,
            Entry::Vacant(vacant) => {
                let (tx, rx) = watch::channel(None);
                vacant.insert(Slot {
                    created: Instant::now(),
                    response: rx.clone(),
                });
                Role::First(tx, rx)
            }
        };
        match role {
            Role::Plain => return next.run(request).await,
            Role::Retry(mut response) => {
                if let Ok(sent) = response.wait_for(Option::is_some).await {
                    if let Some(sent) = sent.as_ref() {
                        return sent.response(true);
                    }
                }
                // The first attempt ended without a response to replay: run this one.
                continue;
            }
            Role::First(tx, rx) => {
                replays.sweep();
                let _cleanup = Unpublished {
                    replays: &replays,
                    key: &key,
                    response: rx,
                };
                let response = next.run(request).await;
                let status = response.status();
                if status.is_server_error()
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::REQUEST_TIMEOUT
                {
                    return response;
                }
                let (parts, body) = response.into_parts();
                let body = match axum::body::to_bytes(body, usize::MAX).await {
                    Ok(body) => body,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot buffer a response to remember it");
                        return Response::builder()
                            .status(StatusCode::INTERNAL_SERVER_ERROR)
                            .body(Body::empty())
                            .unwrap_or_default();
                    }
                };
                let sent = Sent {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                };
                let response = sent.response(false);
                let _ = tx.send(Some(sent));
                return response;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    /// A route answering `status` with "call N" (N counts its runs) after a short pause, so
    /// that concurrent attempts overlap.
    fn app(calls: Arc<AtomicUsize>, status: StatusCode) -> Router {
        let replays = Arc::new(Replays::new(Duration::from_secs(60)));
        Router::new()
            .route(
                "/api/v1/optim_step",
                post(move || {
                    let calls = calls.clone();
                    async move {
                        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        (status, format!("call {n}"))
                    }
                }),
            )
            .layer(axum::middleware::from_fn_with_state(replays, replay))
    }

    /// Status, body and whether it was a replay.
    async fn send(app: &Router, key: Option<&str>, api_key: &str) -> (StatusCode, String, bool) {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/optim_step")
            .header("x-api-key", api_key);
        if let Some(key) = key {
            request = request.header(KEY_HEADER, key);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let replayed = response.headers().contains_key(REPLAY_HEADER);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap(), replayed)
    }

    #[tokio::test]
    async fn concurrent_and_later_retries_get_the_first_response() {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = app(calls.clone(), StatusCode::OK);
        let (a, b) = tokio::join!(
            send(&app, Some("k"), "tml-a"),
            send(&app, Some("k"), "tml-a")
        );
        let c = send(&app, Some("k"), "tml-a").await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for r in [&a, &b, &c] {
            assert_eq!((r.0, r.1.as_str()), (StatusCode::OK, "call 1"));
        }
        assert!(c.2 && (a.2 != b.2), "one attempt ran, the others replayed");
        // Another key, another tenant, or no key: each runs.
        assert_eq!(send(&app, Some("k2"), "tml-a").await.1, "call 2");
        assert_eq!(send(&app, Some("k"), "tml-b").await.1, "call 3");
        assert_eq!(send(&app, None, "tml-a").await.1, "call 4");
        assert_eq!(send(&app, None, "tml-a").await.1, "call 5");
    }

    #[tokio::test]
    async fn responses_worth_retrying_run_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = app(calls.clone(), StatusCode::SERVICE_UNAVAILABLE);
        let (a, b) = tokio::join!(
            send(&app, Some("k"), "tml-a"),
            send(&app, Some("k"), "tml-a")
        );
        let c = send(&app, Some("k"), "tml-a").await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(!a.2 && !b.2 && !c.2);
        assert_eq!(c.0, StatusCode::SERVICE_UNAVAILABLE);
    }
}

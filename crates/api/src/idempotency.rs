//! Replays of retried requests. The SDK sends an `X-Idempotency-Key` with every POST and keeps it
//! across its retries of that request, so a retry whose first attempt's response was lost gets
//! that response again instead of doing the work twice (a second optimizer step, a doubled
//! gradient, a `create_model` failing "already exists"). A retry that arrives while the first
//! attempt is still running waits for its response.
//!
//! A request without that header is recognised by its sequence number instead: the SDK numbers
//! every request of a training or sampling client (`seq_id`, and `model_seq_id` /
//! `sampling_session_seq_id` for the runs and sessions it creates), so a body that carries one
//! and is byte for byte the same as an earlier one is a resend of it (a client that numbers
//! afresh sends different bodies for different work: another run, other data or parameters).
//!
//! Responses are remembered per (API key, method and path, idempotency key or body digest) for
//! [`Replays`]' time to live, in memory: a restart forgets them. Only responses a retry should
//! see again are kept: not 5xx, 408 or 429 (a retry of those runs again), not those of routes
//! that only read (their retries are harmless and their answers can be large), and not streams
//! (`text/event-stream`: a stream goes out as it is written, so there is nothing to replay).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use prost::Message;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::extract::BodyRules;

/// The header the SDK sends its idempotency key in.
pub const KEY_HEADER: &str = "x-idempotency-key";
/// Set on a response that replays an earlier one.
pub const REPLAY_HEADER: &str = "x-idempotent-replay";
/// Routes that only read (or are harmless to repeat): never replayed.
const READ_ONLY: &[&str] = &[
    "/api/v1/retrieve_future",
    "/api/v1/retrieve_futures",
    "/retrieve_future",
    "/api/v1/session_heartbeat",
    // Issuing a token again is harmless, and a remembered one would be a live credential kept
    // for nothing.
    "/api/v1/auth/token",
    "/api/v1/telemetry",
    "/api/v1/get_info",
    "/api/v1/weights_info",
    "/api/v1/sample",
    "/api/v1/client/config",
    "/api/v1/client/dynamic_config",
    "/api/v1/cancel_future",
];
/// Routes whose bodies the SDK numbers: a numbered body sent again is a retry.
const SEQUENCED: &[&str] = &[
    "/api/v1/create_model",
    "/api/v1/create_sampling_session",
    "/api/v1/forward_backward",
    "/api/v1/forward",
    "/api/v1/optim_step",
    "/api/v1/save_weights",
    "/api/v1/save_weights_for_sampler",
    "/api/v1/load_weights",
    "/api/v1/asample",
];
tokio::task_local! {
    /// The replay key of the request being served (see [`client_key`]).
    static CLIENT_KEY: String;
}

/// The replay key of the request being served, when it has one: its route and idempotency key
/// (or numbered body's digest). The engine journals it with the request's job, so that a retry
/// after a crash (this table is in memory) still gets the first attempt's future.
pub fn client_key() -> Option<String> {
    CLIENT_KEY.try_with(Clone::clone).ok()
}

/// Longest idempotency key honoured (longer ones are served without replay).
const MAX_KEY_BYTES: usize = 256;
/// Most responses remembered; past it, new requests are served without replay until expired
/// entries are dropped.
const MAX_ENTRIES: usize = 100_000;
/// Most responses remembered for one tenant and credential: a quarter of the table, so that
/// one caller sending keyed requests as fast as it can (cheap 400s are remembered too) cannot
/// fill it and leave every other tenant's retries unprotected.
const MAX_ENTRIES_PER_OWNER: usize = MAX_ENTRIES / 4;
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

/// (tenant and credential, method and path, idempotency key or body digest).
type Key = (String, String, String);

/// One remembered request: its response once sent (`None` while the first attempt runs).
struct Slot {
    created: Instant,
    response: watch::Receiver<Option<Sent>>,
}

/// Remembered responses of requests that carried an idempotency key or a sequence number.
pub struct Replays {
    ttl: Duration,
    bodies: BodyRules,
    slots: DashMap<Key, Slot>,
    /// Slots held per owner (a key's first part), at most `per_owner`.
    held: DashMap<String, usize>,
    per_owner: usize,
    inserted: AtomicU64,
}

impl Replays {
    /// Remembers each response for `ttl`; reads bodies by `bodies`.
    pub fn new(ttl: Duration, bodies: BodyRules) -> Self {
        Replays {
            ttl,
            bodies,
            slots: DashMap::new(),
            held: DashMap::new(),
            per_owner: MAX_ENTRIES_PER_OWNER,
            inserted: AtomicU64::new(0),
        }
    }

    /// Counts one more slot of `owner` if it holds fewer than its share; whether it did.
    fn reserve(&self, owner: &str) -> bool {
        let mut held = self.held.entry(owner.to_string()).or_insert(0);
        if *held >= self.per_owner {
            return false;
        }
        *held += 1;
        true
    }

    /// Counts one slot of `owner` less.
    fn release(&self, owner: &str) {
        self.held.remove_if_mut(owner, |_, held| {
            *held = held.saturating_sub(1);
            *held == 0
        });
    }

    /// The replay key of `request` (with the request itself, its body read when the key is
    /// the body's digest), or a response to send at once (the body could not be read).
    async fn key_of(&self, request: Request) -> Result<(Option<Key>, Request), Response> {
        if request.method() == Method::GET || READ_ONLY.contains(&request.uri().path()) {
            return Ok((None, request));
        }
        let headers = request.headers();
        // Only a caller the server knows is replayed (others get their 401, and no body is read
        // for them); responses are remembered per tenant and API key.
        let Ok(who) = self.bodies.auth.identify(headers) else {
            return Ok((None, request));
        };
        // The key, whether presented itself or through an access token issued for it (the SDK
        // renews its token every half hour: a retry may carry another one).
        let owner = format!("{}\n{}", who.tenant, who.key_id);
        let route = format!("{} {}", request.method(), request.uri().path());
        if let Some(key) = headers.get(KEY_HEADER).and_then(|v| v.to_str().ok()) {
            let usable = !key.is_empty() && key.len() <= MAX_KEY_BYTES;
            let key = usable.then(|| (owner, route, format!("header:{key}")));
            return Ok((key, request));
        }
        if !SEQUENCED.contains(&request.uri().path()) {
            return Ok((None, request));
        }
        let protobuf = crate::results::is_protobuf(headers);
        let (parts, body) = request.into_parts();
        let bytes = self
            .bodies
            .read(&parts, body)
            .await
            .map_err(IntoResponse::into_response)?;
        let key = is_numbered(&bytes, protobuf).then(|| {
            let digest: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (owner, route, format!("body:{digest}"))
        });
        Ok((key, Request::from_parts(parts, Body::from(bytes))))
    }

    /// Drops expired entries every [`SWEEP_EVERY`] insertions.
    fn sweep(&self) {
        if self
            .inserted
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
        {
            self.slots.retain(|key, slot| {
                let keep = slot.created.elapsed() < self.ttl;
                if !keep {
                    self.release(&key.0);
                }
                keep
            });
        }
    }
}

/// The sequence numbers a request body may carry; any one present numbers it.
#[derive(Deserialize)]
struct SequenceNumbers {
    #[serde(default)]
    seq_id: Option<i64>,
    #[serde(default)]
    model_seq_id: Option<i64>,
    #[serde(default)]
    sampling_session_seq_id: Option<i64>,
}

/// Whether a body carries a sequence number (protobuf bodies: a nonzero `seq_id`). A body that
/// does not parse is not numbered: its handler answers the error.
fn is_numbered(body: &[u8], protobuf: bool) -> bool {
    if protobuf {
        return crate::proto::ForwardBackwardRequest::decode(body).is_ok_and(|r| r.seq_id != 0);
    }
    serde_json::from_slice::<SequenceNumbers>(body).is_ok_and(|n| {
        n.seq_id.is_some() || n.model_seq_id.is_some() || n.sampling_session_seq_id.is_some()
    })
}

/// Who answers a request with a key.
enum Role {
    /// The first attempt: runs the request and publishes its response.
    First(watch::Sender<Option<Sent>>, watch::Receiver<Option<Sent>>),
    /// A retry: waits for the first attempt's response.
    Retry(watch::Receiver<Option<Sent>>),
    /// Served without replay (the table, or the caller's share of it, is full).
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
        if self.response.borrow().is_none()
            && self
                .replays
                .slots
                .remove_if(self.key, |_, slot| {
                    slot.response.same_channel(&self.response)
                })
                .is_some()
        {
            self.replays.release(&self.key.0);
        }
    }
}

/// Whether `response` is a stream of server-sent events (a streamed OpenAI completion).
fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The middleware: replays the response of an earlier attempt with the same key, waits for one
/// still running, or runs the request and remembers its response.
pub async fn replay(State(replays): State<Arc<Replays>>, request: Request, next: Next) -> Response {
    let (key, request) = match replays.key_of(request).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Some(key) = key else {
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
            Entry::Vacant(_) if !replays.reserve(&key.0) => Role::Plain,
            Entry::Vacant(vacant) => {
                let (tx, rx) = watch::channel(None);
                vacant.insert(Slot {
                    created: Instant::now(),
                    response: rx.clone(),
                });
                Role::First(tx, rx)
            }
        };
        let client_key = format!("{} {}", key.1, key.2);
        match role {
            Role::Plain => return CLIENT_KEY.scope(client_key, next.run(request)).await,
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
                let response = CLIENT_KEY.scope(client_key, next.run(request)).await;
                let status = response.status();
                if status.is_server_error()
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::REQUEST_TIMEOUT
                    || is_event_stream(&response)
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
    use crate::auth::Auth;

    /// A route answering `status` with "call N" (N counts its runs) after a short pause, so
    /// that concurrent attempts overlap.
    fn app(calls: Arc<AtomicUsize>, status: StatusCode) -> Router {
        app_sharing(calls, status, MAX_ENTRIES_PER_OWNER)
    }

    /// [`app`] remembering at most `per_owner` responses per caller.
    fn app_sharing(calls: Arc<AtomicUsize>, status: StatusCode, per_owner: usize) -> Router {
        let bodies = BodyRules {
            auth: Arc::new(Auth::new(Default::default())),
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(5),
        };
        let mut replays = Replays::new(Duration::from_secs(60), bodies);
        replays.per_owner = per_owner;
        let replays = Arc::new(replays);
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
        send_body(app, key, api_key, "").await
    }

    /// [`send`] with a JSON body.
    async fn send_body(
        app: &Router,
        key: Option<&str>,
        api_key: &str,
        body: &str,
    ) -> (StatusCode, String, bool) {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/optim_step")
            .header("x-api-key", api_key);
        if let Some(key) = key {
            request = request.header(KEY_HEADER, key);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::from(body.to_string())).unwrap())
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

    #[tokio::test]
    async fn a_numbered_body_sent_again_gets_the_first_response() {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = app(calls.clone(), StatusCode::OK);
        let step = r#"{"model_id": "m", "seq_id": 3, "adam_params": {}}"#;
        let (a, b) = tokio::join!(
            send_body(&app, None, "tml-a", step),
            send_body(&app, None, "tml-a", step)
        );
        let c = send_body(&app, None, "tml-a", step).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(c.2 && (a.2 != b.2) && [a.1, b.1, c.1].iter().all(|r| r == "call 1"));
        // Another number, other contents, another tenant's key: each runs.
        let next = r#"{"model_id": "m", "seq_id": 4, "adam_params": {}}"#;
        assert_eq!(send_body(&app, None, "tml-a", next).await.1, "call 2");
        let other = r#"{"model_id": "n", "seq_id": 3, "adam_params": {}}"#;
        assert_eq!(send_body(&app, None, "tml-a", other).await.1, "call 3");
        assert_eq!(send_body(&app, None, "tml-b", step).await.1, "call 4");
        // Unnumbered bodies, and bodies that do not parse, run every time.
        let plain = r#"{"model_id": "m", "adam_params": {}}"#;
        assert_eq!(send_body(&app, None, "tml-a", plain).await.1, "call 5");
        assert_eq!(send_body(&app, None, "tml-a", plain).await.1, "call 6");
        assert_eq!(send_body(&app, None, "tml-a", "{").await.1, "call 7");
        assert_eq!(send_body(&app, None, "tml-a", "{").await.1, "call 8");
        // A caller without a valid key is never replayed (its body is not even read here).
        assert_eq!(send_body(&app, None, "nope", step).await.1, "call 9");
        assert_eq!(send_body(&app, None, "nope", step).await.1, "call 10");
    }

    #[tokio::test]
    async fn a_caller_past_its_share_is_served_plain_and_others_keep_their_replays() {
        let calls = Arc::new(AtomicUsize::new(0));
        let app = app_sharing(calls.clone(), StatusCode::OK, 3);
        for key in ["k1", "k2", "k3"] {
            send(&app, Some(key), "tml-a").await;
        }
        // Past its share: a's new keys run every time, its remembered ones still replay.
        assert_eq!(send(&app, Some("k4"), "tml-a").await.1, "call 4");
        assert_eq!(send(&app, Some("k4"), "tml-a").await.1, "call 5");
        assert!(send(&app, Some("k1"), "tml-a").await.2);
        // Another tenant's retries are still recognised.
        assert_eq!(send(&app, Some("k4"), "tml-b").await.1, "call 6");
        let again = send(&app, Some("k4"), "tml-b").await;
        assert!(again.2 && again.1 == "call 6", "{again:?}");
    }
}

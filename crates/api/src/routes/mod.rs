//! The axum router, with its handlers in one module per resource (sessions, runs, checkpoints,
//! sampling, futures) and what they share here. Every mutating call follows one path: parse the
//! wire body (naming bad fields) → authenticate → build engine work → submit → answer a promise.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, State};
use axum::http::{HeaderMap, HeaderName};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use loraloom_engine::registry::{parse_checkpoint_path, validate_name, SAMPLER_CLONES};
use loraloom_engine::{
    CheckpointKind, CheckpointRecord, EngineError, FeedKey, FutureState, ModelKey, QueueKey,
    SamplerKey, SamplerSource, SaveOptions, Work,
};
use loraloom_model::LoraSpec;
use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_json, BodyRules, JsonBody, JsonQuery, RawBody, SmallBodyRead, Tenant};
use crate::idempotency::Replays;
use crate::responses::{iso, string_map};
use crate::results::{accepts_protobuf, is_protobuf, output_response, sample_json};
use crate::state::{AppState, Session};
use crate::wire::{self, LoraConfig, ModelInput, Promise, WireAdamParams, WireSamplingParams};

mod abandoned;
mod audit;
mod billing;
mod checkpoints;
mod futures;
mod losses;
mod openai;
mod openai_stream;
mod runs;
mod sampling;
pub(crate) mod sessions;

use self::abandoned::make_room_for_run;
use self::audit::*;
use self::billing::*;
use self::checkpoints::*;
use self::futures::*;
use self::losses::*;
use self::runs::*;
use self::sampling::*;
use self::sessions::*;

/// LoRA alpha of every adapter (the SDK sends none; Tinker-compatible servers use 32).
pub const LORA_ALPHA: f64 = 32.0;

/// How long a response is kept for retries with the same idempotency key (the SDK retries
/// within a few minutes).
pub const REPLAY_TTL: Duration = Duration::from_secs(15 * 60);

/// Every route loraloom serves.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let bodies = BodyRules {
        auth: state.auth.clone(),
        max_bytes: limit,
        timeout: state.body_timeout,
    };
    Router::new()
        .route("/api/v1/healthz", get(healthz))
        .route("/api/v1/get_server_capabilities", get(capabilities))
        .route("/api/v1/client/config", post(client_config))
        .route("/api/v1/client/dynamic_config", post(client_dynamic_config))
        .route("/api/v1/create_session", post(create_session))
        .route("/api/v1/session_heartbeat", post(heartbeat))
        .route("/api/v1/sessions", get(list_sessions))
        .route("/api/v1/sessions/search", post(search_sessions))
        .route("/api/v1/sessions/{id}", get(get_session))
        .route("/api/v1/sessions/{id}/finish", post(finish_session))
        .route("/api/v1/sessions/{id}/project", put(assign_project))
        .route("/api/v1/sessions/{id}/trace_export", get(trace_export))
        .route("/api/v1/telemetry", post(telemetry))
        .route(
            "/api/v1/auth/apikey/me",
            get(own_key).delete(delete_own_key),
        )
        .route("/api/v1/auth/token", post(access_token))
        .route("/oai/api/v1/completions", post(openai::completions))
        .route(
            "/oai/api/v1/chat/completions",
            post(openai::chat_completions),
        )
        .route("/oai/api/v1/models", get(openai::models))
        .route("/api/v1/create_model", post(create_model))
        .route("/api/v1/get_info", post(get_info))
        .route("/api/v1/unload_model", post(unload_model))
        .route("/api/v1/create_custom_loss", post(create_custom_loss))
        .route("/api/v1/forward_backward", post(forward_backward))
        .route("/api/v1/forward", post(forward))
        .route("/api/v1/optim_step", post(optim_step))
        .route("/api/v1/save_weights", post(save_weights))
        .route(
            "/api/v1/save_weights_for_sampler",
            post(save_weights_for_sampler),
        )
        .route("/api/v1/load_weights", post(load_weights))
        .route(
            "/api/v1/create_sampling_session",
            post(create_sampling_session),
        )
        .route("/api/v1/join_sampling_session", post(join_sampling_session))
        .route("/api/v1/samplers/{id}", get(get_sampler))
        .route("/api/v1/asample", post(asample))
        .route("/api/v1/sample", post(sample_sync))
        .route("/api/v1/retrieve_future", post(retrieve_future))
        .route("/retrieve_future", post(retrieve_future))
        .route("/api/v1/retrieve_futures", post(retrieve_futures))
        .route("/api/v1/cancel_future", post(cancel_future))
        .route("/api/v1/training_runs", get(list_runs))
        .route("/api/v1/training_runs/{id}", get(get_run))
        .route(
            "/api/v1/training_runs/{id}/checkpoints",
            get(list_run_checkpoints),
        )
        .route(
            "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}",
            delete(delete_checkpoint),
        )
        .route(
            "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/ttl",
            put(set_checkpoint_ttl),
        )
        .route("/api/v1/save_weights_external", post(save_weights_external))
        .route("/api/v1/copy_weights", post(copy_weights))
        .route(
            "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/publish",
            post(publish_checkpoint).delete(unpublish_checkpoint),
        )
        .route(
            "/api/v1/training_runs/{id}/checkpoints/{kind}/{name}/external_weights_urls",
            get(external_weights_urls),
        )
        .route("/api/v1/downloads/{token}/{file}", get(download))
        .route("/api/v1/checkpoints", get(list_checkpoints))
        .route("/api/v1/weights_info", post(weights_info))
        .route("/api/v1/billing/usage/events", get(billing_usage))
        .route(
            "/api/v1/billing/usage/checkpoints/current",
            get(checkpoint_storage),
        )
        .route("/api/v1/audit", get(audit_log))
        .route("/api/model-stats", get(crate::stats::model_stats))
        .route("/metrics", get(crate::stats::prometheus))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The replay layer may read a body itself, so the body limit goes on outside it.
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(Replays::new(REPLAY_TTL, bodies.clone())),
            crate::idempotency::replay,
        ))
        // Outside the replay layer, which recognises a resend by its decoded body.
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(crate::encoding::Decoder::new(bodies)),
            crate::encoding::decode_request,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            limit,
            reject_oversized,
        ))
        // Outermost: every request gets an id (the client's `X-Request-Id`, or a new UUID),
        // answered in the response, and a span that carries it into every log line of the
        // request, the jobs it submits included (their spans are children of it).
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(state)
}

/// The header naming a request in logs and in its response.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-chosen request id shown in logs (longer ones are cut there, not in the
/// response).
const MAX_LOGGED_REQUEST_ID: usize = 128;

/// The span of one HTTP request: its `X-Request-Id`, method and route template. The template,
/// never the path itself: a download URL's path holds its token.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let id = id.get(..MAX_LOGGED_REQUEST_ID).unwrap_or(id);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("(no route)", MatchedPath::as_str);
    tracing::info_span!("http", x_request_id = id, method = %req.method(), route)
}

/// Answers 413 at once when the declared `Content-Length` is over the limit, before anything
/// reads the body (the connection then closes instead of receiving it).
async fn reject_oversized(
    State(limit): State<usize>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => ApiError::TooLarge(limit).into_response(),
        _ => next.run(request).await,
    }
}

/// A 404 that names the method and path asked for (the path cut to 200 characters).
async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let path: String = uri.path().chars().take(200).collect();
    ApiError::Engine(EngineError::NotFound {
        what: "route".into(),
        id: format!("{method} {path}"),
    })
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let path: String = uri.path().chars().take(200).collect();
    ApiError::MethodNotAllowed(format!("{method} {path}"))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn capabilities(State(state): State<AppState>) -> Json<Value> {
    let base = state.engine.base();
    Json(json!({"supported_models": [{
        "model_name": base.name,
        "max_context_length": base.max_context_length,
        "trainable": true,
        "sampleable": true,
    }]}))
}

/// The least bytes the SDK estimates a training datum's token at: 4 for the token, at least 4
/// for its target (`_estimate_datum_bytes_count_proto`).
const SDK_BYTES_PER_TOKEN: usize = 8;

/// Flags the SDK reads once per client (its body, `{}`, is not read: the route needs no API
/// key, and must not buffer a stranger's upload). `fwdbwd_max_chunk_bytes_count` makes it split a
/// `forward_backward` or `forward` into requests within `--max-request-tokens` (it splits by
/// its byte estimate, at least [`SDK_BYTES_PER_TOKEN`] per token; gradients accumulate across
/// the parts), so a large SFT batch is sent in parts instead of being refused.
/// `proto_compress_fwdbwd` has it send `forward_backward` bodies zstd-compressed (about 1 ms of
/// client CPU per 32k tokens; five times fewer bytes for a client across a network).
/// `sample_max_concurrent_requests` bounds one `SamplingClient`'s requests in flight (2000 by
/// default) by the jobs a tenant may queue, so an RL loop that fires thousands of samples from
/// one client waits in the SDK instead of cycling through 429 refusals and retries (several
/// clients, or training alongside, can still meet the limit; the SDK retries those).
async fn client_config(State(state): State<AppState>, _body: SmallBodyRead) -> Json<Value> {
    let chunk_bytes = state
        .engine
        .max_request_tokens()
        .saturating_mul(SDK_BYTES_PER_TOKEN);
    Json(json!({
        "fwdbwd_max_chunk_bytes_count": chunk_bytes,
        "sample_max_concurrent_requests": state.engine.max_queued_per_tenant().max(1),
        "pjwt_auth_enabled": state.auth.issues_tokens(),
        "proto_compress_fwdbwd": true,
        "sample_use_retrieve_futures": state.sample_poller,
        "sample_join_sampling_session": true,
        "custom_loss_server_side": true,
    }))
}

/// Flags a live SDK client re-reads every `refresh_interval_sec`: `sample_cancel_enabled`
/// makes it send `cancel_future` for a sampling future it abandons (a timeout, a cancelled
/// task: cookbook rollouts that time out), so the decode loop drops the request at its next
/// token instead of decoding it to `max_tokens` for nobody.
async fn client_dynamic_config(_body: SmallBodyRead) -> Json<Value> {
    Json(json!({
        "refresh_interval_sec": 300,
        "sample_cancel_enabled": true,
        "sample_cancel_max_batch_size": 64,
    }))
}

/// The key a request presents, as `tinker auth login` checks a pasted key before storing it:
/// its tenant (as user and name) and a stable id.
async fn own_key(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let who = state.auth.identify_key(&headers)?;
    Ok(Json(json!({
        "key_id": who.key_id,
        "name": who.tenant,
        "note": format!("loraloom key of tenant `{}`", who.tenant),
        "details": {
            "org_details": {"name": "loraloom"},
            "user_details": {"email": who.tenant},
        },
    })))
}

/// Keys are the operator's (`--api-key`, `--api-keys-file`): a client cannot revoke one.
async fn delete_own_key(_tenant: Tenant) -> ApiResult<Json<Value>> {
    Err(ApiError::Forbidden(
        "this server's API keys are set by its operator (--api-key, --api-keys-file); ask them \
         to remove this one"
            .into(),
    ))
}

/// An access token for the API key the request presents (see [`crate::tokens`]); the SDK asks
/// for one when the client config says `pjwt_auth_enabled`, and sends it instead of its key.
async fn access_token(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"jwt": state.auth.issue_token(&headers)?})))
}

async fn telemetry(_tenant: Tenant, _body: RawBody) -> Json<Value> {
    Json(json!({"status": "accepted"}))
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}

fn promise(request_id: String, model_id: Option<String>) -> Json<Promise> {
    Json(Promise {
        request_id,
        model_id,
        sample_sequence_ids: None,
    })
}

fn check_base_model(state: &AppState, name: &str) -> ApiResult<()> {
    let served = &state.engine.base().name;
    if name == served {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "base_model",
            format!("`{name}` is not served here (this server serves `{served}`)"),
        ))
    }
}

fn model_queue(tenant: &str, model_id: &str) -> QueueKey {
    QueueKey::Model(ModelKey {
        tenant: tenant.to_string(),
        model_id: model_id.to_string(),
    })
}

#[derive(Deserialize)]
struct Page {
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    offset: usize,
    /// Only what belongs to this project (training runs).
    #[serde(default)]
    project_id: Option<String>,
}

fn default_limit() -> usize {
    20
}

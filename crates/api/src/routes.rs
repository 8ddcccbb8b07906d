//! The axum router and its handlers. Every mutating call follows one path: parse the wire body
//! (naming bad fields) → authenticate → build engine work → submit → answer a promise.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use loraloom_engine::registry::{parse_checkpoint_path, validate_name};
use loraloom_engine::{
    CheckpointKind, CheckpointRecord, EngineError, FutureState, ModelKey, QueueKey, SamplerKey,
    SamplerSource, SaveOptions, Work,
};
use loraloom_model::LoraSpec;
use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_json, JsonBody, JsonQuery, RawBody, Tenant};
use crate::idempotency::{BodyRules, Replays};
use crate::results::{accepts_protobuf, is_protobuf, output_response, sample_json};
use crate::state::{AppState, Session};
use crate::wire::{self, LoraConfig, ModelInput, Promise, WireAdamParams, WireSamplingParams};

/// LoRA alpha of every adapter (the SDK sends none; Tinker-compatible servers use 32).
pub const LORA_ALPHA: f64 = 32.0;

/// How long a response is kept for retries with the same idempotency key (the SDK retries
/// within a few minutes).
pub const REPLAY_TTL: Duration = Duration::from_secs(15 * 60);

/// Every route loraloom serves.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/api/v1/healthz", get(healthz))
        .route("/api/v1/get_server_capabilities", get(capabilities))
        .route("/api/v1/client/config", post(client_config))
        .route("/api/v1/client/dynamic_config", post(client_config))
        .route("/api/v1/create_session", post(create_session))
        .route("/api/v1/session_heartbeat", post(heartbeat))
        .route("/api/v1/sessions/{id}/finish", post(finish_session))
        .route("/api/v1/telemetry", post(telemetry))
        .route("/api/v1/create_model", post(create_model))
        .route("/api/v1/get_info", post(get_info))
        .route("/api/v1/unload_model", post(unload_model))
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
        .route("/api/v1/samplers/{id}", get(get_sampler))
        .route("/api/v1/asample", post(asample))
        .route("/api/v1/sample", post(sample_sync))
        .route("/api/v1/retrieve_future", post(retrieve_future))
        .route("/retrieve_future", post(retrieve_future))
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
        .route("/api/v1/checkpoints", get(list_checkpoints))
        .route("/api/v1/weights_info", post(weights_info))
        .route("/api/model-stats", get(crate::metrics::model_stats))
        .route("/metrics", get(crate::metrics::prometheus))
        .fallback(not_found)
        // The replay layer may read a body itself, so the body limit goes on outside it.
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(Replays::new(
                REPLAY_TTL,
                BodyRules {
                    auth: state.auth.clone(),
                    max_bytes: limit,
                    timeout: state.body_timeout,
                },
            )),
            crate::idempotency::replay,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            limit,
            reject_oversized,
        ))
        .with_state(state)
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

async fn client_config(_body: RawBody) -> Json<Value> {
    Json(json!({
        "pjwt_auth_enabled": false,
        "proto_compress_fwdbwd": false,
        "sample_use_retrieve_futures": false,
        "sample_join_sampling_session": false,
        "custom_loss_server_side": false,
    }))
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

async fn create_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    _body: RawBody,
) -> ApiResult<Json<Value>> {
    let id = new_id("session");
    let session = Session {
        tenant,
        created: loraloom_engine::registry::unix_now(),
    };
    if let Some(store) = state.engine.registry().store() {
        store.put_session(&loraloom_engine::SessionRow {
            id: id.clone(),
            tenant: session.tenant.clone(),
            created: session.created,
        })?;
    }
    state.sessions.insert(id.clone(), session);
    Ok(Json(json!({"session_id": id, "type": "create_session"})))
}

/// The session `id` if the tenant owns it.
fn session(state: &AppState, tenant: &str, id: &str) -> ApiResult<Session> {
    match state.sessions.get(id) {
        Some(s) if s.tenant == tenant => Ok(s.clone()),
        _ => Err(ApiError::Engine(EngineError::NotFound {
            what: "session".into(),
            id: id.to_string(),
        })),
    }
}

#[derive(Deserialize)]
struct SessionRef {
    session_id: String,
}

async fn heartbeat(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SessionRef>,
) -> ApiResult<Json<Value>> {
    session(&state, &tenant, &body.session_id)?;
    Ok(Json(json!({"type": "session_heartbeat"})))
}

async fn finish_session(Tenant(_tenant): Tenant, _body: RawBody) -> Json<Value> {
    Json(json!({}))
}

fn promise(request_id: String, model_id: Option<String>) -> Json<Promise> {
    Json(Promise {
        request_id,
        model_id,
        sample_sequence_ids: None,
    })
}

#[derive(Deserialize)]
struct CreateModelRequest {
    session_id: String,
    #[serde(default)]
    model_seq_id: Option<i64>,
    base_model: String,
    #[serde(default)]
    user_metadata: Option<Value>,
    #[serde(default)]
    lora_config: Option<LoraConfig>,
    #[serde(default)]
    optimizer_config: Option<OptimizerFamily>,
}

/// The optimizer family a run or a step names (`optimizer_config`, `optimizer_params`).
#[derive(Deserialize)]
struct OptimizerFamily {
    #[serde(rename = "type")]
    family: String,
}

impl OptimizerFamily {
    /// Refuses any family but AdamW, naming `field`.
    fn check(&self, field: &str) -> ApiResult<()> {
        if self.family == "adamw" {
            return Ok(());
        }
        Err(ApiError::invalid(
            format!("{field}.type"),
            format!(
                "optimizer `{}` is not supported; this server trains with AdamW (`adamw`)",
                self.family
            ),
        ))
    }
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

fn run_id(session_id: &str, seq: Option<i64>) -> String {
    match seq {
        Some(n) => format!("{session_id}:train:{n}"),
        None => format!("{session_id}:train:{}", uuid::Uuid::new_v4().simple()),
    }
}

async fn create_model(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CreateModelRequest>,
) -> ApiResult<Json<Promise>> {
    session(&state, &tenant, &body.session_id)?;
    check_base_model(&state, &body.base_model)?;
    if let Some(optimizer) = &body.optimizer_config {
        optimizer.check("optimizer_config")?;
    }
    let lora = body.lora_config.unwrap_or(LoraConfig {
        rank: 32,
        seed: None,
        train_mlp: true,
        train_attn: true,
        train_unembed: true,
    });
    let spec = LoraSpec {
        rank: lora.rank,
        alpha: LORA_ALPHA,
        seed: lora.seed.unwrap_or_else(rand_seed),
        train_attn: lora.train_attn,
        train_mlp: lora.train_mlp,
        train_unembed: lora.train_unembed,
    };
    let model_id = run_id(&body.session_id, body.model_seq_id);
    let key = ModelKey {
        tenant,
        model_id: model_id.clone(),
    };
    let id =
        state
            .engine
            .create_model(key, spec, body.user_metadata.unwrap_or(Value::Null), None)?;
    Ok(promise(id, Some(model_id)))
}

fn rand_seed() -> u64 {
    let u = uuid::Uuid::new_v4();
    u.as_u64_pair().0
}

#[derive(Deserialize)]
struct ModelRef {
    model_id: String,
}

async fn get_info(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<ModelRef>,
) -> ApiResult<Json<Value>> {
    let entry = state.engine.registry().model(&tenant, &body.model_id)?;
    let base = state.engine.base();
    Ok(Json(json!({
        "type": "get_info",
        "model_id": body.model_id,
        "model_data": {"arch": base.config.architecture.name(), "model_name": entry.base_model, "tokenizer_id": state.tokenizer_id},
        "is_lora": true,
        "lora_rank": entry.spec.rank,
        "model_name": entry.base_model,
    })))
}

async fn unload_model(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<ModelRef>,
) -> ApiResult<Json<Value>> {
    state
        .engine
        .registry()
        .remove_model(&tenant, &body.model_id)?;
    Ok(Json(
        json!({"model_id": body.model_id, "type": "unload_model"}),
    ))
}

fn model_queue(tenant: &str, model_id: &str) -> QueueKey {
    QueueKey::Model(ModelKey {
        tenant: tenant.to_string(),
        model_id: model_id.to_string(),
    })
}

fn submit_train(
    state: &AppState,
    tenant: &str,
    input: wire::TrainInput,
) -> ApiResult<Json<Promise>> {
    let work = Work::ForwardBackward {
        data: input.data,
        loss: input.loss,
        backward: input.backward,
    };
    let id = state
        .engine
        .submit(model_queue(tenant, &input.model_id), work)?;
    Ok(promise(id, Some(input.model_id)))
}

async fn forward_backward(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<Json<Promise>> {
    let input = if is_protobuf(&headers) {
        let req = crate::proto::ForwardBackwardRequest::decode(body.as_ref()).map_err(|e| {
            ApiError::BadRequest(format!("malformed protobuf ForwardBackwardRequest: {e}"))
        })?;
        wire::proto_train_input(req)?
    } else {
        parse_json::<wire::JsonForwardBackwardRequest>(&body)?.into_input(false)?
    };
    submit_train(&state, &tenant, input)
}

async fn forward(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<wire::JsonForwardBackwardRequest>,
) -> ApiResult<Json<Promise>> {
    submit_train(&state, &tenant, body.into_input(true)?)
}

#[derive(Deserialize)]
struct OptimStepRequest {
    model_id: String,
    #[serde(default)]
    adam_params: Option<WireAdamParams>,
    /// What the SDK sends instead of `adam_params` for another optimizer family.
    #[serde(default)]
    optimizer_params: Option<OptimizerFamily>,
}

async fn optim_step(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<OptimStepRequest>,
) -> ApiResult<Json<Promise>> {
    if let Some(other) = &body.optimizer_params {
        other.check("optimizer_params")?;
    }
    let params = body
        .adam_params
        .ok_or_else(|| ApiError::invalid("adam_params", "missing field `adam_params`"))?
        .into_params()?;
    let id = state.engine.submit(
        model_queue(&tenant, &body.model_id),
        Work::OptimStep { params },
    )?;
    Ok(promise(id, Some(body.model_id)))
}

#[derive(Deserialize)]
struct SaveRequest {
    model_id: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    sampling_session_seq_id: Option<i64>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    overwrite: Option<bool>,
    #[serde(default)]
    user_metadata: Option<std::collections::BTreeMap<String, String>>,
}

impl SaveRequest {
    /// The save's options; `overwrite` defaults to `overwrite_by_default` when the request does
    /// not say (the SDK's `save_state` always does; `save_weights_for_sampler` has no such flag
    /// and replaces).
    fn options(&self, overwrite_by_default: bool) -> SaveOptions {
        SaveOptions {
            ttl_seconds: self.ttl_seconds,
            overwrite: self.overwrite.unwrap_or(overwrite_by_default),
            user_metadata: self.user_metadata.clone(),
        }
    }
}

fn checkpoint_name(given: Option<String>, prefix: &str) -> ApiResult<String> {
    let name = given.unwrap_or_else(|| new_id(prefix));
    validate_name(&name)?;
    Ok(name)
}

async fn save_weights(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SaveRequest>,
) -> ApiResult<Json<Promise>> {
    let options = body.options(false);
    let name = checkpoint_name(body.path, "state")?;
    let work = Work::Save {
        name,
        kind: CheckpointKind::State,
        sampler: None,
        options,
    };
    let id = state
        .engine
        .submit(model_queue(&tenant, &body.model_id), work)?;
    Ok(promise(id, Some(body.model_id)))
}

async fn save_weights_for_sampler(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SaveRequest>,
) -> ApiResult<Json<Promise>> {
    // Without a name (save_weights_and_get_sampling_client) the result must carry a session.
    let sampler = body.path.is_none().then(|| SamplerKey {
        tenant: tenant.clone(),
        sampler_id: match body.sampling_session_seq_id {
            Some(n) => format!(
                "{}:sample:{n}:{}",
                body.model_id,
                uuid::Uuid::new_v4().simple()
            ),
            None => new_id("sampler"),
        },
    });
    let options = body.options(true);
    let name = checkpoint_name(body.path, "sampler")?;
    let work = Work::Save {
        name,
        kind: CheckpointKind::Sampler,
        sampler,
        options,
    };
    let id = state
        .engine
        .submit(model_queue(&tenant, &body.model_id), work)?;
    Ok(promise(id, Some(body.model_id)))
}

#[derive(Deserialize)]
struct LoadRequest {
    #[serde(default)]
    model_id: Option<String>,
    path: String,
    #[serde(default)]
    optimizer: bool,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    model_seq_id: Option<i64>,
    #[serde(default)]
    user_metadata: Option<Value>,
}

async fn load_weights(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<LoadRequest>,
) -> ApiResult<Json<Promise>> {
    parse_checkpoint_path(&body.path)?;
    if let Some(model_id) = body.model_id {
        let work = Work::Load {
            path: body.path,
            with_optimizer: body.optimizer,
        };
        let id = state.engine.submit(model_queue(&tenant, &model_id), work)?;
        return Ok(promise(id, Some(model_id)));
    }
    // create_training_client_from_state: a new run in the session, initialised from the path.
    let session_id = body.session_id.ok_or_else(|| {
        ApiError::invalid("model_id", "either model_id or session_id is required")
    })?;
    session(&state, &tenant, &session_id)?;
    let record: CheckpointRecord = state.engine.registry().checkpoint(&tenant, &body.path)?;
    let model_id = run_id(&session_id, body.model_seq_id);
    let key = ModelKey {
        tenant,
        model_id: model_id.clone(),
    };
    let id = state.engine.create_model(
        key,
        record.spec,
        body.user_metadata.unwrap_or(Value::Null),
        Some((body.path, body.optimizer)),
    )?;
    Ok(promise(id, Some(model_id)))
}

#[derive(Deserialize)]
struct CreateSamplingSessionRequest {
    session_id: String,
    #[serde(default)]
    sampling_session_seq_id: Option<i64>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
}

fn sampler_source(
    state: &AppState,
    base_model: Option<&str>,
    model_path: Option<String>,
) -> ApiResult<SamplerSource> {
    match (model_path, base_model) {
        (Some(path), _) => {
            parse_checkpoint_path(&path)?;
            Ok(SamplerSource::Checkpoint(path))
        }
        (None, Some(name)) => {
            check_base_model(state, name)?;
            Ok(SamplerSource::Base)
        }
        (None, None) => Err(ApiError::invalid(
            "base_model",
            "either base_model or model_path is required",
        )),
    }
}

async fn create_sampling_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CreateSamplingSessionRequest>,
) -> ApiResult<Json<Value>> {
    session(&state, &tenant, &body.session_id)?;
    let source = sampler_source(&state, body.base_model.as_deref(), body.model_path)?;
    let sampler_id = match body.sampling_session_seq_id {
        Some(n) => format!("{}:sample:{n}", body.session_id),
        None => new_id("sampler"),
    };
    state.engine.create_sampler(
        SamplerKey {
            tenant,
            sampler_id: sampler_id.clone(),
        },
        source,
    )?;
    Ok(Json(
        json!({"sampling_session_id": sampler_id, "type": "create_sampling_session"}),
    ))
}

async fn get_sampler(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let entry = state.engine.registry().sampler(&tenant, &id)?;
    let path = match &entry.source {
        SamplerSource::Base => None,
        SamplerSource::Checkpoint(p) => Some(p.clone()),
    };
    Ok(Json(
        json!({"sampler_id": id, "base_model": entry.base_model, "model_path": path}),
    ))
}

#[derive(Deserialize)]
struct SampleRequest {
    #[serde(default)]
    sampling_session_id: Option<String>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
    prompt: ModelInput,
    #[serde(default = "one")]
    num_samples: i64,
    sampling_params: WireSamplingParams,
    #[serde(default)]
    prompt_logprobs: bool,
    #[serde(default)]
    topk_prompt_logprobs: i64,
    #[serde(default)]
    topk_sample_logprobs: i64,
    #[serde(default)]
    target_prompt_logprobs: Option<Value>,
    #[serde(default)]
    prompt_alt_tokens_k: i64,
    #[serde(default)]
    prompt_logprobs_last_n: Option<i64>,
}

impl SampleRequest {
    /// Refuses, before any work, the SDK's sampling options loraloom does not compute (rather
    /// than answering without them).
    fn refuse_unsupported(&self) -> ApiResult<()> {
        let unsupported = [
            ("topk_prompt_logprobs", self.topk_prompt_logprobs != 0),
            ("topk_sample_logprobs", self.topk_sample_logprobs != 0),
            (
                "target_prompt_logprobs",
                self.target_prompt_logprobs
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
            ("prompt_alt_tokens_k", self.prompt_alt_tokens_k != 0),
            (
                "prompt_logprobs_last_n",
                self.prompt_logprobs_last_n.is_some(),
            ),
        ];
        match unsupported.into_iter().find(|(_, given)| *given) {
            Some((field, _)) => Err(ApiError::invalid(
                field,
                "is not supported by this server (prompt_logprobs is)",
            )),
            None => Ok(()),
        }
    }
}

fn one() -> i64 {
    1
}

/// Submits a sampling job; returns its request id and sample count.
fn submit_sample(state: &AppState, tenant: &str, body: SampleRequest) -> ApiResult<(String, i64)> {
    body.refuse_unsupported()?;
    let sampler_id = match body.sampling_session_id {
        Some(id) => id,
        None => {
            // Clients that name the model directly share one session per source, so repeated
            // calls do not accumulate sessions.
            let source = sampler_source(state, body.base_model.as_deref(), body.model_path)?;
            let id = match &source {
                SamplerSource::Base => "direct:base".to_string(),
                SamplerSource::Checkpoint(path) => format!("direct:{path}"),
            };
            if state.engine.registry().sampler(tenant, &id).is_err() {
                state.engine.create_sampler(
                    SamplerKey {
                        tenant: tenant.to_string(),
                        sampler_id: id.clone(),
                    },
                    source,
                )?;
            }
            id
        }
    };
    let prompt = body.prompt.tokens("prompt")?;
    let work = Work::Sample {
        prompt,
        num_samples: body.num_samples,
        params: body.sampling_params.into_params(),
        prompt_logprobs: body.prompt_logprobs,
    };
    let queue = QueueKey::Sampler(SamplerKey {
        tenant: tenant.to_string(),
        sampler_id,
    });
    let id = state.engine.submit(queue, work)?;
    Ok((id, body.num_samples))
}

async fn asample(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SampleRequest>,
) -> ApiResult<Json<Promise>> {
    let (id, n) = submit_sample(&state, &tenant, body)?;
    let sequence_ids = (0..n.max(0)).map(|i| format!("{id}:{i}")).collect();
    Ok(Json(Promise {
        request_id: id,
        model_id: None,
        sample_sequence_ids: Some(sequence_ids),
    }))
}

/// The seed's synchronous sampling route: waits for the result and answers JSON.
async fn sample_sync(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SampleRequest>,
) -> ApiResult<Response> {
    let (id, _) = submit_sample(&state, &tenant, body)?;
    loop {
        match state
            .engine
            .wait(&tenant, &id, Duration::from_secs(60))
            .await?
        {
            FutureState::Done(loraloom_engine::Output::Sample(out)) => {
                return Ok(Json(sample_json(&out)).into_response())
            }
            FutureState::Done(_) => {
                return Err(ApiError::Engine(EngineError::Internal(
                    "unexpected result".into(),
                )))
            }
            FutureState::Failed(e) => return Err(e.into()),
            FutureState::Queued | FutureState::Running => continue,
        }
    }
}

#[derive(Deserialize)]
struct FutureRef {
    request_id: String,
}

async fn retrieve_future(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    JsonBody(body): JsonBody<FutureRef>,
) -> ApiResult<Response> {
    let proto_ok = accepts_protobuf(&headers);
    let state_now = state
        .engine
        .wait(&tenant, &body.request_id, state.long_poll)
        .await?;
    Ok(match state_now {
        FutureState::Done(out) => output_response(&out, proto_ok),
        FutureState::Failed(e) => {
            let category = if e.is_user_error() { "user" } else { "server" };
            let err = ApiError::from(e);
            let mut body = err.body();
            body["category"] = json!(category);
            Json(body).into_response()
        }
        FutureState::Queued | FutureState::Running => Json(json!({
            "type": "try_again",
            "request_id": body.request_id,
            "queue_state": "active",
        }))
        .into_response(),
    })
}

async fn cancel_future(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<FutureRef>,
) -> ApiResult<Json<Value>> {
    let cancelled = state.engine.cancel(&tenant, &body.request_id)?;
    Ok(Json(
        json!({"request_id": body.request_id, "cancelled": cancelled}),
    ))
}

#[derive(Deserialize)]
struct Page {
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    offset: usize,
}

fn default_limit() -> usize {
    20
}

fn iso(t: f64) -> String {
    let secs = t as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn checkpoint_json(c: &CheckpointRecord) -> Value {
    json!({
        "checkpoint_id": format!("{}/{}", c.kind.segment(), c.name),
        "checkpoint_type": match c.kind { CheckpointKind::State => "training", CheckpointKind::Sampler => "sampler" },
        "time": iso(c.created),
        "tinker_path": c.path,
        "size_bytes": c.size_bytes,
        "public": false,
        "user_metadata": c.user_metadata,
        "expires_at": c.expires_at.map(iso),
    })
}

fn run_json(
    state: &AppState,
    tenant: &str,
    entry: &loraloom_engine::registry::ModelEntry,
) -> Value {
    let checkpoints = state
        .engine
        .registry()
        .checkpoints_of(tenant, Some(&entry.key.model_id));
    let last = |kind| {
        checkpoints
            .iter()
            .rev()
            .find(|c| c.kind == kind)
            .map(checkpoint_json)
    };
    json!({
        "training_run_id": entry.key.model_id,
        "base_model": entry.base_model,
        "model_owner": tenant,
        "is_lora": true,
        "corrupted": false,
        "lora_rank": entry.spec.rank,
        "last_request_time": iso(entry.last_access()),
        "last_checkpoint": last(CheckpointKind::State),
        "last_sampler_checkpoint": last(CheckpointKind::Sampler),
        "user_metadata": string_map(&entry.user_metadata),
    })
}

fn string_map(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        Value::String(v.as_str().map_or_else(|| v.to_string(), str::to_string)),
                    )
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

async fn list_runs(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonQuery(page): JsonQuery<Page>,
) -> Json<Value> {
    let runs = state.engine.registry().models_of(&tenant);
    let total = runs.len();
    let items: Vec<Value> = runs
        .iter()
        .skip(page.offset)
        .take(page.limit)
        .map(|e| run_json(&state, &tenant, e))
        .collect();
    Json(
        json!({"training_runs": items, "cursor": {"offset": page.offset, "limit": page.limit, "total_count": total}}),
    )
}

async fn get_run(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let entry = state.engine.registry().model(&tenant, &id)?;
    Ok(Json(run_json(&state, &tenant, &entry)))
}

async fn list_run_checkpoints(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let checkpoints = state.engine.registry().checkpoints_of(&tenant, Some(&id));
    if checkpoints.is_empty() {
        state.engine.registry().model(&tenant, &id)?;
    }
    let items: Vec<Value> = checkpoints.iter().map(checkpoint_json).collect();
    Ok(Json(json!({"checkpoints": items})))
}

/// `RestClient.delete_checkpoint(run, "weights/NAME")` (and `..._from_tinker_path`).
async fn delete_checkpoint(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, kind, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let path = format!("tinker://{id}/{kind}/{name}");
    state.engine.registry().remove_checkpoint(&tenant, &path)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct TtlRequest {
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

/// `set_checkpoint_ttl_from_tinker_path`: the checkpoint expires `ttl_seconds` from now, or
/// never with `null`.
async fn set_checkpoint_ttl(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, kind, name)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<TtlRequest>,
) -> ApiResult<Json<Value>> {
    let path = format!("tinker://{id}/{kind}/{name}");
    state
        .engine
        .set_checkpoint_ttl(&tenant, &path, body.ttl_seconds)?;
    Ok(Json(json!({})))
}

async fn list_checkpoints(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonQuery(page): JsonQuery<Page>,
) -> Json<Value> {
    // Newest first, as the SDK documents `list_user_checkpoints`.
    let all = state.engine.registry().checkpoints_of(&tenant, None);
    let total = all.len();
    let items: Vec<Value> = all
        .iter()
        .rev()
        .skip(page.offset)
        .take(page.limit.max(1))
        .map(checkpoint_json)
        .collect();
    Json(
        json!({"checkpoints": items, "cursor": {"offset": page.offset, "limit": page.limit, "total_count": total}}),
    )
}

#[derive(Deserialize)]
struct WeightsInfoRequest {
    tinker_path: String,
}

async fn weights_info(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<WeightsInfoRequest>,
) -> ApiResult<Json<Value>> {
    let c = state
        .engine
        .registry()
        .checkpoint(&tenant, &body.tinker_path)?;
    Ok(Json(json!({
        "base_model": state.engine.base().name,
        "is_lora": true,
        "lora_rank": c.spec.rank,
        "train_unembed": c.spec.train_unembed,
        "train_mlp": c.spec.train_mlp,
        "train_attn": c.spec.train_attn,
    })))
}

#[cfg(test)]
mod tests {
    use super::iso;

    #[test]
    fn iso_dates() {
        assert_eq!(iso(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_764_072_000.0), "2025-11-25T12:00:00Z");
    }
}
